"""Rendezvous (highest random weight) hashing: which cluster member owns a key.

Pure. Every member ranks the members for a key by a hash of (member, key) and the
first in that order owns it: members that agree on the member list agree on the
owner without talking to each other, keys spread evenly, and when a member leaves
only the keys it owned move (to the member each ranked second). The rest of the
order is the failover walk when an owner cannot answer.

The keys of what a cluster fetches once: a blob or manifest by its digest (the
same bytes whatever repository names them), a tag by registry, repository and tag.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

# The header a member puts on a request it forwards to an owner: the owner then
# serves it itself (from its cache, else from upstream) and never forwards it again.
FORWARDED_HEADER = "X-Mirrorproxy-Forwarded"


def _weight(member: str, key: str) -> int:
    digest = hashlib.blake2b(f"{member}\n{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(key: str, members: Iterable[str]) -> list[str]:
    """The members in rendezvous order for ``key``: the owner first (duplicates dropped)."""
    return sorted(dict.fromkeys(members), key=lambda m: (-_weight(m, key), m))


def owner(key: str, members: Iterable[str]) -> str | None:
    """The member owning ``key`` (None for no members)."""
    ranked = rank(key, members)
    return ranked[0] if ranked else None


def ahead_of(self_url: str, key: str, members: Iterable[str]) -> list[str]:
    """The members to ask before fetching ``key`` oneself: those ranked above
    ``self_url`` (all of them when ``self_url`` is not a member)."""
    ranked = rank(key, members)
    return ranked[: ranked.index(self_url)] if self_url in ranked else ranked


def blob_key(digest: str) -> str:
    return f"blob:{digest}"


def manifest_key(digest: str) -> str:
    return f"manifest:{digest}"


def tag_key(registry: str, repo: str, tag: str) -> str:
    return f"tag:{registry}/{repo}:{tag}"


def referrers_key(registry: str, repo: str, subject: str) -> str:
    return f"referrers:{registry}/{repo}@{subject}"
