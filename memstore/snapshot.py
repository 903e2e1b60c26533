"""A shard's tables at one instant: the copy a checkpoint writes.

`ShardFreeze` holds every table of a shard still (writes wait, lookups run) while
`snapshot_shard` copies rows, optimizer state, versions and remembered update ids together;
memstore.checkpoint writes the copy to disk without holding anything. Plain torch; no I/O.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from memstore.engine import ShardEngine
from memstore.spec import TableSpec
from memstore.table import ShardTable


class ShardFreeze:
    """Holds every table of a shard still: no update or assign runs while held; lookups do.

    Per table, in name order, takes `ids_lock` and then the read lock: the order in which
    `ShardEngine._write` takes them (ids_lock, then the write lock), so a freeze and a write
    never wait on each other in a cycle. Holding ids_lock matters: an id-tagged write records
    its id only after releasing the write lock, so the rows alone could show an update whose id
    is not yet remembered. A writer queued on a frozen table blocks new lookups of that table
    (the RW lock prefers writers), so hold a freeze for the in-memory copy only.
    `acquire` and `release` may run on different threads (a cut can span two RPCs).
    """

    def __init__(self, engine: ShardEngine) -> None:
        self.engine = engine
        self.tables: list[ShardTable] = []  # the tables in the cut, in name order
        self._stack: ExitStack | None = None  # the held locks; None when not held

    def acquire(self) -> "ShardFreeze":
        """Holds the shard's tables as they are once all are locked: tables dropped or made
        between their listing and the locks (a drop, a create, then writes elsewhere that a
        cut would hold next to the dropped table's old rows) make it list and lock again."""
        assert self._stack is None, "this freeze is already held"
        while True:
            stack = ExitStack()
            tables = sorted(self.engine.tables(), key=lambda t: t.spec.name)
            try:
                for table in tables:
                    stack.enter_context(table.ids_lock)
                    stack.enter_context(table.lock.read())
                if {id(t) for t in self.engine.tables()} == {id(t) for t in tables}:
                    break
            except BaseException:
                stack.close()
                raise
            stack.close()
        self.tables, self._stack = tables, stack
        return self

    def release(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    @property
    def held(self) -> bool:
        return self._stack is not None

    def __enter__(self) -> "ShardFreeze":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class TableSnapshot:
    """One table of a shard at the cut: rows, optimizer state, version, remembered ids."""

    spec: TableSpec
    version: int
    rows: torch.Tensor  # (local_rows, dim) in the table's dtype
    state: dict[str, torch.Tensor]  # name -> (local_rows, dim) or (local_rows,)
    update_ids: list[tuple[str, int, int | None]]  # (update id, version it produced, write digest), oldest first

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, *self.state.values()))


@dataclass
class ShardSnapshot:
    shard_index: int
    num_shards: int
    tables: list[TableSnapshot] = field(default_factory=list)  # in name order
    taken_at: float = 0.0  # time.time() of the cut
    drop_ids: list[tuple[str, bool]] = field(default_factory=list)  # ShardEngine.drop_ids()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tables)


def snapshot_shard(engine: ShardEngine, *, freeze: ShardFreeze | None = None, copy: bool = True) -> ShardSnapshot:
    """The shard's tables at one instant.

    Without `freeze`, takes its own `ShardFreeze` for the copy (a cut of this shard only). For a
    cut across shards, pass an acquired freeze: the snapshot holds exactly its tables and the
    caller releases it. copy=False references the live tensors instead of copying them (no extra
    memory); it needs `freeze`, and the freeze must stay held until `write_shard` returns.
    """
    if freeze is None:
        assert copy, "copy=False needs a freeze that stays held until write_shard returns"
        with ShardFreeze(engine) as own:
            return snapshot_shard(engine, freeze=own)
    assert freeze.held and freeze.engine is engine, "pass an acquired freeze of this engine"
    take = (lambda t: t.clone()) if copy else (lambda t: t)
    tables = [
        TableSnapshot(
            spec=t.spec,
            version=t.version,
            rows=take(t.rows),
            state={name: take(s) for name, s in t.state.items()},
            update_ids=[(i, v, d) for i, (v, d) in t.applied_ids.items()],
        )
        for t in freeze.tables
    ]
    return ShardSnapshot(engine.shard_index, engine.num_shards, tables, time.time(), engine.drop_ids())
