"""Page-aligned buffers for blob bytes: private memory, in huge pages where it can be.

Blob bytes are received into buffers whose whole pages go to the disk as they are
(``O_DIRECT``), so the buffers must be page-aligned: anonymous ``mmap`` memory.
Python's ``mmap(-1, n)`` is a *shared* mapping, backed by shmem: every first touch
of a page goes through the shmem page cache and every unmap tears an inode down.
Measured on the benchmark VM, first touch cost 0.83 CPU-s per GB of buffer shared,
0.45 private and 0.05 private in 2 MiB huge pages; a cold fill touches tens of MiB
of new buffers, and shmem faults were up to a quarter of its CPU.

With the kernel's default THP ``defrag`` ("madvise"), a huge-page fault may compact
fragmented memory before it returns; a download makes new pieces only until it can
reuse them (a few dozen), and in every benchmark here ``compact_stall`` in
``/proc/vmstat`` stayed 0 over ~40,000 huge-page faults.

It only allocates: what a buffer holds and when it is reused is its owner's business.
"""

from __future__ import annotations

import contextlib
import mmap

PAGE = mmap.PAGESIZE
HUGE = 2 * 1024 * 1024  # a transparent huge page on x86-64 and arm64 (4 KiB pages)


def anonymous(size: int) -> mmap.mmap:
    """``size`` bytes of zeroed, page-aligned private memory, asking for huge pages
    when ``size`` is a multiple of one (Linux 6.7 and later align such mappings to
    it; on older kernels a mapping gets huge pages only where it happens to span an
    aligned 2 MiB, and the rest is still private memory)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    buf = mmap.mmap(-1, size, flags=flags)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and size % HUGE == 0:
        # Only advice: a kernel without transparent huge pages says EINVAL.
        with contextlib.suppress(OSError):
            buf.madvise(advice)
    return buf
