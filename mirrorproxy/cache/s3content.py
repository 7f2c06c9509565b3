"""What maintenance needs of either kind of content in a bucket (``ContentStore``).

Objects of one kind live at ``<prefix><kind>s/<alg>/<hex>``; a quarantined one is
copied under ``<prefix>quarantine/`` and removed from its key.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from mirrorproxy.cache import BLOB, Content
from mirrorproxy.cache.s3client import S3Connection
from mirrorproxy.core.oci import Digest, parse_digest


class S3Content:
    """What maintenance needs of either kind of content, over objects of one kind."""

    kind = BLOB

    def __init__(self, conn: S3Connection) -> None:
        self.conn = conn

    def key_of(self, digest: Digest) -> str:
        return self.conn.key(f"{self.kind}s", digest.algorithm, digest.hex)

    def contents(self) -> Iterator[Content]:
        under = self.conn.key(f"{self.kind}s/")
        for key, size, stored in self.conn.run(self.conn.listing(under)):
            alg, _, hex_ = key[len(under) :].partition("/")
            try:
                digest = parse_digest(f"{alg}:{hex_}")
            except ValueError:
                continue  # not ours
            yield Content(self.kind, digest, size, stored)

    def size(self, digest: Digest) -> int | None:
        found = self.conn.run(self.conn.head(self.key_of(digest)))
        return None if found is None else found[0]

    def check(self, digest: Digest) -> bool | None:
        return self.conn.run(self._intact(digest))

    async def _intact(self, digest: Digest) -> bool | None:
        hasher = digest.hasher()
        try:
            async for chunk in self.conn.chunks(self.key_of(digest)):
                hasher.update(chunk)
        except KeyError:
            return None
        return hasher.hexdigest() == digest.hex

    def delete(self, digest: Digest) -> bool:
        return self.conn.run(self.conn.delete(self.key_of(digest)))

    def quarantine(self, digest: Digest) -> str:
        """Copy the object under ``quarantine/`` and remove it from its key."""
        src = self.key_of(digest)
        dst = self.conn.key(
            "quarantine", self.kind, digest.algorithm, f"{digest.hex}-{uuid.uuid4().hex}"
        )
        self.conn.run(self.conn.copy(src, dst))
        self.conn.run(self.conn.delete(src))
        return f"s3://{self.conn.config.bucket}/{dst}"
