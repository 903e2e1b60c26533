"""The in-process store: the same row-source interface as `MemStoreClient`, no network.

It is the reference that tests hold the sharded store against, and the store a trainer uses
when tables fit in its own memory. Keys go through the same planning (de-duplication and
gradient summing) as the client's, and rows through the same engine as a shard's.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping

import numpy as np
import torch

from memstore import keys as keyplan
from memstore.engine import ShardEngine
from memstore.errors import ClientClosed
from memstore.spec import TableSpec, as_key_array, check_learning_rate
from memstore.threads import serial_torch


def _pool_thread(local: threading.local) -> None:
    serial_torch()
    local.in_pool = True


class InProcessStore:
    """All of every table in this process (one shard of one)."""

    num_shards = 1

    def __init__(self) -> None:
        self.engine = ShardEngine(0, 1)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = os.getpid()  # the process _pool's threads run in
        self._inherited_pool: ThreadPoolExecutor | None = None  # the parent's copy, in a forked child
        self._closed = False  # close() ran: *_async calls raise ClientClosed, as MemStoreClient's do
        self._local = threading.local()  # .in_pool: one of this store's _pool threads

    def create_table(self, spec: TableSpec) -> TableSpec:
        return self.engine.create_table(spec).spec

    def spec(self, table: str) -> TableSpec:
        return self.engine.table(table).spec

    def list_tables(self) -> list[TableSpec]:
        return [t.spec for t in self.engine.tables()]

    def drop_table(self, table: str) -> bool:
        return self.engine.drop_table(table)

    def lookup(self, table: str, keys: Any, *, as_tensor: bool = False) -> np.ndarray | torch.Tensor:
        spec = self.spec(table)
        arr = as_key_array(keys)
        plan = keyplan.plan_keys(arr.reshape(-1), spec, 1)
        assembler = plan.assembler(spec.dim, spec.wire_torch_dtype)
        assembler.put(0, self.engine.lookup(table, plan.unique))
        rows = assembler.result().view(*arr.shape, spec.dim)  # (*keys.shape, dim)
        if as_tensor:
            return rows
        return rows.numpy() if rows.dtype != torch.bfloat16 else rows.float().numpy()

    def lookup_async(self, table: str, keys: Any, *, as_tensor: bool = False) -> Future:
        return self._executor().submit(self.lookup, table, keyplan.owned(keys), as_tensor=as_tensor)

    def lookup_many(self, keys: Mapping[str, Any], *, as_tensor: bool = False) -> dict[str, np.ndarray | torch.Tensor]:
        """As `MemStoreClient.lookup_many`: {table: keys} -> {table: rows}."""
        for name in keys:
            self.spec(name)  # every table exists before any is read
        return {name: self.lookup(name, k, as_tensor=as_tensor) for name, k in keys.items()}

    def lookup_many_async(self, keys: Mapping[str, Any], *, as_tensor: bool = False) -> Future:
        return self._executor().submit(self.lookup_many, {t: keyplan.owned(k) for t, k in keys.items()},
                                       as_tensor=as_tensor)

    def update(self, table: str, keys: Any, grads: Any, lr: float, *, update_id: str | None = None) -> int:
        return self._update(table, keys, grads, lr, update_id, None)[0]

    def update_async(self, table: str, keys: Any, grads: Any, lr: float, *, update_id: str | None = None) -> Future:
        return self._executor().submit(self.update, table, keyplan.owned(keys), keyplan.owned(grads), lr,
                                       update_id=update_id)

    def update_read(self, table: str, keys: Any, grads: Any, lr: float, watch: Any, *,
                    update_id: str | None = None) -> tuple[np.ndarray, torch.Tensor]:
        """As `MemStoreClient.update_read`: the changed rows among `watch`, right after the update."""
        _, fresh, rows = self._update(table, keys, grads, lr, update_id, np.unique(as_key_array(watch)))
        return fresh, rows

    def update_read_async(self, table: str, keys: Any, grads: Any, lr: float, watch: Any, *,
                          update_id: str | None = None) -> Future:
        return self._executor().submit(self.update_read, table, keyplan.owned(keys), keyplan.owned(grads), lr,
                                       keyplan.owned(watch), update_id=update_id)

    def update_many(self, updates: Mapping[str, tuple[Any, Any]], lr: float, *, watch: Mapping[str, Any] | None = None,
                    update_ids: Mapping[str, str] | None = None) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
        """As `MemStoreClient.update_many`: every table's update checked before any applies;
        {table: (changed keys, rows)} for the watched tables."""
        prepared = keyplan.prepare_many(updates, watch, update_ids,
                                        lambda name, k, g, uid, w: self._prepare_update(name, k, g, lr, uid, w))
        done = self.engine.apply_together([write for write, _, _ in prepared.values()])
        return {name: (fresh, applied[2]) for (name, (_, fresh, _)), applied in zip(prepared.items(), done)
                if name in (watch or {})}

    def update_many_async(self, updates: Mapping[str, tuple[Any, Any]], lr: float, *, watch: Mapping[str, Any] | None = None,
                          update_ids: Mapping[str, str] | None = None) -> Future:
        updates, watch, update_ids = keyplan.owned_many(updates, watch, update_ids)
        return self._executor().submit(self.update_many, updates, lr, watch=watch, update_ids=update_ids)

    def _update(self, table: str, keys: Any, grads: Any, lr: float, update_id: str | None, watch: np.ndarray | None):
        write, fresh, n = self._prepare_update(table, keys, grads, lr, update_id, watch)
        return n, fresh, write()[2]

    def _prepare_update(self, table: str, keys: Any, grads: Any, lr: float, update_id: str | None,
                        watch: np.ndarray | None):
        """Checks one update: (the write that applies it, the changed watched keys, rows updated)."""
        spec = self.spec(table)
        lr = check_learning_rate(lr, spec.optimizer)
        arr = as_key_array(keys)
        flat = arr.reshape(-1)
        grads = keyplan.as_value_tensor(grads, arr.shape, spec, "gradient")
        if watch is not None:
            keyplan.check_key_range(watch, spec)  # a bad watched key is bad input too
        plan = keyplan.plan_keys(flat, spec, 1, values=True)
        # The same rounding as on the wire, so both stores apply identical gradients.
        summed = keyplan.to_wire(plan, grads, spec.wire_torch_dtype, spec, "gradient")
        fresh = None if watch is None else np.intersect1d(plan.unique, watch)
        write = self.engine.prepare_update(table, plan.unique, summed, lr, update_id or "", read_keys=fresh)
        return write, fresh, len(plan.unique)

    def assign(self, table: str, keys: Any, rows: Any, *, keep_optimizer_state: bool = False) -> int:
        spec = self.spec(table)
        arr = as_key_array(keys)
        flat = arr.reshape(-1)
        values = keyplan.as_value_tensor(rows, arr.shape, spec, "row")
        plan = keyplan.plan_keys(flat, spec, 1, values=True)
        keyplan.check_no_duplicates(plan, spec, "assign")
        self.engine.assign(table, plan.unique, keyplan.to_wire(plan, values, spec.torch_dtype, spec, "row"),
                           keep_optimizer_state)
        return len(plan.unique)

    def _executor(self) -> ThreadPoolExecutor:
        if self._closed:
            raise ClientClosed("this store is closed (close() ran): make a new InProcessStore")
        if self._pool is None or self._pool_pid != os.getpid():  # a forked child's copy has no threads
            self._inherited_pool, self._pool_pid = self._pool, os.getpid()
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="memstore-local", initializer=_pool_thread,
                                            initargs=(self._local,))
        return self._pool

    def close(self) -> None:
        """Waits for the *_async calls made before it, but from a callback of one of their
        futures (on the store's own thread, which cannot wait for itself)."""
        self._closed = True
        if self._pool is not None:
            own = getattr(self._local, "in_pool", False)
            self._pool.shutdown(wait=not own)

    def __enter__(self) -> "InProcessStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
