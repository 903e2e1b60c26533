"""Keeps large freed blocks in the heap so multi-MiB buffers are reused, not re-faulted.

glibc serves blocks above its mmap threshold with fresh mmap()s and unmaps them on free, so
every 8 MiB lookup reply paid for ~2,000 page faults when first written: a shard's Lookup
handler took 4.1 ms per 8 MiB with glibc's defaults and 1.4 ms with the thresholds raised
(bench/bench_store.py). Raising M_MMAP_THRESHOLD and M_TRIM_THRESHOLD keeps up to `limit`
bytes of freed memory in the process for reuse. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False
_lock = threading.Lock()  # guards _done


def keep_freed_memory(limit: int = 256 << 20) -> bool:
    """Applies the thresholds once per process; returns whether glibc accepted them."""
    global _done
    with _lock:
        if _done:
            return True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            return False
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        _done = bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
        return _done
