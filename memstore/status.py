"""What one shard says about itself: its health and its Stats, as plain dicts for `memstore
status` (no Ray here: a shard is reached by its address)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memstore.server import CHANNEL_OPTIONS, SERVICE
from memstore.v1 import memstore_pb2 as pb


def shard_status(shard: dict, timeout_s: float = 2.0) -> dict:
    """shard: {"shard_index", "address", "node_id", ...} from a store's layout."""
    out = {"shard_index": shard["shard_index"], "address": shard["address"], "node_id": shard.get("node_id", "")}
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
        "uptime_s": stats.uptime_s,
        "lookups_per_s": methods["Lookup"].rate_per_s,
        "updates_per_s": methods["Update"].rate_per_s,
        "latency_ms": {name: {"p50": m.p50_ms, "p99": m.p99_ms} for name, m in methods.items() if m.calls},
        "errors": sum(m.errors for m in stats.methods),
    }
