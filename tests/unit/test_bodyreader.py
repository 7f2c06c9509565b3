"""Pieces a body is read into are filled again only once no view of them lives.

A real socket pair under asyncio: the upstream's side sends, the reader's views are
kept or dropped the way the disk, the hash and client sockets keep or drop them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import socket
from collections.abc import AsyncIterator

from mirrorproxy.core.pages import PAGE
from mirrorproxy.upstream.bodyreader import BodyReader
from tests.fakes.registry import payload

PIECE = 64 * 1024


@contextlib.asynccontextmanager
async def reading(
    remaining: int, *, start: int = 0
) -> AsyncIterator[tuple[BodyReader, socket.socket]]:
    """A ``BodyReader`` on one end of a socket pair, and the other end to send from."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, protocol = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    body = BodyReader(
        transport,
        protocol,
        remaining=remaining,
        piece=PIECE,
        limit=8 * PIECE,
        stall=5.0,
        start=start,
    )
    try:
        theirs.setblocking(False)
        yield body, theirs
    finally:
        transport.close()
        theirs.close()


async def read_piece(body: BodyReader) -> list[memoryview]:
    """The views making up the next ``PIECE`` bytes."""
    views: list[memoryview] = []
    got = 0
    async with asyncio.timeout(5):
        while got < PIECE:
            view = await body.read(PIECE - got)
            assert isinstance(view, memoryview)
            views.append(view)
            got += len(view)
    return views


def piece_of(views: list[memoryview]) -> int:
    """Which piece ``views`` are on (its id: holding the piece itself would keep it)."""
    (piece,) = {id(v.obj) for v in views}  # one piece each (they are read whole)
    return piece


async def test_a_piece_is_reused_once_nothing_refers_to_it_and_never_before() -> None:
    loop = asyncio.get_running_loop()
    data = payload(4 * PIECE, "pieces")
    async with reading(len(data)) as (body, theirs):
        got: list[bytes] = []
        kept: list[list[memoryview]] = []
        first = 0  # the first piece (its id)
        for i in range(4):
            await loop.sock_sendall(theirs, data[i * PIECE : (i + 1) * PIECE])
            views = await read_piece(body)
            got.append(b"".join(bytes(v) for v in views))
            kept.append(views)
            if i == 1:
                # The first piece's views still live: the second is a new piece.
                assert piece_of(kept[1]) != piece_of(kept[0])
                first = piece_of(kept[0])
                for v in kept[0]:
                    v.release()
                kept[0] = []
            if i == 2:
                # Nothing refers to the first piece now: it is filled again, after
                # its old bytes were all read (they were, above).
                assert piece_of(kept[2]) == first
            if i == 3:
                # The second piece's views live (kept[1]): not reused.
                assert piece_of(kept[3]) != piece_of(kept[1])
        assert b"".join(got) == data
        assert await body.read(PIECE) == b""


async def test_each_byte_sits_at_an_address_congruent_to_its_place_in_the_blob() -> None:
    """So whole pages of a piece can go to an ``O_DIRECT`` file as they are."""
    loop = asyncio.get_running_loop()
    start = 5 * PAGE + 1234  # the body's first byte is this far into the blob
    data = payload(4 * PIECE + 100, "laid out")
    async with reading(len(data), start=start) as (body, theirs):
        await loop.sock_sendall(theirs, data)
        at, got = start, bytearray()
        async with asyncio.timeout(5):
            while view := await body.read(PIECE):
                assert isinstance(view, memoryview)
                address = ctypes.addressof(ctypes.c_char.from_buffer(view))
                assert (address - at) % PAGE == 0
                at += len(view)
                got += view
        assert got == data
