"""Which configured namespace serves a request: ``ns=``, a path prefix, else the default.

Pure. A registry that is not configured (and not covered by a wildcard) is refused
here, before any connection: the mirror is never an open proxy to a host a client
names.
"""

from __future__ import annotations

from mirrorproxy.config import Config, Namespace
from mirrorproxy.config.values import NS_RE
from mirrorproxy.core.errors import NameInvalid, NameUnknown


def resolve(config: Config, ns_param: str | None) -> tuple[Namespace, str]:
    """Return (namespace config, registry name) for a request's ``ns`` value.

    Raises:
        NameInvalid: ``ns`` is not a registry host name.
        NameUnknown: no namespace (nor a wildcard) serves it; containerd then
            moves on to its next host.
    """
    name = (ns_param or "").strip()
    if not name.isascii():
        raise NameInvalid(f"invalid ns {name[:100]!r}: not a registry host name")
    name = name.lower()
    if not name:
        name = config.server.default_namespace or ""
        if not name:
            raise NameUnknown("this mirror needs ?ns=<registry> (no default_namespace set)")
    if len(name) > 255 or not NS_RE.fullmatch(name):
        raise NameInvalid(f"invalid ns {name[:100]!r}: not a registry host name")
    ns = config.namespace(name)
    if ns is None:
        raise NameUnknown(
            f"registry {name!r} is not configured on this mirror", {"namespace": name}
        )
    return ns, name


def route(config: Config, ns_param: str | None, name: str) -> tuple[Namespace, str, str]:
    """Return (namespace, registry name, repository) for a request.

    containerd says which registry it means with ``?ns=``. containers/image clients
    (podman, skopeo, CRI-O) send no ``ns=``, but a registries.conf mirror location
    may carry a path (``127.0.0.1:5000/quay.io``), so their requests arrive as
    ``/v2/quay.io/org/tool/...``: a first path component that names a configured
    registry selects it and is stripped. ``ns=`` keeps precedence.

    Raises:
        NameInvalid, NameUnknown: as ``resolve``.
    """
    if not (ns_param or "").strip():
        first, sep, rest = name.partition("/")
        if sep and rest and _looks_like_registry(first) and NS_RE.fullmatch(first):
            ns = config.namespace(first)
            if ns is not None:
                return ns, first, rest
    ns, ns_name = resolve(config, ns_param)
    return ns, ns_name, name


def _looks_like_registry(component: str) -> bool:
    """A host name as image references spell one (docker's rule): a dot, a port, or
    ``localhost``; a plain ``library`` or ``org`` is a repository component."""
    return "." in component or ":" in component or component == "localhost"
