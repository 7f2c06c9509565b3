"""Tuning: the sizes and times that bound how blob bytes move through the mirror.

Not user configuration (nothing here is in the config file): the values measured to
work, in one frozen object the engine passes to the code that uses them, so a test
passes smaller ones instead of changing module constants.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True, slots=True)
class Tuning:
    """How downloads share their bytes, how the cache writes them, how clients get them.

    It holds values only: it must not be changed in place (replace it; a download
    keeps the values it started with) and carries no behaviour.
    """

    # -- a download and its clients (pullthrough) --
    write_batch: int = 4 * MIB  # bytes gathered before one write: fewer thread hops
    live_max: int = 4  # live clients per download; the others read the file (sendfile)
    live_buffer: int = 4 * MIB  # a live client with more than this unsent goes to the file
    # Once the disk failed: bytes kept in memory for the followers; past this the
    # download waits for the slowest of them.
    stream_buffer: int = 16 * MIB
    # Upstream body reads: the kernel writes into buffers of read_piece bytes (each
    # filled by several reads, handed on as views); past read_ahead unread bytes
    # the socket is paused.
    # 1 MiB against 256 KiB: fewer, larger reads and sends on the event loop (with
    # pieces reused, 0.60 -> 0.48 CPU-s/GB there). 2 MiB: each piece is one huge page
    # (core.pages; Linux 6.7+ aligns such mappings), so a new piece costs one fault;
    # cold fills 1.30 -> 1.08 CPU-s/GB (median of 27, with private memory). A
    # download gone memory-only reads into pieces of stream_buffer / 8 at most, so
    # memory stays bounded in fine steps.
    read_piece: int = 2 * MIB
    # An upstream body is handed on in parts of at most read_view bytes: a fill's
    # views (to live clients, their window, the writer), a stream-through relay's
    # reads. Peak RSS for 10 clients of a cold 1 GiB blob: 99-131 MiB, against
    # 97-147 with 2 MiB views (live clients' buffers grow in larger steps).
    read_view: int = 1 * MIB
    read_ahead: int = 8 * MIB
    max_resumes: int = 3
    unclaimed_timeout: float = 30.0  # a direct response nobody picked up is closed after this
    shutdown_grace: float = 10.0  # seconds running downloads get to finish at shutdown

    # -- the cache write (cache/blobs) --
    # Bytes queued for the disk and the hash, over all downloads, before a download
    # waits; each may always have write_ahead_min in flight, so every one moves.
    # 64 MiB was no faster for one cold blob and took peak RSS to ~150 MiB when ten
    # clients shared a 1 GiB download on two busy cores; 32 MiB kept it near 100 MiB.
    write_ahead: int = 32 * MIB
    write_ahead_min: int = 8 * MIB
    # Temp files written with O_DIRECT where the filesystem allows (cache/appender):
    # the page-cache copy cost 0.2-1.6 CPU-s/GB of a cold fill; the price is that the
    # first reader of a new blob's file reads the disk.
    direct_write: bool = True
    # ...while the disk keeps up: past this many bytes queued and not yet on disk, if
    # the disk took direct writes slower than the download brings bytes, a batch goes
    # through the page cache (a disk slower than the download must not slow its
    # clients; the page cache absorbs the difference as before). Below write_ahead,
    # where the download would wait. A backlog with a fast disk (the writing thread
    # short of CPU on busy cores) stays direct: switching on the backlog alone sent
    # 0-80 % of a cold 256 MiB fill through the page cache here, at up to 3 CPU-s/GB.
    direct_backlog: int = 24 * MIB
    index_flush: float = 10.0  # seconds between writes of last-use times to the index

    # -- a cluster over one bucket (pullthrough/touchreports, cache/budget) --
    touch_report: float = 3.0  # seconds between reports of use to the owners of blobs
    touch_batch: int = 512  # digests in one report at most (the rest wait for the next)
    remote_pin: float = 15.0  # seconds a blob read elsewhere stays pinned unless re-reported
    relist_after: float = 5.0  # seconds the member list must hold still before a re-list

    # -- sending to clients (http) --
    slice_time: float = 0.1  # seconds one sendfile slice should take
    min_slice: int = 64 * KIB  # a client slower than this per client_timeout is stalled
    first_slice: int = 1024 * KIB
    max_slice: int = 16 * MIB
    # Loopback clients get file bytes copied in writes of copy_piece (http/blobsend):
    # 256 MiB cached to one client here, 3.2-4.7 GB/s against 2.5 by sendfile; 1 MiB
    # writes fell to 1.7 (the piece no longer stays in the CPU cache between copies).
    loopback_copy: bool = True
    copy_piece: int = 256 * KIB
    flush_poll: float = 0.01  # seconds between looks at a transport buffer being flushed
    small_blob: int = 64 * KIB  # cached blobs up to this size are answered from one read


DEFAULT_TUNING = Tuning()
