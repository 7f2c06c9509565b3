"""podman, skopeo and CRI-O's side of ``mirrorproxy doctor``: registries.conf and drop-ins.

containers/image reads one main file, then every ``*.conf`` of the drop-in
directories in name order; a later ``[[registry]]`` with the same prefix replaces an
earlier one whole. A file that does not parse, or a drop-in in the old v1 format,
makes every pull fail. This module follows those rules, then checks that each
namespace's registry has the mirror, with the namespace as its path, as a mirror.
It only reads files.
"""

from __future__ import annotations

import tomllib
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirrorproxy.clientconf.findings import Finding
from mirrorproxy.clientconf.registriesconf import DROP_IN_DIR, DROP_IN_NAME, GENERATED_MARK

MAIN_FILE = Path("/etc/containers/registries.conf")
USER_FILE = Path(".config/containers/registries.conf")  # under $HOME
V1_KEY = "registries"  # [registries.search] and friends: the v1 format
REGEN = f"run: mirrorproxy hosts --config FILE --format registries-conf --out {{}}/{DROP_IN_NAME}"


@dataclass(frozen=True, slots=True)
class Sources:
    """The files containers/image reads, in order: the main file, then drop-in dirs."""

    main: Path
    dirs: tuple[Path, ...]
    required: bool = False  # named by CONTAINERS_REGISTRIES_CONF: missing fails pulls
    via: str = ""  # how the main file was chosen, for messages

    @classmethod
    def choose(cls, *, flag: Path | None, env_path: str | None, home: Path | None) -> Sources:
        """Pick the files the way containers/image does for a user with ``home``.

        ``flag`` (doctor's --registries-conf) reads that file and ``<file>.d``, as for
        a node root mounted elsewhere. CONTAINERS_REGISTRIES_CONF replaces only the
        main file; the drop-in directories stay. A user's own registries.conf replaces
        the system files and directory.
        """
        if flag is not None:
            return cls(flag, (Path(f"{flag}.d"),), via="--registries-conf")
        user_dirs = (home / f"{USER_FILE}.d",) if home is not None else ()
        system_dirs = (Path(DROP_IN_DIR), *user_dirs)
        if env_path:
            return cls(
                Path(env_path), system_dirs, required=True, via="CONTAINERS_REGISTRIES_CONF"
            )
        if home is not None and (home / USER_FILE).is_file():
            return cls(home / USER_FILE, user_dirs)
        return cls(MAIN_FILE, system_dirs)


@dataclass(frozen=True, slots=True)
class Registry:
    """One effective ``[[registry]]`` table and the file it came from."""

    prefix: str
    table: dict[str, Any]
    source: Path
    order: int  # position of ``source`` in load order


@dataclass
class RegistriesConf:
    files: list[Path] = field(default_factory=list)  # read, in load order
    registries: dict[str, Registry] = field(default_factory=dict)  # by prefix
    generated: int | None = None  # load position of mirrorproxy's drop-in, if any


def load_registries_conf(sources: Sources) -> tuple[RegistriesConf | None, list[Finding]]:
    """Read and merge the files; None (no finding) when none of them exists."""
    paths = [sources.main] if sources.main.is_file() else []
    for directory in sources.dirs:
        if directory.is_dir():
            paths += sorted(p for p in directory.glob("*.conf") if p.is_file())
    findings = []
    if sources.required and not sources.main.is_file():
        problem = f"{sources.main} ({sources.via}) does not exist: every pull fails"
        findings.append(Finding(problem, "create it or unset CONTAINERS_REGISTRIES_CONF"))
    if not paths:
        return None, findings
    conf = RegistriesConf()
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            why = f"cannot read it ({err.strerror})" if isinstance(err, OSError) else "not TOML"
            problem = f"{path}: {why}; podman, skopeo and CRI-O fail every pull"
            findings.append(Finding(problem, f"repair or remove {path}"))
            continue
        drop_in = path != sources.main
        if data.get(V1_KEY) is not None and (drop_in or data.get("registry") is not None):
            what = "a drop-in in the v1 format" if drop_in else "v1 and v2 formats mixed"
            problem = f"{path}: {what} ([registries.*]); every pull fails"
            findings.append(Finding(problem, "use [[registry]] tables only"))
            continue
        order = len(conf.files)
        conf.files.append(path)
        if GENERATED_MARK in text and conf.generated is None:
            conf.generated = order
        tables = data.get("registry")
        for table in tables if isinstance(tables, list) else []:
            if isinstance(table, dict):
                prefix = str(table.get("prefix") or table.get("location") or "").rstrip("/")
                conf.registries[prefix] = Registry(prefix, table, path, order)
    return conf, findings


def find_registry(conf: RegistriesConf, registry: str) -> Registry | None:
    """Return the table that governs pulls from ``registry``: its own, else a ``*.`` one."""
    exact = conf.registries.get(registry)
    if exact is not None:
        return exact
    wild = [
        r for p, r in conf.registries.items() if p.startswith("*.") and registry.endswith(p[1:])
    ]
    return max(wild, key=lambda r: len(r.prefix), default=None)


def mirror_hosts(conf: RegistriesConf) -> dict[str, bool]:
    """Return {mirror host: insecure} for mirrors whose path is their registry's name.

    Those are mirrors in mirrorproxy's layout; doctor guesses the mirror from them
    when it is not told.
    """
    out: dict[str, bool] = {}
    for reg in conf.registries.values():
        for mirror in _mirrors(reg):
            host, _, path = str(mirror.get("location", "")).partition("/")
            if path.rstrip("/") == reg.prefix:
                out[host.lower()] = out.get(host.lower(), True) and mirror.get("insecure") is True
    return out


def uses_mirror(conf: RegistriesConf, mirror_url: str) -> bool:
    """Whether any registry has a mirror on the mirror's host (someone meant to use it)."""
    host = _netloc(mirror_url)
    return any(_has_mirror(r, host) for r in conf.registries.values())


def check_registries_conf(
    conf: RegistriesConf, *, mirror_url: str, namespaces: Sequence[str] | None
) -> list[Finding]:
    """Check that each namespace's registry tries the mirror, in mirrorproxy's layout.

    ``namespaces`` are the mirror's path-routable namespaces; None when the mirror's
    config is unknown, and then every registry that has the mirror is checked.
    """
    host = _netloc(mirror_url)
    if namespaces is None:
        namespaces = [p for p, r in conf.registries.items() if _has_mirror(r, host)]
        if not namespaces:
            where = ", ".join(map(str, conf.files))
            problem = f"no [[registry]] in {where} has the mirror {host} as a mirror"
            return [Finding(problem, REGEN.format(DROP_IN_DIR))]
    findings = []
    for name in namespaces:
        reg = find_registry(conf, name)
        if reg is None:
            where = ", ".join(map(str, conf.files))
            problem = f"no [[registry]] for {name} in {where}: podman and CRI-O pull it directly"
            findings.append(Finding(problem, REGEN.format(DROP_IN_DIR)))
        elif reg.table.get("blocked") is not True:
            findings += _check_entry(conf, reg, name, host, mirror_url)
    return findings


def _check_entry(
    conf: RegistriesConf, reg: Registry, name: str, host: str, mirror_url: str
) -> list[Finding]:
    """Check one registry's mirror list and its digest-only switches."""
    where = f'{reg.source}: [[registry]] prefix "{reg.prefix}"'
    # A table from a file read after mirrorproxy's drop-in overrides it: edit that one.
    fix_file = conf.generated is not None and reg.order > conf.generated
    regen = f"edit {reg.source}" if fix_file else REGEN.format(DROP_IN_DIR)
    want = f"{host}/{name}"
    mirrors = [m for m in _mirrors(reg) if _netloc_of(m) == host]
    if not mirrors:
        return [Finding(f"{where} has no mirror at {host}; pulls of {name} skip it", regen)]
    findings = []
    mirror = next((m for m in mirrors if _path_of(m) == name), None)
    if mirror is None:
        got = mirrors[0].get("location")
        problem = f'{where}: mirror "{got}" lacks the path /{name}, so the mirror cannot tell '
        problem += "the registry and serves its default_namespace"
        return [Finding(problem, f'set location = "{want}" in its [[registry.mirror]]')]
    if mirror_url.startswith("http://") and mirror.get("insecure") is not True:
        problem = f'{where}: mirror "{want}" is plain http but not insecure = true, so '
        problem += "pulls try https there and fall back to the registry"
        findings.append(Finding(problem, "add insecure = true to its [[registry.mirror]]"))
    if reg.table.get("mirror-by-digest-only") is True or mirror.get("pull-from-mirror") == (
        "digest-only"
    ):
        problem = f"{where}: the mirror is used for pulls by digest only; tags skip it"
        fix = 'remove mirror-by-digest-only / pull-from-mirror = "digest-only"'
        findings.append(Finding(problem, fix))
    return findings


def _has_mirror(reg: Registry, host: str) -> bool:
    return any(_netloc_of(m) == host for m in _mirrors(reg))


def _mirrors(reg: Registry) -> list[dict[str, Any]]:
    mirrors = reg.table.get("mirror")
    return [m for m in mirrors if isinstance(m, dict)] if isinstance(mirrors, list) else []


def _path_of(mirror: dict[str, Any]) -> str:
    return str(mirror.get("location", "")).partition("/")[2].rstrip("/")


def _netloc_of(mirror: dict[str, Any]) -> str:
    return str(mirror.get("location", "")).partition("/")[0].lower()


def _netloc(mirror_url: str) -> str:
    return urllib.parse.urlsplit(mirror_url).netloc.lower()
