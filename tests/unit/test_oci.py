"""Unit tests for mirrorproxy.core.oci: names, references, digests, Range and Accept.

Everything a client sends passes through these parsers before it touches the disk
or the network, so hostile inputs get as much attention as valid ones.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrorproxy.core.errors import (
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    RangeNotSatisfiable,
)
from mirrorproxy.core.oci import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_V1_SIGNED,
    MANIFEST_TYPES,
    MAX_NAME_LENGTH,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
    accept_types,
    acceptable,
    join_fields,
    manifest_digest,
    manifest_media_type,
    parse_digest,
    parse_name,
    parse_range,
    parse_reference,
    same_variant,
    schema1_payload,
)

HEX64 = hashlib.sha256(b"mirrorproxy").hexdigest()
HEX128 = hashlib.sha512(b"mirrorproxy").hexdigest()
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

FAST = settings(max_examples=200, deadline=None, database=None)

# --- parse_name -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "0",
        "alpine",
        "library/alpine",
        "a/b/c/d",
        "a-b",
        "a--b",
        "a_b",
        "a__b",
        "a.b",
        "my.registry/x-y_z",
        "bitnami/postgresql-repmgr",
        "x" * MAX_NAME_LENGTH,
        "a" + "/a" * 127,
    ],
)
def test_parse_name_valid(name: str) -> None:
    assert parse_name(name) == name


HOSTILE_NAMES = [
    "",
    ".",
    "..",
    "../x",
    "x/..",
    "x/../y",
    "x/./y",
    "../../etc/passwd",
    "/x",
    "/etc/passwd",
    "x/",
    "x//y",
    "a\x00b",
    "\x00",
    "alpine\x00",
    "a%2fb",
    "a%2Fb",
    "%2e%2e",
    "%2e%2e%2fetc",
    "a\\b",
    "..\\x",
    "C:\\x",
    "A",
    "Library/alpine",
    "\uff41lpine",  # full-width a
    "alp\u0456ne",  # Cyrillic i
    "\u212aube",  # Kelvin sign, lower()s to "k"
    "caf\u00e9",
    "a b",
    " a",
    "a ",
    "a\n",
    "a\nb",
    "a\tb",
    "a\r",
    "-a",
    "a-",
    "_a",
    "a_",
    "a___b",
    "a..b",
    "a.-b",
    "a._b",
    "a:b",
    "a@sha256",
    "a;b",
    "a?b",
    "a#b",
    "a*",
    "x" * (MAX_NAME_LENGTH + 1),
    "a/" * 200 + "a",
    "x" * 10_000,
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_parse_name_rejects(name: str) -> None:
    with pytest.raises(NameInvalid) as info:
        parse_name(name)
    assert info.value.code == "NAME_INVALID"
    assert info.value.status == 400


def test_parse_name_truncates_long_names_in_message() -> None:
    with pytest.raises(NameInvalid) as info:
        parse_name("x" * 10_000)
    assert len(info.value.message) < 400


# The distribution-spec grammar, built independently of the implementation's regex:
# component = [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*, name = component ("/" component)*.
_alnum = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
_separator = st.sampled_from([".", "_", "__", "-", "--", "---"])
_component = st.builds(
    lambda first, rest: first + "".join(sep + part for sep, part in rest),
    _alnum,
    st.lists(st.tuples(_separator, _alnum), max_size=3),
)
spec_names = st.lists(_component, min_size=1, max_size=6).map("/".join)

_name_chars = st.sampled_from([*"az09._-/", "..", "%2F", "\x00", "A", " ", "\u212a", "\\"])
names = st.one_of(
    spec_names,
    st.lists(_name_chars, max_size=40).map("".join),
    st.text(max_size=40),
)


@FAST
@given(names)
def test_property_accepted_names_are_safe(name: str) -> None:
    try:
        result = parse_name(name)
    except NameInvalid:
        return
    assert result == name
    assert ".." not in name
    assert not name.startswith("/")
    assert "\x00" not in name
    assert re.fullmatch(r"[a-z0-9._/-]+", name)
    assert len(name) <= MAX_NAME_LENGTH
    assert "//" not in name
    assert not name.endswith("/")


@FAST
@given(spec_names)
def test_property_spec_names_are_accepted(name: str) -> None:
    assert len(name) <= MAX_NAME_LENGTH  # the strategy stays below the limit
    assert parse_name(name) == name


# --- parse_digest -----------------------------------------------------------------------


def test_parse_digest_sha256() -> None:
    digest = parse_digest(f"sha256:{HEX64}")
    assert digest == Digest("sha256", HEX64)
    assert str(digest) == f"sha256:{HEX64}"


def test_parse_digest_sha512() -> None:
    digest = parse_digest(f"sha512:{HEX128}")
    assert (digest.algorithm, digest.hex) == ("sha512", HEX128)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256",
        "sha256:",
        f":{HEX64}",
        HEX64,
        f"sha256:{HEX64.upper()}",
        f"sha256:{HEX64[:-1]}A",
        f"sha256:{HEX64[:-1]}",
        f"sha256:{HEX64}0",
        f"sha256:{HEX128}",
        f"sha512:{HEX64}",
        f"sha512:{HEX128[:-1]}",
        "sha256:" + "g" * 64,
        "sha256:" + "=" * 64,
        "sha256:" + "_" * 64,
        f"SHA256:{HEX64}",
        f"Sha256:{HEX64}",
        f" sha256:{HEX64}",
        f"sha256:{HEX64} ",
        f"sha256:{HEX64}\n",
        f"sha256:{HEX64}\x00",
        f"sha256:{HEX64[:32]}\x00{HEX64[33:]}",
        f"sha256: {HEX64}",
        f"sha256::{HEX64}",
        f"sha256:{HEX64}:",
        "sha256:../../../../etc/passwd",
        f"sha256:{HEX64[:61]}/..",
        f"sha256:{HEX64[:60]}%2F.",
        f"../sha256:{HEX64}",
        f"sha256/../x:{HEX64}",
        f"sha256:{HEX64[:63]}\uff10",  # full-width 0
        f"sha256:{HEX64[:63]}\u0660",  # Arabic-Indic 0
        "sha256:" + "a" * 10_000,
    ],
)
def test_parse_digest_invalid(text: str) -> None:
    with pytest.raises(DigestInvalid) as info:
        parse_digest(text)
    assert info.value.code == "DIGEST_INVALID"


@pytest.mark.parametrize(
    "text",
    [
        "sha384:" + hashlib.sha384(b"").hexdigest(),
        "md5:" + hashlib.md5(b"", usedforsecurity=False).hexdigest(),
        "sha1:" + hashlib.sha1(b"", usedforsecurity=False).hexdigest(),
        f"blake3:{HEX64}",
        f"sha256+b64u:{HEX64}",
        f"sha512.v2:{HEX128}",
    ],
)
def test_parse_digest_unsupported_algorithm(text: str) -> None:
    with pytest.raises(DigestInvalid) as info:
        parse_digest(text)
    assert info.value.code == "DIGEST_INVALID"
    assert "not supported" in info.value.message


_lower_hex = st.sampled_from([63, 64, 65, 127, 128, 129]).flatmap(
    lambda n: st.text(alphabet="0123456789abcdef", min_size=n, max_size=n)
)
_hex_like = st.text(alphabet="0123456789abcdefABCDEFgz=_-/.:\x00 ", min_size=60, max_size=132)
digests = st.one_of(
    st.builds(
        lambda alg, body: f"{alg}:{body}",
        st.sampled_from(["sha256", "sha512", "SHA256", "sha384", "md5", "", "sha256:"]),
        st.one_of(_lower_hex, _hex_like),
    ),
    st.text(max_size=140),
)


@FAST
@given(digests)
def test_property_accepted_digests_are_lowercase_hex(text: str) -> None:
    try:
        digest = parse_digest(text)
    except DigestInvalid:
        return
    assert digest.algorithm in ("sha256", "sha512")
    assert re.fullmatch(r"[0-9a-f]+", digest.hex)
    assert len(digest.hex) == {"sha256": 64, "sha512": 128}[digest.algorithm]
    assert str(digest) == text


@FAST
@given(st.binary(max_size=64), st.sampled_from(["sha256", "sha512"]))
def test_property_real_digests_round_trip(data: bytes, algorithm: str) -> None:
    digest = Digest.of(data, algorithm)
    assert parse_digest(str(digest)) == digest


def test_digest_of_and_hasher() -> None:
    digest = Digest.of(b"")
    assert str(digest) == f"sha256:{EMPTY_SHA256}"
    hasher = Digest.of(b"x", "sha512").hasher()
    hasher.update(b"x")
    assert hasher.hexdigest() == Digest.of(b"x", "sha512").hex


# --- parse_reference -------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag", ["latest", "v1.2.3", "1.0-rc_1", "_x", "A", "3", "x" * 128, "UPPER.lower-9_"]
)
def test_parse_reference_tag(tag: str) -> None:
    assert parse_reference(tag) == tag


def test_parse_reference_digest() -> None:
    assert parse_reference(f"sha256:{HEX64}") == Digest("sha256", HEX64)


@pytest.mark.parametrize(
    "tag",
    [
        "",
        ".x",
        "-x",
        ".",
        "..",
        "../x",
        "a/b",
        "/etc/passwd",
        "x" * 129,
        "a b",
        "a\x00",
        "a\n",
        "caf\u00e9",
        "\uff41",
        "a%2f",
        "a@b",
        "a\\b",
    ],
)
def test_parse_reference_bad_tag(tag: str) -> None:
    with pytest.raises(ManifestUnknown):
        parse_reference(tag)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("sha256:abc", DigestInvalid),
        (f"sha256:{HEX64.upper()}", DigestInvalid),
        (f"../sha256:{HEX64}", DigestInvalid),
        ("latest:", DigestInvalid),
        (":latest", DigestInvalid),
        ("sha384:" + "a" * 96, DigestInvalid),
        ("foo:bar", DigestInvalid),
    ],
)
def test_parse_reference_with_colon_must_be_a_digest(
    text: str, error: type[DigestInvalid]
) -> None:
    with pytest.raises(error):
        parse_reference(text)


# --- parse_range ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", (0, 99)),
        ("bytes=0-0", (0, 0)),
        ("bytes=999-999", (999, 999)),
        ("bytes=100-", (100, 999)),
        ("bytes=0-", (0, 999)),
        ("bytes=999-", (999, 999)),
        ("bytes=-100", (900, 999)),
        ("bytes=-1", (999, 999)),
        ("bytes=-1000", (0, 999)),
        ("bytes=-5000", (0, 999)),
        ("bytes=0-5000", (0, 999)),
        ("bytes=500-999", (500, 999)),
        ("bytes=500-1000", (500, 999)),
        (" bytes=1-2 ", (1, 2)),
        ("bytes = 1 - 2", (1, 2)),
        ("Bytes=1-2", (1, 2)),  # range units are case-insensitive
    ],
)
def test_parse_range_single(header: str, expected: tuple[int, int]) -> None:
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes=",
        "bytes=-",
        "bytes=0-1,5-6",
        "bytes=0-1, 5-6",
        "bytes=-5,10-",
        "bytes=a-b",
        "bytes=0x10-",
        "bytes=--5",
        "bytes=+1-5",
        "bytes=-1-5",
        "bytes=0-5-6",
        "bytes 0-5",
        "0-5",
        "items=0-5",
        "bytes=0.5-1",
        "garbage",
        "bytes=0-5\x00",
        "bytes=5-3",  # an invalid range-spec: the header is ignored (RFC 9110 14.2)
        "bytes=0-1,5-3",
        "bytes=5000-,1-2",  # several ranges, one satisfiable: the whole blob
    ],
)
def test_parse_range_unusable_is_none(header: str | None) -> None:
    assert parse_range(header, 1000) is None


def test_suffix_range_on_empty_blob_is_ignored() -> None:
    """A suffix range of an empty blob is ignored (the whole, empty, blob is the answer)."""
    assert parse_range("bytes=-5", 0) is None


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=1000-", 1000),
        ("bytes=1000-2000", 1000),
        ("bytes=5000-", 1000),
        ("bytes=-0", 1000),
        ("bytes=1000-,2000-2100", 1000),  # no range of the set overlaps the blob
        ("bytes=-0,5000-", 1000),
        ("bytes=0-", 0),
        ("bytes=0-0", 0),
    ],
)
def test_parse_range_not_satisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, size)
    assert info.value.status == 416


@FAST
@given(
    size=st.integers(min_value=1, max_value=10**12),
    first=st.one_of(st.none(), st.integers(min_value=0, max_value=10**13)),
    last=st.one_of(st.none(), st.integers(min_value=0, max_value=10**13)),
)
def test_property_range_within_blob(size: int, first: int | None, last: int | None) -> None:
    header = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    try:
        result = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    if result is None:  # nothing asked, or an invalid range (last before first)
        invalid = first is not None and last is not None and last < first
        assert (first is None and last is None) or invalid
        return
    start, end = result
    assert 0 <= start <= end < size


# --- Accept handling --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, ()),
        ("", ()),
        (" , ,", ()),
        (OCI_MANIFEST, (OCI_MANIFEST,)),
        (
            f"{OCI_MANIFEST}, {DOCKER_MANIFEST};q=0.9,{OCI_INDEX} ; q=0.5",
            tuple(sorted((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX))),
        ),
        (
            f"{DOCKER_LIST},{OCI_MANIFEST},{DOCKER_LIST}",
            tuple(sorted((DOCKER_LIST, OCI_MANIFEST))),
        ),
        ("Application/VND.OCI.Image.Manifest.v1+JSON", (OCI_MANIFEST,)),
        ("*/*", ("*/*",)),
        ("a,,b", ("a", "b")),
    ],
)
def test_accept_types(header: str | None, expected: tuple[str, ...]) -> None:
    assert accept_types(header) == expected


def test_accept_types_is_order_independent() -> None:
    assert accept_types(f"{OCI_INDEX},{OCI_MANIFEST}") == accept_types(
        f"{OCI_MANIFEST}, {OCI_INDEX}"
    )


@pytest.mark.parametrize(
    ("media_type", "accepted", "ok"),
    [
        (OCI_MANIFEST, (), True),
        (OCI_MANIFEST, (OCI_MANIFEST,), True),
        (OCI_MANIFEST, (DOCKER_MANIFEST, OCI_MANIFEST), True),
        (OCI_INDEX, (OCI_MANIFEST,), False),
        (DOCKER_LIST, (DOCKER_MANIFEST,), False),
        (DOCKER_LIST, ("*/*",), True),
        (OCI_INDEX, ("*/*", OCI_MANIFEST), True),
    ],
)
def test_acceptable(media_type: str, accepted: tuple[str, ...], ok: bool) -> None:
    assert acceptable(media_type, accepted) is ok


def test_manifest_types() -> None:
    assert len(set(MANIFEST_TYPES)) == 5
    assert {OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST} <= set(MANIFEST_TYPES)


# --- manifest_media_type ----------------------------------------------------------------


def _body(media_type: str) -> bytes:
    return b'{"schemaVersion": 2, "mediaType" : "' + media_type.encode() + b'"}'


@pytest.mark.parametrize(
    ("body", "header", "expected"),
    [
        (_body(DOCKER_MANIFEST), OCI_INDEX, OCI_INDEX),
        (b"{}", f"{DOCKER_LIST}; charset=utf-8", DOCKER_LIST),
        (_body(DOCKER_LIST), "application/json", DOCKER_LIST),
        (_body(DOCKER_LIST), "application/json; charset=utf-8", DOCKER_LIST),
        (_body(OCI_INDEX), "application/octet-stream", OCI_INDEX),
        (_body(OCI_INDEX), "text/plain", OCI_INDEX),
        (_body(OCI_INDEX), None, OCI_INDEX),
        (_body(OCI_INDEX), "", OCI_INDEX),
        (_body(OCI_INDEX), " ; charset=utf-8", OCI_INDEX),
        (b'{"schemaVersion": 2}', None, OCI_MANIFEST),
        (b"", None, OCI_MANIFEST),
        (b"not json at all", "application/json", OCI_MANIFEST),
        (b" " * 4096 + _body(DOCKER_LIST), None, DOCKER_LIST),  # parsed, not sniffed
    ],
)
def test_manifest_media_type(body: bytes, header: str | None, expected: str) -> None:
    assert manifest_media_type(body, header) == expected


@FAST
@given(st.binary(max_size=512), st.one_of(st.none(), st.text(max_size=40)))
def test_property_manifest_media_type_never_raises(body: bytes, header: str | None) -> None:
    assert isinstance(manifest_media_type(body, header), str)


def test_media_type_comes_from_the_top_level_only() -> None:
    """A body's type comes from its top-level fields, not from a nested descriptor's."""
    index = json.dumps(
        {"schemaVersion": 2, "manifests": [{"mediaType": OCI_MANIFEST, "digest": "x"}]}
    ).encode()
    assert manifest_media_type(index, None) == OCI_INDEX
    manifest = json.dumps(
        {"schemaVersion": 2, "config": {"mediaType": "application/vnd.oci.image.config.v1+json"}}
    ).encode()
    assert manifest_media_type(manifest, "application/json") == OCI_MANIFEST


# --- several Accept lines, variants, schema1 ---------------------------------------


def test_join_fields_makes_one_list_of_repeated_lines() -> None:
    assert join_fields(["a/b", " c/d ", ""]) == "a/b, c/d"
    assert join_fields([]) is None


def test_same_variant_needs_the_type_named_and_agreement_on_indexes() -> None:
    both = (OCI_INDEX, OCI_MANIFEST)
    assert same_variant(both, OCI_INDEX, (DOCKER_LIST, OCI_INDEX, OCI_MANIFEST))
    assert same_variant(both, OCI_MANIFEST, (OCI_INDEX, OCI_MANIFEST))  # tag has no index
    assert not same_variant((OCI_MANIFEST,), OCI_MANIFEST, both)  # it may have one
    assert not same_variant(both, OCI_INDEX, ("*/*",))
    assert not same_variant(both, OCI_INDEX, ())


def test_schema1_digest_covers_the_payload_only() -> None:
    payload = b'{\n   "schemaVersion": 1,\n   "name": "x"\n}'
    length = len(payload) - 2
    fmt = {"formatLength": length, "formatTail": base64.urlsafe_b64encode(b"\n}").decode()}
    protected = base64.urlsafe_b64encode(json.dumps(fmt).encode()).decode().rstrip("=")
    body = payload[:length] + b',\n   "signatures": [{"protected": "' + protected.encode()
    body += b'"}]\n}'
    assert schema1_payload(body) == payload
    assert manifest_digest(body, DOCKER_V1_SIGNED) == Digest.of(payload)
    assert manifest_digest(b"{}", DOCKER_V1_SIGNED) == Digest.of(b"{}")  # unsigned: the body
