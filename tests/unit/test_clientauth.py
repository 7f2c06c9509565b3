"""Client authentication, piece by piece: config, headers, policy, throttle, files.

The config cases check each error names the file and the key. The rest drive the
pure parts (``credentials``, ``policy``, ``ratelimit``) and the htpasswd file's
reload with fake clocks.
"""

from __future__ import annotations

import asyncio
import base64
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest

from mirrorproxy.clientauth.credentials import Basic, Bearer, Malformed, parse_authorization
from mirrorproxy.clientauth.htpasswd import Htpasswd, parse_htpasswd
from mirrorproxy.clientauth.policy import (
    AuthRequired,
    Client,
    TooManyRequests,
    authorize,
    require_login,
)
from mirrorproxy.clientauth.ratelimit import FailedLogins, client_key
from mirrorproxy.config import ANYONE, Access, ClientAuth, ConfigError, load_config
from mirrorproxy.core.errors import Denied
from tests.support import jwtkeys

NS = '[namespaces."docker.io"]\nupstreams = ["http://registry.internal:5000"]\n'


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text(f"alice:{_hash('a-pw')}\nbob:{_hash('b-pw')}\n")
    return path


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mp.toml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message


# -- config ---------------------------------------------------------------------------


def test_without_server_auth_everything_is_open(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, NS))
    assert config.server.auth is None
    assert config.namespaces["docker.io"].access == ANYONE


def test_full_auth_config(tmp_path: Path, htpasswd: Path) -> None:
    keys = tmp_path / "keys.pem"
    keys.write_bytes(jwtkeys.rsa_signer().cert_pem())
    config = load_config(
        _write(
            tmp_path,
            f"""
[server.auth]
htpasswd = "{htpasswd}"
token_realm = "https://auth.corp.example/token"
token_service = "mirrorproxy"
token_issuer = "corp-auth"
token_public_keys = "keys.pem"
max_failed_logins = 5
failed_login_window = "10m"
[server.auth.groups]
ops = ["carol", "dave"]

[namespaces."harbor.corp.example"]
upstreams = [{{ url = "https://harbor.corp.example" }}]
access = "authenticated"

[namespaces."team.corp.example"]
upstreams = ["https://team.corp.example"]
access = ["alice", "group:ops"]

{NS}""",
        )
    )
    auth = config.server.auth
    assert auth is not None
    assert auth.basic
    assert auth.bearer
    assert auth.token_public_keys == keys
    assert (auth.max_failed_logins, auth.failed_login_window) == (5, 600.0)
    assert config.namespaces["harbor.corp.example"].access == Access(anyone=False)
    team = config.namespaces["team.corp.example"].access
    assert team.users == frozenset({"alice", "carol", "dave"})
    assert team.permits("dave")
    assert not team.permits("bob")
    assert config.namespaces["docker.io"].access.anyone


@pytest.mark.parametrize(
    ("auth", "access", "key", "problem"),
    [
        ('htpasswd = "nope"', None, "server.auth.htpasswd", "no readable file"),
        ("", None, "server.auth.htpasswd", "needs htpasswd, token_* keys, or both"),
        (
            'token_realm = "https://a/t"\ntoken_service = "m"',
            None,
            "server.auth.token_issuer",
            "missing",
        ),
        (
            'token_realm = "ftp://a/t"\ntoken_service = "m"\ntoken_issuer = "i"\n'
            'token_public_keys = "HTPASSWD"',
            None,
            "server.auth.token_realm",
            "not an http(s) URL",
        ),
        (
            'token_realm = "https://a/t"\ntoken_service = "m"\ntoken_issuer = "i"\n'
            'token_public_keys = "HTPASSWD"',
            None,
            "server.auth.token_public_keys",
            "no PEM certificate or public key",
        ),
        (
            'token_realm = "https://a/t"\ntoken_service = "a\\"b"\ntoken_issuer = "i"\n'
            'token_public_keys = "HTPASSWD"',
            None,
            "server.auth.token_service",
            "without quotes",
        ),
        (
            'htpasswd = "HTPASSWD"\nmax_failed_logins = 0',
            None,
            "server.auth.max_failed_logins",
            "at least",
        ),
        ('htpasswd = "HTPASSWD"\nsurprise = 1', None, "server.auth.surprise", "unknown key"),
        ('htpasswd = "HTPASSWD"', '"everyone"', 'namespaces."x.io".access', "expected"),
        ('htpasswd = "HTPASSWD"', "[]", 'namespaces."x.io".access', "non-empty"),
        ('htpasswd = "HTPASSWD"', '["group:nope"]', 'namespaces."x.io".access[0]', "no group"),
        ('htpasswd = "HTPASSWD"', '["a", 3]', 'namespaces."x.io".access[1]', "user name"),
        (None, '"authenticated"', 'namespaces."x.io".access', "needs [server.auth]"),
    ],
)
def test_auth_config_errors_name_file_and_key(
    tmp_path: Path, htpasswd: Path, auth: str | None, access: str | None, key: str, problem: str
) -> None:
    text = ""
    if auth is not None:
        text += "[server.auth]\n" + auth.replace("HTPASSWD", str(htpasswd)) + "\n"
    text += '[namespaces."x.io"]\nupstreams = ["http://x.internal"]\n'
    if access is not None:
        text += f"access = {access}\n"
    message = _error(tmp_path, text)
    assert f": {key}: " in message, message
    assert problem in message, message


def test_htpasswd_without_bcrypt_is_refused_naming_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "htpasswd"
    bad.write_text(f"alice:{_hash('x')}\n\nbob:$apr1$abc$def\n")  # htpasswd -m (MD5)
    message = _error(tmp_path, f'[server.auth]\nhtpasswd = "{bad}"\n{NS}')
    assert ": server.auth.htpasswd: " in message
    assert "line 3" in message
    assert "htpasswd -B" in message
    assert "$apr1$" not in message  # the hash is not repeated


def test_metrics_allow(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, f'[metrics]\nallow = ["10.1.0.0/16"]\n{NS}'))
    assert [str(n) for n in config.metrics.allow] == ["10.1.0.0/16"]
    message = _error(tmp_path, f'[metrics]\nallow = ["nope"]\n{NS}')
    assert ": metrics.allow[0]: " in message


def test_jwks_file_is_accepted(tmp_path: Path) -> None:
    jwks = jwtkeys.write_jwks(tmp_path / "jwks.json", jwtkeys.ec_signer("k"))
    config = load_config(
        _write(
            tmp_path,
            "[server.auth]\n"
            'token_realm = "http://127.0.0.1:1/token"\ntoken_service = "m"\n'
            f'token_issuer = "i"\ntoken_public_keys = "{jwks}"\n{NS}',
        )
    )
    assert config.server.auth is not None
    assert not config.server.auth.basic


# -- Authorization headers -------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        (f"Basic {_b64(':')}", None),  # what containers/image sends without credentials
        (f"Basic {_b64('al:ice:pw')}", Basic("al", "ice:pw")),
        (f"basic   {_b64('u:p')}", Basic("u", "p")),
        ("Bearer abc.def.ghi", Bearer("abc.def.ghi")),
        ("Basic ***", Malformed("basic", "Basic credentials are not base64 of user:password")),
        (
            f"Basic {_b64('nocolon')}",
            Malformed("basic", "Basic credentials are not user:password"),
        ),
        ("Bearer", Malformed("bearer", "empty or oversized Bearer token")),
        ("Negotiate xyz", Malformed("other", "unsupported Authorization scheme")),
    ],
)
def test_parse_authorization(header: str | None, expected: object) -> None:
    assert parse_authorization(header) == expected


def test_credentials_do_not_show_in_repr() -> None:
    assert "pw" not in repr(Basic("u", "pw"))
    assert "secret" not in repr(Bearer("secret"))


# -- policy ------------------------------------------------------------------------------

BOTH = ClientAuth(
    htpasswd=Path("/h"),
    token_realm="https://auth/token",
    token_service="mp",
    token_issuer="i",
    token_public_keys=Path("/k"),
)
LISTED = Access(anyone=False, users=frozenset({"alice"}))


def test_open_namespace_allows_anyone_even_throttled() -> None:
    authorize(BOTH, ANYONE, "docker.io", "library/a", Client(retry_after=5))


def test_anonymous_gets_both_challenges_with_the_scope() -> None:
    with pytest.raises(AuthRequired) as info:
        authorize(BOTH, Access(anyone=False), "h.io", "team/app", Client())
    assert info.value.challenges == (
        'Bearer realm="https://auth/token",service="mp",scope="repository:h.io/team/app:pull"',
        'Basic realm="mirrorproxy",charset="UTF-8"',
    )


def test_token_scope_includes_the_registry() -> None:
    token_client = Client(user="svc", scheme="bearer", pulls=frozenset({"team/app"}))
    with pytest.raises(AuthRequired) as info:
        authorize(BOTH, Access(anyone=False), "h.io", "team/app", token_client)
    assert info.value.challenges[0].endswith('error="insufficient_scope"')
    good = Client(user="svc", scheme="bearer", pulls=frozenset({"h.io/team/app"}))
    authorize(BOTH, Access(anyone=False), "h.io", "team/app", good)


def test_listed_users_only() -> None:
    authorize(BOTH, LISTED, "h.io", "a", Client(user="alice", scheme="basic"))
    with pytest.raises(Denied):
        authorize(BOTH, LISTED, "h.io", "a", Client(user="bob", scheme="basic"))


def test_throttled_client_gets_429_with_retry_after() -> None:
    with pytest.raises(TooManyRequests) as info:
        authorize(BOTH, LISTED, "h.io", "a", Client(scheme="basic", retry_after=0.2))
    assert info.value.status == 429
    assert info.value.headers == {"Retry-After": "1"}
    with pytest.raises(TooManyRequests):
        require_login(BOTH, Client(scheme="basic", retry_after=30))


def test_refused_token_says_invalid_token() -> None:
    with pytest.raises(AuthRequired) as info:
        require_login(BOTH, Client(scheme="bearer", refused="expired"))
    assert info.value.challenges[0] == (
        'Bearer realm="https://auth/token",service="mp",error="invalid_token"'
    )


# -- the failed-login throttle -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failed_logins_bucket() -> None:
    clock = Clock()
    limits = FailedLogins(max_failures=3, window=30.0, max_tracked=100, clock=clock)
    assert [limits.take("a") for _ in range(3)] == [None, None, None]
    wait = limits.take("a")
    assert wait == pytest.approx(10.0)  # one failure forgiven every 10 s
    assert limits.blocked("a") == pytest.approx(10.0)
    assert limits.take("b") is None  # other addresses are not affected
    clock.now += 10.0
    assert limits.blocked("a") is None
    assert limits.take("a") is None
    limits.give_back("a")  # that one was right: it does not count
    assert limits.take("a") is None
    assert limits.take("a") is not None


def test_tracked_addresses_are_bounded() -> None:
    limits = FailedLogins(max_failures=1, window=60.0, max_tracked=2, clock=Clock())
    for key in ("a", "b", "c"):
        assert limits.take(key) is None
    assert limits.blocked("c") is not None
    assert limits.blocked("a") is None  # forgotten, the least recently seen


def test_client_key_groups_ipv6_by_64() -> None:
    assert client_key("10.1.2.3") == "10.1.2.3"
    assert client_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert client_key("2001:db8:1:2::5") == client_key("2001:db8:1:2:ffff::1")
    assert client_key("2001:db8:1:2::5") == "2001:db8:1:2::/64"
    assert client_key(None) == "-"


# -- the htpasswd file -------------------------------------------------------------------


def test_parse_htpasswd_skips_comments_and_blank_lines() -> None:
    users = parse_htpasswd(f"# users\n\nalice:{_hash('x')}\n")
    assert list(users) == ["alice"]
    with pytest.raises(ValueError, match="line 1"):
        parse_htpasswd("alice")
    with pytest.raises(ValueError, match="malformed bcrypt"):
        parse_htpasswd("alice:$2y$05$short")


async def test_htpasswd_reloads_when_the_file_changes(htpasswd: Path) -> None:
    clock = Clock()
    with ThreadPoolExecutor(1) as executor:
        h = Htpasswd(
            htpasswd,
            executor=executor,
            cache_ttl=60.0,
            cache_max=10,
            reload_interval=5.0,
            clock=clock,
        )
        assert await h.verify("alice", "a-pw")
        assert not await h.verify("alice", "wrong")
        assert not await h.verify("nobody", "a-pw")
        assert h.remembered("alice", "a-pw")
        await asyncio.to_thread(
            htpasswd.write_text, f"alice:{_hash('new-pw')}\ncarol:{_hash('c-pw')}\n"
        )
        assert h.remembered("alice", "a-pw")  # not yet looked at
        clock.now += 5.0
        assert not h.remembered("alice", "a-pw")  # the old password is forgotten at once
        assert not await h.verify("alice", "a-pw")
        assert await h.verify("alice", "new-pw")
        assert await h.verify("carol", "c-pw")
        await asyncio.to_thread(htpasswd.write_text, "garbage\n")
        clock.now += 5.0
        assert await h.verify("carol", "c-pw")  # a broken file keeps the last users


async def test_concurrent_checks_of_the_same_credentials_share_one(htpasswd: Path) -> None:
    with ThreadPoolExecutor(1) as executor:
        h = Htpasswd(
            htpasswd, executor=executor, cache_ttl=0.0, cache_max=10, reload_interval=60.0
        )
        results = await asyncio.gather(*(h.verify("bob", "b-pw") for _ in range(20)))
        assert results == [True] * 20
