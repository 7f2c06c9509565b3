"""Which index entries a budget accounts for, when several split one cache."""

from __future__ import annotations

from collections.abc import Callable

from mirrorproxy.core.oci import Digest


class OwnedDigests:
    """``owns`` over the index's digest strings, remembered: recounting a share asks
    it of every entry, and rendezvous hashing costs a hash per worker.

    When what ``owns`` answers changes (a cluster's member list did), ``forget``
    must be called before anything asks again.
    """

    LIMIT = 1 << 18  # entries remembered (then forgotten at once, and relearnt)

    def __init__(self, owns: Callable[[Digest], bool]) -> None:
        self._owns = owns
        self._known: dict[str, bool] = {}

    def __call__(self, text: str) -> bool:
        known = self._known.get(text)
        if known is None:
            if len(self._known) >= self.LIMIT:
                self._known.clear()
            algorithm, _, hex_ = text.partition(":")  # the index holds valid digests only
            known = self._known[text] = self._owns(Digest(algorithm, hex_))
        return known

    def forget(self) -> None:
        self._known.clear()
