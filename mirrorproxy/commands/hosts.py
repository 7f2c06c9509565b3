"""``mirrorproxy hosts``: render the client configuration in one format; write or print it.

Formats: containerd's hosts.toml files, k3s's registries.yaml, a registries.conf
drop-in (podman, skopeo, CRI-O) and Docker's daemon.json entry. This module knows no
argparse and no exit codes: a failure is a HostsError, which the command line turns
into one line and an exit status.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from mirrorproxy.clientconf.hoststoml import (
    HOSTS_FILE,
    WriteResult,
    default_mirror_url,
    normalize_mirror_url,
    render_all,
    write_generated,
    write_hosts_files,
)
from mirrorproxy.commands.errors import EXIT_FAIL, EXIT_USAGE, CliError
from mirrorproxy.config import Config, load_config

FORMATS = ("containerd", "k3s", "registries-conf", "docker")
# Where a private CA goes for clients that take no CA path in their mirror settings.
_CA_DIRS = {"registries-conf": "/etc/containers/certs.d", "docker": "/etc/docker/certs.d"}


class HostsError(Exception):
    """A failure of ``hosts``; ``usage`` when the arguments were wrong."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def run(args: argparse.Namespace) -> int:
    """The ``hosts`` verb: render or write the client configuration the flags ask for."""
    try:
        return hosts_command(
            load_config(args.config),
            out_dir=args.out,
            mirror_url=args.mirror_url,
            fmt=args.fmt,
            dry_run=args.dry_run,
            stdout=sys.stdout,
            stderr=sys.stderr,
            ca=str(args.ca.absolute()) if args.ca is not None else None,
            auth=_credentials(args.auth_user, args.auth_password_file),
        )
    except HostsError as err:
        raise CliError(str(err), EXIT_USAGE if err.usage else EXIT_FAIL) from None


def _credentials(user: str | None, password_file: Path | None) -> tuple[str, str] | None:
    """The node's login to the mirror, from ``--auth-user`` and ``--auth-password-file``.

    Raises:
        HostsError: only one of the two given, or the file cannot be read.
    """
    if user is None and password_file is None:
        return None
    if user is None or password_file is None:
        raise HostsError("--auth-user and --auth-password-file go together", usage=True)
    try:
        password = password_file.read_text().strip()
    except OSError as err:
        raise HostsError(f"--auth-password-file {password_file}: {err.strerror}") from None
    if not password:
        raise HostsError(f"--auth-password-file {password_file}: the file is empty", usage=True)
    return user, password


def hosts_command(
    config: Config,
    *,
    out_dir: Path | None,
    mirror_url: str | None,
    fmt: str,
    dry_run: bool,
    stdout: TextIO,
    stderr: TextIO | None = None,
    ca: str | None = None,
    auth: tuple[str, str] | None = None,
) -> int:
    """Run ``mirrorproxy hosts``: write (or print) the files that point clients here.

    ``out_dir`` is the certs.d directory for containerd and the drop-in file for
    registries-conf. ``ca`` is the CA file containerd or k3s should trust for an
    https mirror. Returns 0.

    Raises:
        HostsError: bad arguments, or a file could not be written.
    """
    try:
        url = normalize_mirror_url(mirror_url) if mirror_url else default_mirror_url(config.server)
    except ValueError as err:
        raise HostsError(f"--mirror-url: {err}", usage=True) from None
    if fmt not in FORMATS:
        raise HostsError(f"unknown --format {fmt!r} (use {', '.join(FORMATS)})", usage=True)
    if ca is not None and not url.startswith("https://"):
        raise HostsError(f"--ca only applies to an https:// mirror URL, not {url}", usage=True)
    if ca is not None and fmt in _CA_DIRS:
        where = f"{_CA_DIRS[fmt]}/{url.split('://', 1)[1]}/ca.crt"
        raise HostsError(f"--ca is not for --format {fmt}: put the CA in {where}", usage=True)
    if auth is not None and fmt != "k3s":
        raise HostsError(
            f"--auth-user is for --format k3s; {fmt} clients log in themselves "
            "(see the README's Client authentication)",
            usage=True,
        )
    if fmt == "containerd":
        _containerd(config, url, out_dir=out_dir, dry_run=dry_run, stdout=stdout, ca=ca)
    elif fmt == "k3s":
        _print_only(fmt, out_dir, "/etc/rancher/k3s/registries.yaml")
        from mirrorproxy.clientconf.k3s import render_registries_yaml

        stdout.write(render_registries_yaml(config, url, ca=ca, auth=auth))
    elif fmt == "registries-conf":
        _registries_conf(config, url, out=out_dir, dry_run=dry_run, stdout=stdout)
    else:
        _print_only(fmt, out_dir, "/etc/docker/daemon.json (merge it with what is there)")
        _docker(config, url, stdout=stdout, stderr=stderr)
    return 0


def _print_only(fmt: str, out: Path | None, where: str) -> None:
    """Refuse ``--out`` for a format that is printed, and say where it belongs."""
    if out is not None:
        raise HostsError(
            f"--out is for --format containerd or registries-conf; for {fmt} redirect the "
            f"output to {where}",
            usage=True,
        )


def _containerd(
    config: Config,
    url: str,
    *,
    out_dir: Path | None,
    dry_run: bool,
    stdout: TextIO,
    ca: str | None,
) -> None:
    files = render_all(config, url, ca=ca)
    if dry_run:
        for name, text in files.items():
            shown = out_dir / name / HOSTS_FILE if out_dir else Path(name, HOSTS_FILE)
            stdout.write(f"# ----- {shown}\n{text}\n")
        return
    if out_dir is None:
        raise HostsError(
            "hosts: --out DIR is required (or --dry-run to print the files)", usage=True
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise HostsError(f"--out {out_dir}: not a directory", usage=True)
    try:
        results = write_hosts_files(out_dir, files)
    except OSError as err:
        raise HostsError(
            f"cannot write {err.filename or out_dir}: {err.strerror or err}"
        ) from None
    for r in results:
        _report(r, stdout)


def _registries_conf(
    config: Config, url: str, *, out: Path | None, dry_run: bool, stdout: TextIO
) -> None:
    from mirrorproxy.clientconf.registriesconf import (
        GENERATED_MARK,
        mirror_host,
        render_registries_conf,
    )

    try:
        mirror_host(url)
    except ValueError as err:
        raise HostsError(f"--format registries-conf: {err}", usage=True) from None
    try:
        text = render_registries_conf(config, url)
    except ValueError as err:
        raise HostsError(f"--format registries-conf: {err}") from None
    if out is None or dry_run:
        stdout.write(text)
        return
    if out.is_dir():
        raise HostsError(f"--out {out}: a directory; give the drop-in file's path", usage=True)
    try:
        out.parent.mkdir(mode=0o755, parents=True, exist_ok=True)  # a node without podman yet
        result = write_generated(out, text, mark=GENERATED_MARK)
    except OSError as err:
        raise HostsError(f"cannot write {err.filename or out}: {err.strerror or err}") from None
    _report(result, stdout)


def _docker(config: Config, url: str, *, stdout: TextIO, stderr: TextIO | None) -> None:
    from mirrorproxy.clientconf.dockerconf import docker_notice, render_daemon_json

    try:
        text = render_daemon_json(url)
    except ValueError as err:
        raise HostsError(f"--format docker: {err}", usage=True) from None
    stdout.write(text)
    notice, warning = docker_notice(config)
    if stderr is not None:
        stderr.write(f"mirrorproxy: {'warning' if warning else 'note'}: {notice}\n")


def _report(result: WriteResult, stdout: TextIO) -> None:
    if not result.changed:
        stdout.write(f"unchanged {result.path}\n")
    elif result.backup is not None:
        stdout.write(f"wrote {result.path} (the previous file is kept as {result.backup})\n")
    else:
        stdout.write(f"wrote {result.path}\n")
