"""Recently corrupt downloads: which endpoints sent bad bytes for a blob, and when.

A digest mismatch does not say where in the blob the bad bytes are, so every byte a
client received from that download is suspect: the first unverified byte is 0.
After such a failure, for a while:

- a new download of the blob tries the endpoints that sent it corrupt last
  (``avoid``), so a retry goes to the next upstream even once their cooldown ends;
- a request for the blob that starts past byte 0 (a client resuming where it was cut)
  is refused (``refused_resume``): serving it would complete a corrupt prefix with
  good bytes, which the client can only reject after downloading the rest. Refused,
  its attempt fails at once and the next one starts from byte 0.

Pure bookkeeping with an injected clock: no I/O, no HTTP.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mirrorproxy.core.oci import Digest

RESUME_WINDOW = 30.0  # seconds after a corrupt download during which resumes are refused
AVOID_FOR = 900.0  # seconds a corrupt endpoint goes last for that blob
MAX_RECORDS = 4096  # blobs remembered; the oldest are forgotten first


@dataclass(slots=True)
class _Record:
    failed_at: float  # clock time of the last corrupt download
    bad_from: int  # first byte that may be wrong in what clients received
    endpoints: set[str] = field(default_factory=set)


class CorruptBlobs:
    """What recent digest mismatches imply for the next requests of those blobs."""

    def __init__(
        self,
        *,
        resume_window: float = RESUME_WINDOW,
        avoid_for: float = AVOID_FOR,
        max_records: int = MAX_RECORDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resume_window = resume_window
        self.avoid_for = avoid_for
        self._max = max_records
        self._clock = clock
        self._records: OrderedDict[Digest, _Record] = OrderedDict()

    def record(self, digest: Digest, endpoints: Iterable[str], *, bad_from: int = 0) -> None:
        """A download of ``digest`` from ``endpoints`` (URLs) failed verification."""
        now = self._clock()
        rec = self._records.pop(digest, None)
        if rec is None or now - rec.failed_at > self.avoid_for:
            rec = _Record(now, bad_from)
        rec.failed_at, rec.bad_from = now, min(rec.bad_from, bad_from)
        rec.endpoints.update(endpoints)
        self._records[digest] = rec
        while len(self._records) > self._max:
            self._records.popitem(last=False)

    def avoid(self, digest: Digest) -> frozenset[str]:
        """Endpoints that sent ``digest`` corrupt lately: a new download tries them last."""
        rec = self._current(digest, self.avoid_for)
        return frozenset(rec.endpoints) if rec is not None else frozenset()

    def refused_resume(self, digest: Digest, first_byte: int) -> float | None:
        """Seconds since the corrupt download if a request from ``first_byte`` must be
        refused (it continues bytes that may be corrupt); None to serve it."""
        rec = self._current(digest, self.resume_window)
        if rec is None or first_byte <= rec.bad_from:
            return None
        return self._clock() - rec.failed_at

    def _current(self, digest: Digest, within: float) -> _Record | None:
        rec = self._records.get(digest)
        if rec is None:
            return None
        age = self._clock() - rec.failed_at
        if age > max(self.avoid_for, self.resume_window):
            del self._records[digest]
            return None
        return rec if age <= within else None
