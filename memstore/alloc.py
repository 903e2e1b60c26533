"""Memory for large buffers: freed blocks kept for reuse, and tables on huge pages.

keep_freed_memory: glibc serves blocks above its mmap threshold with fresh mmap()s and unmaps
them on free, so every 8 MiB lookup reply paid for ~2,000 page faults when first written: a
shard's Lookup handler took 4.1 ms per 8 MiB with glibc's defaults and 1.4 ms with the
thresholds raised (bench/bench_store.py). Raising M_MMAP_THRESHOLD and M_TRIM_THRESHOLD keeps
up to `limit` bytes of freed memory in the process for reuse. A no-op where the C library is
not glibc.

zeros: a table's rows and optimizer state are read and written at random rows, one TLB miss
per row with 4 KiB pages once the table outgrows the TLB's reach (a few MiB). Backed by
transparent huge pages (2 MiB), a gather of 32,768 random rows from a 1 GiB table took
0.26 ms instead of 0.54-0.91 ms (measured on this project's 2-core VM). Linux serves huge
pages to anonymous private mappings advised MADV_HUGEPAGE when THP is "always" or "madvise";
elsewhere the same call gives ordinary pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import threading

import torch

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


HUGE_PAGE_BYTES = 2 << 20  # x86-64 and arm64 (4 KiB base pages) transparent huge page size


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor; one of HUGE_PAGE_BYTES or more lives in its own anonymous
    mapping, 2 MiB-aligned and advised for huge pages, unmapped when the tensor is freed.
    Pages are zeroed by the kernel on first touch, so an untouched table costs nothing."""
    nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < HUGE_PAGE_BYTES or advise is None:
        return torch.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    offset = -address % HUGE_PAGE_BYTES  # the first 2 MiB boundary inside the mapping
    try:
        region.madvise(advise, offset, nbytes)
    except OSError:  # THP compiled out, or "never": ordinary pages, same semantics
        pass
    # The tensor holds the mapping through the buffer protocol; it is unmapped with the tensor.
    flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)


def available_bytes() -> int | None:
    """Memory the kernel says can be had now without swapping (MemAvailable), or None where
    it does not say (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
