"""The storage engine of one shard: its tables, and the checks every request passes first.

Plain Python + torch/numpy, no gRPC: the servicer decodes a request into arrays, calls one
method here and encodes the result. Every check runs before anything changes, so a rejected
request changes nothing; failures are typed `memstore.errors` exceptions that name the bad
key, table or shard.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import zlib
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch

from memstore import wal
from memstore.cut import WriteGate
from memstore.errors import InvalidArgument, TableExists, TableNotFound, Unavailable, WrongShard
from memstore.keys import check_gradient_scale, check_key_range, first_non_finite_row, first_row_not_finite_as
from memstore.partition import place_keys
from memstore.spec import TableSpec, check_learning_rate
from memstore.table import REMEMBERED_UPDATE_IDS, ShardTable

log = logging.getLogger("memstore.engine")

# Longest update id or group name a write may carry: a table remembers its last
# REMEMBERED_UPDATE_IDS ids (and a shard its cuts' groups), so their size must be bounded. The
# client's ids are "<group>:<shard>:<part>", the group a caller's update id or its own.
MAX_ID_CHARS = 256


# How many drop ids a shard remembers (DropTable's drop_id): a client retries a drop within
# seconds, and drops are rare.
REMEMBERED_DROP_IDS = 4096
# How often a drop waiting for a request's writes looks whether a cut froze the gate meanwhile.
DROP_POLL_S = 0.05


def check_ids(update_id: str, group: str = "", what_id: str = "update id") -> None:
    for what, value in ((what_id, update_id), ("group", group)):
        if len(value) > MAX_ID_CHARS:
            raise InvalidArgument(f"{what} {value[:40]!r}... is {len(value)} characters long; at most {MAX_ID_CHARS}")


def write_digest(kind: str, keys: np.ndarray, param: float) -> int:
    """A write's fingerprint, remembered with its update id: a retry (the same keys, and the
    same learning rate or keep-state flag) matches it; another write sent under a used id
    does not, and is refused rather than answered as already applied (its rows would
    silently never change). The gradients are left out: data-parallel workers send one
    step's update under one id, and their sums may differ in the last bits. CRC-32 runs
    at ~3 GB/s, 2 % of an Adagrad apply of the same keys."""
    head = struct.pack("<8sqd", kind.encode(), len(keys), float(param))
    return zlib.crc32(np.ascontiguousarray(keys, dtype=np.int64), zlib.crc32(head))


class ShardEngine:
    """Shard `shard_index` of a store of `num_shards`: holds its part of every table."""

    def __init__(self, shard_index: int = 0, num_shards: int = 1) -> None:
        if not 0 <= shard_index < num_shards:
            raise InvalidArgument(f"shard index {shard_index} is not in [0, {num_shards})")
        self.shard_index = shard_index
        self.num_shards = num_shards
        self._tables: dict[str, ShardTable] = {}
        self._lock = threading.Lock()  # guards _tables (the dict, not the tables)
        # Guards _together (requests applying several writes, apply_together) and _dropping
        # (drops waiting for those): a drop waits for them, and new ones for a waiting drop.
        self._layout = threading.Condition(threading.Lock())
        self._together = 0
        self._dropping = 0
        # drop id -> whether that drop found the table (under _lock): a retry answers the same.
        self._drop_ids: OrderedDict[str, bool] = OrderedDict()
        self.gate = WriteGate()  # every write passes it; a cut closes it (memstore.cut)
        # Where a durable host logs writes (a WriteAheadLog's append): called with each
        # applied write's record inside the gate, before the write is acknowledged.
        self.journal: Callable[[dict], None] | None = None
        # How that host stops its log for good (WriteAheadLog.fail): for a write that failed
        # to apply after its record was logged.
        self.journal_failed: Callable[[BaseException], None] | None = None
        # What that host says about its log, as memstore.v1.LogState's fields (Stats, health,
        # metrics); None when it keeps none.
        self.log_state: Callable[[], dict] | None = None

    def log_facts(self) -> dict | None:
        """log_state(), or None when the host keeps no log or cannot say now (logged): Stats,
        health and metrics go on without it."""
        if self.log_state is None:
            return None
        try:
            return self.log_state()
        except Exception:
            log.warning("shard %d: reading its log's state failed", self.shard_index, exc_info=True)
            return None

    # ---- table management -------------------------------------------------------------
    def create_table(self, spec: TableSpec) -> ShardTable:
        return self.ensure_table(spec)[0]

    def ensure_table(self, spec: TableSpec) -> tuple[ShardTable, bool]:
        """The table of this spec, created if absent; and whether this call created it.
        TableExists if one of that name has another spec."""
        spec.validate()
        with self._lock:
            existing = self._tables.get(spec.name)
            if existing is not None:
                if existing.spec != spec:
                    raise TableExists(
                        f"table {spec.name!r} exists with a different spec: {existing.spec} (asked: {spec})"
                    )
                return existing, False
        table = ShardTable(spec, self.shard_index, self.num_shards)  # allocation outside the lock
        # Through the gate (a cut holds it), journaled under _lock: no write to the new table
        # can reach the log before its create record.
        # The record first: a failed append (a full disk) leaves no table behind.
        with self.gate.write("", 0), self._lock:
            created = spec.name not in self._tables
            if created:
                if self.journal is not None:
                    self.journal(wal.create_record(spec))
                self._tables[spec.name] = table
            table = self._tables[spec.name]
        if table.spec != spec:
            raise TableExists(f"table {spec.name!r} was created concurrently with a different spec")
        return table, created

    def install_table(self, table: ShardTable) -> None:
        """Puts a fully built table (a restore's) in place, replacing one of the same name."""
        assert (table.shard_index, table.num_shards) == (self.shard_index, self.num_shards), "table of another shard"
        with self._lock:
            self._tables[table.spec.name] = table

    def replace_tables(self, tables: list[ShardTable]) -> None:
        """Swaps every table for these (a restore), unjournaled; only while the gate is frozen."""
        assert self.gate.frozen, "replace_tables outside a cut"
        with self._lock:
            self._tables = {t.spec.name: t for t in tables}

    def table(self, name: str) -> ShardTable:
        with self._lock:
            table = self._tables.get(name)
        if table is None:
            raise TableNotFound(f"table {name!r} does not exist on shard {self.shard_index}")
        return table

    def tables(self) -> list[ShardTable]:
        with self._lock:
            return list(self._tables.values())

    def drop_table(self, name: str, drop_id: str = "") -> bool:
        """Drops the table; waits for the writes of a request applying together (apply_together).

        drop_id: the call's id. A drop under an id this shard has seen (its last
        REMEMBERED_DROP_IDS, in its log and checkpoints) answers as the first did and drops nothing:
        a retry whose first try did drop must not drop a table created again since.

        It passes the write gate first, and only then holds new requests back while it waits
        for those applying: a drop waiting at a cut's frozen gate must not stop the parts the
        cut released (it would give up on their calls and cut them half applied). Should a
        cut freeze the gate while it waits for a request's writes (one held at the gate), it
        steps out of the gate and waits for the cut to end."""
        check_ids(drop_id, what_id="drop id")
        while True:
            with self.gate.write("", 0):
                with self._layout:
                    self._dropping += 1
                    try:
                        while self._together and not self.gate.frozen:
                            self._layout.wait(DROP_POLL_S)  # a freeze does not notify _layout
                    except BaseException:
                        self._dropping -= 1
                        self._layout.notify_all()
                        raise
                    stepped_out = bool(self._together)  # a cut froze the gate meanwhile: out of its way
                    if stepped_out:
                        self._dropping -= 1
                        self._layout.notify_all()
                if not stepped_out:
                    try:
                        return self._drop(name, drop_id)
                    finally:
                        with self._layout:
                            self._dropping -= 1
                            self._layout.notify_all()
            # Stepped out: the next pass waits at the frozen gate until the cut ends.

    def _drop(self, name: str, drop_id: str) -> bool:
        """Inside the write gate. The table's ids_lock too, in _write's order (gate, ids_lock,
        _lock): a write that found the table current logs and applies before the drop
        record, never after it (replayed after a re-create, it would change the new table)."""
        while True:
            with self._lock:
                if drop_id in self._drop_ids:  # a retry (or the same id's try running alongside)
                    return self._drop_ids[drop_id]
                table = self._tables.get(name)
                if table is None:
                    if drop_id and self.journal is not None:  # its id must outlive a crash too
                        self.journal(wal.drop_record(name, drop_id))
                    self._remember_drop(drop_id, False)
                    return False
            with table.ids_lock, self._lock:  # the record first, as for a create
                if self._tables.get(name) is not table:
                    continue  # replaced meanwhile (a restore): drop what is there now
                if drop_id in self._drop_ids:
                    return self._drop_ids[drop_id]
                if self.journal is not None:
                    self.journal(wal.drop_record(name, drop_id))
                del self._tables[name]
                self._remember_drop(drop_id, True)
            return True

    def drop_ids(self) -> list[tuple[str, bool]]:
        """The remembered drop ids, oldest first, with whether each dropped (a snapshot's)."""
        with self._lock:
            return list(self._drop_ids.items())

    def remember_drops(self, items) -> None:
        """Remembers (drop id, dropped) pairs: a checkpoint's, so that a retry reaching a shard
        recovered from it drops nothing either."""
        with self._lock:
            for drop_id, dropped in items:
                self._remember_drop(str(drop_id), bool(dropped))

    def _remember_drop(self, drop_id: str, dropped: bool) -> None:
        """Under _lock."""
        if drop_id:
            self._drop_ids[drop_id] = dropped
            while len(self._drop_ids) > REMEMBERED_DROP_IDS:
                self._drop_ids.popitem(last=False)

    def check_route(self, shard_index: int, num_shards: int) -> None:
        if (shard_index, num_shards) != (self.shard_index, self.num_shards):
            raise WrongShard(
                f"request routed to shard {shard_index} of {num_shards}, but this server is "
                f"shard {self.shard_index} of {self.num_shards}"
            )

    # ---- data path ----------------------------------------------------------------------
    def local_index(self, table: ShardTable, keys: np.ndarray, unique: bool) -> torch.Tensor:
        """Validates global keys for this shard and returns their local rows (int64 tensor)."""
        check_key_range(keys, table.spec)
        # A new array either way: keys often view a request's immutable bytes.
        if self.num_shards == 1:
            local = keys.copy()
        else:
            shard, local = place_keys(keys, self.num_shards)
            stray = shard != self.shard_index
            if stray.any():
                first = int(keys[np.flatnonzero(stray)[0]])
                raise WrongShard(
                    f"key {first} of table {table.spec.name!r} belongs to shard "
                    f"{first % self.num_shards}, not shard {self.shard_index} of {self.num_shards}"
                )
        if unique and len(local) > 1:
            ordered = np.sort(local)
            dup = np.flatnonzero(ordered[1:] == ordered[:-1])
            if len(dup):  # name the first key, in request order, that appears again
                first = np.flatnonzero(np.isin(local, ordered[dup]))[0]
                key = int(keys[first])
                raise InvalidArgument(
                    f"key {key} appears twice in one request to table {table.spec.name!r}; "
                    "sum the gradients of duplicate keys before sending"
                )
        return torch.from_numpy(local)

    def lookup(self, name: str, keys: np.ndarray, alloc=None, slots: np.ndarray | None = None) -> torch.Tensor:
        """Rows of `keys` in the table's wire dtype [n, dim]. alloc(version) may supply the
        tensor to fill (the server's reply frame, a client's segment), told the version the
        rows are read at; with `slots`, row slots[i] of it receives key i (ShardTable.gather)."""
        return self.prepare_lookup(name, keys, alloc, slots)()

    def prepare_lookup(self, name: str, keys: np.ndarray, alloc=None,
                       slots: np.ndarray | None = None) -> Callable[[], torch.Tensor]:
        """Runs every check of `lookup` now and returns the call that reads the rows (and
        counts them as read): a request of several lookups checks all before reading any.
        A held shard (WriteGate.hold: rows a restore is replacing) refuses it."""
        self.gate.check_held()
        table = self.table(name)
        local = self.local_index(table, keys, unique=False)
        if alloc is None:
            alloc = lambda version: torch.empty(len(keys), table.spec.dim, dtype=table.spec.wire_torch_dtype)  # noqa: E731

        def read() -> torch.Tensor:
            rows = table.gather(local, alloc, slots)
            table.telemetry.record_lookup(local)  # per-head load (memstore.telemetry)
            return rows

        return read

    def update(
        self, name: str, keys: np.ndarray, grads: torch.Tensor, lr: float, update_id: str = "",
        group: str = "", parts: int = 0, read_keys: np.ndarray | None = None,
    ) -> tuple[int, bool, torch.Tensor | None]:
        """Applies one sparse update; returns (version, duplicate, rows of `read_keys`).

        The rows of read_keys (any valid keys of this shard, typically a subset of `keys`) are
        read, in the wire dtype, after the update and before any later write to the table; for
        a duplicate id they are read at once. None without read_keys. All checks run first."""
        return self.prepare_update(name, keys, grads, lr, update_id, group, parts, read_keys)()

    def prepare_update(
        self, name: str, keys: np.ndarray, grads: torch.Tensor, lr: float, update_id: str = "",
        group: str = "", parts: int = 0, read_keys: np.ndarray | None = None, table: ShardTable | None = None,
    ) -> "PreparedWrite":
        """Runs every check of `update` now and returns the call that applies it (and may
        still fail only as a write can: UNAVAILABLE for a table replaced meanwhile). Several
        updates in one request are all prepared before the first applies (apply_together).
        table: the table `name` names, when the caller has looked it up already (and decoded
        the gradients by its spec)."""
        table = table if table is not None else self.table(name)
        check_ids(update_id, group)
        self._check_values(table, keys, grads, "gradient")
        lr = check_learning_rate(lr, table.spec.optimizer)
        check_gradient_scale(grads, lr, keys, name)
        local = self.local_index(table, keys, unique=True)
        read = None
        if read_keys is not None:
            read_local = self.local_index(table, read_keys, unique=False)
            # Allocated now: a write must not apply and then fail for want of room for its reply.
            room = torch.empty(len(read_local), table.spec.dim, dtype=table.spec.wire_torch_dtype)
            read = lambda: table.gather(read_local, lambda version: room)  # noqa: E731
        grads32 = grads.float()
        digest = write_digest("update", keys, lr) if update_id else None
        # Now, not only when it applies: a request's other parts must not apply before this one is refused.
        self._check_id_reuse(table, update_id, digest)
        return PreparedWrite(table, group, parts, lambda gated: self._write(
            table, update_id, digest, group, parts, lambda: table.apply(local, grads32, lr),
            lambda version: wal.update_record(name, keys, grads, lr, update_id, version, group, parts), read,
            gated=gated,
        ), lambda: self._check_id_reuse(table, update_id, digest))

    def apply_together(self, writes: list["PreparedWrite"]) -> list[tuple[int, bool, torch.Tensor | None]]:
        """Applies prepared writes of one request, all or none of them as far as tables go:
        no table of theirs is dropped until the last has applied, and one dropped or
        replaced since they were checked makes the request UNAVAILABLE before any applies
        (a restore may still replace them all, between two of them: the restore wins)."""
        with self._layout:
            while self._dropping:
                self._layout.wait()
            with self._lock:
                stale = sorted({w.table.spec.name for w in writes if self._tables.get(w.table.spec.name) is not w.table})
            if stale:
                raise Unavailable(f"tables {stale} were replaced or dropped since the request was checked; retry")
            self._together += 1
        try:
            # One pass of the gate for the request (WriteGate.write_all): a part a cut holds
            # back must not stop one it released behind it.
            with self.gate.write_all([(w.group, w.parts) for w in writes]) as applied, contextlib.ExitStack() as held:
                # Every part's id checked again with all their tables' ids_locks held (in name
                # order, as snapshot takes them), before the first applies: an equal id another
                # call applied since prepare_update must refuse this request whole, not midway.
                for table in sorted({id(w.table): w.table for w in writes}.values(), key=lambda t: t.spec.name):
                    held.enter_context(table.ids_lock)
                for write in writes:
                    write.check_id()
                done = []
                for i, write in enumerate(writes):
                    done.append(write(gated=False))
                    applied[i] = not done[-1][1]  # a duplicate did not apply now
                return done
        finally:
            with self._layout:
                self._together -= 1
                self._layout.notify_all()

    def assign(
        self, name: str, keys: np.ndarray, values: torch.Tensor, keep_state: bool, update_id: str = "",
        group: str = "", parts: int = 0,
    ) -> tuple[int, bool]:
        """Writes rows verbatim; returns (version, duplicate). All checks run first."""
        table = self.table(name)
        check_ids(update_id, group)
        self._check_values(table, keys, values, "row")
        row = first_row_not_finite_as(values, table.spec.torch_dtype)  # as they are stored
        if row is not None:
            raise InvalidArgument(f"row of key {int(keys[row])} for table {table.spec.name!r} is not finite "
                                  f"once stored as {table.spec.dtype}")
        local = self.local_index(table, keys, unique=True)
        digest = write_digest("assign", keys, keep_state) if update_id else None
        version, dup, _ = self._write(
            table, update_id, digest, group, parts, lambda: table.assign(local, values, keep_state),
            lambda version: wal.assign_record(name, keys, values, keep_state, update_id, version, group, parts),
        )
        return version, dup

    @staticmethod
    def _check_values(table: ShardTable, keys: np.ndarray, values: torch.Tensor, what: str) -> None:
        dim = table.spec.dim
        if values.dim() != 2 or values.shape[0] != len(keys) or values.shape[1] != dim:
            raise InvalidArgument(
                f"{what}s for table {table.spec.name!r} must have shape ({len(keys)}, {dim}), "
                f"got {tuple(values.shape)}"
            )
        row = first_non_finite_row(values)
        if row is not None:
            raise InvalidArgument(
                f"{what} of key {int(keys[row])} for table {table.spec.name!r} holds NaN or Inf"
            )

    def _write(self, table: ShardTable, update_id: str, digest: int | None, group: str, parts: int, apply, record,
               read=None, gated: bool = True) -> tuple[int, bool, torch.Tensor | None]:
        """Runs `apply` at most once per update id, through the write gate (a cut may hold it
        back), logging it first, then `read` (the rows a caller wants back). A remembered id
        whose write_digest differs is INVALID_ARGUMENT, and nothing changes. Under the table's
        ids_lock: the id check, the journal append, the apply, the id record and the read —
        two concurrent retries cannot both apply, a write is durable before it changes memory
        (a failed append changes nothing), the journal holds a table's writes in the order
        they apply, and the read sees this write and no later one. A table replaced while the
        write waited at the gate (a restore) makes it UNAVAILABLE: the client retries on the
        new one."""
        # gated=False: inside a gate's write_all already (apply_together), which counts it and
        # holds the ids_lock of every table of the request.
        with (self.gate.write(group, parts) if gated else contextlib.nullcontext([False])) as applied, (
                table.ids_lock if gated else contextlib.nullcontext()):
            with self._lock:
                current = self._tables.get(table.spec.name)
            if current is not table:
                raise Unavailable(f"table {table.spec.name!r} was replaced or dropped during the write; retry")
            seen = self._check_id_reuse(table, update_id, digest)
            if seen is not None:
                return seen[0], True, read() if read is not None else None
            if self.journal is not None:
                self.journal(record(table.version + 1))  # apply() moves the version by one
                try:
                    version = apply()
                except BaseException as e:
                    raise self._broken_after_logging(table, e) from e
            else:
                version = apply()
            if update_id:
                table.applied_ids[update_id] = (version, digest)
                while len(table.applied_ids) > REMEMBERED_UPDATE_IDS:
                    table.applied_ids.popitem(last=False)
            applied[0] = True
            return version, False, read() if read is not None else None

    def _broken_after_logging(self, table: ShardTable, error: BaseException) -> Unavailable:
        """A write whose record is logged failed to apply (memory ran out mid-optimizer): its
        rows here may be half updated, while a restart's replay applies it whole. The shard
        serves nothing more until it restarts: lookups and writes are refused, and so is its
        log (health NOT_SERVING). Its client retries under the same update id, which the
        restarted shard finds applied."""
        why = (f"a write to table {table.spec.name!r} failed after it was logged ({type(error).__name__}: {error}); "
               "the shard's rows may differ from its log until it restarts, and it refuses calls till then")
        self.gate.hold(why)
        if self.journal_failed is not None:
            self.journal_failed(RuntimeError(why))
        log.error("shard %d: %s", self.shard_index, why)
        return Unavailable(why)

    @staticmethod
    def _check_id_reuse(table: ShardTable, update_id: str, digest: int | None) -> tuple[int, int | None] | None:
        """The remembered (version, digest) of update_id, or None; INVALID_ARGUMENT when it
        was applied as another write (one dict read: atomic under the GIL, so callable
        without ids_lock, as prepare_update does)."""
        seen = table.applied_ids.get(update_id) if update_id else None
        if seen is not None and seen[1] is not None and seen[1] != digest:
            raise InvalidArgument(
                f"update id {update_id!r} was already applied to table {table.spec.name!r} as another "
                "write (other keys, learning rate or kind); an id names one write: send a new id")
        return seen


class PreparedWrite:
    """A write whose checks have all passed (ShardEngine.prepare_update): call it to apply.
    Several of one request apply through ShardEngine.apply_together."""

    def __init__(self, table: ShardTable, group: str, parts: int,
                 run: Callable[[bool], tuple[int, bool, torch.Tensor | None]], check_id: Callable[[], object]) -> None:
        self.table = table
        self.group = group  # the client call it is a part of, and that call's parts in all
        self.parts = parts
        self._run = run
        self.check_id = check_id  # INVALID_ARGUMENT if its update id was applied as another write meanwhile

    def __call__(self, gated: bool = True) -> tuple[int, bool, torch.Tensor | None]:
        """gated=False: inside the gate's write_all of its request (apply_together)."""
        return self._run(gated)
