"""The client of a sharded store: routes, de-duplicates, batches and retries.

`MemStoreClient(["host:port", ...])` talks to shard i at position i. A lookup or update is
validated whole before anything is sent (one bad key rejects it on every shard), its keys
are de-duplicated and grouped by shard, split into requests below gRPC's message limits and
sent to all shards at once. Calls retry with backoff while a shard is UNAVAILABLE; updates
carry an id, so a retried update is applied at most once. Every call has a deadline. Status
codes come back as the typed exceptions of `memstore.errors`.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import random
import threading
import time
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import grpc
import numpy as np
import torch

from memstore import keys as keyplan
from memstore import segments, wire
from memstore.alloc import keep_freed_memory
from memstore.lookups import KEY_BYTES, LookupCall, chunks
from memstore.errors import (
    ClientClosed,
    DeadlineExceeded,
    InvalidArgument,
    MemStoreError,
    ResourceExhausted,
    SegmentUnreachable,
    TableChanged,
    TableExists,
    TableNotFound,
    Unavailable,
    WrongShard,
)
from memstore.engine import MAX_ID_CHARS
from memstore.server import CHANNEL_OPTIONS, ERROR_KEY, FRAMED, MAX_MESSAGE_BYTES, SERVICE
from memstore.spec import TableSpec, as_key_array, check_learning_rate
from memstore.threads import serial_torch
from memstore.v1 import memstore_pb2 as pb

ERROR_OF = {
    grpc.StatusCode.NOT_FOUND: TableNotFound,
    grpc.StatusCode.ALREADY_EXISTS: TableExists,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: WrongShard,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}
# A shard names the class it raised in trailing metadata (ERROR_KEY): it tells apart errors
# that share a status code (FAILED_PRECONDITION: a wrong route, or an unreachable segment).
ERROR_NAMED = {cls.__name__: cls for cls in (*ERROR_OF.values(), SegmentUnreachable, TableChanged)}
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
# A shard that could not map a segment is asked for replies, then for deliveries again after
# this backoff (seconds: first, most): a shard on another host costs one failed try an hour.
DELIVERY_RETRY_S = (60.0, 3600.0)
# ReleaseSegments' own deadline: it is tiny, and a short call timeout_s used to lose tokens.
RELEASE_TIMEOUT_S = 10.0
# A channel replaced on re-resolving is closed this long after (calls on it may still be running).
RETIRED_CHANNEL_S = 120.0
# Most row (or key) bytes one request may carry (ClientConfig.max_request_bytes): a request
# of rows also holds their keys, and together they stay under a shard's message limit.
MAX_REQUEST_BYTES = MAX_MESSAGE_BYTES // 2


@dataclass(frozen=True)
class ClientConfig:
    timeout_s: float = 60.0  # deadline of one RPC
    retry_s: float = 30.0  # how long a call keeps retrying an unavailable shard
    backoff_s: tuple[float, float] = (0.05, 2.0)  # first and largest pause between retries
    max_request_bytes: int = 12 << 20  # most payload of one data request (rows or grads); more is split evenly
    # Keep large freed blocks for reuse in this process (memstore.alloc): replies of several
    # MiB are otherwise page-faulted in afresh on every lookup.
    keep_freed_memory: bool = True
    # Shards on this host write lookup rows straight into this process's memory (a memfd
    # segment, memstore.segments) instead of sending them over the socket; shards elsewhere
    # are found out on their first lookup and reply with the rows as usual.
    shared_memory: bool = True

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> InvalidArgument:
            return InvalidArgument(f"ClientConfig.{field} = {getattr(self, field)!r}: {why}")

        seconds = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        if not (seconds(self.timeout_s) and self.timeout_s > 0):
            raise bad("timeout_s", "must be a finite number of seconds above 0")
        if not (seconds(self.retry_s) and self.retry_s >= 0):
            raise bad("retry_s", "must be a finite number of seconds, 0 or more")
        b = self.backoff_s
        if (not isinstance(b, (tuple, list)) or len(b) != 2 or not all(isinstance(x, (int, float)) for x in b)
                or not (0 < b[0] <= b[1] < math.inf)):
            raise bad("backoff_s", "must be (first, largest) pause in seconds, 0 < first <= largest, both finite")
        m = self.max_request_bytes
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= MAX_REQUEST_BYTES:
            raise bad("max_request_bytes", f"must be an int in [1, {MAX_REQUEST_BYTES}] (half the largest message "
                                           "a shard accepts, leaving room for the keys)")


@dataclass
class ShardTableInfo:
    spec: TableSpec
    shard_index: int
    local_rows: int
    version: int
    row_bytes: int
    state_bytes: int


def _info_from_pb(m: pb.TableInfo) -> ShardTableInfo:
    return ShardTableInfo(
        wire.spec_from_pb(m.spec), m.shard_index, m.local_rows, m.version, m.row_bytes, m.state_bytes
    )


@dataclass
class _Retries:
    """How long a call may still retry, and its next backoff pause."""

    deadline: float  # time.monotonic()
    pause: float


class _RetryCall(Exception):
    """Raised by _fan_out(whole=True): the call must start over (its requests are not resent)."""

    def __init__(self, retries: _Retries) -> None:
        super().__init__("retry the whole call")
        self.retries = retries


class _Shard:
    """The channel and method callables of one shard."""

    def __init__(self, index: int, address: str) -> None:
        self.index = index
        self.address = address
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        # Whether lookups may ask this shard to write into this client's segments: None
        # until tried, False once it said it cannot map them (another host, or for a moment
        # out of descriptors): then asked again after a backoff (cannot_deliver).
        self.delivers: bool | None = None
        self.retry_delivery_at = 0.0
        self._delivery_backoff_s = 0.0
        self.unreleased: list[bytes] = []  # segment tokens a ReleaseSegments to it failed to carry
        ident = lambda b: b  # noqa: E731 -- frames are bytes both ways
        self.methods: dict[str, grpc.UnaryUnaryMultiCallable] = {}
        for m in pb.DESCRIPTOR.services_by_name["MemStore"].methods:
            framed = m.name in FRAMED
            out_cls = getattr(pb, m.output_type.name)
            self.methods[m.name] = self.channel.unary_unary(
                f"/{SERVICE}/{m.name}",
                request_serializer=ident if framed else (lambda msg: msg.SerializeToString()),
                response_deserializer=ident if framed else out_cls.FromString,
            )

    def cannot_deliver(self) -> None:
        """The shard could not map this client's segment: replies from it for a while (one
        minute, doubling up to an hour while it keeps failing), then delivery is tried again."""
        now = time.monotonic()
        if self.delivers is False and now < self.retry_delivery_at:
            return  # another call's failure of the same round: the backoff is running
        self.delivers = False
        self._delivery_backoff_s = min(max(2 * self._delivery_backoff_s, DELIVERY_RETRY_S[0]), DELIVERY_RETRY_S[1])
        self.retry_delivery_at = now + self._delivery_backoff_s

    def delivered(self) -> None:
        self.delivers, self._delivery_backoff_s = True, 0.0


_CLIENTS: "weakref.WeakSet[MemStoreClient]" = weakref.WeakSet()  # this process's, for _forked


def _after_fork_in_child() -> None:
    for client in list(_CLIENTS):
        client._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _pool_thread(local: threading.local) -> None:
    """Starts one of a client's *_async threads."""
    serial_torch()  # beside a trainer's own threads
    local.may_call = True  # the *_async calls close() waits for


class MemStoreClient:
    """A handle on a store of len(addresses) shards; shard i serves at addresses[i]."""

    def __init__(self, addresses: Sequence[str], config: ClientConfig | None = None) -> None:
        if not addresses:
            raise InvalidArgument("a store needs at least one shard address")
        self.config = config or ClientConfig()
        if self.config.keep_freed_memory:
            keep_freed_memory()
        self._shards = [_Shard(i, a) for i, a in enumerate(addresses)]
        self._specs: dict[str, TableSpec] = {}  # table name -> spec, filled on first use
        self._specs_lock = threading.Lock()  # guards _specs
        self._client_id = uuid.uuid4().hex
        self._seq = itertools.count()  # update ids; next() is atomic under the GIL
        self._pool: ThreadPoolExecutor | None = None
        self._rpc_pool: ThreadPoolExecutor | None = None  # the blocking calls of fan-outs (_send)
        self._pool_lock = threading.Lock()  # guards _pool, _rpc_pool and _segment_pool creation
        self._segment_pool: segments.SegmentPool | None = None
        self._closed = False  # close() began: no call may start a background task (under _pool_lock)
        self._ended = False  # close() closed the channels: every call raises ClientClosed
        self._local = threading.local()  # .may_call: one of _pool's threads, or close()'s own
        self._directory = None  # set by connect(): where a named store's shards serve now
        self._retired: list[tuple[float, _Shard]] = []  # (when, shard) replaced on re-resolving; under _resolve_lock
        self._resolve_lock = threading.Lock()  # serialises re-resolution; _shards is swapped whole
        self._release_lock = threading.Lock()  # one ReleaseSegments fan-out at a time (shards' unreleased)
        self._inherited: list[Any] = []  # a forked child's copies of the parent's channels and threads
        self._inherited_channels = False  # in a forked child, until its first call makes its own
        self._closer: threading.Thread | None = None  # finishes a close() begun on one of _pool's threads
        _CLIENTS.add(self)

    @classmethod
    def connect(cls, name: str, *, address: str | None = None, config: ClientConfig | None = None) -> "MemStoreClient":
        """A client of the store `name` on Ray (at `address`, $RAY_ADDRESS, or the local Ray).
        It re-resolves shard addresses from the store's coordinator when a shard is unavailable."""
        from cluster.store import StoreDirectory  # Ray only for clients that ask for it

        directory = StoreDirectory(name, address)
        client = cls(directory.addresses(), config)
        client._directory = directory
        return client

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self._shards]

    # ---- table management ---------------------------------------------------------------
    def create_table(self, spec: TableSpec) -> TableSpec:
        """Creates the table on every shard; idempotent for an identical spec. Should a shard
        refuse it (ALREADY_EXISTS, RESOURCE_EXHAUSTED, unreachable), the shards this call made
        it on drop it again, so a create with a corrected spec is not refused by leftovers;
        the error says where it stays."""
        spec.validate()
        made: list[int] = []

        def on_reply(i: int, reply: pb.TableInfo) -> None:
            if reply.created:
                made.append(i)

        try:
            self._fan_out(
                "CreateTable",
                [(s.index, pb.CreateTableRequest(spec=wire.spec_to_pb(spec), route=self._route(s.index)))
                 for s in self._shards],
                on_reply, settle=True,
            )
        except MemStoreError as e:
            self._undo_create(spec.name, sorted(made), e)
            raise
        with self._specs_lock:
            self._specs[spec.name] = spec
        if self._directory is not None:
            self._directory.register_table(spec)  # restarted shards recreate it
        return spec

    def _undo_create(self, table: str, made: list[int], error: MemStoreError) -> None:
        """After a refused create: drops the table on the shards `made` (where that call
        created it), and says so in `error`'s message. A shard that did not answer the create
        may hold it; a client that created it at the same moment with the same spec loses
        it on these shards (and finds it missing on the one that refused us)."""
        if not made:
            return
        request = pb.DropTableRequest(name=table, drop_id=f"{self._client_id}:drop:{next(self._seq)}")
        try:
            self._fan_out("DropTable", [(i, request) for i in made])
            note = f"; dropped again on shards {made}, where this call had created it"
        except MemStoreError as e:
            note = f"; it stays on shards {made}, where this call created it (dropping it failed: {e})"
        error.args = (f"{error.args[0]}{note}", *error.args[1:])

    def describe(self, table: str) -> list[ShardTableInfo]:
        """Each shard's part of the table. Checks the layout too: the shard at position i of
        the addresses must be shard i of as many (a client given them in another order would
        have its writes refused by some shards and applied by the others)."""
        replies = self._fan_out("DescribeTable", [(s.index, pb.TableRef(name=table)) for s in self._shards])
        for s, r in zip(self._shards, replies):
            if (r.shard_index, r.num_shards) != (s.index, self.num_shards):
                raise WrongShard(f"the shard at {s.address}, position {s.index} of this client's {self.num_shards} "
                                 f"addresses, is shard {r.shard_index} of {r.num_shards}: give every shard's address, "
                                 "in shard order")
        return [_info_from_pb(r) for r in replies]

    def spec(self, table: str) -> TableSpec:
        with self._specs_lock:
            spec = self._specs.get(table)
        if spec is None:
            spec = self.describe(table)[0].spec
            with self._specs_lock:
                self._specs[table] = spec
        return spec

    def _specs_changed(self, used: Mapping[str, TableSpec]) -> bool:
        """Reads the specs of these tables anew (into the cache); whether any differs from the
        one used. A check of ours that failed against a cached spec is run again when the
        table was created anew since (more rows, another dim). Each spec is read once from
        the first shard that answers, without retries: a shard that is down must not turn a
        caller's bad input into Unavailable after retry_s; when none answers, the spec counts
        as unchanged and the caller's own error stands. A table gone raises TableNotFound."""
        changed = False
        for name, spec in used.items():
            fresh = self._spec_from_any_shard(name)
            if fresh is None:
                continue
            with self._specs_lock:
                self._specs[name] = fresh
            changed |= fresh != spec
        return changed

    def _spec_from_any_shard(self, table: str) -> TableSpec | None:
        """The table's spec as the first shard that answers holds it (every shard holds the
        same), or None when none answers at once."""
        self._check_open()
        for s in list(self._shards):
            try:
                reply = self._call(s.index, "DescribeTable", pb.TableRef(name=table), self.config.timeout_s)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    raise self._error(s.index, "DescribeTable", e) from None
                continue
            return wire.spec_from_pb(reply.spec)
        return None

    def _checked(self, tables: list[str], prepare: Callable[[], Any]) -> Any:
        """prepare() (checks against the cached specs, nothing sent); once more when one of
        its checks failed and a table's spec has changed since it was cached."""
        used = {name: self.spec(name) for name in tables}
        try:
            return prepare()
        except InvalidArgument:
            if not self._specs_changed(used):
                raise
        return prepare()

    def list_tables(self) -> list[TableSpec]:
        reply = self._fan_out("ListTables", [(0, pb.ListTablesRequest())])[0]
        return [wire.spec_from_pb(t.spec) for t in reply.tables]

    def drop_table(self, table: str) -> bool:
        """Drops the table on every shard; whether any held it. Its retries carry the call's
        id, so a shard whose first try dropped it drops nothing more (a table created again
        meanwhile stays)."""
        request = pb.DropTableRequest(name=table, drop_id=f"{self._client_id}:drop:{next(self._seq)}")
        replies = self._fan_out("DropTable", [(s.index, request) for s in self._shards])
        with self._specs_lock:
            self._specs.pop(table, None)
        if self._directory is not None:
            self._directory.unregister_table(table)  # restarted shards must not recreate it
        return any(r.dropped for r in replies)

    def stats(self) -> list[pb.StatsResponse]:
        return self._fan_out("Stats", [(s.index, pb.StatsRequest()) for s in self._shards])

    # ---- data path ----------------------------------------------------------------------
    def lookup(self, table: str, keys: Any, *, as_tensor: bool = False) -> np.ndarray | torch.Tensor:
        """Rows of `keys` (any integer array or tensor), shape keys.shape + (dim,), in key order.

        The result is a numpy array of the table's wire dtype (float32 when that is bfloat16,
        which numpy lacks), or a torch tensor of the wire dtype with as_tensor=True. Shards
        on this host write the rows straight into it (ClientConfig.shared_memory).
        """
        return self._lookup({table: keys}, "Lookup", as_tensor)[table]

    def lookup_many(self, keys: Mapping[str, Any], *, as_tensor: bool = False) -> dict[str, np.ndarray | torch.Tensor]:
        """`lookup` of several tables at once, {table: keys} -> {table: rows}, in one request
        per shard (LookupMany) where `lookup` makes one per table and shard: a training step
        that reads every Engram head's table pays one round trip per shard."""
        return self._lookup(dict(keys), "LookupMany", as_tensor)

    def lookup_many_async(self, keys: Mapping[str, Any], *, as_tensor: bool = False) -> Future:
        """`lookup_many` on a background thread; the future's result is its return value."""
        return self._executor().submit(self.lookup_many, {t: keyplan.owned(k) for t, k in keys.items()},
                                       as_tensor=as_tensor)

    def _lookup(self, keys: dict[str, Any], method: str, as_tensor: bool) -> dict[str, np.ndarray | torch.Tensor]:
        """Lookups of {table: keys} by `method`: Lookup (a request per part) or LookupMany
        (one shard's parts packed). A shard that cannot map this client's segment is asked
        for rows in replies for a while (_Shard.cannot_deliver), and the call runs again."""
        jobs = {name: (self.spec(name), as_key_array(k)) for name, k in keys.items()}
        retries, rechecked = None, False
        while True:
            delivering = self._delivering_shards()
            try:
                rows = self._lookup_once(jobs, method, delivering, retries)
            except _RetryCall as e:  # a shard was unavailable: start over, with a fresh lease
                retries = e.retries
                continue
            except (SegmentUnreachable, InvalidArgument) as e:
                shard = getattr(e, "shard", None)  # None: raised here, not by a shard
                if (shard is None or isinstance(e, TableChanged)) and isinstance(e, InvalidArgument) and not rechecked:
                    # Our own check (a key range), or a reply's or a shard's dim: against a
                    # spec since changed? Then once more with the table's spec now (a read).
                    rechecked = True
                    if self._specs_changed({name: spec for name, (spec, _) in jobs.items()}):
                        jobs = {name: (self.spec(name), arr) for name, (_, arr) in jobs.items()}
                        continue
                    raise
                # A shard that cannot map our segments, or one from before shared memory that
                # reads the delivered request as keys missing from its payload (its error names
                # no class): rows in replies from it for a while.
                if shard not in delivering or not (isinstance(e, SegmentUnreachable) or e.unnamed):
                    raise
                self._shards[shard].cannot_deliver()
                continue
            return {name: self._as_result(rows[name], arr, spec, as_tensor) for name, (spec, arr) in jobs.items()}

    def _lookup_once(self, jobs: dict, method: str, delivering: set[int],
                     retries: _Retries | None) -> dict[str, torch.Tensor]:
        """One attempt of `_lookup`: {table: rows [N, dim]} (memstore.lookups.LookupCall)."""
        call = LookupCall(jobs, self.num_shards, delivering, self.config.max_request_bytes,
                          self._segments().lease if delivering else None)
        if method == "Lookup":
            for shard, head, _ in call.parts:
                head.route.CopyFrom(self._route(shard))
            frames = [(shard, wire.encode_frame(head, *pieces), [i]) for i, (shard, head, pieces) in enumerate(call.parts)]
        else:
            frames = self._packed(call.parts, pb.LookupManyRequest, call.request_bytes)

        def place(f: int, frame: bytes) -> None:  # runs as each reply arrives
            if method == "Lookup":
                head, payload = wire.decode_frame(frame, pb.LookupResponse)
                call.place(frames[f][2], [head], payload)
            else:
                many, payload = wire.decode_frame(frame, pb.LookupManyResponse)
                call.place(frames[f][2], list(many.parts), payload)

        try:
            self._fan_out(method, [(shard, frame) for shard, frame, _ in frames], on_reply=place,
                          whole=call.lease is not None, retries=retries)
            rows = call.rows()
        except BaseException as e:
            call.discard()
            if isinstance(e, TableChanged):  # recreated under us: the next call reads its spec again
                with self._specs_lock:
                    self._specs.clear()
            raise
        for shard in call.delivering:
            self._shards[shard].delivered()
        return call.detach(rows, self._segment_pool)

    @staticmethod
    def _as_result(rows: torch.Tensor, arr: np.ndarray, spec: TableSpec, as_tensor: bool) -> np.ndarray | torch.Tensor:
        out = rows.view(*arr.shape, spec.dim)  # (*keys.shape, dim)
        if as_tensor:
            return out
        return out.numpy() if out.dtype != torch.bfloat16 else out.float().numpy()

    def lookup_async(self, table: str, keys: Any, *, as_tensor: bool = False) -> Future:
        """`lookup` on a background thread; the future's result is its return value. Inputs
        are copied first (as in every *_async call): the caller may reuse its buffers at once."""
        return self._executor().submit(self.lookup, table, keyplan.owned(keys), as_tensor=as_tensor)

    def update(self, table: str, keys: Any, grads: Any, lr: float, *, update_id: str | None = None) -> int:
        """Applies the table's optimizer with learning rate `lr` to the rows of `keys`.

        grads: shape keys.shape + (dim,); the gradients of repeated keys are summed. All or
        nothing: a bad key or value rejects the whole update before anything is sent. Returns
        the number of rows updated. update_id: the same id names the same update to every
        shard, which applies it once however often it is sent (data-parallel workers each
        send the step's summed update; the first to arrive applies it); None: a fresh id.
        Senders of one id must send the same keys and gradients with the same
        ClientConfig.max_request_bytes, so the update splits into the same parts (ids); a
        part sent under a used id with other keys or another lr is INVALID_ARGUMENT.
        """
        return self._update(table, keys, grads, lr, update_id, None)[0]

    def update_async(self, table: str, keys: Any, grads: Any, lr: float, *, update_id: str | None = None) -> Future:
        return self._executor().submit(self.update, table, keyplan.owned(keys), keyplan.owned(grads), lr,
                                       update_id=update_id)

    def update_read(self, table: str, keys: Any, grads: Any, lr: float, watch: Any, *,
                    update_id: str | None = None) -> tuple[np.ndarray, torch.Tensor]:
        """`update`, returning the rows this update changed among the keys `watch`, as each
        shard holds them right after applying it: (sorted int64 keys [F], wire-dtype rows
        [F, dim]) for F = |distinct watch keys ∩ distinct update keys|. A prefetching trainer
        watches the keys it has already read for later steps, so the update's reply refreshes
        them without a second round trip."""
        _, fresh_keys, fresh_rows = self._update(table, keys, grads, lr, update_id, np.unique(as_key_array(watch)))
        return fresh_keys, fresh_rows

    def update_read_async(self, table: str, keys: Any, grads: Any, lr: float, watch: Any, *,
                          update_id: str | None = None) -> Future:
        return self._executor().submit(self.update_read, table, keyplan.owned(keys), keyplan.owned(grads), lr,
                                       keyplan.owned(watch), update_id=update_id)

    def update_many(self, updates: Mapping[str, tuple[Any, Any]], lr: float, *, watch: Mapping[str, Any] | None = None,
                    update_ids: Mapping[str, str] | None = None) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
        """`update` of several tables at once, {table: (keys, grads)} with one learning rate,
        in one request per shard (UpdateMany) where `update` makes one per table and shard.
        Each table's update is the one `update` would send (its own id: update_ids[table], or
        a fresh one) and, for the tables in `watch` ({table: keys}), reads back its changed
        watched rows as `update_read` does. All or nothing: every table's update is checked
        before anything is sent, and every shard checks all of a request's parts before it
        applies any. Returns {table: (sorted changed keys, rows)} for the watched tables."""
        calls = self._checked(list(updates), lambda: keyplan.prepare_many(
            updates, watch, update_ids, lambda name, k, g, uid, w: self._prepare_update(name, k, g, lr, uid, w)))
        watch = watch or {}
        parts, owner = [], []  # every call's parts; owner[i]: (table, index of the part in its call)
        for name, (_, _, call_parts, _) in calls.items():
            parts += call_parts
            owner += [(name, j) for j in range(len(call_parts))]
        group = self._many_group(update_ids, list(calls))
        for _, head, _ in parts:  # one call for a cut, whole in it or out: one group over every table's parts
            head.group, head.parts = group, len(parts)
        tables = [pb.TableShape(table=name, num_rows=spec.num_rows, dim=spec.dim) for name, (spec, *_) in calls.items()]
        frames = self._packed(parts, pb.UpdateManyRequest, lambda i: sum(memoryview(p).nbytes for p in parts[i][2]),
                              tables=tables)
        replies = self._fan_out("UpdateMany", [(shard, frame) for shard, frame, _ in frames])
        read_rows: dict[str, list] = {name: [None] * len(calls[name][2]) for name in watch}
        for (_, _, members), reply in zip(frames, replies):
            head, payload = wire.decode_frame(reply, pb.UpdateManyResponse)
            if len(head.parts) != len(members):
                raise MemStoreError(f"UpdateMany: a shard answered {len(head.parts)} parts, asked {len(members)}")
            at = 0
            for i, part in zip(members, head.parts):
                name, j = owner[i]
                if name not in watch:
                    continue
                spec, want = calls[name][0], calls[name][3][j]
                size = part.num_rows * spec.wire_row_bytes
                read_rows[name][j] = self._read_back(name, spec, part, payload[at:at + size], want)
                at += size
        return {name: self._fresh(calls[name][0], calls[name][3], read_rows[name]) for name in watch}

    def _many_group(self, update_ids: Mapping[str, str] | None, tables: list[str]) -> str:
        """The group of an update_many call. Given every table's update id, one derived from
        them all, so the call sent again (a retry, or each data-parallel worker sending one
        step's update) counts as one call at a shard; else a fresh one."""
        if update_ids is None or any(t not in update_ids for t in tables):
            return f"{self._client_id}:{next(self._seq)}"
        named = "\0".join(f"{t}\0{update_ids[t]}" for t in sorted(tables)).encode()
        return f"many:{hashlib.blake2b(named, digest_size=16).hexdigest()}"

    def update_many_async(self, updates: Mapping[str, tuple[Any, Any]], lr: float, *, watch: Mapping[str, Any] | None = None,
                          update_ids: Mapping[str, str] | None = None) -> Future:
        updates, watch, update_ids = keyplan.owned_many(updates, watch, update_ids)
        return self._executor().submit(self.update_many, updates, lr, watch=watch, update_ids=update_ids)

    def _update(self, table: str, keys: Any, grads: Any, lr: float, update_id: str | None,
                watch: np.ndarray | None) -> tuple[int, np.ndarray | None, torch.Tensor | None]:
        spec, plan, parts, reads = self._checked(
            [table], lambda: self._prepare_update(table, keys, grads, lr, update_id, watch))
        replies = self._fan_out("Update", self._frames(parts))
        if watch is None:
            return len(plan.unique), None, None
        rows = []
        for reply, want in zip(replies, reads):
            head, payload = wire.decode_frame(reply, pb.UpdateResponse)
            rows.append(self._read_back(table, spec, head, payload, want))
        return (len(plan.unique), *self._fresh(spec, reads, rows))

    def _prepare_update(self, table: str, keys: Any, grads: Any, lr: float, update_id: str | None,
                        watch: np.ndarray | None):
        """Checks one update and splits it into parts: (spec, key plan, parts, each part's read keys)."""
        spec = self.spec(table)
        lr = check_learning_rate(lr, spec.optimizer)
        arr = as_key_array(keys)
        flat = arr.reshape(-1)
        grads = keyplan.as_value_tensor(grads, arr.shape, spec, "gradient")
        if watch is not None:
            keyplan.check_key_range(watch, spec)  # a bad watched key is bad input too
        plan = keyplan.plan_keys(flat, spec, self.num_shards, values=True)
        summed = keyplan.to_wire(plan, grads, spec.wire_torch_dtype, spec, "gradient")  # (U, dim), repeats summed
        keyplan.check_gradient_scale(summed, lr, plan.unique, table)
        header = pb.UpdateRequest(table=table, dim=spec.dim, dtype=wire.DTYPE_TO_PB[spec.wire_dtype], lr=lr,
                                  num_rows=spec.num_rows)
        # Each part reads back the watched keys it updates (sorted: intersect1d), so every
        # watched key that changed comes back exactly once, from the part that changed it.
        read = None if watch is None else (lambda chunk: np.intersect1d(chunk, watch))
        parts, reads = self._value_parts(plan, summed, header, update_id, read)
        return spec, plan, parts, reads

    @staticmethod
    def _read_back(table: str, spec: TableSpec, head: pb.UpdateResponse, payload, want: np.ndarray) -> torch.Tensor:
        """The read-back rows of one update part's reply, checked against the keys asked."""
        if not len(want):
            return torch.empty(0, spec.dim, dtype=spec.wire_torch_dtype)
        dtype = wire.dtype_name(head.dtype, "update reply")
        if (head.num_rows, head.dim, dtype) != (len(want), spec.dim, spec.wire_dtype) or \
                len(payload) != len(want) * spec.wire_row_bytes:
            raise MemStoreError(f"Update of {table!r}: a shard returned {head.num_rows} read-back rows of dim "
                                f"{head.dim} {dtype} in {len(payload)} bytes; asked {len(want)} of dim {spec.dim} "
                                f"{spec.wire_dtype}")
        return wire.rows_from_buffer(payload, head.num_rows, head.dim, dtype)

    @staticmethod
    def _fresh(spec: TableSpec, reads: list[np.ndarray], rows: list[torch.Tensor]) -> tuple[np.ndarray, torch.Tensor]:
        """Every part's read-back (keys, rows), joined and sorted by key."""
        fresh = np.concatenate(reads) if reads else np.empty(0, np.int64)
        values = torch.cat(rows) if rows else torch.empty(0, spec.dim, dtype=spec.wire_torch_dtype)
        order = np.argsort(fresh, kind="stable")
        return fresh[order], values[torch.from_numpy(order)]

    def assign(self, table: str, keys: Any, rows: Any, *, keep_optimizer_state: bool = False) -> int:
        """Writes rows verbatim (cast to the storage dtype); repeated keys are an error. The
        assigned rows' optimizer state is reset unless keep_optimizer_state. Returns rows written."""
        def prepare():
            spec = self.spec(table)
            arr = as_key_array(keys)
            values = keyplan.as_value_tensor(rows, arr.shape, spec, "row")
            plan = keyplan.plan_keys(arr.reshape(-1), spec, self.num_shards, values=True)
            keyplan.check_no_duplicates(plan, spec, "assign")
            ordered = keyplan.to_wire(plan, values, spec.torch_dtype, spec, "row")  # (U, dim)
            header = pb.AssignRequest(table=table, dim=spec.dim, dtype=wire.DTYPE_TO_PB[spec.dtype],
                                      keep_optimizer_state=keep_optimizer_state, num_rows=spec.num_rows)
            return plan, self._value_parts(plan, ordered, header)[0]

        plan, parts = self._checked([table], prepare)
        self._fan_out("Assign", self._frames(parts))
        return len(plan.unique)

    # ---- helpers --------------------------------------------------------------------------
    def _route(self, shard: int) -> pb.Route:
        return pb.Route(shard_index=shard, num_shards=self.num_shards)

    def _chunks(self, keys: np.ndarray, row_bytes: int) -> list[np.ndarray]:
        """Splits one shard's keys so no request's rows exceed max_request_bytes."""
        return chunks(keys, row_bytes, self.config.max_request_bytes)

    def _value_parts(self, plan, values: torch.Tensor, header, update_id: str | None = None,
                     read=None) -> tuple[list[tuple[int, Any, tuple]], list[np.ndarray]]:
        """The parts of one update or assign: (shard, header, payload pieces: keys || values
        (|| read keys)) per shard and chunk, and each part's read keys (read(chunk keys), or
        none). All parts share a group id (the unit a cut keeps whole), and each part has its
        own update id (the unit a shard applies at most once), derived from `update_id` when
        given: the same call made twice with the same id is split the same way, so its parts
        carry the same ids."""
        group = update_id if update_id is not None else f"{self._client_id}:{next(self._seq)}"
        if len(group) > MAX_ID_CHARS - 16:  # room for ":<shard>:<part>"
            raise InvalidArgument(f"update id {group[:40]!r}... is {len(group)} characters long; at most "
                                  f"{MAX_ID_CHARS - 16}")
        # A key, its row and (update_read) a read key a row: together within twice the limit,
        # a shard's message limit at the largest setting. The same split with or without
        # reads, so an id names the same parts either way.
        row_bytes = values.shape[1] * values.element_size()
        row_bytes = max(row_bytes, -(-(2 * KEY_BYTES + row_bytes) // 2))
        chunks = []  # (shard, chunk number, first row, keys)
        for shard in range(self.num_shards):
            lo = int(plan.bounds[shard])
            for j, chunk in enumerate(self._chunks(plan.shard_keys(shard), row_bytes)):
                chunks.append((shard, j, lo, chunk))
                lo += len(chunk)
        parts, reads = [], []
        for shard, j, lo, chunk in chunks:
            head = type(header)()
            head.CopyFrom(header)
            head.route.CopyFrom(self._route(shard))
            head.num_keys = len(chunk)
            head.update_id = f"{group}:{shard}:{j}"
            head.group = group
            head.parts = len(chunks)
            tail = ()
            if read is not None:
                reads.append(read(chunk).astype("<i8", copy=False))
                head.num_read_keys = len(reads[-1])
                tail = (reads[-1],)
            parts.append((shard, head, (chunk, wire.tensor_bytes(values[lo : lo + len(chunk)]), *tail)))
        return parts, reads

    @staticmethod
    def _frames(parts: list[tuple[int, Any, tuple]]) -> list[tuple[int, bytes]]:
        """One single-part frame per part."""
        return [(shard, wire.encode_frame(head, *pieces)) for shard, head, pieces in parts]

    def _packed(self, parts: list[tuple[int, Any, tuple]], many_type, size_of,
                **fields) -> list[tuple[int, bytes, list[int]]]:
        """Parts of several calls packed into multi-part frames of `many_type` (LookupMany,
        UpdateMany), one shard's parts per frame, whose parts' sizes (size_of(i): the bytes
        of rows the part sends or asks for) add up to at most config.max_request_bytes (a
        single larger part goes alone): (shard, frame, the indices of its parts). `fields`
        are set in every frame's header."""
        by_shard: dict[int, list[int]] = {}
        for i, (shard, _, _) in enumerate(parts):
            by_shard.setdefault(shard, []).append(i)
        frames = []
        for shard, members in by_shard.items():
            batch, size = [], 0
            for i in members + [None]:
                n = None if i is None else size_of(i)
                if batch and (i is None or size + n > self.config.max_request_bytes):
                    head = many_type(route=self._route(shard), **fields)
                    for b in batch:
                        head.parts.append(parts[b][1])
                        head.parts[-1].ClearField("route")
                    frames.append((shard, wire.encode_frame(head, *(p for b in batch for p in parts[b][2])), batch))
                    batch, size = [], 0
                if i is not None:
                    batch.append(i)
                    size += n
        return frames

    def _fan_out(self, method: str, requests: list[tuple[int, Any]], on_reply=None, *, whole: bool = False,
                 retries: _Retries | None = None, settle: bool = False) -> list[Any]:
        """Sends every (shard, request) at once; retries those that find their shard
        unavailable, with jittered exponential backoff, until config.retry_s has passed.

        Returns the replies in request order, or, with on_reply, calls on_reply(i, reply) as
        each arrives, in the order they arrive (so placing rows overlaps the transfers still
        running) and returns [].
        whole=True: instead of resending, wait out the backoff and raise _RetryCall, so the
        caller starts the whole call afresh (a delivered lookup: a handler still running for
        the failed request could write into the old lease later). `retries` carries an
        earlier attempt's deadline and backoff. settle=True: a refused request does not end
        the call at once; every other shard answers (or runs out of retries) first, and then
        the first refusal is raised (a caller undoing what the others did knows them all)."""
        cfg = self.config
        retries = retries or _Retries(time.monotonic() + cfg.retry_s, cfg.backoff_s[0])
        pending = self._send(method, dict(enumerate(requests)), cfg.timeout_s)
        results: list[Any] = [None] * len(requests)
        refused: MemStoreError | None = None
        while pending:
            retry = []
            for fut in as_completed(pending):
                i = pending[fut]
                try:
                    reply = fut.result()
                except grpc.RpcError as e:
                    if e.code() in RETRYABLE and time.monotonic() < retries.deadline:
                        retry.append(i)
                    elif not settle:
                        raise self._error(requests[i][0], method, e) from None
                    elif refused is None:
                        refused = self._error(requests[i][0], method, e)
                else:
                    if on_reply is None:
                        results[i] = reply
                    else:
                        on_reply(i, reply)
            if not retry:
                break
            time.sleep(retries.pause * (0.5 + random.random()))
            self._re_resolve()
            retries.pause = min(retries.pause * 2, cfg.backoff_s[1])
            if whole:
                raise _RetryCall(retries)
            pending = self._send(method, {i: requests[i] for i in retry}, cfg.timeout_s)
        if refused is not None:
            raise refused
        return results if on_reply is None else []

    def _send(self, method: str, requests: dict[int, tuple[int, Any]], timeout_s: float) -> dict[Future, int]:
        """Starts the calls of {i: (shard, request)}: {future of the reply: i}. A lone call
        runs on the calling thread (its future comes back done), others on the client's RPC
        threads, as blocking calls. gRPC's own futures start a polling thread per channel
        whenever the channel has been idle, which the caller waits for: measured on 2 cores,
        16 MiB same-host lookups took 8-15 % less this way, small ones as long or less."""
        self._check_open()
        if len(requests) == 1:
            [(i, (shard, req))] = requests.items()
            done: Future = Future()
            try:
                done.set_result(self._call(shard, method, req, timeout_s))
            except grpc.RpcError as e:
                done.set_exception(e)
            return {done: i}
        pool = self._rpc_threads()
        try:
            return {pool.submit(self._call, shard, method, req, timeout_s): i for i, (shard, req) in requests.items()}
        except RuntimeError:  # close() shut the threads down meanwhile
            raise self._closed_error() from None

    def _check_open(self) -> None:
        """ClientClosed once close() began, but for the calls it waits for (*_async ones, its
        own); in a forked child, the child's channels on its first call."""
        if self._ended or (self._closed and not getattr(self._local, "may_call", False)):
            raise self._closed_error()
        if self._inherited_channels:
            with self._resolve_lock:
                if self._inherited_channels:
                    self._inherited.append(self._shards)
                    self._shards = [_Shard(s.index, s.address) for s in self._shards]
                    self._inherited_channels = False

    def _call(self, shard: int, method: str, request: Any, timeout_s: float) -> Any:
        """One blocking call; ClientClosed once close() closed the channels."""
        if self._ended:
            raise self._closed_error()
        try:
            return self._shards[shard].methods[method](request, timeout=timeout_s)
        except ValueError:  # gRPC's "closed channel": close() ran meanwhile
            if self._ended:
                raise self._closed_error() from None
            raise

    @staticmethod
    def _closed_error() -> ClientClosed:
        return ClientClosed("this client is closed (close() ran): make a new MemStoreClient")

    def _re_resolve(self) -> None:
        """After UNAVAILABLE: ask the store where its shards serve now (connect() only)."""
        if self._directory is None:
            return
        with self._resolve_lock:
            try:
                changed = self._directory.refresh()
            except Exception:  # the coordinator itself may be unreachable for a moment
                return
            if changed:
                old = self._shards
                self._shards = [s if s.address == a else _Shard(i, a) for i, (s, a) in enumerate(zip(old, self._directory.addresses()))]
                # Another thread may still be in a call on a replaced channel: closed a while later.
                now = time.monotonic()
                for _, s in [r for r in self._retired if now - r[0] > RETIRED_CHANNEL_S]:
                    s.channel.close()
                self._retired = [r for r in self._retired if now - r[0] <= RETIRED_CHANNEL_S]
                self._retired += [(now, s) for s in old if s not in self._shards]

    def _error(self, shard: int, method: str, e: grpc.RpcError) -> MemStoreError:
        named = dict(e.trailing_metadata() or ()).get(ERROR_KEY)
        cls = ERROR_NAMED.get(named) or ERROR_OF.get(e.code(), MemStoreError)
        if self._ended and e.code() == grpc.StatusCode.CANCELLED:
            cls = ClientClosed  # a call in flight when close() closed the channels
        if cls in (TableNotFound, WrongShard, TableChanged):
            with self._specs_lock:
                self._specs.clear()  # the layout or the tables changed under us
        err = cls(f"{method} on shard {shard} ({self._shards[shard].address}): {e.details()}")
        err.shard = shard
        err.unnamed = named is None  # a shard from before errors named their class
        return err

    # ---- shared memory ------------------------------------------------------------------
    def _delivering_shards(self) -> set[int]:
        """Shards that lookups ask to write into this client's segments."""
        if not (self.config.shared_memory and segments.supported()):
            return set()
        now = time.monotonic()
        return {s.index for s in self._shards if s.delivers is not False or now >= s.retry_delivery_at}

    def _segments(self) -> segments.SegmentPool:
        with self._pool_lock:
            if self._segment_pool is None:
                self._segment_pool = segments.SegmentPool()
            pool = self._segment_pool
            # Segments closed since: the shards can unmap them. Once close() began (a call
            # it waits for runs now), close() releases them itself.
            if pool.closed_tokens and not self._closed:
                self._executor_locked().submit(self._release_segments, pool.take_closed())
        return pool

    def _release_segments(self, tokens: list[bytes]) -> None:
        """Tells every shard that these segments of this client are closed, so those that
        mapped one unmap it (best effort: a shard also drops them once this process has
        exited). Every shard, not only delivering ones: one that stopped delivering may have
        mapped some before. A shard the request fails to reach gets its tokens again with the
        next release."""
        if not tokens and (self._inherited_channels or not any(s.unreleased for s in self._shards)):
            return  # nothing to say (a forked child's inherited shards hold the parent's unreleased)
        self._check_open()  # a forked child's channels first
        with self._release_lock:
            asked = {s.index: (s, [*s.unreleased, *tokens]) for s in self._shards}
            if not any(t for _, t in asked.values()):
                return
            calls = self._send("ReleaseSegments", {i: (i, pb.ReleaseSegmentsRequest(tokens=t))
                                                   for i, (_, t) in asked.items() if t}, RELEASE_TIMEOUT_S)
            for call, i in calls.items():
                shard, sent = asked[i]
                try:
                    call.result()
                    shard.unreleased = []
                except grpc.RpcError as e:
                    # A shard from before ReleaseSegments has nothing to release.
                    shard.unreleased = [] if e.code() == grpc.StatusCode.UNIMPLEMENTED else sent

    def _executor(self) -> ThreadPoolExecutor:
        """The threads of *_async calls; ClientClosed once close() began."""
        with self._pool_lock:
            return self._executor_locked()

    def _executor_locked(self) -> ThreadPoolExecutor:
        if self._closed:
            raise self._closed_error()
        if self._pool is None:
            # The initializer's arguments live as long as the threads: the client's local,
            # never the client, which stays collectable while its idle threads wait.
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="memstore-client",
                                            initializer=_pool_thread, initargs=(self._local,))
        return self._pool

    def _rpc_threads(self) -> ThreadPoolExecutor:
        """Threads that only make blocking calls (never a fan-out of their own, so a full
        pool queues calls and cannot deadlock)."""
        with self._pool_lock:
            if self._ended:
                raise self._closed_error()
            if self._rpc_pool is None:
                self._rpc_pool = ThreadPoolExecutor(max_workers=min(64, 4 * max(2, self.num_shards)),
                                                    thread_name_prefix="memstore-rpc")
            return self._rpc_pool

    def _forked(self) -> None:
        """In a forked child (at the fork): gRPC's threads did not come along, so a call on
        the parent's channels would wait forever, and the thread pools have no threads.
        The child makes channels of its own on its first call (not here: a child that never
        calls, a DataLoader worker, touches no gRPC state), and pools when it needs them; the
        parent's are kept, never closed or collected (which would touch its gRPC state too).
        Locks another thread held at the fork are made anew, and the child gets an id of
        its own: its updates' ids must not repeat the parent's (a shard would answer one as
        already applied)."""
        self._specs_lock, self._pool_lock = threading.Lock(), threading.Lock()
        self._resolve_lock, self._release_lock = threading.Lock(), threading.Lock()
        self._inherited.append((self._retired, self._pool, self._rpc_pool))
        self._pool = self._rpc_pool = None
        self._retired = []
        self._inherited_channels = True
        self._client_id = uuid.uuid4().hex
        self._seq = itertools.count()

    def close(self) -> None:
        """Ends the client's threads, channels and segments; a second close does nothing.
        *_async calls made before it run to the end first; any call after it raises
        ClientClosed. From a callback of one of this client's futures (which runs on the
        client's own thread, and cannot wait for itself), it returns at once and a thread
        of its own finishes closing once the callback has returned; a later close() from
        another thread waits for that."""
        own_thread = getattr(self._local, "may_call", False)
        with self._pool_lock:
            closer, first = self._closer, not self._closed
            if first:
                self._closed = True
                if own_thread:
                    closer = self._closer = threading.Thread(target=self._finish_close, name="memstore-client-close")
        if first and own_thread:
            closer.start()
        elif first:
            self._finish_close()
        elif closer is not None and not own_thread:
            closer.join()

    def _finish_close(self) -> None:
        self._local.may_call = True  # its ReleaseSegments
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._segment_pool is not None:
            self._segment_pool.close()
            # Leased ones too: their results live on in this process, but every call that
            # had a shard write into them has returned.
            self._release_segments(self._segment_pool.take_closed() + self._segment_pool.leased_tokens())
        with self._pool_lock:
            self._ended = True  # no thread makes a pool from here on
        own = [] if self._inherited_channels else self._shards  # a forked child's inherited ones stay as they are
        for s in [*own, *(s for _, s in self._retired)]:
            s.channel.close()  # first: calls still in flight (another thread's) end now, cancelled
        if self._rpc_pool is not None:
            self._rpc_pool.shutdown(wait=True)

    def __enter__(self) -> "MemStoreClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
