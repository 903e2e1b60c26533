"""What one shard says about itself: its health and its Stats, as plain dicts for `memstore
status`, and its per-table telemetry for `memstore stats` (no Ray here: a shard is reached by
its address)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memstore.errors import TableNotFound, Unavailable
from memstore.service import CHANNEL_OPTIONS, SERVICE
from memstore.v1 import memstore_pb2 as pb

if TYPE_CHECKING:
    from memstore.telemetry import TelemetrySnapshot


def shard_status(shard: dict, timeout_s: float = 2.0) -> dict:
    """shard: {"shard_index", "address", "node_id", ...} from a store's layout."""
    out = {"shard_index": shard["shard_index"], "address": shard["address"], "node_id": shard.get("node_id", ""),
           "metrics_address": shard.get("metrics_address")}
    try:
        with grpc.insecure_channel(shard["address"], options=CHANNEL_OPTIONS) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout_s)
            stats_call = ch.unary_unary(f"/{SERVICE}/Stats", request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=pb.StatsResponse.FromString)
            stats = stats_call(pb.StatsRequest(), timeout=timeout_s)
    except grpc.RpcError:
        return out | {"state": "UNREACHABLE"}
    methods = {m.method: m for m in stats.methods}
    return out | {
        "state": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
        "tables": len(stats.tables),
        "rows": sum(t.local_rows for t in stats.tables),
        "bytes_held": sum(t.row_bytes + t.state_bytes for t in stats.tables),
        "rss_bytes": stats.rss_bytes,
        "mapped_segment_bytes": stats.mapped_segment_bytes,  # same-host clients' memory, not the shard's
        # What a new table could take on the shard's host (shared by the shards there); None: unknown.
        "available_bytes": stats.available_bytes if stats.HasField("available_bytes") else None,
        "uptime_s": stats.uptime_s,
        # A trainer reads and writes all of a step's tables in one LookupMany / UpdateMany.
        "lookups_per_s": methods["Lookup"].rate_per_s + methods["LookupMany"].rate_per_s,
        "updates_per_s": methods["Update"].rate_per_s + methods["UpdateMany"].rate_per_s,
        "latency_ms": {name: {"p50": m.p50_ms, "p99": m.p99_ms} for name, m in methods.items() if m.calls},
        "errors": sum(m.errors for m in stats.methods),
        "log": {"bytes": stats.log.bytes, "failed": stats.log.failed, "compactions": stats.log.compactions,
                "compaction_error": stats.log.compaction_error} if stats.HasField("log") else None,
    }


def table_telemetry(address: str, tables: list[str] = (),
                    timeout_s: float = 10.0) -> tuple[int, int, list[TelemetrySnapshot]]:
    """The TableStats of the shard at `address`: (shard index, shard count, one snapshot per
    table, all when none named). TableNotFound for a table the shard lacks, Unavailable when
    it does not answer."""
    from memstore.telemetry import TelemetrySnapshot  # here: status and health run without torch

    try:
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
            call = ch.unary_unary(f"/{SERVICE}/TableStats", request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=pb.TableStatsResponse.FromString)
            reply = call(pb.TableStatsRequest(tables=list(tables)), timeout=timeout_s)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            raise TableNotFound(e.details()) from None
        raise Unavailable(f"shard at {address} did not answer TableStats: {e.code().name} {e.details()}") from None
    return reply.shard_index, reply.num_shards, [
        TelemetrySnapshot(
            table=t.table, num_rows=t.num_rows, local_rows=t.local_rows, shard_index=reply.shard_index,
            num_shards=reply.num_shards, lookups=t.lookups, lookup_keys=t.lookup_keys, updates=t.updates,
            update_keys=t.update_keys, rows_touched=t.rows_touched,
            hot_counts=np.array(t.hot_counts, dtype=np.int64), hot_keys=np.array(t.hot_keys, dtype=np.int64),
        )
        for t in reply.tables
    ]
