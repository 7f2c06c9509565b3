"""Regressions for blob-fill bugs found in review (all fixed).

- Clients of one namespace waiting on another namespace's fill of the same digest
  each started their own download when that fill failed: a thundering herd on the
  upstream, N copies of the blob in flight. They must share one new fill.
- A client joining a fill just as its commit renamed the temp file into place (in
  a worker thread) opened the temp path after its 200 headers were sent, got
  ENOENT, and the error middleware wrote a second, 500 response into the blob body.
  It must get the whole blob from the final path instead.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path

import pytest

from mirrorproxy.cache import BlobInfo
from mirrorproxy.cache import blobs as blobs_module
from mirrorproxy.cache.blobs import FileBlobStore
from mirrorproxy.core.oci import Digest, parse_digest
from tests.fakes.registry import payload
from tests.support.mirror import FakeFactory, MirrorFactory
from tests.support.paths import REPO, blob_path
from tests.support.waiting import WAIT, wait_for


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records at ERROR or above, or carrying a traceback (an unexpected failure)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_waiters_of_a_failed_foreign_fill_share_one_new_fill(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    """When another namespace's fill fails, its waiters start one fill: 1 upstream GET."""
    lacking, having = await start_fake(), await start_fake()
    data = payload(1_000_000, "herd")
    digest = having.registry.add_blob(data)
    lacking.registry.faults.delay = 0.3  # its 404 comes late: the herd gathers meanwhile
    having.registry.faults.chunk_delay = 0.01  # the new fill is still running as they join
    mirror = await start_mirror([], namespaces={"a.io": [lacking.url], "b.io": [having.url]})

    async with asyncio.timeout(WAIT):
        first = asyncio.create_task(mirror.client.get(blob_path(REPO, digest, ns="a.io")))
        await wait_for(lambda: bool(lacking.registry.calls("GET", "blobs")))
        herd = [
            asyncio.create_task(mirror.client.get(blob_path(REPO, digest, ns="b.io")))
            for _ in range(5)
        ]
        resp = await first
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
        for resp in await asyncio.gather(*herd):
            assert resp.status == 200
            assert await resp.read() == data

    assert len(lacking.registry.calls("GET", "blobs")) == 1
    assert len(having.registry.calls("GET", "blobs")) == 1
    await mirror.settled()
    assert mirror.blob_path(digest).read_bytes() == data


def http_get_raw(host: str, port: int, path: str) -> bytes:
    """Everything the server writes for one ``Connection: close`` GET, up to EOF."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    chunks = []
    with socket.create_connection((host, port), timeout=WAIT) as sock:
        sock.sendall(request.encode())
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_follower_racing_the_commit_rename_gets_the_whole_blob(
    start_fake: FakeFactory,
    start_mirror: MirrorFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A follower whose cache lookup missed just before the rename is sent the whole blob.

    The interleaving is forced: the commit's publish (in a worker thread) waits until
    the follower's lookup has missed, and that lookup returns only once the rename is
    done, so the follower joins the fill with its temp file already gone.
    """
    fake = await start_fake()
    img = fake.registry.add_image(REPO, "3", layer_sizes=(300_000,))
    layer, digest = img.layers[0], img.layer_digests[0]
    mirror = await start_mirror([fake.url])

    in_publish, looked, renamed = threading.Event(), threading.Event(), threading.Event()
    publish = blobs_module._publish  # no public hook holds the rename: wrap the function

    def held_publish(fd: int, tmp_path: Path, final: Path) -> None:  # a worker thread
        in_publish.set()
        looked.wait(WAIT)
        try:
            publish(fd, tmp_path, final)  # fsync, rename, fsync of the directory
        finally:
            renamed.set()

    lookup = FileBlobStore.lookup
    armed: list[Digest] = []  # the digest whose next lookup is the follower's

    async def racing_lookup(self: FileBlobStore, d: Digest) -> BlobInfo | None:
        info = await lookup(self, d)
        if d in armed:
            armed.clear()
            looked.set()
            # Block the loop (on purpose) until the worker thread has renamed: the
            # follower then goes on with a miss in hand and the temp file gone.
            renamed.wait(WAIT)
        return info

    monkeypatch.setattr(blobs_module, "_publish", held_publish)
    monkeypatch.setattr(FileBlobStore, "lookup", racing_lookup)

    async with asyncio.timeout(WAIT):
        leader = asyncio.create_task(mirror.client.get(blob_path(REPO, digest)))
        await wait_for(in_publish.is_set)
        armed.append(parse_digest(digest))
        caplog.set_level(logging.WARNING)
        server = mirror.client.server
        port = server.port
        assert port is not None
        wire = await asyncio.to_thread(http_get_raw, server.host, port, blob_path(REPO, digest))
        resp = await leader
        assert resp.status == 200
        assert await resp.read() == layer

    assert looked.is_set()
    assert renamed.is_set()
    head, _, body = wire.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line == "HTTP/1.1 200 OK"
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert headers["content-length"] == str(len(layer))
    assert headers["docker-content-digest"] == digest
    assert body == layer  # the whole blob, and nothing after it (no second response)
    assert len(fake.registry.calls("GET", "blobs")) == 1
    await mirror.settled()
    assert mirror.blob_path(digest).read_bytes() == layer
    assert errors_logged(caplog) == []
