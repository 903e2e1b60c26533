"""The store on a multi-node Ray cluster (ray.cluster_utils.Cluster on this machine).

A head node without the `memstore` resource and two memory nodes offering it; one cluster
for the whole module. Run: python -m pytest tests/test_ray_store.py -q
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from cluster import store
from memstore import ClientConfig, InProcessStore, MemStoreClient, OptimizerSpec, TableSpec
from memstore.errors import StoreNotFound


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {}})
    memory_nodes = [c.add_node(num_cpus=1, resources={"memstore": 1}) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="memstore", log_to_driver=False)
    yield c, {n.node_id for n in memory_nodes}
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def engram_store(cluster):
    specs = [TableSpec("engram.l1", num_rows=20_483, dim=16, optimizer=OptimizerSpec("adam"))]
    layout = store.deploy("engram", 4, specs)
    yield layout
    store.shutdown("engram")


def test_shards_land_only_on_memory_nodes_and_spread(cluster, engram_store):
    _, memory_node_ids = cluster
    nodes = [s["node_id"] for s in engram_store["shards"]]
    assert set(nodes) <= memory_node_ids, "a shard landed on a node without the memstore resource"
    assert set(nodes) == memory_node_ids, f"shards did not spread over both memory nodes: {nodes}"
    assert len({s["address"] for s in engram_store["shards"]}) == 4


def test_client_on_the_driver_reads_and_writes_through_the_shards(engram_store):
    rng = np.random.default_rng(0)
    with MemStoreClient.connect("engram") as client, InProcessStore() as ref:
        assert client.num_shards == 4
        ref.create_table(client.spec("engram.l1"))
        for step in range(4):
            keys = rng.integers(0, 20_483, size=(8, 64))
            np.testing.assert_array_equal(client.lookup("engram.l1", keys), ref.lookup("engram.l1", keys))
            grads = rng.standard_normal((8, 64, 16)).astype(np.float32)
            client.update("engram.l1", keys, grads, lr=0.01)
            ref.update("engram.l1", keys, grads, lr=0.01)
        all_keys = np.arange(20_483)
        np.testing.assert_array_equal(client.lookup("engram.l1", all_keys), ref.lookup("engram.l1", all_keys))
        client.create_table(TableSpec("engram.l2", num_rows=101, dim=4))
    assert "engram.l2" in store.layout("engram")["tables"]


def test_killed_shard_restarts_and_clients_re_resolve(engram_store):
    with MemStoreClient.connect("engram", config=ClientConfig(retry_s=120)) as client:
        before = store.layout("engram")
        victim = before["shards"][1]
        os.kill(victim["pid"], signal.SIGKILL)
        rows = client.lookup("engram.l1", np.arange(100))  # retries until shard 1 is back
        assert rows.shape == (100, 16)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            after = store.layout("engram")
            if after["shards"][1]["pid"] != victim["pid"]:
                break
            time.sleep(0.5)
        assert after["shards"][1]["pid"] != victim["pid"] and after["epoch"] > before["epoch"]
        assert "engram.l2" in store.layout("engram")["tables"]
        client.lookup("engram.l2", [1, 2])  # tables created after start come back too


def test_shutdown_leaves_no_actor_behind(cluster):
    layout = store.deploy("short-lived", 2, [TableSpec("t", num_rows=10, dim=2)])
    assert "short-lived" in [s["store"] for s in store.list_stores()]
    pids = [s["pid"] for s in layout["shards"]]
    store.shutdown("short-lived")
    with pytest.raises(StoreNotFound):
        store.find("short-lived")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a shard process outlived `down`"
    assert [s["store"] for s in store.list_stores()] == ["engram"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its parent counts as gone
        return f.read().split()[2] != "Z"
