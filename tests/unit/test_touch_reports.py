"""The report of blob use between cluster members: its wire format, strictly parsed."""

from __future__ import annotations

import pytest

from mirrorproxy.core.touches import MAX_DIGESTS, decode_report, encode_report

A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def test_a_report_round_trips() -> None:
    report = decode_report(encode_report([A], [B]))
    assert report.served == frozenset({A})
    assert report.reading == frozenset({B})
    assert decode_report(b"{}").served == frozenset()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[1, 2]",
        b'{"served": "x"}',
        b'{"served": [1]}',
        b'{"reading": ["sha256:abc"]}',
        b'{"served": [], "extra": []}',
        b"\xff\xfe",
        b'{"served": ["md5:' + b"a" * 32 + b'"]}',
    ],
)
def test_anything_else_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError, match=r"."):
        decode_report(body)


def test_too_many_digests_are_refused() -> None:
    many = [f"sha256:{i:064x}" for i in range(MAX_DIGESTS + 1)]
    with pytest.raises(ValueError, match="more than"):
        decode_report(encode_report(many, []))
