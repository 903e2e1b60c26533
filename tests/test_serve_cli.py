"""`memstore serve` as an operator runs it: health, stats, clean errors and shutdown.

Run: python -m pytest tests/test_serve_cli.py -q
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memstore import MemStoreClient, TableSpec
from memstore.server import SERVICE


def test_health_service_reports_serving(shards_2):
    for address in shards_2.addresses:
        with grpc.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("", SERVICE):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_stats_count_calls_rows_and_bytes(shards_2):
    spec = TableSpec("stats", num_rows=100, dim=8)
    with MemStoreClient(shards_2.addresses) as client:
        client.create_table(spec)
        before = {s.shard_index: {m.method: m for m in s.methods} for s in client.stats()}
        client.lookup("stats", np.arange(100))
        client.update("stats", np.arange(10), np.ones((10, 8), np.float32), lr=0.1)
        stats = client.stats()
        client.drop_table("stats")
    assert [s.shard_index for s in stats] == [0, 1] and all(s.num_shards == 2 for s in stats)
    for s in stats:
        methods = {m.method: m for m in s.methods}
        looked = methods["Lookup"].rows - before[s.shard_index]["Lookup"].rows
        assert looked == 50  # 100 keys split evenly by k % 2
        assert methods["Update"].rows - before[s.shard_index]["Update"].rows == 5
        # This client shares the shards' host: the rows went into its memory, not into replies.
        assert methods["Lookup"].bytes_delivered - before[s.shard_index]["Lookup"].bytes_delivered == 50 * 8 * 4
        table = next(t for t in s.tables if t.spec.name == "stats")
        assert table.local_rows == 50 and table.row_bytes == 50 * 8 * 4 and table.version == 1
        assert s.rss_bytes > 10 << 20 and s.uptime_s > 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memstore.cli.main", *args], capture_output=True, text=True, timeout=60)


def test_bad_flags_give_one_line_and_nonzero_exit():
    for args, needle in ((["serve", "--num-shards", "0"], "--num-shards"),
                         (["serve", "--shard-index", "3", "--num-shards", "2"], "shard index 3"),
                         (["serve", "--port", "70000"], "--port")):
        r = run_cli(*args)
        assert r.returncode != 0, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    r = run_cli("serve", "--port", "notaport")
    assert r.returncode == 2 and "invalid int value" in r.stderr


def test_port_in_use_is_a_clear_error(shards_2):
    port = shards_2.addresses[0].rsplit(":", 1)[1]
    r = run_cli("serve", "--port", port)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
