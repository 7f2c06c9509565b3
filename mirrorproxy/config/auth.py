"""Loading ``[server.auth]`` and a namespace's ``access``.

``[server.auth]`` takes ``htpasswd`` (Basic), the four ``token_*`` keys (Bearer;
all or none), or both, plus ``groups`` for access lists and the failed-login limit.
The htpasswd file and the token keys are read here once, so a bad entry or key is
a config error naming the file and key; the server reads them again when it starts
(and the htpasswd file whenever it changes).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mirrorproxy.clientauth.htpasswd import read_htpasswd
from mirrorproxy.clientauth.tokens import load_keys
from mirrorproxy.config.model import ANYONE, Access, ClientAuth, ConfigError
from mirrorproxy.config.table import Table, tname
from mirrorproxy.core.units import parse_duration

TOKEN_KEYS = ("token_realm", "token_service", "token_issuer", "token_public_keys")
GROUP_PREFIX = "group:"


def load_client_auth(server: Table) -> ClientAuth | None:
    """``[server.auth]``, or None when the table is absent."""
    if "auth" not in server.data:
        server.seen.add("auth")
        return None
    t = server.table("auth")
    d = ClientAuth()
    htpasswd = t.file("htpasswd")
    if htpasswd is not None:
        try:
            read_htpasswd(htpasswd)
        except ValueError as err:
            raise t.error("htpasswd", f"{htpasswd}: {err}") from None
    given = [k for k in TOKEN_KEYS if k in t.data]
    if given and len(given) < len(TOKEN_KEYS):
        missing = next(k for k in TOKEN_KEYS if k not in t.data)
        raise t.error(missing, "missing (Bearer tokens need all of " + ", ".join(TOKEN_KEYS) + ")")
    realm = _text(t, "token_realm")
    if realm is not None:
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise t.error("token_realm", f"not an http(s) URL: {realm!r}")
    service, issuer = _text(t, "token_service"), _text(t, "token_issuer")
    keys_path = t.file("token_public_keys")
    if keys_path is not None:
        try:
            load_keys(keys_path)
        except ValueError as err:
            raise t.error("token_public_keys", f"{keys_path}: {err}") from None
    if htpasswd is None and keys_path is None:
        raise t.error("htpasswd", "missing ([server.auth] needs htpasswd, token_* keys, or both)")
    out = ClientAuth(
        htpasswd=htpasswd,
        token_realm=realm,
        token_service=service,
        token_issuer=issuer,
        token_public_keys=keys_path,
        groups=_groups(t),
        max_failed_logins=t.take("max_failed_logins", int, d.max_failed_logins),
        failed_login_window=t.convert(
            "failed_login_window", parse_duration, d.failed_login_window
        ),
    )
    if out.max_failed_logins < 1:
        raise t.error("max_failed_logins", "must be at least 1")
    if out.failed_login_window <= 0:
        raise t.error("failed_login_window", "must be longer than 0s")
    t.done()
    return out


def _text(t: Table, key: str) -> str | None:
    """A non-empty string that can sit inside a quoted challenge parameter."""
    if key not in t.data:
        t.seen.add(key)
        return None
    value = t.take(key, str, "")
    if not value or not value.isprintable() or '"' in value or "\\" in value:
        raise t.error(key, "must be non-empty printable text without quotes or backslashes")
    return value


def _groups(t: Table) -> dict[str, frozenset[str]]:
    g = t.table("groups")
    out: dict[str, frozenset[str]] = {}
    for name, members in g.data.items():
        g.seen.add(name)
        if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
            raise g.error(name, f"expected an array of user names, got {tname(members)}")
        out[name] = frozenset(members)
    g.done()
    return out


def load_access(t: Table, auth: ClientAuth | None) -> Access:
    """A namespace's ``access``: "anyone", "authenticated", or users and groups.

    Args:
        t: the namespace's table.
        auth: ``[server.auth]``; anything but "anyone" needs it.
    """
    if "access" not in t.data:
        t.seen.add("access")
        return ANYONE
    raw = t.data["access"]
    t.seen.add("access")
    if raw == "anyone":
        return ANYONE
    if auth is None:
        raise t.error("access", "needs [server.auth] (how clients log in)")
    if raw == "authenticated":
        return Access(anyone=False)
    if isinstance(raw, str):
        raise t.error(
            "access", f'expected "anyone", "authenticated" or a list of users, got {raw!r}'
        )
    if not isinstance(raw, list) or not raw:
        raise t.error(
            "access", f"expected a non-empty array of users and groups, got {tname(raw)}"
        )
    users: set[str] = set()
    for i, item in enumerate(raw):
        key = f"{t.sub('access')}[{i}]"
        if not isinstance(item, str) or not item:
            raise ConfigError(t.source, key, "expected a user name or group:NAME")
        if item.startswith(GROUP_PREFIX):
            group = item[len(GROUP_PREFIX) :]
            if group not in auth.groups:
                raise ConfigError(t.source, key, f"no group {group!r} in [server.auth.groups]")
            users |= auth.groups[group]
        else:
            users.add(item)
    return Access(anyone=False, users=frozenset(users))
