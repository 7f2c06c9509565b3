"""Namespace isolation: content cached through a non-public namespace stays there.

The cache is shared by digest across namespaces. Once a namespace is not open to
everyone (``access`` with ``[server.auth]``), its content must not be reachable
through another namespace just because a client knows the digest: a blob or
manifest first cached through such a namespace (the cache index records which
registry fetched it) is served under another registry name only after that
registry's own upstreams confirmed they have it, with a HEAD. A confirmation is
remembered for that namespace's ``tag_ttl``. Content whose origin is unknown (put
in place by a crash recovery, say) is treated the same way. Without non-public
namespaces this module does nothing.

The cost: one upstream HEAD per (registry, digest) per ``tag_ttl`` for content that
really is shared, and a lookup in the cache index on cache hits while a non-public
namespace is configured. It owns no cache data and changes none.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable

from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.cache.index import BLOB
from mirrorproxy.config import Config
from mirrorproxy.core.errors import BlobUnknown, ManifestUnknown, RegistryError
from mirrorproxy.core.oci import MANIFEST_TYPES, Digest
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.answers import Target
from mirrorproxy.upstream.client import UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

MAX_CONFIRMED = 65536  # remembered confirmations; the oldest go first
CONFIRMED, REFUSED, FAILED = "confirmed", "refused", "error"


class Isolation:
    """Whether content cached through a non-public namespace may be served under another.

    It owns the remembered confirmations; it must not change the cache or its index,
    and asks an upstream only with a HEAD.
    """

    def __init__(
        self,
        config: Config,
        *,
        client: UpstreamClient,
        budget: CacheBudget,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        max_confirmed: int = MAX_CONFIRMED,
    ) -> None:
        self._config = config
        self._client = client
        self._budget = budget
        self._metrics = metrics
        self._clock = clock
        self._max_confirmed = max_confirmed
        self.active = any(not ns.access.anyone for ns in config.namespaces.values())
        self._confirmed: dict[tuple[str, str, Digest], float] = {}  # -> expiry
        self._pending: dict[tuple[str, str, Digest], asyncio.Future[None]] = {}

    async def check(
        self, t: Target, kind: str, digest: Digest, *, origin: str | None = None
    ) -> None:
        """Return if ``t`` may be served this cached (or downloading) content, else raise.

        Args:
            origin: the registry fetching it, for a download still running; else
                the cache index says.

        Raises:
            BlobUnknown, ManifestUnknown: ``t``'s upstreams do not have it (or the
                mirror is offline and cannot ask).
            RegistryError: they could not be asked.
        """
        if not self.active:
            return
        if origin is None:
            origin = self._origin(kind, digest)
        if origin == t.ns_name:
            return
        source = self._config.namespace(origin) if origin else None
        if source is not None and source.access.anyone:
            return  # public content: any namespace may share it
        key = (t.ns_name, kind, digest)
        if self._confirmed.get(key, 0.0) > self._clock():
            return
        pending = self._pending.get(key)
        if pending is not None:
            await asyncio.shield(pending)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            await self._confirm(t, kind, digest)
        except BaseException as err:
            fut.set_exception(
                err if isinstance(err, RegistryError) else RegistryError("confirmation failed")
            )
            fut.exception()  # retrieved: there may be no follower
            raise
        else:
            fut.set_result(None)
        finally:
            del self._pending[key]
        self._remember(key, t.ns.tag_ttl)

    def _origin(self, kind: str, digest: Digest) -> str:
        """The registry the index says fetched it ("" when it does not know)."""
        index = self._budget.index
        if index is None:
            return ""
        try:
            entry = index.get(kind, str(digest))
        except sqlite3.Error as err:  # a closed index at shutdown counts too
            logger.warning("cannot read the cache index for %s: %s", digest, err)
            return ""
        return entry.namespace if entry is not None else ""

    async def _confirm(self, t: Target, kind: str, digest: Digest) -> None:
        missing: type[RegistryError] = BlobUnknown if kind == BLOB else ManifestUnknown
        what = f"{kind} {t.repo}@{digest}"
        if self._config.cache.offline:
            self._count(t, REFUSED)
            raise missing(f"{what} is not known to {t.ns_name} and the mirror is offline")
        sub = "blobs" if kind == BLOB else "manifests"
        headers = {} if kind == BLOB else {"Accept": ", ".join(MANIFEST_TYPES)}
        try:
            resp = await self._client.open(
                t.ns, t.ns_name, "HEAD", f"{t.repo}/{sub}/{digest}", what=what, headers=headers
            )
        except UpstreamError as err:
            self._count(t, REFUSED if err.not_found else FAILED)
            raise err.registry_error(missing) from None
        resp.release()
        self._count(t, CONFIRMED)

    def _count(self, t: Target, result: str) -> None:
        self._metrics.child(self._metrics.isolation_checks, t.ns.name, result).inc()

    def _remember(self, key: tuple[str, str, Digest], ttl: float) -> None:
        if len(self._confirmed) >= self._max_confirmed:
            now = self._clock()
            self._confirmed = {k: v for k, v in self._confirmed.items() if v > now}
            while len(self._confirmed) >= self._max_confirmed:
                del self._confirmed[next(iter(self._confirmed))]
        self._confirmed[key] = self._clock() + ttl
