"""Load telemetry per table (per hash head): where a shard's reads go, and how much of it is used.

Engram addresses rows by hashing N-grams into one table per hash head, so an operator sizing
tables wants to know, per head: how many rows are read, how many distinct rows have ever been
read (occupancy: is the prime too large, or are collisions piling up?) and how concentrated the
reads are (skew: the share of reads that go to the hottest 1 % of rows, which N-gram
frequencies make large). No peer store reports this.

`TableTelemetry` counts one shard's part of one table: a read count per local row, kept in
one int64 tensor beside the rows (8 bytes a row: ~1 % of a 64-wide float32 row with Adam state)
and bumped with `torch.index_add_` on every lookup (0.15 ms for 65,536 keys on a 4 M-row
table, ~1 % of the lookup itself; np.bincount with minlength would allocate and add the whole
table, 2.2 ms), plus call and key counters for lookups and updates. `snapshot` turns the
counts into the figures a shard reports; `combine` merges the shards' snapshots into the
table's figures, exactly: every shard sends its top ceil(1 % of the *whole* table) read
counts, which hold every row of the store-wide top 1 %.

Plain numpy/torch, no gRPC: the servicer ships snapshots over the wire (TableStats), the
CLI combines them (`memstore stats`). Counts start when a table part is created in a process:
a shard restart or a restore starts them again (a restart's log replay counts as updates).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from memstore import alloc

# Skew is the share of reads that go to the hottest HOT_PERCENT % of a table's rows.
HOT_PERCENT = 1
# How many of the hottest rows a snapshot names by key.
TOP_KEYS = 16


def hot_rows(num_rows: int) -> int:
    """How many rows the hottest HOT_PERCENT % of a table of num_rows is (at least one)."""
    return max(1, -(-num_rows * HOT_PERCENT // 100))  # ceil, in integers: 1,000 rows -> 10


@dataclass
class TelemetrySnapshot:
    """One shard's figures for one table at one moment (what TableStats carries)."""

    table: str
    num_rows: int  # rows of the whole table
    local_rows: int  # rows this shard holds
    shard_index: int = 0
    num_shards: int = 1
    lookups: int = 0  # lookup requests this shard served for the table
    lookup_keys: int = 0  # rows they read; a row read twice counts twice
    updates: int = 0  # update requests applied
    update_keys: int = 0  # rows they updated
    rows_touched: int = 0  # distinct local rows read at least once
    # Read counts of this shard's most-read rows, descending: the top hot_rows(num_rows),
    # rows never read left out.
    hot_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # Global keys of the first min(TOP_KEYS, len(hot_counts)) of them, in the same order.
    hot_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def occupancy(self) -> float:
        """Share of this shard's rows read at least once."""
        return self.rows_touched / self.local_rows if self.local_rows else 0.0

    @property
    def skew(self) -> float:
        """Share of this shard's reads that went to its hottest HOT_PERCENT % of rows."""
        top = int(self.hot_counts[: hot_rows(self.local_rows)].sum())
        return top / self.lookup_keys if self.lookup_keys else 0.0


class TableTelemetry:
    """Read counts per local row and request counters of one shard's part of one table."""

    ROW_BYTES = 8  # an int64 read count a row

    def __init__(self, local_rows: int) -> None:
        self.local_rows = local_rows
        self._reads = alloc.zeros((local_rows,), torch.int64)  # reads per local row; random access: huge pages
        self._one = torch.ones(1, dtype=torch.int64)
        self.lookups = 0
        self.lookup_keys = 0
        self.updates = 0
        self.update_keys = 0
        # Guards _reads and the counters: index_add_ releases the GIL, and two lookups adding
        # into the same rows at once would lose counts.
        self._lock = threading.Lock()

    def record_lookup(self, local: torch.Tensor) -> None:
        """Counts one lookup of local rows `local` (int64 [n], validated, repeats allowed)."""
        ones = self._one.expand(len(local))  # (n,) without allocating n ones
        with self._lock:
            self._reads.index_add_(0, local, ones)
            self.lookups += 1
            self.lookup_keys += len(local)

    def record_update(self, num_keys: int) -> None:
        with self._lock:
            self.updates += 1
            self.update_keys += num_keys

    def rows_touched(self) -> int:
        """Distinct local rows read so far (one pass over the counts, no lock: a lookup in
        flight may or may not be in it)."""
        return int(torch.count_nonzero(self._reads))

    def snapshot(self, table: str, num_rows: int, shard_index: int = 0, num_shards: int = 1) -> TelemetrySnapshot:
        """The figures now. Costs a pass over the read counts (a few ms per million rows):
        for monitoring, not for every step."""
        with self._lock:  # only the copy of the read rows is taken under the lock
            touched = torch.nonzero(self._reads).squeeze(1).numpy()  # (T,) local rows read
            counts = self._reads.numpy()[touched]  # (T,)
            figures = dict(lookups=self.lookups, lookup_keys=self.lookup_keys, updates=self.updates,
                           update_keys=self.update_keys)
        k = hot_rows(num_rows)
        if len(counts) > k:
            top = np.argpartition(counts, len(counts) - k)[-k:]
            touched_top, counts_top = touched[top], counts[top]
        else:
            touched_top, counts_top = touched, counts
        order = np.argsort(-counts_top, kind="stable")
        hot_local = touched_top[order[:TOP_KEYS]]
        return TelemetrySnapshot(
            table=table, num_rows=num_rows, local_rows=self.local_rows, shard_index=shard_index,
            num_shards=num_shards, rows_touched=len(touched), hot_counts=counts_top[order],
            hot_keys=hot_local * num_shards + shard_index, **figures,
        )


def combine(parts: list[TelemetrySnapshot]) -> dict:
    """The store-wide figures of one table from every shard's snapshot of it."""
    assert parts, "no snapshots to combine"
    num_rows = parts[0].num_rows
    assert all(p.num_rows == num_rows and p.table == parts[0].table for p in parts), "snapshots of different tables"
    k = hot_rows(num_rows)
    counts = np.concatenate([p.hot_counts for p in parts])
    hottest = np.sort(counts)[::-1][:k]  # every shard sent its top k, so these are the table's
    keys = np.concatenate([p.hot_keys for p in parts])
    key_counts = np.concatenate([p.hot_counts[: len(p.hot_keys)] for p in parts])
    order = np.argsort(-key_counts, kind="stable")[:TOP_KEYS]
    reads = sum(p.lookup_keys for p in parts)
    touched = sum(p.rows_touched for p in parts)
    return {
        "table": parts[0].table,
        "num_rows": num_rows,
        "shards": len(parts),
        "lookups": sum(p.lookups for p in parts),
        "lookup_keys": reads,
        "rows_touched": touched,
        "occupancy": touched / num_rows,
        "hot_rows": k,
        "hot_reads": int(hottest.sum()),
        "skew": int(hottest.sum()) / reads if reads else 0.0,
        "updates": sum(p.updates for p in parts),
        "update_keys": sum(p.update_keys for p in parts),
        "hot_keys": [[int(key), int(c)] for key, c in zip(keys[order], key_counts[order])],
        "per_shard": [
            {"shard_index": p.shard_index, "local_rows": p.local_rows, "lookups": p.lookups,
             "lookup_keys": p.lookup_keys, "rows_touched": p.rows_touched, "occupancy": p.occupancy,
             "skew": p.skew, "updates": p.updates, "update_keys": p.update_keys}
            for p in sorted(parts, key=lambda p: p.shard_index)
        ],
    }

