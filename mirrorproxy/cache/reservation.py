"""Reservation: room in the cache budget promised to one fill, released by that fill only.

A failing fill cleaning up late must not release the room of the retry that
replaced it, so each fill holds its own object rather than a count by digest.
"""

from __future__ import annotations

from collections.abc import Callable


class Reservation:
    """Room promised to one fill; ``refused`` says why there is none (then nothing is held).

    Released once, by ``release()`` or when the blob is committed; releasing again
    is a no-op, and never touches another fill's reservation.
    """

    __slots__ = ("_on_release", "digest", "refused", "size")

    def __init__(
        self,
        digest: str,
        size: int,
        *,
        refused: str | None = None,
        on_release: Callable[[Reservation], None] | None = None,
    ) -> None:
        self.digest, self.size, self.refused = digest, size, refused
        self._on_release = on_release

    def release(self) -> None:
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release(self)
