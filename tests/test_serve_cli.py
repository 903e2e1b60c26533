"""`memstore serve` as an operator runs it: health, stats, clean errors and shutdown.

Run: python -m pytest tests/test_serve_cli.py -q
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import grpc
import pytest
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memstore import MemStoreClient, TableSpec
from memstore.server import SERVICE

PHYSICAL_BYTES = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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
        # What a new table could take on the host: Linux says (MemAvailable, cgroup limits), so it is set.
        assert s.HasField("available_bytes") and 0 < s.available_bytes <= PHYSICAL_BYTES


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
    r = run_cli("serve", "--data-dir", "unused", "--compact-log-bytes=-1M")
    assert r.returncode == 2 and "--compact-log-bytes: not a size: '-1M'" in r.stderr, r.stderr
    r = run_cli("serve", "--compact-log-bytes", "1G")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "memstore serve: error: --wal-sync and --compact-log-bytes apply to a shard with --data-dir only"], r.stderr
    from memstore.cli.serve import _size

    assert [_size(t) for t in ("0", "auto", "4K", "1.5g", "64MiB", "2kb", "100")] == [
        0, None, 4096, 3 << 29, 64 << 20, 2048, 100]
    for bad, why in (("lots", "not a size"), ("inf", "not a size"), ("4X", "not a size"), ("-1", "not a size"),
                     ("0.5", "not a whole number of bytes")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            _size(bad)


def test_port_in_use_is_a_clear_error(shards_2):
    port = shards_2.addresses[0].rsplit(":", 1)[1]
    r = run_cli("serve", "--port", port)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_killed_shard_with_a_data_dir_comes_back_with_every_acknowledged_write(tmp_path):
    """`memstore serve --data-dir`: SIGKILL one of two shards after acknowledged creates,
    updates, assigns and a drop, with its log compacted more than once meanwhile (and maybe
    mid-compaction); restarted on the same dir, it loads its base and replays the log since,
    and the store matches the in-process reference row for row, optimizer state included."""
    import signal
    import time

    from memstore import InProcessStore, OptimizerSpec
    from memstore.launch import start_shard, wait_serving

    flags = ("--data-dir", str(tmp_path), "--wal-sync", "group", "--compact-log-bytes", "4K")
    base = tmp_path / "shard-00001-of-00002" / "base"
    procs = [start_shard(i, 2, extra_args=flags) for i in range(2)]
    try:
        addresses = [wait_serving(p) for p in procs]
        spec = TableSpec("kept", num_rows=1_001, dim=8, optimizer=OptimizerSpec("adam"))
        gone = TableSpec("gone", num_rows=50, dim=4)
        rng = np.random.default_rng(3)

        def steps(store_, ref, n: int, seed: int) -> None:
            r = np.random.default_rng(seed)
            for _ in range(n):
                keys = r.integers(0, spec.num_rows, 300)
                grads = r.standard_normal((300, spec.dim)).astype(np.float32)
                store_.update("kept", keys, grads, lr=0.05, update_id=f"u-{seed}-{_}")
                ref.update("kept", keys, grads, lr=0.05)

        with MemStoreClient(addresses) as client, InProcessStore() as ref:
            for s in (client, ref):
                s.create_table(spec)
                s.create_table(gone)
            steps(client, ref, 4, seed=1)
            rows = rng.standard_normal((20, spec.dim)).astype(np.float32)
            for s in (client, ref):
                s.assign("kept", np.arange(20), rows)
                s.drop_table("gone")
            steps(client, ref, 2, seed=2)
            deadline, seed = time.monotonic() + 30, 10
            while time.monotonic() < deadline and not any(int(p.name[5:]) >= 2 for p in base.glob("ckpt-*")
                                                          if p.name[5:].isdigit()):  # compacted twice
                steps(client, ref, 1, seed=seed)
                seed += 1
            assert list(base.glob("ckpt-*")), "the log was never compacted"
            steps(client, ref, 1, seed=4)  # past the base, in the log
            procs[1].send_signal(signal.SIGKILL)
            procs[1].wait()
            procs[1] = start_shard(1, 2, extra_args=flags)
            addresses[1] = wait_serving(procs[1])
            with MemStoreClient(addresses) as again:
                assert [t.name for t in again.list_tables()] == ["kept"]
                np.testing.assert_array_equal(again.lookup("kept", np.arange(spec.num_rows)),
                                              ref.lookup("kept", np.arange(spec.num_rows)))
                # The update ids came back with the log: the last update, retried, applies nowhere.
                last = np.random.default_rng(2)
                for _ in range(2):
                    keys = last.integers(0, spec.num_rows, 300)
                    grads = last.standard_normal((300, spec.dim)).astype(np.float32)
                again.update("kept", keys, grads, lr=0.05, update_id="u-2-1")
                steps(again, ref, 2, seed=3)  # the moments came back too
                np.testing.assert_array_equal(again.lookup("kept", np.arange(spec.num_rows)),
                                              ref.lookup("kept", np.arange(spec.num_rows)))
        other_count = start_shard(0, 3, extra_args=flags)
        with pytest.raises(RuntimeError, match="exited"):
            wait_serving(other_count)
        assert "another shard count" in open(other_count.log_path).read()
    finally:
        for p in procs:
            p.kill()
            p.wait()
