"""Prometheus metrics of one shard server, on its own HTTP port.

Every `ShardServer` owns a `ShardMetrics` with its own `CollectorRegistry` (never the global
one), so several servers in one process — tests, a demo — neither clash nor mix their counts.
The servicer calls `request`, `error` and `transfer` from the counting it already does; sizes
(rows and bytes held per table, optimizer state included), the per-table telemetry counters
and the process's memory are read from the engine when Prometheus scrapes, so they cost
nothing on the request path.

Relies on prometheus-client and memstore.alloc (the host's free memory) only; no gRPC here: status
codes arrive as names such as "OK".
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from memstore import alloc

# Request latency buckets (seconds): a small lookup answers in well under a millisecond, a
# 16 MiB one in ~15 ms on loopback, an optimizer step on 65 k rows in tens of ms.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)


class MetricsEndpoint:
    """Serves `registry` at /metrics over HTTP (prometheus-client's server), once asked."""

    what = "metrics"  # named in the error when the port is taken

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http = None  # the HTTP server while serving

    def serve(self, port: int = 0, host: str = "0.0.0.0") -> int:
        """Serves /metrics on host:port (0 picks a free port); returns the bound port."""
        assert self._http is None, "metrics are served already"
        try:
            self._http, _ = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise OSError(f"cannot serve {self.what} on {host}:{port}: {e.strerror or e}") from None
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class ShardMetrics(MetricsEndpoint):
    """The metrics of one shard; `registry` is what its HTTP endpoint serves."""

    def __init__(self, engine, methods: list[str]) -> None:
        super().__init__()
        r = self.registry
        self.requests = Counter("memstore_requests", "RPCs finished, by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.errors = Counter("memstore_request_errors", "RPCs that failed, by method and gRPC status code",
                              ["method", "code"], registry=r)
        self.latency = Histogram("memstore_request_duration_seconds", "RPC handling time on the shard, by method",
                                 ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.bytes_in = Counter("memstore_received_bytes", "request bytes of data RPCs that succeeded", ["method"],
                                registry=r)
        self.bytes_out = Counter("memstore_sent_bytes", "reply bytes of data RPCs that succeeded", ["method"],
                                 registry=r)
        self.delivered = Counter("memstore_delivered_bytes", "rows' bytes written into same-host clients' "
                                 "shared memory instead of replies", ["method"], registry=r)
        self.rows = Counter("memstore_request_rows", "rows (keys) of data RPCs that succeeded", ["method"], registry=r)
        for m in methods:  # every series from the start, so rate() sees the first calls
            self.requests.labels(m, "OK")
            self.latency.labels(m)
        ProcessCollector(registry=r)  # process_resident_memory_bytes (RSS), CPU seconds, open fds
        r.register(_EngineCollector(engine))

    # ---- called by the servicer ----------------------------------------------------------------
    def request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def error(self, method: str, code: str) -> None:
        self.errors.labels(method, code).inc()

    def transfer(self, method: str, rows: int, bytes_in: int, bytes_out: int, bytes_delivered: int = 0) -> None:
        self.rows.labels(method).inc(rows)
        self.bytes_in.labels(method).inc(bytes_in)
        self.bytes_out.labels(method).inc(bytes_out)
        if bytes_delivered:
            self.delivered.labels(method).inc(bytes_delivered)



class _EngineCollector:
    """What the shard holds, read from the engine at scrape time."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        e = self.engine
        info = GaugeMetricFamily("memstore_shard", "this shard's place in its store (always 1)",
                                 labels=["shard_index", "num_shards"])
        info.add_metric([str(e.shard_index), str(e.num_shards)], 1)
        rows = GaugeMetricFamily("memstore_table_rows", "rows of the table this shard holds", labels=["table"])
        held = GaugeMetricFamily("memstore_table_bytes", "bytes of the table this shard holds: rows, optimizer state",
                                 labels=["table", "kind"])
        total = GaugeMetricFamily("memstore_held_bytes", "bytes of rows and optimizer state held, all tables")
        touched = GaugeMetricFamily("memstore_table_rows_touched", "distinct local rows read at least once",
                                    labels=["table"])
        reads = CounterMetricFamily("memstore_table_lookup_keys", "rows read by lookups", labels=["table"])
        updates = CounterMetricFamily("memstore_table_updates", "update requests applied", labels=["table"])
        held_sum = 0
        for t in e.tables():
            name = t.spec.name
            rows.add_metric([name], t.local_rows)
            held.add_metric([name, "rows"], t.row_bytes)
            held.add_metric([name, "optimizer_state"], t.state_bytes)
            held_sum += t.row_bytes + t.state_bytes
            tele = t.telemetry
            touched.add_metric([name], tele.rows_touched())
            reads.add_metric([name], tele.lookup_keys)
            updates.add_metric([name], tele.updates)
        total.add_metric([], held_sum)
        yield from (info, rows, held, total, touched, reads, updates)
        room = alloc.available_bytes()
        if room is not None:
            yield GaugeMetricFamily("memstore_host_available_bytes", "memory a new table could take on this shard's "
                                    "host now (MemAvailable, or less under its cgroup's limit)", value=room)
        state = e.log_facts()
        if state is not None:
            yield GaugeMetricFamily("memstore_log_bytes", "write-ahead log on disk that a restart would replay",
                                    value=state.get("bytes", 0))
            yield GaugeMetricFamily("memstore_log_failed", "1 while the write-ahead log has failed for good: "
                                    "every write is refused until the shard restarts", value=int(bool(state.get("failed"))))
            yield CounterMetricFamily("memstore_log_compactions", "compactions of a standalone shard's log",
                                      value=state.get("compactions", 0))
