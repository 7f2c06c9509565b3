"""Property tests of the request parsers against hostile input, as the server sees it.

aiohttp percent-decodes the path before routing (``%2F`` -> ``/``, ``%2e%2e`` ->
``..``, ``%00`` -> NUL), so the parsers get decoded text; the strategies here feed
them that: traversal pieces, NUL, decoded and still-encoded slashes, unicode
look-alikes and very long values. Whatever a parser accepts must be safe to use as
a cache path and an upstream URL; whatever it refuses must be refused with the
right error, never a crash.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrorproxy.cache.blobs import FileBlobStore
from mirrorproxy.cache.manifests import FileManifestStore
from mirrorproxy.config import WILDCARD, Config, parse_config
from mirrorproxy.core.errors import (
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RangeNotSatisfiable,
)
from mirrorproxy.core.namespaces import resolve
from mirrorproxy.core.oci import Digest, parse_digest, parse_name, parse_range, parse_reference

FAST = settings(max_examples=300, deadline=None, database=None)
ROOT = Path("/cache/root")

HOSTILE_PIECES = [
    "..", ".", "/", "//", "\\", "\x00", "%2F", "%2f", "%2e", "%00", "%25", "%", ":", "@",
    "?", "#", " ", "\t", "\r\n", "\uff0e", "\u2024", "\u2215", "\u0430", "\u212a", "A",
    "a", "b", "0", "-", "_", ".", "sha256", "latest", "library", "etc", "passwd",
]  # fmt: skip
hostile_text = st.one_of(
    st.lists(st.sampled_from(HOSTILE_PIECES), max_size=30).map("".join),
    st.text(max_size=60),
    st.text(alphabet="a/.-_%2Fe0", min_size=200, max_size=2000),
)
# What aiohttp hands the parsers: text that was percent-decoded once, or not at all.
decoded = st.one_of(hostile_text, hostile_text.map(unquote))


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` stays below ``root`` once ``..`` and the like are resolved."""
    resolved = Path("/").joinpath(*_lexical(path.parts))  # lexical: no symlinks here
    return resolved.is_relative_to(root) and resolved != root


def _lexical(parts: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for part in parts:
        if part in ("", ".", "/"):
            continue
        if part == "..":
            if out:
                out.pop()
            continue
        out.append(part)
    return out


@FAST
@given(decoded)
def test_accepted_names_are_plain_path_components(text: str) -> None:
    try:
        name = parse_name(text)
    except NameInvalid:
        return
    parts = name.split("/")
    assert all(p and p not in (".", "..") for p in parts)
    assert re.fullmatch(r"[a-z0-9._/-]{1,255}", name)
    assert unquote(name) == name  # nothing left for a second decoding to change


@FAST
@given(decoded)
def test_references_are_tags_or_digests(text: str) -> None:
    try:
        ref = parse_reference(text)
    except (ManifestUnknown, DigestInvalid):
        return
    if isinstance(ref, Digest):
        assert ref.algorithm in ("sha256", "sha512")
        assert str(ref) == text
    else:
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", ref)
        assert ref not in (".", "..")


_digest_like = st.builds(
    lambda alg, body: f"{alg}:{body}",
    st.sampled_from(["sha256", "sha512", "sha256/..", "..", "sha1", "sha256\x00"]),
    st.one_of(
        st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
        st.text(alphabet="0123456789abcdef", min_size=128, max_size=128),
        st.lists(
            st.sampled_from([*"0123456789abcdef", "/", "..", "%2F", "\x00"]), max_size=130
        ).map("".join),
    ),
)


@FAST
@given(st.one_of(_digest_like, decoded))
def test_accepted_digests_stay_inside_the_cache(text: str) -> None:
    try:
        digest = parse_digest(text)
    except DigestInvalid:
        return
    for path in (
        FileBlobStore(ROOT).path_of(digest),
        FileManifestStore(ROOT).path_of(digest),
    ):
        assert _inside(path, ROOT)
        assert path.name == digest.hex
        assert "\x00" not in str(path)


def _config(*names: str, allow: tuple[str, ...] = ()) -> Config:
    data: dict[str, Any] = {
        "namespaces": {
            name: {
                "upstreams": ["http://upstream.example"],
                **({"allow": list(allow)} if name == WILDCARD else {}),
            }
            for name in names
        }
    }
    return parse_config(data, source="test.toml", base_dir=Path("/"))


FORBIDDEN_HOSTS = [
    "127.0.0.1", "127.0.0.1:22", "127.0.0.2:5000", "localhost", "localhost:22",
    "169.254.169.254", "169.254.169.254:80", "[::1]", "[::1]:22", "0.0.0.0", "127.1",
    "2130706433", "0x7f000001", "[::ffff:127.0.0.1]", "metadata.google.internal",
    "[fe80::1%25eth0]", "10.0.0.1:2375",
]  # fmt: skip
ns_values = st.one_of(
    st.sampled_from(FORBIDDEN_HOSTS),
    st.sampled_from(FORBIDDEN_HOSTS).map(lambda h: h.upper()),
    st.sampled_from(FORBIDDEN_HOSTS).map(lambda h: h + "."),
    st.builds(
        lambda a, b: a + b,
        st.sampled_from(["docker.io", "reg.corp.example", "x.corp.example"]),
        st.sampled_from(["", ".", ":22", "%2F..", "/..", "\x00", "@127.0.0.1", ".evil.io"]),
    ),
    decoded,
)


@FAST
@given(ns_values)
def test_ns_reaches_only_configured_namespaces(text: str) -> None:
    config = _config("docker.io")
    try:
        ns, name = resolve(config, text)
    except (NameInvalid, NameUnknown):
        return
    assert (ns.name, name) == ("docker.io", "docker.io")


@FAST
@given(ns_values)
def test_wildcard_serves_only_its_allowlist(text: str) -> None:
    config = _config("docker.io", WILDCARD, allow=("*.corp.example",))
    try:
        ns, name = resolve(config, text)
    except (NameInvalid, NameUnknown):
        return
    if ns.name == "docker.io":
        assert name == "docker.io"
    else:
        assert ns.name == WILDCARD
        assert re.fullmatch(r"[a-z0-9.-]+\.corp\.example", name)
    assert name.isascii()
    assert not set(name) & set("/@%\\?#\x00 ")


@pytest.mark.parametrize("host", FORBIDDEN_HOSTS)
def test_forbidden_hosts_are_never_served(host: str) -> None:
    config = _config("docker.io", WILDCARD, allow=("*.corp.example",))
    with pytest.raises((NameInvalid, NameUnknown)):
        resolve(config, host)


range_headers = st.one_of(
    st.builds(
        lambda a, b: f"bytes={a}-{b}",
        st.one_of(st.just(""), st.integers(0, 10**30).map(str), st.just("9" * 5000)),
        st.one_of(st.just(""), st.integers(0, 10**30).map(str), st.just("9" * 5000)),
    ),
    st.builds(
        lambda digits: f"bytes={digits}-",
        st.text(alphabet="0123456789\u0663\uff10\u00b2", min_size=1, max_size=8),
    ),
    st.text(max_size=40),
    st.lists(st.sampled_from(["bytes", "=", "-", ",", " ", "0", "1", "9" * 30, "x"])).map("".join),
)


@FAST
@given(range_headers, st.integers(0, 10**13))
def test_ranges_never_crash_and_stay_in_the_blob(header: str, size: int) -> None:
    refused: RangeNotSatisfiable | None = None
    try:
        result = parse_range(header, size)
    except RangeNotSatisfiable as err:
        refused, result = err, None
    if refused is not None:
        assert refused.status == 416
        assert len(refused.message) < 300
    elif result is not None:
        start, end = result
        assert 0 <= start <= end < size


@pytest.mark.parametrize("header", ["bytes=\u0663-", "bytes=\uff10-1", "bytes=\u00b2-"])
def test_range_digits_are_ascii_only(header: str) -> None:
    assert parse_range(header, 100) is None


def test_absurd_range_numbers_are_unsatisfiable_not_a_crash() -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=" + "9" * 5000 + "-", 100)
    assert parse_range("bytes=0-" + "9" * 5000, 100) == (0, 99)
    assert parse_range("bytes=-" + "9" * 5000, 100) == (0, 99)
