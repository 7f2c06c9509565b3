"""``mirrorproxy doctor``: find the known ways a node ends up not using the mirror.

It runs containerd's checks (containerdcheck), podman/skopeo/CRI-O's registries.conf
checks (registriescheck), the proxy environment of containerd and CRI-O (proxycheck)
and one GET on the mirror, and joins their Findings. It never writes anything. Nothing
here reads the process environment: the command line passes in what it means.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from mirrorproxy.clientconf.containerdcheck import (
    REGEN,
    check_containerd_config,
    check_hosts_dir,
    load_containerd_config,
)
from mirrorproxy.clientconf.findings import Finding
from mirrorproxy.clientconf.hoststoml import default_mirror_url, normalize_mirror_url
from mirrorproxy.clientconf.proxycheck import (
    DAEMONS,
    UNIT_DIRS,
    check_daemon,
    read_unit_env,
    running,
    unit_files,
)
from mirrorproxy.clientconf.registriescheck import (
    RegistriesConf,
    Sources,
    check_registries_conf,
    load_registries_conf,
    mirror_hosts,
    uses_mirror,
)
from mirrorproxy.clientconf.registriesconf import path_problem
from mirrorproxy.config import Config

MIRROR_TIMEOUT = 3.0  # seconds; a node-local mirror that needs longer is not healthy


class DoctorError(Exception):
    """Arguments doctor cannot work with (the command line reports a usage error)."""


@dataclass
class _Report:
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # parts of the ok line


def check_mirror(mirror_url: str, *, timeout: float = MIRROR_TIMEOUT) -> Finding | None:
    """GET ``/v2/`` on the mirror, bypassing proxies: 200 or 401 is a registry answering."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    fix = "start it (systemctl start mirrorproxy, or its pod) or pass the right --mirror-url"
    try:
        with opener.open(mirror_url + "/v2/", timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as err:
        status = err.code
        err.close()
    except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        return Finding(f"the mirror {mirror_url} does not answer GET /v2/ ({reason})", fix)
    if status in (200, 401):
        return None
    return Finding(f"{mirror_url}/v2/ answers HTTP {status}: not a registry", fix)


def installed_containerd_version() -> tuple[int, int] | None:
    """Return (major, minor) of the containerd on PATH, or None."""
    exe = shutil.which("containerd")
    if exe is None:
        return None
    try:
        out = subprocess.run(  # noqa: S603 -- a fixed argv, no shell
            [exe, "--version"], capture_output=True, text=True, timeout=3, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\sv?(\d+)\.(\d+)\.\d+", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def run_doctor(
    *,
    containerd_config: Path,
    hosts_dir: Path | None,
    mirror_url: str | None,
    containerd_version: tuple[int, int] | None,
    timeout: float = MIRROR_TIMEOUT,
    registries: Sources | None = None,
    namespaces: Sequence[str] | None = None,
    systemd_dirs: Sequence[Path] = (),
    proc_dir: Path | None = None,
    probe: bool = True,
) -> tuple[list[Finding], str]:
    """Run every check; return the findings and the line to print if there are none.

    Args:
        registries: the registries.conf files to read; None skips podman/CRI-O.
        namespaces: the mirror's path-routable namespaces, when its config is known.
        systemd_dirs: unit directories to read daemons' environment from.
        proc_dir: where running daemons are found; None skips them.
        probe: send GET /v2/ to the mirror.
    """
    report = _Report()
    daemons = [
        (unit, name, read_unit_env(unit_files(unit, systemd_dirs)), running(proc_dir, name))
        for unit, name in DAEMONS
    ]
    conf, found = load_registries_conf(registries) if registries else (None, [])
    report.findings += found
    crio = any(env.files or procs for unit, _, env, procs in daemons if unit == "crio.service")
    containerd_absent = (
        conf is not None
        and containerd_version is None
        and not containerd_config.exists()
        and not any(
            env.files or procs for u, _, env, procs in daemons if u == "containerd.service"
        )
    )
    files: list[list[str]] = []
    if containerd_absent:
        report.notes.append(f"no containerd ({containerd_config} absent)")
    else:
        files = _containerd(report, containerd_config, hosts_dir, mirror_url, containerd_version)
    mirror = mirror_url or _common_first_host(files) or (_guess(conf) if conf else None)
    if registries is not None:
        wanted = crio or containerd_absent or bool(registries.via)
        _containers(report, registries, conf, mirror, namespaces, wanted=wanted)
    if mirror is not None:
        first_dir = systemd_dirs[0] if systemd_dirs else UNIT_DIRS[0]
        for unit, name, env, procs in daemons:
            report.findings += check_daemon(unit, name, env, procs, mirror, first_dir)
        if probe and (problem := check_mirror(mirror, timeout=timeout)):
            report.findings.append(problem)
        report.notes.append(f"mirror {mirror} answers /v2/" if probe else f"mirror {mirror}")
    return report.findings, "ok: " + "; ".join(report.notes)


def doctor_command(
    *,
    config: Config | None,
    containerd_config: Path,
    hosts_dir: Path | None,
    mirror_url: str | None,
    registries_conf: Path | None,
    environ: Mapping[str, str],
    systemd_dirs: Sequence[Path] | None,
    proc_dir: Path | None,
    stdout: TextIO,
) -> bool:
    """Run ``mirrorproxy doctor``: one line per finding, or a single ``ok`` line.

    ``config`` is the mirror's, when given: its namespaces are checked in
    registries.conf and its listen address is the default mirror URL. ``environ``
    holds HOME and CONTAINERS_REGISTRIES_CONF, which decide what podman reads.
    Returns True when there was nothing to report.

    Raises:
        DoctorError: the mirror URL is not one a client could use.
    """
    try:
        mirror = normalize_mirror_url(mirror_url) if mirror_url else None
    except ValueError as err:
        raise DoctorError(f"--mirror-url: {err}") from None
    if mirror is None and config is not None:
        mirror = default_mirror_url(config.server)
    home = environ.get("HOME")
    registries = Sources.choose(
        flag=registries_conf,
        env_path=environ.get("CONTAINERS_REGISTRIES_CONF"),
        home=Path(home) if home else None,
    )
    findings, summary = run_doctor(
        containerd_config=containerd_config,
        hosts_dir=hosts_dir,
        mirror_url=mirror,
        containerd_version=installed_containerd_version(),
        registries=registries,
        namespaces=[n for n in config.namespaces if path_problem(n) is None] if config else None,
        systemd_dirs=UNIT_DIRS if systemd_dirs is None else systemd_dirs,
        proc_dir=proc_dir,
    )
    for finding in findings:
        stdout.write(finding.line() + "\n")
    if not findings:
        stdout.write(summary + "\n")
    return not findings


def _containerd(
    report: _Report,
    config: Path,
    hosts_dir: Path | None,
    mirror_url: str | None,
    version: tuple[int, int] | None,
) -> list[list[str]]:
    """Check config.toml and the hosts.toml files; return each file's [host] URLs."""
    data, findings = load_containerd_config(config)
    settings = None
    if data is not None or not findings:  # a file that does not load has nothing to check
        settings, found = check_containerd_config(
            data, source=str(config), containerd_version=version
        )
        findings += found
    roots = [Path(p) for p in settings.config_path] if settings else []
    if hosts_dir is not None:
        if settings and roots and not any(_same_path(hosts_dir, r) for r in roots):
            cp = ":".join(settings.config_path)
            problem = f"{config}: config_path {cp} does not include {hosts_dir}"
            fix = f'set config_path = "{hosts_dir}" in [{settings.table}]'
            findings.append(Finding(problem, fix))
        roots = [hosts_dir]
    elif roots and not any(r.is_dir() for r in roots):
        findings.append(
            Finding(f"{roots[0]} (config_path) does not exist", REGEN.format(roots[0]))
        )
        roots = []
    else:
        roots = [r for r in roots if r.is_dir()]
    files: list[list[str]] = []
    for root in roots:
        found, hosts = check_hosts_dir(root, mirror_url)
        findings += found
        files += hosts
    note = str(config)
    if settings:
        note += f" (version {settings.version}, config_path {':'.join(settings.config_path)})"
    if roots:
        note += f"; {len(files)} hosts.toml in {', '.join(map(str, roots))}"
    report.findings += findings
    report.notes.append(note)
    return files


def _containers(
    report: _Report,
    sources: Sources,
    conf: RegistriesConf | None,
    mirror: str | None,
    namespaces: Sequence[str] | None,
    *,
    wanted: bool,
) -> None:
    """Check registries.conf when this is a podman/CRI-O node or the files use the mirror."""
    if conf is None:
        report.notes.append(f"no {sources.main} (podman, CRI-O)")
        return
    count = f"{len(conf.files)} registries.conf files"
    if mirror is None:
        report.notes.append(f"{count}; no mirror known to check them against")
        return
    if wanted or uses_mirror(conf, mirror):
        report.findings += check_registries_conf(conf, mirror_url=mirror, namespaces=namespaces)
        report.notes.append(f"{count} send pulls to the mirror")
    else:
        report.notes.append(f"{count}, none naming the mirror (podman pulls directly)")


def _guess(conf: RegistriesConf) -> str | None:
    """The mirror, when every mirror in mirrorproxy's layout names the same host."""
    hosts = mirror_hosts(conf)
    if len(hosts) != 1:
        return None
    host, insecure = hosts.popitem()
    return f"{'http' if insecure else 'https'}://{host}"


def _common_first_host(files: list[list[str]]) -> str | None:
    """Return the mirror when every hosts.toml names the same first [host], else None."""
    firsts = {hosts[0] for hosts in files if hosts}
    if len(firsts) != 1 or not all(files):
        return None
    first = firsts.pop()
    try:
        url = normalize_mirror_url(first if first.startswith("http") else "https://" + first)
    except ValueError:
        return None
    return url.removesuffix("/v2")  # containerd adds /v2 itself; check_mirror does too


def _same_path(a: Path, b: Path) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))
