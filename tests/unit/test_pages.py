"""Buffers for blob bytes are private, page-aligned and zeroed, in huge pages if they can be."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import pytest

from mirrorproxy.core.pages import HUGE, PAGE, anonymous


def _address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _mapping(address: int) -> tuple[str, str]:
    """The permissions and the ``smaps`` block of the mapping holding ``address``."""
    blocks = Path("/proc/self/smaps").read_text().split("\n")
    for i, line in enumerate(blocks):
        head = line.split()
        if not head or "-" not in head[0] or ":" in head[0]:
            continue
        lo, hi = (int(x, 16) for x in head[0].split("-"))
        if lo <= address < hi:
            rest = []
            for more in blocks[i + 1 :]:
                if more and "-" in more.split()[0] and ":" not in more.split()[0]:
                    break
                rest.append(more)
            return head[1], "\n".join(rest)
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("size", [1, PAGE, 3 * PAGE + 1, HUGE])
def test_private_aligned_and_zeroed(size: int) -> None:
    buf = anonymous(size)
    try:
        assert len(buf) == size
        assert _address(buf) % PAGE == 0
        assert buf[:] == bytes(size)
        buf[size - 1 : size] = b"x"  # writable
        if Path("/proc/self/smaps").exists():
            perms, _ = _mapping(_address(buf))
            assert perms.endswith("p"), perms  # private: not shmem
    finally:
        buf.close()


def test_huge_page_sized_buffers_get_huge_pages_where_the_kernel_allows() -> None:
    """Asked for with ``madvise``; given where transparent huge pages are on. (4 MiB
    always spans one aligned 2 MiB, whether or not the kernel aligns the mapping.)"""
    thp = Path("/sys/kernel/mm/transparent_hugepage")
    if not (thp / "enabled").exists() or "[never]" in (thp / "enabled").read_text():
        pytest.skip("transparent huge pages are off on this kernel")
    if int((thp / "hpage_pmd_size").read_text()) != HUGE:
        pytest.skip("this kernel's huge pages are not 2 MiB")
    buf = anonymous(2 * HUGE)
    try:
        buf[:] = b"\1" * len(buf)  # touched: the pages exist now
        _, smaps = _mapping(_address(buf))
        fields = {k: v.split() for k, _, v in (ln.partition(":") for ln in smaps.splitlines())}
        if fields.get("THPeligible") == ["0"]:
            pytest.skip("huge pages are turned off for this process")
        assert int(fields["AnonHugePages"][0]) > 0, smaps
    finally:
        buf.close()
