"""CorruptBlobs: what a recent digest mismatch means for the next requests of a blob."""

from __future__ import annotations

from mirrorproxy.core.oci import Digest
from mirrorproxy.pullthrough.corruption import CorruptBlobs

A = Digest("sha256", "a" * 64)
B = Digest("sha256", "b" * 64)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_resume_past_byte_0_is_refused_for_the_window_only() -> None:
    clock = Clock()
    corrupt = CorruptBlobs(resume_window=30, avoid_for=600, clock=clock)
    corrupt.record(A, ["http://one"])
    clock.now += 5
    assert corrupt.refused_resume(A, 1) == 5
    assert corrupt.refused_resume(A, 10**9) == 5
    assert corrupt.refused_resume(A, 0) is None  # from the start: nothing suspect is kept
    assert corrupt.refused_resume(B, 1) is None  # another blob
    clock.now += 26
    assert corrupt.refused_resume(A, 1) is None


def test_corrupt_endpoints_go_last_for_that_blob_for_a_while() -> None:
    clock = Clock()
    corrupt = CorruptBlobs(resume_window=30, avoid_for=600, clock=clock)
    assert corrupt.avoid(A) == frozenset()
    corrupt.record(A, ["http://one"])
    corrupt.record(A, ["http://two", "http://one"])  # a later download failed too
    assert corrupt.avoid(A) == {"http://one", "http://two"}
    assert corrupt.avoid(B) == frozenset()
    clock.now += 601
    assert corrupt.avoid(A) == frozenset()
    # A new failure after the memory lapsed starts afresh.
    corrupt.record(A, ["http://three"])
    assert corrupt.avoid(A) == {"http://three"}


def test_another_failure_restarts_the_resume_window() -> None:
    clock = Clock()
    corrupt = CorruptBlobs(resume_window=30, avoid_for=600, clock=clock)
    corrupt.record(A, ["http://one"])
    clock.now += 25
    corrupt.record(A, ["http://two"])
    clock.now += 25
    assert corrupt.refused_resume(A, 7) == 25


def test_memory_is_bounded() -> None:
    corrupt = CorruptBlobs(max_records=3, clock=Clock())
    digests = [Digest("sha256", f"{i:064x}") for i in range(5)]
    for d in digests:
        corrupt.record(d, ["http://one"])
    assert [bool(corrupt.avoid(d)) for d in digests] == [False, False, True, True, True]
