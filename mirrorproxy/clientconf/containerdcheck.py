"""containerd's side of ``mirrorproxy doctor``: config.toml and the hosts.toml files.

The traps are containerd's own, seen on containerd 1.6: a plugin table spelled for
another config ``version`` is ignored or stops containerd, legacy ``registry.mirrors``
next to ``config_path`` stops the CRI plugin, and a hosts.toml that does not parse is
skipped with one log line. Checks return Findings; this module only reads files.
"""

from __future__ import annotations

import glob
import os
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirrorproxy.clientconf.findings import Finding
from mirrorproxy.clientconf.hoststoml import HOSTS_FILE

V1_CRI = "cri"  # version 1 files name plugins by ID
V2_CRI = "io.containerd.grpc.v1.cri"  # containerd 1.x, version 2
V3_IMAGES = "io.containerd.cri.v1.images"  # containerd 2.x, version 3
REGISTRY_PLUGIN = {1: V1_CRI, 2: V2_CRI, 3: V3_IMAGES}
# containerd 2.x's config_path when the file leaves it out.
V3_DEFAULT_CONFIG_PATH = ("/etc/containerd/certs.d", "/etc/docker/certs.d")
CAPABILITIES = {"pull", "resolve", "push"}
REGEN = "run: mirrorproxy hosts --config FILE --out {}"


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    """What containerd makes of config.toml's registry section."""

    version: int
    table: str  # where config_path belongs, spelled as in TOML
    config_path: tuple[str, ...]  # host directories containerd searches, in order
    explicit: bool  # config_path is in the file, not containerd 2.x's default


def load_containerd_config(path: Path) -> tuple[dict[str, Any] | None, list[Finding]]:
    """Parse config.toml plus its ``imports``; an import replaces whole plugin tables.

    Relative imports are read from the config's directory, which is what their author
    meant; a finding says that containerd itself looks elsewhere. Returns None (and no
    finding) for a missing file: what that means depends on the containerd version,
    which check_containerd_config decides.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, []
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else f"not valid TOML ({err})"
        return None, [Finding(f"{path}: {why}; containerd cannot load it", f"repair {path}")]
    findings = []
    imports = data.get("imports")
    for pattern in imports if isinstance(imports, list) else []:
        if not os.path.isabs(str(pattern)):
            problem = f'{path}: imports "{pattern}" is relative; containerd 1.6 resolves it from '
            fix = "make it absolute"
            findings.append(Finding(problem + "its working directory (/ under systemd)", fix))
        for name in sorted(glob.glob(os.path.join(path.parent, str(pattern)))):
            try:
                extra = tomllib.loads(Path(name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
                findings.append(Finding(f"{name} (imported by {path}): {err}", f"repair {name}"))
                continue
            if isinstance(extra.get("plugins"), dict):
                data.setdefault("plugins", {}).update(extra["plugins"])
    return data, findings


def check_containerd_config(
    data: dict[str, Any] | None, *, source: str, containerd_version: tuple[int, int] | None
) -> tuple[RegistrySettings | None, list[Finding]]:
    """Check plugin names, disabled_plugins, config_path and legacy registry settings.

    ``containerd_version`` is the (major, minor) of the containerd that reads the file,
    when known: 1.x reads a version 3 file with version 2 names, and 2.1+ has its own
    trap with config_path lists.
    """
    major = containerd_version[0] if containerd_version else None
    if data is None:  # no file: containerd runs on built-in defaults
        if major is not None and major >= 2:
            return _v3_settings({}, f"{source} (absent)", containerd_version)
        problem = f"{source} does not exist, so containerd 1.x runs without config_path"
        fix = f'create it: `version = 2`, [plugins."{V2_CRI}".registry] config_path = '
        return None, [Finding(problem, fix + '"/etc/containerd/certs.d"; restart containerd')]
    version = data.get("version", 1)
    if isinstance(version, bool) or version not in REGISTRY_PLUGIN:
        fix = "use version = 2 (containerd 1.x) or version = 3 (containerd 2.x)"
        return None, [Finding(f"{source}: unknown config version {version!r}", fix)]
    plugins = data.get("plugins")
    plugins = plugins if isinstance(plugins, dict) else {}
    if version == 3 and major == 1:
        version = 2  # containerd 1.x reads any later version with version 2's plugin names
    findings = _plugin_name_findings(plugins, version, source)
    disabled = data.get("disabled_plugins")
    for name in (V1_CRI, V2_CRI, V3_IMAGES):
        if isinstance(disabled, list) and name in disabled:
            problem = f'{source}: disabled_plugins has "{name}": kubelet\'s pulls never get here'
            fix = (
                f'remove "{name}" (Docker\'s containerd package ships it off); restart containerd'
            )
            findings.append(Finding(problem, fix))
    plugin = REGISTRY_PLUGIN[version]
    section = _table(plugins.get(plugin))
    registry = _table(section.get("registry"))
    if version == 3:
        settings, found = _v3_settings(section, source, containerd_version)
    else:
        table = f'plugins."{plugin}".registry' if version > 1 else f"plugins.{plugin}.registry"
        roots = _split_path_list(registry.get("config_path"))
        settings, found = RegistrySettings(version, table, roots, bool(roots)), []
        if not roots:
            problem = f"{source}: config_path is not set in [{table}], so hosts.toml is ignored"
            fix = f'add config_path = "/etc/containerd/certs.d" to [{table}]; restart containerd'
            found.append(Finding(problem, fix))
    findings += found + _legacy_findings(registry, settings.table, source, settings.explicit)
    return settings, findings


def _v3_settings(
    images: dict[str, Any], source: str, containerd_version: tuple[int, int] | None
) -> tuple[RegistrySettings, list[Finding]]:
    """Read config_path as containerd 2.x does, with its default and the 2.1 trap.

    From 2.1 the CRI plugin pulls through the transfer service unless told otherwise,
    and that path takes config_path as a single directory: the default two-directory
    list (or any list) then finds no hosts.toml at all (containerd issue 12415).
    """
    table = f'plugins."{V3_IMAGES}".registry'
    roots = _split_path_list(_table(images.get("registry")).get("config_path"))
    explicit = bool(roots)
    roots = roots or V3_DEFAULT_CONFIG_PATH
    local_pull = images.get("use_local_image_pull") is True
    local_pull = local_pull or images.get("discard_unpacked_layers") is True
    if len(roots) > 1 and not local_pull and (containerd_version or (2, 1)) >= (2, 1):
        where = f'config_path "{":".join(roots)}"' if explicit else "the default config_path"
        problem = (
            f"{source}: {where} lists several directories; containerd 2.1+ pulls through its "
            "transfer service, which takes it as one directory and finds no hosts.toml"
        )
        fix = f'set config_path = "/etc/containerd/certs.d" in [{table}]; restart containerd'
        return RegistrySettings(3, table, roots, explicit), [Finding(problem, fix)]
    return RegistrySettings(3, table, roots, explicit), []


def _plugin_name_findings(plugins: dict[str, Any], version: int, source: str) -> list[Finding]:
    """Flag CRI plugin tables spelled for another config version."""
    right = f'[plugins."{REGISTRY_PLUGIN[version]}".registry]'
    out = []
    if version == 1:
        for name in (V2_CRI, V3_IMAGES):
            if name in plugins:
                problem = (
                    f'{source}: [plugins."{name}"] needs `version = 2` or 3, so it is ignored'
                )
                fix = "put `version = 2` (containerd 1.x) or `version = 3` (2.x) at the top"
                out.append(Finding(problem, fix))
        return out
    if V1_CRI in plugins:
        problem = f"{source}: [plugins.cri] is a version 1 name; containerd 1.6 refuses to start"
        out.append(Finding(problem, f"move its settings under {right}"))
    if version == 2 and V3_IMAGES in plugins:
        problem = f'{source}: [plugins."{V3_IMAGES}"] is containerd 2.x\'s; 1.x never reads it'
        out.append(Finding(problem, f"on containerd 1.x use {right} (and `version = 2`)"))
    if version == 3 and "registry" in _table(plugins.get(V2_CRI)):
        problem = f'{source}: [plugins."{V2_CRI}".registry] is ignored in a version 3 file'
        out.append(Finding(problem, f"move it to {right}"))
    return out


def _legacy_findings(
    registry: dict[str, Any], table: str, source: str, explicit: bool
) -> list[Finding]:
    """Flag the settings hosts.toml replaced: mirrors, configs.*.tls, auths."""
    out = []
    fatal = "next to config_path: containerd refuses to load the CRI plugin"
    if registry.get("mirrors"):
        what = fatal if explicit else "is deprecated (containerd 1.5+ reads hosts.toml)"
        fix = "delete it; `mirrorproxy hosts --out DIR` writes the same routing as hosts.toml"
        out.append(Finding(f"{source}: [{table}.mirrors] {what}", fix))
    configs = _table(registry.get("configs"))
    for name, entry in configs.items():
        if _table(entry).get("tls"):
            what = fatal if explicit else "is deprecated"
            fix = "move ca/client/skip_verify into that registry's hosts.toml"
            out.append(Finding(f'{source}: [{table}.configs."{name}".tls] {what}', fix))
    if registry.get("auths"):
        fix = "use imagePullSecrets (the CRI plugin hands them to a host that asks)"
        out.append(Finding(f"{source}: [{table}.auths] is deprecated since containerd 1.3", fix))
    return out


def check_hosts_toml(
    text: str, *, source: str, mirror_url: str | None
) -> tuple[list[Finding], list[str]]:
    """Check one hosts.toml as containerd 1.6 reads it; also return its [host] URLs."""
    regen = REGEN.format(Path(source).parent.parent)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        return [Finding(f"{source}: not valid TOML ({err}); containerd skips it", regen)], []
    hosts = data.get("host")
    if not isinstance(hosts, dict) or not hosts:
        problem = f'{source}: no [host."..."] table; containerd 1.6 rejects such a file'
        return [Finding(problem, regen)], []
    findings = []
    if not isinstance(data.get("server", ""), str):
        findings.append(Finding(f"{source}: `server` is not a string; containerd skips it", regen))
    for url, entry in hosts.items():
        caps = _table(entry).get("capabilities", [])
        if not isinstance(caps, list) or not {str(c).lower() for c in caps} <= CAPABILITIES:
            problem = f'{source}: [host."{url}"] capabilities {caps!r}; containerd skips the file'
            findings.append(Finding(problem, regen))
    if findings or mirror_url is None:  # containerd skips a file with findings so far
        return findings, list(hosts)
    match = next((u for u in hosts if _same_endpoint(u, mirror_url)), None)
    if match is None:
        problem = f"{source} does not send pulls to the mirror {mirror_url}"
        findings.append(Finding(problem, f"{regen} --mirror-url {mirror_url}"))
        return findings, list(hosts)
    caps = _table(hosts[match]).get("capabilities", sorted(CAPABILITIES))
    caps_set = {str(c).lower() for c in caps} if isinstance(caps, list) else set()
    if caps_set != {"pull", "resolve"}:
        problem = (
            f"{source}: the mirror may {'/'.join(sorted(caps_set)) or 'do nothing'}; tags resolve "
            "only on pull+resolve hosts and a pull-through mirror takes no pushes"
        )
        findings.append(
            Finding(problem, f'capabilities = ["pull", "resolve"] in [host."{match}"]')
        )
    return findings, list(hosts)


def check_hosts_dir(root: Path, mirror_url: str | None) -> tuple[list[Finding], list[list[str]]]:
    """Check every ``<root>/*/hosts.toml``; also return the [host] URLs of each file."""
    if not root.is_dir():
        return [Finding(f"{root} does not exist", REGEN.format(root))], []
    files = sorted(root.glob(f"*/{HOSTS_FILE}"))
    if not files:
        problem = f"no */{HOSTS_FILE} under {root}: containerd pulls straight from registries"
        return [Finding(problem, REGEN.format(root))], []
    findings: list[Finding] = []
    hosts: list[list[str]] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            findings.append(Finding(f"cannot read {path}: {err}", "run doctor as root"))
            continue
        found, urls = check_hosts_toml(text, source=str(path), mirror_url=mirror_url)
        findings += found
        hosts.append(urls)
    return findings, hosts


def _split_path_list(value: object) -> tuple[str, ...]:
    """Split a config_path value the way containerd does (":"-separated, blanks dropped)."""
    return tuple(p for p in value.split(":") if p) if isinstance(value, str) else ()


def _table(value: object) -> dict[str, Any]:
    """Return a TOML table, or an empty one for anything else."""
    return value if isinstance(value, dict) else {}


def _same_endpoint(host: str, mirror_url: str) -> bool:
    """Compare a [host] key with the mirror URL as containerd would dial them."""

    def norm(url: str) -> tuple[str, str, str]:
        parts = urllib.parse.urlsplit(url if url.startswith("http") else "https://" + url)
        path = parts.path.rstrip("/")
        path = path if path.endswith("/v2") else path + "/v2"
        return parts.scheme.lower(), parts.netloc.lower(), path

    return norm(host) == norm(mirror_url)
