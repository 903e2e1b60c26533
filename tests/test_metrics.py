"""Prometheus metrics: a real `memstore serve --metrics-port 0` scraped over HTTP after known
traffic, parsed with prometheus-client's own parser; servers in one process keep apart.

Run: python -m pytest tests/test_metrics.py -q
"""

from __future__ import annotations

import os
import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from memstore import ClientConfig, MemStoreClient, OptimizerSpec, TableNotFound, TableSpec
from memstore.engine import ShardEngine
from memstore.launch import LocalShards
from memstore.server import SERVICE, ShardServer


def scrape(address: str) -> dict[tuple, float]:
    """Every sample of the endpoint as {(sample name, sorted label items): value}."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def shard():
    with LocalShards(1, metrics=True) as s:
        assert s.metrics_addresses[0] is not None, "serve did not announce its metrics port"
        yield s


def test_scraped_counters_move_by_the_traffic(shard):
    before = scrape(shard.metrics_addresses[0])
    with MemStoreClient(shard.addresses) as client:
        client.create_table(TableSpec("m", num_rows=1_000, dim=8, optimizer=OptimizerSpec("adam")))
        for n in (100, 50, 10):
            client.lookup("m", np.arange(n))
        client.update("m", np.arange(20), np.ones((20, 8), np.float32), lr=0.1)
        with grpc.insecure_channel(shard.addresses[0]) as ch, pytest.raises(grpc.RpcError) as bad:
            ch.unary_unary(f"/{SERVICE}/Lookup")(b"\x01", timeout=10)  # not a frame
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(TableNotFound):
            client.lookup("no-such-table", [1])
        (stats,) = client.stats()
    after = scrape(shard.metrics_addresses[0])
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731

    assert delta("memstore_requests_total", method="Lookup", code="OK") == 3
    assert delta("memstore_requests_total", method="Lookup", code="INVALID_ARGUMENT") == 1
    assert delta("memstore_request_errors_total", method="Lookup", code="INVALID_ARGUMENT") == 1
    assert delta("memstore_requests_total", method="Update", code="OK") == 1
    assert delta("memstore_request_duration_seconds_count", method="Lookup") == 4  # the failure is timed too
    assert delta("memstore_request_duration_seconds_bucket", method="Lookup", le="+Inf") == 4
    assert delta("memstore_request_rows_total", method="Lookup") == 160
    assert delta("memstore_request_rows_total", method="Update") == 20
    # A missing table fails before a spec is known: the client asks DescribeTable, not Lookup.
    assert value(after, "memstore_request_errors_total", method="DescribeTable", code="NOT_FOUND") >= 1
    # Bytes: the same counting as the Stats RPC. This client is on the shard's host, so the
    # rows went into its shared memory, and the keys with them; a client elsewhere gets
    # them in replies (test_servers_in_one_process_count_apart).
    lookup = next(m for m in stats.methods if m.method == "Lookup")
    assert value(after, "memstore_received_bytes_total", method="Lookup") == lookup.bytes_in > 0
    assert value(after, "memstore_sent_bytes_total", method="Lookup") == lookup.bytes_out > 0
    assert value(after, "memstore_delivered_bytes_total", method="Lookup") == lookup.bytes_delivered == 160 * 8 * 4
    # What the shard holds, next to the process's memory.
    (info,) = [t for t in stats.tables if t.spec.name == "m"]
    assert value(after, "memstore_table_rows", table="m") == 1_000
    assert value(after, "memstore_table_bytes", table="m", kind="rows") == 1_000 * 8 * 4 == info.row_bytes
    assert value(after, "memstore_table_bytes", table="m", kind="optimizer_state") == info.state_bytes > 0
    assert value(after, "memstore_held_bytes") == info.row_bytes + info.state_bytes
    assert value(after, "process_resident_memory_bytes") > info.row_bytes + info.state_bytes
    assert value(after, "memstore_table_lookup_keys_total", table="m") == 160
    assert value(after, "memstore_table_rows_touched", table="m") == 100
    assert value(after, "memstore_table_updates_total", table="m") == 1
    assert value(after, "memstore_shard", shard_index="0", num_shards="1") == 1
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < value(after, "memstore_host_available_bytes") <= physical  # room for a new table on the host


def test_servers_in_one_process_count_apart():
    servers = [ShardServer(ShardEngine(), metrics_port=0).start() for _ in range(2)]
    try:
        with MemStoreClient([servers[0].address], ClientConfig(shared_memory=False)) as client:
            client.create_table(TableSpec("a", num_rows=10, dim=2))
            client.lookup("a", [1, 2, 3])
        first, second = (scrape(s.metrics_address) for s in servers)
        assert value(first, "memstore_requests_total", method="Lookup", code="OK") == 1
        # Rows in the reply: at least the keys in, the rows out, nothing delivered.
        assert value(first, "memstore_received_bytes_total", method="Lookup") >= 3 * 8
        assert value(first, "memstore_sent_bytes_total", method="Lookup") >= 3 * 2 * 4
        assert value(first, "memstore_delivered_bytes_total", method="Lookup") == 0
        assert value(second, "memstore_requests_total", method="Lookup", code="OK") == 0
        assert value(first, "memstore_table_rows", table="a") == 10
        assert ("memstore_table_rows", (("table", "a"),)) not in second
    finally:
        for s in servers:
            s.stop(0)


def test_a_taken_metrics_port_is_one_clear_error():
    server = ShardServer(ShardEngine(), metrics_port=0).start()
    try:
        port = int(server.metrics_address.rsplit(":", 1)[1])
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            ShardServer(ShardEngine(), metrics_port=port)
    finally:
        server.stop(0)


def _free_run(length: int, start: int) -> int:
    """The first port >= start beginning `length` ports that all bind now on 127.0.0.1."""
    import socket

    for base in range(start, start + 2_000, length):
        try:
            socks = [socket.create_server(("127.0.0.1", p)) for p in range(base, base + length)]
        except OSError:
            continue
        for s in socks:
            s.close()
        return base
    raise AssertionError("no run of free ports")


def test_shards_take_the_first_free_ports_of_the_published_ranges(monkeypatch):
    """What a Ray shard actor does under Docker Compose, which publishes both ranges."""
    from cluster.actors import _serve_in_port_range

    grpc_base = _free_run(4, 23_000)
    metrics_base = _free_run(4, grpc_base + 100)
    monkeypatch.setenv("MEMSTORE_PORT_BASE", str(grpc_base))
    monkeypatch.setenv("MEMSTORE_METRICS_PORT_BASE", str(metrics_base))
    servers = [_serve_in_port_range(ShardEngine(i, 2), "127.0.0.1") for i in range(2)]
    try:
        assert [s.port for s in servers] == [grpc_base, grpc_base + 1]
        assert [s.metrics_address for s in servers] == [f"127.0.0.1:{metrics_base + i}" for i in range(2)]
        assert value(scrape(servers[1].metrics_address), "memstore_shard", shard_index="1", num_shards="2") == 1
    finally:
        for s in servers:
            s.stop(0)
