"""The rules of blob answers: ETag, conditional requests, If-Range, where a GET starts."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from mirrorproxy.core.errors import PreconditionFailed, RangeNotSatisfiable
from mirrorproxy.core.oci import Digest
from mirrorproxy.http.blobrules import blob_headers, first_byte, not_modified, wanted_range

D = Digest("sha256", "c" * 64)
TAG = f'"{D}"'


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_every_answer_states_digest_etag_and_ranges() -> None:
    assert blob_headers(D) == {
        "Docker-Content-Digest": str(D),
        "ETag": TAG,
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
    }


@pytest.mark.parametrize(
    "value",
    [TAG, f"W/{TAG}", "*", f'"sha256:{"d" * 64}", {TAG}', f" {TAG} "],
)
def test_if_none_match_with_the_digest_is_not_modified(value: str) -> None:
    assert not_modified(headers(("If-None-Match", value)), D)


def test_if_none_match_on_several_lines_is_one_list() -> None:
    assert not_modified(headers(("If-None-Match", '"x"'), ("If-None-Match", TAG)), D)


@pytest.mark.parametrize("value", ['"other"', str(D), f'"{D.hex}"'])
def test_if_none_match_with_another_tag_is_modified(value: str) -> None:
    assert not not_modified(headers(("If-None-Match", value)), D)
    assert not not_modified(headers(), D)


def test_if_match_needs_the_strong_digest_tag() -> None:
    assert not not_modified(headers(("If-Match", TAG)), D)
    assert not not_modified(headers(("If-Match", "*")), D)
    for value in ('"other"', f"W/{TAG}"):
        with pytest.raises(PreconditionFailed) as info:
            not_modified(headers(("If-Match", value)), D)
        assert info.value.status == 412


def test_if_range_that_does_not_hold_voids_the_range() -> None:
    assert wanted_range(headers(("Range", "bytes=5-9")), D, 100) == (5, 9)
    assert wanted_range(headers(("Range", "bytes=5-9"), ("If-Range", TAG)), D, 100) == (5, 9)
    for value in ('"other"', f"W/{TAG}", "Wed, 21 Oct 2015 07:28:00 GMT"):
        assert wanted_range(headers(("Range", "bytes=5-9"), ("If-Range", value)), D, 100) is None


def test_a_size_not_known_yet_means_the_whole_blob() -> None:
    assert wanted_range(headers(("Range", "bytes=5-9")), D, None) is None


def test_416_only_when_nothing_overlaps() -> None:
    with pytest.raises(RangeNotSatisfiable):
        wanted_range(headers(("Range", "bytes=100-")), D, 100)
    assert wanted_range(headers(("Range", "bytes=0-9,20-29")), D, 100) is None
    assert wanted_range(headers(("Range", "bytes=abc")), D, 100) is None


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ((), 0),
        ((("Range", "bytes=0-"),), 0),
        ((("Range", "bytes=0-1023"),), 0),
        ((("Range", "bytes=1000000-"),), 1000000),
        ((("Range", "bytes=7-9"),), 7),
        ((("Range", "bytes=-10"),), 10**18 - 10),  # a suffix skips the start
        ((("Range", "bytes=0-9,20-29"),), 0),  # answered whole
        ((("Range", "garbage"),), 0),
        ((("Range", "bytes=-0"),), 0),  # 416 later: nothing is sent
        ((("Range", "bytes=5-"), ("If-Range", '"other"')), 0),
        ((("Range", "bytes=5-"), ("If-Range", TAG)), 5),
    ],
)
def test_first_byte_of_a_get(pairs: tuple[tuple[str, str], ...], expected: int) -> None:
    assert first_byte(headers(*pairs), D) == expected
