"""The gRPC server of one shard: translates between the wire and the storage engine.

`MemStoreServicer` has one thin method per RPC of protos/memstore/v1/memstore.proto; engine
exceptions become status codes in one place (`STATUS_OF`). Data RPCs are registered with
frame (de)serializers through a generic handler, so rows travel as raw bytes. `serve()` wires
the servicer, the standard grpc.health.v1 service and the message-size limits together.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import threading
import time
from concurrent import futures
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from memstore import wire
from memstore.alloc import available_bytes, keep_freed_memory
from memstore.engine import ShardEngine
from memstore.errors import (InvalidArgument, MemStoreError, ResourceExhausted, SegmentUnreachable, TableChanged,
                             TableExists, TableNotFound, Unavailable, WrongShard)
from memstore.metrics import ShardMetrics
from memstore.partition import shard_of
from memstore.segments import SegmentMap, SegmentRef
from memstore.service import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, SERVICE  # noqa: F401 (the client's too)
from memstore.spec import DTYPE_BYTES, TableSpec
from memstore.v1 import memstore_pb2 as pb

log = logging.getLogger("memstore.server")
LOG_WATCH_S = 1.0  # how often health looks for a failed write-ahead log

# A reply's header (its parts, versions) next to its rows: the rows a request asks back may
# take the rest of a message, checked before anything is read or written (_check_reply).
REPLY_HEADER_ROOM = 1 << 20

# Rates and latency percentiles in Stats cover this many recent seconds / calls per method.
STATS_WINDOW_S = 10.0
FREE_AT_CUT = 2  # server threads a frozen write gate never parks writes on (WriteGate.max_waiting)
RECENT_CALLS = 4096

STATUS_OF: dict[type[MemStoreError], grpc.StatusCode] = {
    TableNotFound: grpc.StatusCode.NOT_FOUND,
    TableExists: grpc.StatusCode.ALREADY_EXISTS,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    WrongShard: grpc.StatusCode.FAILED_PRECONDITION,
    SegmentUnreachable: grpc.StatusCode.FAILED_PRECONDITION,  # the client falls back to rows in replies
    Unavailable: grpc.StatusCode.UNAVAILABLE,  # retryable: a table swapped by a restore, a log that failed
}


@dataclass
class MethodCounters:
    calls: int = 0
    errors: int = 0
    rows: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    bytes_delivered: int = 0  # rows written into same-host clients' segments
    # (monotonic end time, seconds) of the latest calls, for rates and latency percentiles
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_CALLS))

    def window(self, now: float, window_s: float) -> dict:
        """Calls per second and p50/p99 latency (ms) over the last window_s seconds."""
        lat = np.array([sec for end, sec in self.recent if end >= now - window_s])
        if not len(lat):
            return {"rate_per_s": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "window_s": window_s}
        p50, p99 = np.percentile(lat, [50, 99]) * 1e3
        return {"rate_per_s": len(lat) / window_s, "p50_ms": float(p50), "p99_ms": float(p99), "window_s": window_s}


def _check_reply(method: str, row_bytes: int) -> None:
    """INVALID_ARGUMENT for a request whose reply would carry more rows than a message holds
    (keys may repeat: a small request can ask for a huge reply), before anything is read,
    allocated or written: a write must not apply and then fail on its reply."""
    most = MAX_MESSAGE_BYTES - REPLY_HEADER_ROOM
    if row_bytes > most:
        raise InvalidArgument(f"the reply to this {method} would carry {row_bytes:,} bytes of rows, more than the "
                              f"{most:,} a message may: ask for fewer rows per request (the client splits them)")


class MemStoreServicer:
    """One method per RPC; each decodes, calls the engine once and encodes."""

    def __init__(self, engine: ShardEngine) -> None:
        self.engine = engine
        self.started = time.monotonic()
        self._counters = {m.name: MethodCounters() for m in pb.DESCRIPTOR.services_by_name["MemStore"].methods}
        self._counters_lock = threading.Lock()  # guards the counters' fields
        self.metrics = ShardMetrics(engine, list(self._counters))  # Prometheus, fed by the same counting
        self.segments = SegmentMap()  # same-host clients' shared memory, where lookups deliver rows

    # ---- control RPCs ----------------------------------------------------------------------
    def CreateTable(self, request: pb.CreateTableRequest, context) -> pb.TableInfo:
        self._route(request.route)
        table, created = self.engine.ensure_table(wire.spec_from_pb(request.spec))
        info = self._info(table)
        info.created = created
        return info

    def DescribeTable(self, request: pb.TableRef, context) -> pb.TableInfo:
        return self._info(self.engine.table(request.name))

    def ListTables(self, request: pb.ListTablesRequest, context) -> pb.ListTablesResponse:
        return pb.ListTablesResponse(tables=[self._info(t) for t in self.engine.tables()])

    def DropTable(self, request: pb.DropTableRequest, context) -> pb.DropTableResponse:
        return pb.DropTableResponse(dropped=self.engine.drop_table(request.name, request.drop_id))

    def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        now = time.monotonic()
        window_s = min(STATS_WINDOW_S, max(now - self.started, 1e-3))
        with self._counters_lock:
            methods = [
                pb.MethodStats(method=name, calls=c.calls, errors=c.errors, rows=c.rows, bytes_in=c.bytes_in,
                               bytes_out=c.bytes_out, bytes_delivered=c.bytes_delivered, **c.window(now, window_s))
                for name, c in self._counters.items()
            ]
        log = self.engine.log_facts()
        room = available_bytes()
        return pb.StatsResponse(
            shard_index=self.engine.shard_index,
            num_shards=self.engine.num_shards,
            tables=[self._info(t) for t in self.engine.tables()],
            methods=methods,
            uptime_s=time.monotonic() - self.started,
            rss_bytes=_rss_bytes(),
            mapped_segments=len(self.segments),
            mapped_segment_bytes=self.segments.mapped_bytes,
            **({"log": pb.LogState(**log)} if log is not None else {}),
            **({"available_bytes": room} if room is not None else {}),
        )

    def TableStats(self, request: pb.TableStatsRequest, context) -> pb.TableStatsResponse:
        tables = [self.engine.table(name) for name in dict.fromkeys(request.tables)] or self.engine.tables()  # each once
        out = pb.TableStatsResponse(shard_index=self.engine.shard_index, num_shards=self.engine.num_shards)
        for t in tables:
            s = t.telemetry.snapshot(t.spec.name, t.spec.num_rows, t.shard_index, t.num_shards)
            out.tables.add(table=s.table, num_rows=s.num_rows, local_rows=s.local_rows, lookups=s.lookups,
                           lookup_keys=s.lookup_keys, updates=s.updates, update_keys=s.update_keys,
                           rows_touched=s.rows_touched, hot_counts=s.hot_counts.tolist(), hot_keys=s.hot_keys.tolist())
        return out

    # ---- data RPCs (framed) ------------------------------------------------------------------
    def Lookup(self, frame: bytes, context) -> bytes:
        header, payload = wire.decode_frame(frame, pb.LookupRequest)
        self._route(header.route)
        spec, keys, slots, delivery = self._lookup_part(header, payload)
        if delivery is None:
            _check_reply("Lookup", len(keys) * spec.wire_row_bytes)
        head = pb.LookupResponse(num_keys=len(keys), dim=spec.dim, dtype=wire.DTYPE_TO_PB[spec.wire_dtype],
                                 delivered=delivery is not None)
        reply = []

        def alloc(version: int) -> torch.Tensor:  # the rows go straight into the reply frame or the client's segment
            head.version = version
            if delivery is not None:
                return delivery
            out, rows = wire.new_frame(head, len(keys), spec.dim, spec.wire_dtype)
            reply.append(out)
            return rows

        self.engine.lookup(header.table, keys, alloc, slots)
        out = reply[0] if reply else wire.encode_frame(head)
        self._count("Lookup", len(keys), len(frame), len(out), 0 if reply else len(keys) * spec.wire_row_bytes)
        return out

    def LookupMany(self, frame: bytes, context) -> bytes:
        header, payload = wire.decode_frame(frame, pb.LookupManyRequest)
        self._route(header.route)
        sizes = [0 if p.HasField("delivery") else p.num_keys * 8 for p in header.parts]
        if min(sizes, default=0) < 0 or sum(sizes) != len(payload):
            raise InvalidArgument(f"LookupMany payload is {len(payload)} bytes; its parts' keys "
                                  f"need {sizes} = {sum(sizes)}")
        starts = np.cumsum([0, *sizes])
        head, reads, delivered, replying = pb.LookupManyResponse(), [], 0, 0
        for request, lo, hi in zip(header.parts, starts[:-1], starts[1:]):  # every part checked before any is read
            spec, keys, slots, delivery = self._lookup_part(request, payload[lo:hi])
            part = head.parts.add(num_keys=len(keys), dim=spec.dim, dtype=wire.DTYPE_TO_PB[spec.wire_dtype],
                                  delivered=delivery is not None)

            def alloc(version: int, n=len(keys), spec=spec, part=part, delivery=delivery) -> torch.Tensor:
                part.version = version
                return delivery if delivery is not None else torch.empty(n, spec.dim, dtype=spec.wire_torch_dtype)

            reads.append((self.engine.prepare_lookup(request.table, keys, alloc, slots), delivery is None))
            delivered += 0 if delivery is None else len(keys) * spec.wire_row_bytes
            replying += 0 if delivery is not None else len(keys) * spec.wire_row_bytes
        _check_reply("LookupMany", replying)
        replied = []
        for read, in_reply in reads:
            rows = read()
            if in_reply:
                replied.append(wire.tensor_bytes(rows))
        # Replied parts are a step's few thousand rows per table: one copy into the frame is cheap.
        out = wire.encode_frame(head, *replied)
        self._count("LookupMany", sum(p.num_keys for p in head.parts), len(frame), len(out), delivered)
        return out

    def _lookup_part(self, header: pb.LookupRequest, payload) -> tuple[TableSpec, np.ndarray, np.ndarray | None,
                                                                          torch.Tensor | None]:
        """One lookup (part) of a request: (spec, keys, slots, rows). rows is None when the
        reply carries them; else `keys` are this shard's keys of the delivery's range (read
        from the client's segment) and rows the region they go to: [n, dim] (slots None), or
        [first + n, dim] whose row slots[i] receives key i. The keys are checked later, by
        the engine (prepare_lookup)."""
        spec = self.engine.table(header.table).spec
        if not header.HasField("delivery"):
            return spec, wire.keys_from_payload(payload, header.num_keys), None, None
        d, n = header.delivery, header.num_keys
        if len(payload) or n < 0:
            raise InvalidArgument(f"a delivered lookup of {spec.name!r} has {n} keys in its segment and no payload; "
                                  f"got {len(payload)} payload bytes")
        if (d.dim, d.dtype) != (spec.dim, wire.DTYPE_TO_PB[spec.wire_dtype]):
            raise TableChanged(f"table {spec.name!r} has dim {spec.dim} and wire dtype {spec.wire_dtype}; the delivery "
                               f"made room for dim {d.dim} of {wire.PB_TO_DTYPE.get(d.dtype, d.dtype)}")
        end = d.first + n
        ref = SegmentRef(d.segment.pid, d.segment.fd, d.segment.size, d.segment.token)
        key_region = self.segments.region(ref, d.keys_offset, 8 * end)  # each within the segment: checked first
        region = self.segments.region(ref, d.rows_offset, end * spec.wire_row_bytes)
        if d.keys_offset < d.rows_offset + end * spec.wire_row_bytes and d.rows_offset < d.keys_offset + 8 * end:
            raise InvalidArgument(f"delivery of {spec.name!r}: its keys and rows regions overlap")
        # A private copy: the client's memory could change under the checks.
        keys = key_region.view("<i8")[d.first :].copy()
        rows = torch.from_numpy(region).view(spec.wire_torch_dtype).view(end, spec.dim)
        if self.engine.num_shards == 1:
            return spec, keys, None, rows[d.first :]
        mine = np.flatnonzero(shard_of(keys, self.engine.num_shards) == self.engine.shard_index)  # this shard's keys
        return spec, keys[mine], mine + d.first, rows

    def ReleaseSegments(self, request: pb.ReleaseSegmentsRequest, context) -> pb.ReleaseSegmentsResponse:
        return pb.ReleaseSegmentsResponse(released=self.segments.release(set(request.tokens)))

    def Update(self, frame: bytes, context) -> bytes:
        header, payload = wire.decode_frame(frame, pb.UpdateRequest)
        self._route(header.route)
        apply, spec, num_keys = self._prepare_update(header, payload)
        version, dup, rows = apply()
        head = self._update_response(version, dup, rows, spec)
        out = wire.encode_frame(head, *(() if rows is None else (wire.tensor_bytes(rows),)))
        self._count("Update", num_keys, len(frame), len(out))
        return out

    def UpdateMany(self, frame: bytes, context) -> bytes:
        header, payload = wire.decode_frame(frame, pb.UpdateManyRequest)
        self._route(header.route)
        for shape in header.tables:  # the whole call's tables, as its client checked them
            self._check_size(shape, self.engine.table(shape.table).spec)
        ids = [(part.table, part.update_id) for part in header.parts if part.update_id]  # a table's ids are its own
        if len(set(ids)) < len(ids):
            table, again = next(i for n, i in enumerate(ids) if i in ids[:n])
            raise InvalidArgument(f"UpdateMany carries update id {again!r} of table {table!r} in more than one part: "
                                  "an id names one update")
        _check_reply("UpdateMany", sum(part.num_read_keys * self.engine.table(part.table).spec.wire_row_bytes
                                       for part in header.parts))
        prepared, at = [], 0
        for part in header.parts:  # every part is checked before the first applies
            size = self._update_bytes(part)
            if at + size > len(payload):
                raise InvalidArgument(f"UpdateMany payload is {len(payload)} bytes, too short for its parts")
            prepared.append(self._prepare_update(part, payload[at:at + size]))
            at += size
        if at != len(payload):
            raise InvalidArgument(f"UpdateMany payload is {len(payload)} bytes; its parts take {at}")
        head, rows = pb.UpdateManyResponse(), []
        done = self.engine.apply_together([apply for apply, _, _ in prepared])
        for (_, spec, _), (version, dup, read) in zip(prepared, done):
            head.parts.append(self._update_response(version, dup, read, spec))
            if read is not None:
                rows.append(wire.tensor_bytes(read))
        out = wire.encode_frame(head, *rows)
        self._count("UpdateMany", sum(n for _, _, n in prepared), len(frame), len(out))
        return out

    @staticmethod
    def _update_bytes(header: pb.UpdateRequest) -> int:
        """The payload bytes of one update part: keys, gradients, read keys."""
        if min(header.num_keys, header.dim, header.num_read_keys) < 0:
            raise InvalidArgument(f"negative size in header: num_keys={header.num_keys}, dim={header.dim}, "
                                  f"num_read_keys={header.num_read_keys}")
        item = DTYPE_BYTES[wire.dtype_name(header.dtype, "gradient dtype")]
        return header.num_keys * (8 + header.dim * item) + header.num_read_keys * 8

    def _prepare_update(self, header: pb.UpdateRequest, payload) -> tuple[Callable, TableSpec, int]:
        """Checks one update (its header and its payload: keys || grads || read keys) without
        applying it: (the call that applies it, the table's spec, its number of keys)."""
        table = self.engine.table(header.table)  # once: the gradients are decoded by its spec
        spec = table.spec
        if header.num_read_keys < 0:
            raise InvalidArgument(f"negative num_read_keys in header: {header.num_read_keys}")
        read_bytes = header.num_read_keys * 8
        if read_bytes > len(payload):
            raise InvalidArgument(f"update payload is {len(payload)} bytes, too short for its {header.num_read_keys} read keys")
        cut = len(payload) - read_bytes
        self._check_size(header, spec, spec.wire_dtype)
        keys, grads = self._values(header, payload[:cut], spec.wire_dtype, "gradient")
        read_keys = wire.keys_from_payload(payload[cut:], header.num_read_keys) if header.num_read_keys else None
        _check_reply("Update", header.num_read_keys * spec.wire_row_bytes)  # before the engine allocates its rows
        apply = self.engine.prepare_update(header.table, keys, grads, header.lr, header.update_id, header.group,
                                           header.parts, read_keys, table=table)
        return apply, spec, len(keys)

    @staticmethod
    def _update_response(version: int, dup: bool, rows: torch.Tensor | None, spec: TableSpec) -> pb.UpdateResponse:
        head = pb.UpdateResponse(version=version, duplicate=dup)
        if rows is not None:  # read-back rows are the few stale ones of a prefetch: one copy into the frame is cheap
            head.num_rows, head.dim, head.dtype = len(rows), spec.dim, wire.DTYPE_TO_PB[spec.wire_dtype]
        return head

    def Assign(self, frame: bytes, context) -> bytes:
        header, payload = wire.decode_frame(frame, pb.AssignRequest)
        self._route(header.route)
        self._check_size(header, self.engine.table(header.table).spec)
        keys, rows = self._values(header, payload, None, "row")
        version, dup = self.engine.assign(
            header.table, keys, rows, header.keep_optimizer_state, header.update_id, header.group, header.parts
        )
        out = wire.encode_frame(pb.AssignResponse(version=version, duplicate=dup))
        self._count("Assign", len(keys), len(frame), len(out))
        return out

    # ---- helpers -----------------------------------------------------------------------------
    def _route(self, route: pb.Route) -> None:
        self.engine.check_route(route.shard_index, route.num_shards)

    @staticmethod
    def _check_size(header, spec: TableSpec, wire_dtype: str | None = None) -> None:
        """A write its client checked (it names the table's num_rows) against another shape
        of the table, size or dim (or, given the table's wire dtype, gradient dtype):
        TableChanged, so the client reads the spec anew."""
        if not header.num_rows:
            return
        dtype = wire.PB_TO_DTYPE.get(getattr(header, "dtype", None))  # a TableShape has none
        if (header.num_rows, header.dim) != (spec.num_rows, spec.dim) or (wire_dtype and dtype != wire_dtype):
            raise TableChanged(f"table {spec.name!r} has {spec.num_rows:,} rows of dim {spec.dim} ({spec.wire_dtype} "
                               f"on the wire); this write was checked against {header.num_rows:,} of dim {header.dim} "
                               f"({dtype}): the table was created again, read its spec anew")

    @staticmethod
    def _values(header, payload, want_dtype: str | None, what: str):
        """(keys, values) of an Update/Assign frame; the dtype must be the table's wire dtype
        for gradients, any supported dtype for assigned rows."""
        dtype = wire.dtype_name(header.dtype, f"{what} dtype")
        if want_dtype is not None and dtype != want_dtype:
            raise InvalidArgument(f"{what}s for table {header.table!r} must be {want_dtype}, got {dtype}")
        return wire.split_payload(payload, header.num_keys, header.dim, dtype, what)

    def _info(self, table) -> pb.TableInfo:
        return pb.TableInfo(
            spec=wire.spec_to_pb(table.spec),
            shard_index=table.shard_index,
            num_shards=table.num_shards,
            local_rows=table.local_rows,
            version=table.version,
            row_bytes=table.row_bytes,
            state_bytes=table.state_bytes,
        )

    def _count(self, method: str, rows: int, bytes_in: int, bytes_out: int, bytes_delivered: int = 0) -> None:
        with self._counters_lock:
            c = self._counters[method]
            c.calls += 1
            c.rows += rows
            c.bytes_in += bytes_in
            c.bytes_out += bytes_out
            c.bytes_delivered += bytes_delivered
        self.metrics.transfer(method, rows, bytes_in, bytes_out, bytes_delivered)

    def count_error(self, method: str, code: str = "UNKNOWN") -> None:
        with self._counters_lock:
            self._counters[method].errors += 1
        self.metrics.error(method, code)

    def observe(self, method: str, seconds: float, code: str = "OK") -> None:
        with self._counters_lock:
            self._counters[method].recent.append((time.monotonic(), seconds))
        self.metrics.request(method, code, seconds)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Trailing metadata key of every error reply: the memstore.errors class raised.
ERROR_KEY = "memstore-error"
FRAMED = ("Lookup", "LookupMany", "Update", "UpdateMany", "Assign")


def _handler(servicer: MemStoreServicer, method) -> grpc.RpcMethodHandler:
    """A unary handler for one RPC that maps engine exceptions to status codes."""
    name = method.name
    impl = getattr(servicer, name)
    request_cls = None if name in FRAMED else getattr(pb, method.input_type.name)

    def call(request, context):
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if request_cls is not None:  # parsed here, so a malformed message is INVALID_ARGUMENT
                request = _parse(request_cls, request)
            return impl(request, context)
        except MemStoreError as e:
            code = next((c for t, c in STATUS_OF.items() if isinstance(e, t)), grpc.StatusCode.UNAVAILABLE)
            servicer.count_error(name, code.name)
            context.set_trailing_metadata(((ERROR_KEY, type(e).__name__),))  # the client raises the same class
            context.abort(code, str(e))
        except Exception:
            code = grpc.StatusCode.INTERNAL
            servicer.count_error(name, code.name)
            log.exception("%s failed", name)
            context.abort(code, f"{name} failed on shard {servicer.engine.shard_index}; see its log")
        finally:
            servicer.observe(name, time.perf_counter() - t0, code.name)

    if name in FRAMED:
        return grpc.unary_unary_rpc_method_handler(call)  # frames stay bytes both ways
    return grpc.unary_unary_rpc_method_handler(call, response_serializer=lambda m: m.SerializeToString())


def _parse(message_cls, data: bytes):
    try:
        return message_cls.FromString(data)
    except DecodeError as e:
        raise InvalidArgument(f"malformed {message_cls.__name__}: {e}") from None


def add_servicer(servicer: MemStoreServicer, server: grpc.Server) -> None:
    methods = pb.DESCRIPTOR.services_by_name["MemStore"].methods
    handlers = {m.name: _handler(servicer, m) for m in methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class _Health(health.HealthServicer):
    """grpc.health.v1, and NOT_SERVING for good once the shard's write-ahead log has failed:
    such a shard refuses every write until it restarts, which a probe should see. Check looks
    at the log each time; Watch streams learn it from `watch_log` (within LOG_WATCH_S)."""

    def __init__(self, engine: ShardEngine) -> None:
        super().__init__()
        self._engine = engine

    def Check(self, request, context):
        if self._log_failed():
            self.not_serving()
        return super().Check(request, context)

    def _log_failed(self) -> bool:
        facts = self._engine.log_facts()
        return bool(facts and facts.get("failed"))

    def not_serving(self) -> None:
        for name in ("", SERVICE):  # a no-op once shutting down
            self.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def watch_log(self, stop: threading.Event) -> None:
        while not stop.wait(LOG_WATCH_S):
            if self._log_failed():
                self.not_serving()
                return


class ShardServer:
    """A running shard: engine, gRPC server and health service, and Prometheus metrics over
    HTTP when metrics_port is given (0 picks a free port). `stop()` drains gracefully."""

    def __init__(self, engine: ShardEngine, host: str = "127.0.0.1", port: int = 0, max_workers: int = 8,
                 metrics_port: int | None = None) -> None:
        keep_freed_memory()  # reply buffers are reused instead of page-faulted in per request
        self.engine = engine
        self.servicer = MemStoreServicer(engine)
        self.health = _Health(engine)
        self._stopping = threading.Event()
        # so_reuseport off: a second shard started on a taken port must fail, not share it.
        options = CHANNEL_OPTIONS + [("grpc.so_reuseport", 0)]
        # A cut's frozen gate parks writes on this pool's threads: some are kept for the parts
        # the cut releases and for lookups.
        engine.gate.max_waiting = max(0, max_workers - FREE_AT_CUT)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
        add_servicer(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        try:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:  # grpcio raises this when the address cannot be bound
            self.port = 0
        if self.port == 0:
            self.server.stop(None)  # its ports and threads now, not at garbage collection
            raise OSError(f"could not bind {host}:{port} (in use, or not an address of this host)")
        self.address = f"{host}:{self.port}"
        self.host = host
        self.metrics_address = None  # host:port of /metrics, when served
        if metrics_port is not None:
            try:
                self.serve_metrics(metrics_port)
            except OSError:
                self.server.stop(None)  # release the gRPC port now, not at garbage collection
                raise

    def serve_metrics(self, port: int) -> str:
        """Serves Prometheus metrics on this server's host:port (0 picks a free port);
        returns that address. OSError if the port is taken."""
        self.metrics_address = f"{self.host}:{self.servicer.metrics.serve(port, self.host)}"
        return self.metrics_address

    def start(self) -> "ShardServer":
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        threading.Thread(target=self.health.watch_log, args=(self._stopping,), name="memstore-health",
                         daemon=True).start()
        return self

    def stop(self, grace_s: float = 2.0) -> None:
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        self.servicer.metrics.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def settle_shard_process() -> None:
    """Call once a shard process is serving: moves every object alive now (torch's and grpc's
    modules, the tables' metadata) out of the cyclic garbage collector's reach. Each data RPC
    allocates a few hundred container objects, and every ~70,000 of them Python ran a full
    collection over the ~10^5 objects torch leaves behind at import: during training that was
    27 % of a shard's CPU time (perf, bench/bench_train.py's memstore runs). Objects made later
    are still collected as usual."""
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()


def serve(host: str, port: int, shard_index: int, num_shards: int, metrics_port: int | None = None) -> ShardServer:
    """Starts shard `shard_index` of `num_shards` on host:port (0 picks a free port)."""
    return ShardServer(ShardEngine(shard_index, num_shards), host, port, metrics_port=metrics_port).start()
