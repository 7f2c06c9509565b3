"""The report of blob use between cluster members: its wire format, strictly parsed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest
from prometheus_client import CollectorRegistry

from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.cache.remotepins import RemoteUse
from mirrorproxy.config import ClusterConfig
from mirrorproxy.core.rendezvous import blob_key, owner
from mirrorproxy.core.touches import MAX_DIGESTS, decode_report, encode_report
from mirrorproxy.core.tuning import DEFAULT_TUNING
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.touchreports import MemberSplit, TouchReporter
from mirrorproxy.upstream.client import UpstreamClient
from mirrorproxy.upstream.members import Members

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


async def test_what_a_failed_report_said_was_served_is_told_next_round() -> None:
    """A report lost to a timeout or a restarting owner must not make the owner
    forget that a blob was used elsewhere."""
    me, other = "http://127.0.0.1:5001", "http://127.0.0.1:5002"
    metrics = Metrics(CollectorRegistry())
    members = Members(ClusterConfig(me, members=(me, other)), metrics)
    theirs = next(
        f"sha256:{i:064x}"
        for i in range(100)
        if owner(blob_key(f"sha256:{i:064x}"), (me, other)) == other
    )
    remote = RemoteUse()
    budget = cast(CacheBudget, SimpleNamespace(remote=remote, pinned=frozenset()))
    answers = [False, True]
    sent: list[bytes] = []

    async def post_member(member: str, path: str, body: bytes) -> bool:
        sent.append(body)
        return answers.pop(0)

    client = cast(UpstreamClient, SimpleNamespace(post_member=post_member))
    reporter = TouchReporter(MemberSplit(me, members), budget, client, metrics, DEFAULT_TUNING)
    remote.note(theirs)
    assert await reporter.report() == 0  # the owner did not take it
    assert await reporter.report() == 1  # told again, and taken
    assert [decode_report(b).served for b in sent] == [frozenset({theirs})] * 2
    assert await reporter.report() == 0
    assert len(sent) == 2  # nothing left to tell
