"""One shard's part of one table: its rows, optimizer state and version, behind a lock.

Rows live in one contiguous tensor [local_rows, dim] per table (so they could move into a
shared-memory segment); optimizer state sits beside them. Every read and write goes through
the table's reader-writer lock, so a lookup running while an update applies sees each row
whole, either before or after the update.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from memstore import alloc
from memstore.errors import ResourceExhausted, TableChanged
from memstore.keys import as_numpy
from memstore.optim import make_optimizer
from memstore.partition import fill_initial_rows, init_scratch_bytes, local_rows
from memstore.spec import DTYPE_LARGEST, TableSpec
from memstore.telemetry import TableTelemetry

# How many update ids a table remembers for retry de-duplication. A client retries an
# update within seconds; this covers far more updates than can be in flight.
REMEMBERED_UPDATE_IDS = 1 << 16


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        # Guards _readers, _writer and _writers_waiting.
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def table_row_bytes(spec: TableSpec) -> int:
    """Bytes a shard holds for each of its rows of `spec`: the row, its optimizer state and
    its read counter (memstore.telemetry)."""
    return spec.row_bytes + make_optimizer(spec.optimizer).state_row_bytes(spec.dim) + TableTelemetry.ROW_BYTES


class ShardTable:
    """The rows of `spec` that shard `shard_index` of `num_shards` holds (keys k % S == i)."""

    def __init__(
        self, spec: TableSpec, shard_index: int = 0, num_shards: int = 1, *, initialise: bool = True
    ) -> None:
        """initialise=False leaves rows and optimizer state zero, for a restore that
        overwrites every value (memstore.checkpoint); it skips the init cost. Rows and state
        sit on huge pages where the OS allows (memstore.alloc.zeros): their accesses are random."""
        self.spec = spec
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.local_rows = local_rows(spec.num_rows, shard_index, num_shards)
        self.optimizer = make_optimizer(spec.optimizer)
        # Refused up front rather than left to the kernel: an overcommitted table that fills
        # in would get the whole shard, every table of it, killed for memory. Checked and
        # taken (every page touched) under the host's reservation: see memstore.alloc.
        need = self.local_rows * table_row_bytes(spec)
        scratch = init_scratch_bytes(self.local_rows, spec.dim, spec.init) if initialise else 0
        with alloc.reserving_memory():
            room = alloc.available_bytes()
            if room is not None and need + scratch > room:
                building = f" (and {scratch / 2**30:.2f} GiB more while its initial rows are built)" if scratch else ""
                raise ResourceExhausted(self._too_big(need, f"{building}; its host has {room / 2**30:.2f} GiB available"))
            try:
                self.rows = alloc.zeros((self.local_rows, spec.dim), spec.torch_dtype)
                self.state = self.optimizer.init_state(self.local_rows, spec.dim)
                self.telemetry = TableTelemetry(self.local_rows)  # reads per row, lookups, updates
            except (MemoryError, OSError, RuntimeError) as e:  # RuntimeError: torch's allocator
                raise ResourceExhausted(self._too_big(need, f"; allocating it failed: {e}")) from None
        self._rows_np = as_numpy(self.rows)  # the same memory, for single-threaded gathers
        if initialise:
            fill_initial_rows(self.rows, spec.init, spec.seed, shard_index, num_shards)
        self.version = 0  # updates + assigns applied; guarded by lock
        self.lock = RWLock()
        # update id -> (version it produced, engine.write_digest or None: unknown); guarded by ids_lock
        self.applied_ids: OrderedDict[str, tuple[int, int | None]] = OrderedDict()
        self.ids_lock = threading.Lock()  # serialises id-tagged writes: check id, apply, record id

    def _too_big(self, need: int, why: str) -> str:
        return (f"table {self.spec.name!r} needs {need / 2**30:.2f} GiB of rows, optimizer state and read counters "
                f"on shard {self.shard_index} of {self.num_shards}{why}")

    @property
    def row_bytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    @property
    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def gather(self, local: torch.Tensor, alloc, slots: np.ndarray | None = None) -> torch.Tensor:
        """Rows `local` (int64 [n]) copied into `alloc(version)` — a tensor of the wire dtype
        that the caller allocates knowing the version the rows are read at: [n, dim], or,
        with `slots` (int64 [n], checked to be rows of it), any [m, dim] whose row slots[i]
        receives row local[i]."""
        with self.lock.read():
            out = alloc(self.version)
            if out.shape[-1] != self.spec.dim or out.dtype != self.spec.wire_torch_dtype:
                # Sized from a spec read before the table was recreated (another dim or dtype).
                raise TableChanged(f"table {self.spec.name!r} has dim {self.spec.dim} of {self.spec.wire_dtype}; "
                                   f"the request made room for dim {out.shape[-1]} of {out.dtype}")
            if slots is not None:
                self._scatter(local, out, slots)
            elif out.dtype == self.rows.dtype:
                # numpy's take runs on this handler thread; torch's index_select would wake
                # intra-op threads that fight gRPC's for the cores (lookups 1.5x slower on 2).
                # mode="clip": the keys were range-checked already, and numpy buffers `out` in
                # the default mode="raise" (an extra copy: 1.5 vs 0.8 ms for 8 MiB, measured).
                np.take(self._rows_np, local.numpy(), axis=0, out=as_numpy(out), mode="clip")
            else:
                out.copy_(self._for_wire(self.rows.index_select(0, local), out.dtype))
            return out

    @staticmethod
    def _for_wire(rows: torch.Tensor, wire: torch.dtype) -> torch.Tensor:
        """Gathered rows (a copy) of wider storage held within a float16 wire's range: a row
        that updates took past 65,504 reads as 65,504, not Inf. A bfloat16 wire over float32
        rows is not clamped (a pass that cost 11 % of the gather): only rows beyond 3.39e38
        would read as Inf there."""
        if wire != torch.float16 or rows.dtype == torch.float16:
            return rows
        top = DTYPE_LARGEST["float16"]  # not a bfloat16 value: clamped there, it rounds to 65,536
        return (rows.float() if rows.dtype == torch.bfloat16 else rows).clamp_(-top, top)

    def _scatter(self, local: torch.Tensor, out: torch.Tensor, slots: np.ndarray) -> None:
        """out[slots[i]] = rows[local[i]] (under the read lock). Same dtype: gathered in
        blocks of ~1 MiB that stay in cache for the scatter, rows moved as single void items
        (np.put: ~5 % faster than fancy assignment here, measured)."""
        if out.dtype != self.rows.dtype:
            out.index_copy_(0, torch.from_numpy(slots), self._for_wire(self.rows.index_select(0, local), out.dtype).to(out.dtype))
            return
        row = np.dtype((np.void, self.spec.dim * self.rows.element_size()))
        src, dst = self._rows_np.view(row).reshape(-1), as_numpy(out).view(row).reshape(-1)
        idx = local.numpy()
        block = max(1, (1 << 20) // row.itemsize)
        for lo in range(0, len(idx), block):  # a few blocks per request, not a loop over rows
            np.put(dst, slots[lo : lo + block], np.take(src, idx[lo : lo + block], mode="clip"))

    def apply(self, local: torch.Tensor, grads: torch.Tensor, lr: float) -> int:
        """Applies the optimizer to unique rows `local` with float32 `grads`; returns the version."""
        with self.lock.write():
            self.optimizer.step(self.rows, self.state, local, grads, lr, seed=self.spec.seed,
                                shard=(self.shard_index, self.num_shards))
            self.version += 1
            version = self.version
        self.telemetry.record_update(len(local))
        return version

    def assign(self, local: torch.Tensor, values: torch.Tensor, keep_state: bool) -> int:
        """Writes `values` into unique rows `local` verbatim; resets their optimizer state unless kept."""
        with self.lock.write():
            self.rows.index_copy_(0, local, values.to(self.rows.dtype))
            if not keep_state:
                for t in self.state.values():
                    t.index_fill_(0, local, 0)
            self.version += 1
            return self.version

    def snapshot(self) -> tuple[int, np.ndarray]:
        """A copy of (version, rows as float32) taken under the read lock; for tests and tools."""
        with self.lock.read():
            return self.version, self.rows.float().numpy().copy()
