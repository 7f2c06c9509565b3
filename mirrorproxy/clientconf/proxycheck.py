"""Does a daemon's proxy environment send its requests for the mirror to a proxy?

containerd (and CRI-O) fetch images themselves, with the proxy settings of their own
environment. Go never proxies loopback, so a node-local mirror is safe; a site mirror
(``http://10.0.0.5:5000``) goes to the corporate proxy unless ``NO_PROXY`` covers it,
and fails there. Two places hold that environment: the systemd unit with its drop-ins
(what the next start uses) and ``/proc/<pid>/environ`` of the running daemon (what it
uses now). This module reads both and never writes.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mirrorproxy.clientconf.findings import Finding
from mirrorproxy.clientconf.proxyenv import ProxyEnv

# systemd's unit search path for the system manager, highest priority first.
UNIT_DIRS = (
    Path("/etc/systemd/system"),
    Path("/run/systemd/system"),
    Path("/usr/local/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
    Path("/lib/systemd/system"),
)
DROP_IN = "http-proxy.conf"  # the name Docker's and containerd's docs use
# Daemons that pull images themselves: (systemd unit, process name).
DAEMONS = (("containerd.service", "containerd"), ("crio.service", "crio"))
Procs = list[tuple[int, dict[str, str] | None]]  # (pid, environment or None if unreadable)


@dataclass(frozen=True, slots=True)
class UnitEnv:
    """The environment a unit starts with: {name: (value, file that set it)}."""

    files: tuple[Path, ...]  # unit file and drop-ins, in the order systemd applies them
    env: dict[str, tuple[str, Path]]
    unreadable: tuple[Path, ...] = ()  # EnvironmentFile= files we could not read


def unit_files(unit: str, dirs: Sequence[Path]) -> tuple[Path, ...]:
    """Return the unit file and its ``*.conf`` drop-ins, in systemd's order.

    The unit file is the first one found; drop-ins come from every directory, sorted
    by name, a name in an earlier directory hiding the same name in later ones.
    """
    main = next((d / unit for d in dirs if (d / unit).is_file()), None)
    drop_ins: dict[str, Path] = {}
    for d in dirs:
        for path in sorted((d / f"{unit}.d").glob("*.conf")):
            drop_ins.setdefault(path.name, path)
    ordered = [drop_ins[name] for name in sorted(drop_ins)]
    return tuple([main, *ordered] if main is not None else ordered)


def read_unit_env(files: Sequence[Path]) -> UnitEnv:
    """Apply Environment= and EnvironmentFile= of [Service] the way systemd does.

    An empty assignment resets the list; EnvironmentFile= settings win over
    Environment=. Values are split like a shell would (systemd's quoting is close).
    """
    assignments: list[tuple[str, str, Path]] = []
    env_files: list[tuple[str, Path]] = []
    for path in files:
        for key, value in _service_lines(path):
            if key == "Environment":
                if not value:
                    assignments.clear()
                for word in _split(value):
                    name, sep, val = word.partition("=")
                    if sep and name:
                        assignments.append((name, val, path))
            elif key == "EnvironmentFile":
                if not value:
                    env_files.clear()
                else:
                    env_files.append((value, path))
    env = {name: (val, path) for name, val, path in assignments}
    unreadable = []
    for spec, _unit in env_files:
        optional = spec.startswith("-")
        target = Path(spec.lstrip("-"))
        try:
            text = target.read_text(encoding="utf-8", errors="replace")
        except OSError:
            if not optional:
                unreadable.append(target)
            continue
        for name, val in _env_file(text):
            env[name] = (val, target)
    return UnitEnv(tuple(files), env, tuple(unreadable))


def running_envs(proc: Path, name: str) -> Iterator[tuple[int, dict[str, str] | None]]:
    """Yield (pid, environment) of each process called ``name``; None if unreadable."""
    for entry in sorted(proc.iterdir(), key=lambda p: (len(p.name), p.name)):
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            continue  # gone, or not a process directory
        if comm != name:
            continue
        try:
            raw = (entry / "environ").read_bytes()
        except OSError:
            yield int(entry.name), None
            continue
        pairs = (item.decode("utf-8", "replace").partition("=") for item in raw.split(b"\0"))
        yield int(entry.name), {k: v for k, sep, v in pairs if sep and k}


def running(proc: Path | None, name: str) -> Procs:
    """Return the processes called ``name`` under ``proc`` (None: do not look)."""
    if proc is None or not proc.is_dir():
        return []
    return list(running_envs(proc, name))


def check_daemon(
    unit: str, name: str, env: UnitEnv, procs: Procs, mirror_url: str, first_dir: Path
) -> list[Finding]:
    """Check a daemon's unit files and running processes for a proxy the mirror hits.

    ``first_dir`` is where a new drop-in goes (systemd's /etc/systemd/system).
    """
    findings = [
        Finding(f"{unit}: EnvironmentFile {path} cannot be read", "run doctor as root")
        for path in env.unreadable
    ]
    unit_problem = check_unit_proxy(unit, mirror_url, env, first_dir) if env.files else None
    if unit_problem is not None:
        findings.append(unit_problem)
    fixed_unit = unit if env.files and unit_problem is None else None
    for pid, environ in procs:
        found = check_running_proxy(name, pid, environ, mirror_url, unit=fixed_unit)
        if found is not None:
            findings.append(found)
    return findings


def check_unit_proxy(
    unit: str, mirror_url: str, unit_env: UnitEnv, first_dir: Path
) -> Finding | None:
    """A finding when the unit's environment proxies requests for the mirror."""
    values = {name: value for name, (value, _) in unit_env.env.items()}
    penv = ProxyEnv.from_environ(values)
    used = penv.proxy_for(mirror_url)
    if used is None:
        return None
    var, proxy = used
    no_proxy_var, no_proxy = penv.no_proxy
    source = unit_env.env[var][1]
    edit = unit_env.env[no_proxy_var][1] if no_proxy else source
    if edit.name == unit:  # the unit file itself may be the vendor's: use a drop-in
        edit = first_dir / f"{unit}.d" / DROP_IN
    host = _host(mirror_url)
    new = f"{no_proxy},{host}" if no_proxy else host
    line = (
        f"{no_proxy_var}={new}"
        if edit.suffix != ".conf"
        else f'Environment="{no_proxy_var}={new}"'
    )
    problem = (
        f"{unit}: {var}={proxy} (from {source}) also carries requests for the mirror {host}: "
        f"{no_proxy_var} ({no_proxy or 'unset'}) does not cover it"
    )
    fix = f"set {line} in {edit}, then systemctl daemon-reload; systemctl restart {unit}"
    return Finding(problem, fix)


def check_running_proxy(
    name: str, pid: int, env: dict[str, str] | None, mirror_url: str, *, unit: str | None
) -> Finding | None:
    """A finding when the running daemon proxies requests for the mirror.

    ``unit`` is the systemd unit whose files already leave the mirror direct, if any:
    then a restart is the fix.
    """
    if env is None:
        return Finding(f"cannot read /proc/{pid}/environ of {name}", "run doctor as root")
    used = ProxyEnv.from_environ(env).proxy_for(mirror_url)
    if used is None:
        return None
    var, proxy = used
    problem = f"the running {name} (pid {pid}) has {var}={proxy}, which carries its requests "
    problem += f"for the mirror {_host(mirror_url)}"
    fix = (
        f"systemctl restart {unit} (its unit files already leave the mirror direct)"
        if unit is not None
        else f"add the mirror's host to NO_PROXY where {name} is started, then restart it"
    )
    return Finding(problem, fix)


def _service_lines(path: Path) -> Iterator[tuple[str, str]]:
    """Yield (key, value) of the [Service] section, continuation lines joined."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            yield key.strip(), value.strip()


def _env_file(text: str) -> Iterator[tuple[str, str]]:
    """Yield NAME=VALUE lines of an EnvironmentFile=, with shell-like quoting."""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        line = line.removeprefix("export ").strip()
        name, sep, value = line.partition("=")
        if sep and name.strip():
            words = _split(value.strip())
            yield name.strip(), " ".join(words) if words else ""


def _split(value: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError:  # an unbalanced quote: systemd ignores such a line too
        return []


def _host(mirror_url: str) -> str:
    return urlsplit(mirror_url).hostname or mirror_url
