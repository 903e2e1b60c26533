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

Room for a table: a shard refuses a table its host cannot hold (memstore.table) rather than
be killed for memory once updates fill it in. The check holds only if memory promised is
memory taken, so zeros touches every page it maps (~0.1 s a GiB, what the first writes
would pay anyway), and a shard checks and takes a table's memory under reserving_memory(),
one at a time across the processes sharing /dev/shm: two shard processes creating tables at
once would each count the other's as still free. available_bytes is the smaller of the host's
MemAvailable and the headroom of the process's memory cgroup (a container's or a pod's
limit, which MemAvailable does not see).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import mmap
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from memstore import cgroup
from memstore.errors import Unavailable

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
    """A zero-filled CPU tensor whose memory is all the process's when it returns; one of
    HUGE_PAGE_BYTES or more lives in its own anonymous mapping, 2 MiB-aligned and advised for
    huge pages, every page touched (so taken from the host now, not when an update first
    reaches it), unmapped when the tensor is freed."""
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
    # One byte a page written: the kernel maps (and zeroes) each page as the write faults.
    np.frombuffer(region, dtype=np.uint8, count=nbytes, offset=offset)[:: mmap.PAGESIZE] = 0
    # The tensor holds the mapping through the buffer protocol; it is unmapped with the tensor.
    flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)


def available_bytes(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory this process can take now without swapping or meeting its cgroup's OOM killer:
    the smaller of the host's MemAvailable and memstore.cgroup.memory_headroom; None where
    neither says (not Linux). The paths are parameters for tests."""
    said = [b for b in (_mem_available(proc / "meminfo"), cgroup.memory_headroom(proc / "self" / "cgroup", cgroups))
            if b is not None]
    return min(said) if said else None


def _mem_available(meminfo: Path) -> int | None:
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_reserving = threading.Lock()  # serialises this process's reservations; guards _held
_held: tuple[int, int] | None = None  # (pid, fd) of the open LOCK_FILE while a reservation holds or awaits its flock
LOCK_FILE = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()) / "memstore-memory.lock"


# A reservation is given up (Unavailable, naming the holder) only when one holder has kept it
# this long. Taking a table's memory runs at ~10 GiB/s, so such a holder is stuck (stopped,
# hung mid-create), not making a large table; a queue of holders, each quick, is waited out
# however long it is (shards restoring side by side on one host). A handler thread so never
# waits for good behind a stuck process.
RESERVE_STUCK_S = 300.0
# How often a waiter asks /proc/locks who holds the flock (a new holder restarts its clock).
_HOLDER_POLL_S = 0.25
_taken = 0  # reservations taken in this process so far: a waiting thread sees its holder change


@contextlib.contextmanager
def reserving_memory(stuck_s: float | None = None) -> Iterator[None]:
    """Held while a table checks available_bytes and takes its memory: one at a time in this
    process (a lock) and across the processes that share this /dev/shm (flock on LOCK_FILE,
    let go by the kernel if the holder dies): a host's shard processes, unless containers
    give each its own /dev/shm (then each container's cgroup limit is what bounds it). Where
    the file cannot be opened, this process's reservations alone are serialised. Not
    re-entrant: a thread holding it must not ask again. Unavailable once one holder has kept
    it stuck_s (RESERVE_STUCK_S) seconds while this one waited."""
    global _held, _taken
    stuck_s = RESERVE_STUCK_S if stuck_s is None else stuck_s
    if not (isinstance(stuck_s, (int, float)) and 0 <= stuck_s < float("inf")):
        raise ValueError(f"stuck_s must be a finite number of seconds, 0 or more, got {stuck_s!r}")
    lock = _reserving  # the one to let go of: a child forked inside gets a new _reserving
    _acquire_unless_stuck(lock, stuck_s)
    try:
        _taken += 1
        fd = _open_lock_file()
        if fd is not None:
            _held = (os.getpid(), fd)  # before flock: a fork while it waits must close its copy too
        try:
            if fd is not None:
                _flock_unless_stuck(fd, stuck_s)
            yield
        finally:
            if fd is not None and _held == (os.getpid(), fd):  # a forked child's hook closed its copy already
                _held = None
                os.close(fd)  # lets go of the flock
    finally:
        lock.release()


def _acquire_unless_stuck(lock: threading.Lock, stuck_s: float) -> None:
    """lock.acquire(), given up once one holder (told apart by _taken) has kept it stuck_s."""
    seen, since = _taken, time.monotonic()
    while not lock.acquire(timeout=min(_HOLDER_POLL_S, stuck_s)):
        now = time.monotonic()
        if _taken != seen:
            seen, since = _taken, now
        elif now - since >= stuck_s:
            raise Unavailable(f"another thread of this process has held the memory reservation for tables for "
                              f"{stuck_s:g} s: a create or restore of it is stuck")


def _flock_unless_stuck(fd: int, stuck_s: float) -> None:
    """flock(fd, LOCK_EX), polled, given up once one holder has kept it stuck_s."""
    pause, seen = 0.001, _flock_holder(fd)
    since = checked = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            now = time.monotonic()
            if now - checked >= _HOLDER_POLL_S:
                checked, holder = now, _flock_holder(fd)
                if holder != seen:  # None when /proc/locks does not say: then the whole wait counts
                    seen, since = holder, now
            if now - since >= stuck_s:
                who = f"process {seen}" if seen is not None else "another process"
                raise Unavailable(f"{who} on this host has held the memory reservation for tables ({LOCK_FILE}) "
                                  f"for {now - since:.0f} s; if it is stuck, ending it lets the reservation go") from None
            time.sleep(pause)
            pause = min(2 * pause, 0.05)


def _flock_holder(fd: int) -> int | None:
    """The pid /proc/locks names for the flock on fd's file (matched by device and inode:
    each tmpfs numbers its own inodes), or None; 0 (a holder in another pid namespace) too."""
    st = os.fstat(fd)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF"; waiters: "1: -> FLOCK"
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == where:
                    return int(parts[4]) or None
    except (OSError, ValueError):
        pass
    return None


def _after_fork_in_child() -> None:
    """A child forked during a reservation (by its thread or another): its copy of the open
    file would keep the flock held after the parent closes its own, and its copy of
    _reserving is locked for good."""
    global _reserving, _held
    if _held is not None:
        os.close(_held[1])  # not flock(LOCK_UN): that would let go of the parent's lock too
        _held = None
    _reserving = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _open_lock_file() -> int | None:
    # Opened for reading (enough for flock): another user's file in a sticky /dev/shm can be
    # read, not opened with O_CREAT (fs.protected_regular).
    for flags in (os.O_RDONLY, os.O_RDONLY | os.O_CREAT):
        try:
            return os.open(LOCK_FILE, flags | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None
