"""Room on the disk under the cache directory, as the budget asks for it.

The disk is asked whatever ``min_free`` says: a full disk cuts a fill mid-way
otherwise. It only reads the filesystem's counts (statvfs); it must not evict.
"""

from __future__ import annotations

import os

from mirrorproxy.config import CacheConfig


def disk_shortfall(config: CacheConfig, need: int) -> int | None:
    """Bytes that must be freed on the disk before ``need`` more fit, keeping
    ``min_free`` (0 or less: it fits); None when the disk cannot be asked."""
    try:
        st = os.statvfs(config.dir)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    wanted = max(int(config.min_free * st.f_blocks * st.f_frsize), config.min_free_bytes)
    return wanted + need - free
