"""Shared-memory segments: a same-host client's lookups land in its own memory, copied once.

Over loopback gRPC a 16 MiB lookup reply is copied about six times (gather into the reply,
gRPC's send copy, the kernel's two, gRPC's per-slice and join copies on receipt) and the
client copies it once more into key order. When a shard runs on the client's host, the
client instead names a region of one of its *segments* (a Linux memfd) in the request, and
the shard gathers the rows straight into it; the reply carries no rows. The shard's tables
stay private memory on transparent huge pages (shared memory gets no huge pages where
`shmem_enabled` is "never", the common default, and the optimizers' speed depends on them),
and the shard reads them under its reader-writer lock as for any lookup, so delivered rows
are whole rows at one version, exactly as in a reply.

A segment is reachable by a shard when it can open `/proc/<pid>/fd/<fd>` (same host, same
PID namespace, same user), what it opened is a memstore memfd sealed against resizing (so a
gather cannot fault on a shrunk file) of at most the shard's budget, and its header holds the
request's token (16 random bytes; it also keys the shard's cache of mappings). Anything else
is `SegmentUnreachable`, and the client falls back to rows in replies for that shard.

Layout: HEADER_BYTES of header (MAGIC, then the token), then data.

Client side, `SegmentPool` leases segments, one per lookup call: the call's results are
numpy/torch views of the lease's region, and the segment goes back to the pool only when the
last of them is garbage (a `weakref.finalize` on the region array, which every derived view
and tensor keeps alive). Never reused: a segment that a failed or retried call may still have
shards writing into (a retry starts the whole call on a fresh lease), and one whose results
were alive when the process forked (parent and child share them). Small results, and results
past MAX_LEASED live leases, are copied out instead (memstore.lookups), so that holding many
results does not hold many segments. Shard side, `SegmentMap` maps segments on first use,
bounds-checks every region, and drops mappings that their client released, that belong to a
dead process, or that exceed its byte budget (least recently used first; a later request
maps it again).

Plain Python + numpy (os, mmap); no gRPC.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import threading
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from memstore.errors import InvalidArgument, SegmentUnreachable

MAGIC = b"memstore-segment"  # 16 bytes at offset 0; the token follows
TOKEN_BYTES = 16
HEADER_BYTES = 4096  # data starts page-aligned
MEMFD_NAME = "memstore-segment"
MIN_CAPACITY = 1 << 20  # smallest segment's data bytes; capacities are powers of two
ALIGN = 64  # regions within a segment start on cache lines
FREE_PER_CAPACITY = 4  # free segments a pool keeps per capacity; more are closed
SHARD_MAP_BYTES = 4 << 30  # mapped client segments a shard keeps before dropping the oldest

_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # a client's pages are faulted in once, at creation
_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0)  # a segment's size is fixed
MAX_LEASE_BYTES = 1 << 30  # a larger call's rows come in replies (a shard maps at most SHARD_MAP_BYTES)
COPY_OUT_BYTES = 256 << 10  # a smaller call's results are copied out and its segment reused at once
MAX_LEASED = 32  # past this many live leases, results are copied out too (a segment is an fd)


def supported() -> bool:
    """Whether this platform has sealable memfds and /proc (Linux)."""
    return hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS") and os.path.isdir("/proc/self/fd")


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class SegmentRef:
    """What a request names a segment by (the wire's Segment message)."""

    pid: int
    fd: int
    size: int
    token: bytes


# ---------------------------------------------------------------- client side


class Segment:
    """One memfd of this process, mapped read-write; `capacity` data bytes after the header.
    Sealed against shrinking and growing, so a shard that maps it can trust its size."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = secrets.token_bytes(TOKEN_BYTES)
        size = HEADER_BYTES + capacity
        self.fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
            self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        except OSError:
            os.close(self.fd)
            raise
        self.mm[: len(MAGIC) + TOKEN_BYTES] = MAGIC + self.token
        # A segment dropped unclosed (its client collected without close()) closes its fd
        # too; the mapping keeps a descriptor of its own, which goes with it.
        self._close_fd = weakref.finalize(self, os.close, self.fd)
        self.ref = SegmentRef(os.getpid(), self.fd, size, self.token)
        # Set when a shard may still write into it (a failed call), or a forked child may
        # hold results in it: then it is closed, never leased again.
        self.discarded = False

    def region(self, nbytes: int) -> np.ndarray:
        """A new uint8 array over the first nbytes of data (base: the mapping)."""
        return np.frombuffer(self.mm, np.uint8, count=nbytes, offset=HEADER_BYTES)

    def close(self) -> None:
        try:
            self.mm.close()
        except BufferError:  # a view is still alive: the mapping goes with it
            pass
        self._close_fd()  # once, whoever asks first


class Lease:
    """A segment held for one call: `data` (uint8 [nbytes]) is where the shards write."""

    def __init__(self, segment: Segment, data: np.ndarray) -> None:
        self.segment = segment
        self.data = data

    @property
    def ref(self) -> SegmentRef:
        return self.segment.ref

    def discard(self) -> None:
        """Never reuse this segment: a shard may still write into it (a failed call)."""
        self.segment.discarded = True


class SegmentPool:
    """The segments of one client, leased per call and reused once their results are gone."""

    def __init__(self) -> None:
        self._free: dict[int, list[Segment]] = {}  # capacity -> free segments
        self._lock = threading.Lock()  # guards _free
        # Segments whose results died. Finalizers may run inside any allocation, even one
        # made while _lock is held, so they only append here (atomic) and lease() drains it.
        self._returned: deque[Segment] = deque()
        self.leased: set[Segment] = set()  # segments whose results may be alive (add/discard are atomic)
        self._closed = False
        self.created = 0  # segments made so far (tests and stats)
        self.closed_tokens: list[bytes] = []  # of segments closed and not yet reported (take_closed)
        _POOLS.add(self)

    def lease(self, nbytes: int) -> Lease:
        capacity = max(MIN_CAPACITY, 1 << max(0, nbytes - 1).bit_length())
        with self._lock:
            self._drain()
            free = self._free.get(capacity)
            segment = free.pop() if free else None
        if segment is None:
            segment = Segment(capacity)
            self.created += 1
        data = segment.region(nbytes)
        self.leased.add(segment)
        weakref.finalize(data, self._give_back, segment).atexit = False
        return Lease(segment, data)

    def _give_back(self, segment: Segment) -> None:
        """A lease's results are gone (a finalizer: no lock may be taken here)."""
        self.leased.discard(segment)
        self._returned.append(segment)
        if self._closed:  # nobody leases again: close what came back now
            while self._returned:
                self._close(self._returned.popleft())

    def _drain(self) -> None:
        """Files returned segments (under _lock): reusable ones as free, the rest closed."""
        while self._returned:
            segment = self._returned.popleft()
            free = self._free.setdefault(segment.capacity, [])
            if segment.discarded or self._closed or len(free) >= FREE_PER_CAPACITY:
                self._close(segment)
            else:
                free.append(segment)

    def _close(self, segment: Segment) -> None:
        segment.close()
        self.closed_tokens.append(segment.token)

    def take_closed(self) -> list[bytes]:
        """The tokens of the segments closed since the last call (for the shards to unmap)."""
        with self._lock:
            self._drain()
            tokens, self.closed_tokens = self.closed_tokens, []
        return tokens

    def leased_tokens(self) -> list[bytes]:
        """The tokens of the segments whose results may still be alive."""
        return [segment.token for segment in list(self.leased)]

    def close(self) -> None:
        """Closes the free segments; leased ones close when their results are gone."""
        with self._lock:
            self._closed = True
            self._drain()
            for free in self._free.values():
                for segment in free:
                    self._close(segment)
            self._free.clear()

    def _forked(self) -> None:
        """In a forked child: the segments are the parent's; lease fresh ones from now on."""
        self._lock = threading.Lock()
        for segment in [*self.leased, *self._returned, *(s for free in self._free.values() for s in free)]:
            segment.discarded = True
        self._free.clear()
        self._returned.clear()
        self.closed_tokens = []


# A fork copies every pool: results alive then are shared (MAP_SHARED) between parent and
# child, so neither may lease their segments again; the child starts with no segments.
_POOLS: "weakref.WeakSet[SegmentPool]" = weakref.WeakSet()


def _before_fork() -> None:
    for pool in list(_POOLS):
        for segment in list(pool.leased):
            segment.discarded = True


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------- shard side


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/pid/stat): tells a pid's
    process from a later one that reuses the pid. None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()[19].decode()  # fields after "(comm) "


@dataclass
class _Mapping:
    mm: mmap.mmap
    data: np.ndarray  # uint8 view of the whole segment
    pid: int
    fd: int
    started: str | None


class SegmentMap:
    """The client segments one shard has mapped, by token; regions are bounds-checked."""

    def __init__(self, budget_bytes: int = SHARD_MAP_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._maps: OrderedDict[bytes, _Mapping] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # guards _maps (mapping itself happens outside it)

    def __len__(self) -> int:
        with self._lock:
            return len(self._maps)

    @property
    def mapped_bytes(self) -> int:
        with self._lock:
            return sum(len(m.data) for m in self._maps.values())

    def region(self, ref: SegmentRef, offset: int, nbytes: int) -> np.ndarray:
        """A writable uint8 view of bytes [offset, offset + nbytes) of the segment.
        SegmentUnreachable if this process cannot map it; InvalidArgument if the region
        leaves the segment's data."""
        if offset < HEADER_BYTES or nbytes < 0 or offset + nbytes > ref.size:
            raise InvalidArgument(f"delivery region [{offset}, {offset + nbytes}) is outside segment data "
                                  f"[{HEADER_BYTES}, {ref.size})")
        data = self._mapping(ref).data
        if len(data) != ref.size:
            raise InvalidArgument(f"segment is {len(data)} bytes, the request says {ref.size}")
        return data[offset : offset + nbytes]

    def _mapping(self, ref: SegmentRef) -> _Mapping:
        with self._lock:
            m = self._maps.get(ref.token)
            if m is not None and (m.pid, m.fd) == (ref.pid, ref.fd):
                self._maps.move_to_end(ref.token)
                return m
        m = self._map(ref)
        with self._lock:
            self._maps[ref.token] = m
            self._evict()
        return m

    def _map(self, ref: SegmentRef) -> _Mapping:
        if len(ref.token) != TOKEN_BYTES:
            raise InvalidArgument(f"segment token is {len(ref.token)} bytes, not {TOKEN_BYTES}")
        path = f"/proc/{ref.pid}/fd/{ref.fd}"
        if ref.size > self.budget_bytes:
            raise SegmentUnreachable(f"segment {path} of {ref.size} bytes exceeds this shard's "
                                     f"budget for mapped segments ({self.budget_bytes} bytes)")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:  # what was opened, not what the path named a moment before
                target = os.readlink(f"/proc/self/fd/{fd}")
                if not target.startswith(f"/memfd:{MEMFD_NAME}"):
                    raise SegmentUnreachable(f"{path} is {target!r}, not a memstore segment")
                # Sealed against shrinking, the mapping cannot turn into a SIGBUS under a gather.
                if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
                    raise SegmentUnreachable(f"{path} is not sealed against resizing")
                if os.fstat(fd).st_size != ref.size:
                    raise SegmentUnreachable(f"{path} is {os.fstat(fd).st_size} bytes, the request says {ref.size}")
                mm = mmap.mmap(fd, ref.size, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
        except OSError as e:
            raise SegmentUnreachable(f"cannot map {path}: {e.strerror or e}") from None
        if mm[: len(MAGIC) + TOKEN_BYTES] != MAGIC + ref.token:
            mm.close()
            raise SegmentUnreachable(f"{path} holds another segment (token mismatch)")
        return _Mapping(mm, np.frombuffer(mm, np.uint8), ref.pid, ref.fd, _start_time(ref.pid))

    def _evict(self) -> None:
        """After a new mapping (under _lock): drops the mappings of processes that are gone,
        then those past the byte budget, oldest first. A mapping still in use by a request
        stays valid: its views keep the mmap alive until they go."""
        for token in [t for t, m in self._maps.items() if _start_time(m.pid) != m.started]:
            del self._maps[token]
        total = sum(len(m.data) for m in self._maps.values())
        while total > self.budget_bytes and len(self._maps) > 1:
            _, m = self._maps.popitem(last=False)
            total -= len(m.data)

    def release(self, tokens) -> int:
        """Drops the mappings of these tokens and of segments whose process is gone;
        returns how many were dropped."""
        with self._lock:
            gone = [t for t, m in self._maps.items() if t in tokens or _start_time(m.pid) != m.started]
            for t in gone:
                del self._maps[t]
        return len(gone)
