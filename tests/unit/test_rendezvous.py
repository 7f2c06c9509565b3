"""Rendezvous hashing: one owner per key that every member agrees on, spread evenly,
and only the leaving member's keys move."""

from __future__ import annotations

from collections import Counter

from mirrorproxy.core.rendezvous import ahead_of, blob_key, owner, rank, tag_key

MEMBERS = [f"http://10.0.0.{i}:5000" for i in range(1, 6)]
KEYS = [blob_key(f"sha256:{i:064x}") for i in range(5000)]


def test_the_order_is_stable_and_ignores_the_order_members_are_listed_in() -> None:
    key = blob_key("sha256:" + "ab" * 32)
    first = rank(key, MEMBERS)
    assert sorted(first) == sorted(MEMBERS)
    assert rank(key, list(reversed(MEMBERS))) == first
    assert rank(key, MEMBERS + MEMBERS[:2]) == first  # duplicates dropped
    assert owner(key, MEMBERS) == first[0]
    assert owner(key, []) is None


def test_keys_spread_evenly_over_the_members() -> None:
    counts = Counter(owner(k, MEMBERS) for k in KEYS)
    assert set(counts) == set(MEMBERS)
    fair = len(KEYS) / len(MEMBERS)
    assert all(0.85 * fair < n < 1.15 * fair for n in counts.values()), counts


def test_when_a_member_leaves_only_its_keys_move_to_their_second_choice() -> None:
    gone = MEMBERS[2]
    rest = [m for m in MEMBERS if m != gone]
    moved = 0
    for k in KEYS:
        before, after = rank(k, MEMBERS), owner(k, rest)
        if before[0] == gone:
            moved += 1
            assert after == before[1]
        else:
            assert after == before[0]
    assert 0 < moved < len(KEYS) / 4


def test_a_joining_member_takes_keys_only_for_itself() -> None:
    new = "http://10.0.0.9:5000"
    for k in KEYS[:1000]:
        after = owner(k, [*MEMBERS, new])
        assert after in (owner(k, MEMBERS), new)


def test_ahead_of_self_is_the_failover_walk_before_fetching_oneself() -> None:
    key = tag_key("docker.io", "library/alpine", "3")
    ranked = rank(key, MEMBERS)
    assert ahead_of(ranked[0], key, MEMBERS) == []
    assert ahead_of(ranked[2], key, MEMBERS) == ranked[:2]
    assert ahead_of("http://10.9.9.9:5000", key, MEMBERS) == ranked  # not a member (yet)


def test_kinds_of_keys_do_not_collide() -> None:
    assert blob_key("sha256:1") != tag_key("sha256", "1", "x")
