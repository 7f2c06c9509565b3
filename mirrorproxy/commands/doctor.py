"""``mirrorproxy doctor``: the flags to ``clientconf.doctor``'s checks, and their verdict
to an exit code. The checks themselves live in ``clientconf``; this only wires them.
"""

from __future__ import annotations

import argparse
import os
import sys

from mirrorproxy.clientconf.doctor import DoctorError, doctor_command
from mirrorproxy.commands.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError
from mirrorproxy.config import load_config


def run(args: argparse.Namespace) -> int:
    """Check the node; exit 1 when a check finds a problem, 2 when it cannot look."""
    try:
        ok = doctor_command(
            config=load_config(args.config) if args.config is not None else None,
            containerd_config=args.containerd_config,
            hosts_dir=args.hosts_dir,
            mirror_url=args.mirror_url,
            registries_conf=args.registries_conf,
            environ={
                k: os.environ[k] for k in ("HOME", "CONTAINERS_REGISTRIES_CONF") if k in os.environ
            },
            systemd_dirs=args.systemd_dir,
            proc_dir=args.proc_dir,
            stdout=sys.stdout,
        )
    except DoctorError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    return EXIT_OK if ok else EXIT_FAIL
