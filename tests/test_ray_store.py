"""The store on a multi-node Ray cluster (ray.cluster_utils.Cluster on this machine).

A head node without the `memstore` resource and two memory nodes offering it; one cluster
for the whole module. Run: python -m pytest tests/test_ray_store.py -q
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from cluster import store
from memstore import ClientConfig, InProcessStore, MemStoreClient, OptimizerSpec, TableSpec
from memstore.checkpoint import CheckpointError
from memstore.cli.main import main as cli_main
from memstore.durable import DurableShard
from memstore.engine import ShardEngine
from memstore.errors import StoreNotFound, Unavailable

from conftest import start_ray_head  # tests/ is on sys.path under pytest


@pytest.fixture(scope="module")
def cluster():
    # No dashboard: nothing here uses it, and its start once aborted and stalled the head (flaky in CI).
    def start() -> Cluster:  # whole, again if any node's raylet did not come up (a loaded host)
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {}, "include_dashboard": False})
        c.memory_nodes = [c.add_node(num_cpus=1, resources={"memstore": 1}) for _ in range(2)]
        c.wait_for_nodes()
        return c

    c = start_ray_head(start)
    ray.init(address=c.address, namespace="memstore", log_to_driver=False)
    memory_nodes = c.memory_nodes
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
        # Ray's shard actors run on this host (the test cluster's nodes share it) but are no
        # children of the driver: they map its segments all the same.
        assert all(s.delivers for s in client._shards)
        client.create_table(TableSpec("engram.l2", num_rows=101, dim=4))
    assert "engram.l2" in store.layout("engram")["tables"]


def test_killed_shard_restarts_and_clients_re_resolve(engram_store):
    with MemStoreClient.connect("engram", config=ClientConfig(retry_s=120)) as client:
        before = store.layout("engram")
        victim = before["shards"][1]
        os.kill(victim["pid"], signal.SIGKILL)
        rows = client.lookup("engram.l1", np.arange(100))  # retries until shard 1 is back
        assert rows.shape == (100, 16)
        after = wait_for_new_pid("engram", 1, victim["pid"])
        assert after["epoch"] > before["epoch"]
        client.lookup("engram.l2", [1, 2])  # tables created after start come back too


def wait_for_new_pid(name: str, shard: int, old_pid: int, timeout_s: float = 90) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        layout = store.refresh_layout(name)
        if layout["shards"][shard]["pid"] != old_pid:
            return layout
        time.sleep(0.5)
    raise AssertionError(f"shard {shard} did not come back within {timeout_s} s")


def stream_updates(client, ref, table: str, steps: int, seed: int, on_step=None) -> None:
    """Sync updates; each is applied to the reference only once the store acknowledged it."""
    rng = np.random.default_rng(seed)
    spec = client.spec(table)
    for step in range(steps):
        keys = rng.integers(0, spec.num_rows, size=256)
        grads = rng.standard_normal((256, spec.dim)).astype(np.float32)
        client.update(table, keys, grads, lr=0.05)
        if ref is not None:
            ref.update(table, keys, grads, lr=0.05)
        if on_step:
            on_step(step)


def assert_same_table(client, ref, table: str) -> None:
    keys = np.arange(ref.spec(table).num_rows)
    np.testing.assert_array_equal(client.lookup(table, keys), ref.lookup(table, keys))


def test_sigkill_mid_stream_loses_no_acknowledged_update(engram_store):
    spec = TableSpec("durable", num_rows=5_003, dim=8, optimizer=OptimizerSpec("adam"))
    with MemStoreClient.connect("engram", config=ClientConfig(retry_s=120)) as client, InProcessStore() as ref:
        client.create_table(spec)
        ref.create_table(spec)
        victim = store.layout("engram")["shards"][2]
        errors = []

        def killer(step):
            if step == 5:
                threading.Thread(target=lambda: os.kill(victim["pid"], signal.SIGKILL)).start()

        stream_updates(client, ref, "durable", 25, seed=1, on_step=killer)
        after = wait_for_new_pid("engram", 2, victim["pid"])
        assert after["shards"][2]["replayed"] > 0  # it came back through its log
        # Optimizer state came back too: further updates still match the reference.
        stream_updates(client, ref, "durable", 3, seed=2)
        assert_same_table(client, ref, "durable")
        assert not errors


def test_checkpoint_restore_and_reshard(engram_store, tmp_path):
    spec = TableSpec("ckpt", num_rows=3_001, dim=8, optimizer=OptimizerSpec("adagrad"))
    with MemStoreClient.connect("engram") as client, InProcessStore() as ref:
        client.create_table(spec)
        ref.create_table(spec)
        stream_updates(client, ref, "ckpt", 4, seed=3)
        facts = store.checkpoint("engram", str(tmp_path))
        assert facts["version"] >= 1 and os.path.isdir(facts["path"])
        # The store recovers from its own copy: the one given to the operator may go away.
        recovery = store.layout("engram")["recovery"]["checkpoint"]
        assert not recovery.startswith(str(tmp_path)) and os.path.isdir(recovery)
        moved = shutil.copytree(facts["path"], tmp_path / "kept")
        shutil.rmtree(facts["path"])
        victim = store.layout("engram")["shards"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for_new_pid("engram", 0, victim["pid"])
        with MemStoreClient.connect("engram", config=ClientConfig(retry_s=120)) as again:
            assert_same_table(again, ref, "ckpt")
        moved.rename(facts["path"])
        # A standalone shard's base holds one shard: no store restores from it, and nothing changes.
        alone = DurableShard(ShardEngine(0, 4), tmp_path / "standalone", compact_bytes=0)
        alone.recover()
        alone.engine.create_table(spec)
        base = alone.compact()
        alone.close()
        with pytest.raises(CheckpointError, match=r"checkpoint of shard 0 of 4 alone"):
            store.restore("engram", str(base))
        at_checkpoint = client.lookup("ckpt", np.arange(3_001))
        rng = np.random.default_rng(5)
        client.update("ckpt", rng.integers(0, 3_001, 500), rng.standard_normal((500, 8)).astype(np.float32), lr=0.5)
        assert not np.array_equal(client.lookup("ckpt", np.arange(3_001)), at_checkpoint)
        store.restore("engram", str(tmp_path))
        np.testing.assert_array_equal(client.lookup("ckpt", np.arange(3_001)), at_checkpoint)
        stream_updates(client, ref, "ckpt", 2, seed=6)  # optimizer state restored as well
        assert_same_table(client, ref, "ckpt")
        ref_rows = ref.lookup("ckpt", np.arange(3_001))

    # The same checkpoint into a store of another shard count.
    store.deploy("resharded", 3, [])
    try:
        # The base of a standalone store's one shard is a whole cut: a store of 3 restores it.
        single = DurableShard(ShardEngine(0, 1), tmp_path / "single", compact_bytes=0)
        single.recover()
        single.engine.create_table(spec)
        single.engine.assign("ckpt", np.arange(3_001), torch.from_numpy(at_checkpoint[::-1].copy()), False)
        store.restore("resharded", str(single.compact()))
        single.close()
        # The store keeps its own copy of what it restored: gone at the source, a restarted
        # shard still recovers from it.
        shutil.rmtree(tmp_path / "single")
        victim = store.layout("resharded")["shards"][2]
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for_new_pid("resharded", 2, victim["pid"])
        with MemStoreClient.connect("resharded", config=ClientConfig(retry_s=120)) as three:
            np.testing.assert_array_equal(three.lookup("ckpt", np.arange(3_001)), at_checkpoint[::-1])
        store.restore("resharded", facts["path"])
        with MemStoreClient.connect("resharded") as three:
            assert three.num_shards == 3
            np.testing.assert_array_equal(three.lookup("ckpt", np.arange(3_001)), at_checkpoint)
            stream_updates(three, None, "ckpt", 2, seed=6)  # the same updates as the reference's
            np.testing.assert_array_equal(three.lookup("ckpt", np.arange(3_001)), ref_rows)
    finally:
        store.shutdown("resharded")


def test_a_shard_a_restore_has_not_reached_refuses_calls_until_the_restore_finishes(engram_store, tmp_path):
    """A restore whose swap failed part-way holds the shards it did not reach (hold_restore,
    as the coordinator calls it then): their lookups and writes are UNAVAILABLE, naming the
    restore, while the other shards serve; a restore again swaps them and lifts the hold."""
    from cluster.actors import NAMESPACE, shard_actor_name

    spec = TableSpec("held", num_rows=400, dim=4, optimizer=OptimizerSpec("sgd"))
    with MemStoreClient.connect("engram", config=ClientConfig(retry_s=1.0)) as client:
        client.create_table(spec)
        facts = store.checkpoint("engram", str(tmp_path))
        at_checkpoint = client.lookup("held", np.arange(400))
        shard = ray.get_actor(shard_actor_name("engram", 1), namespace=NAMESPACE)
        assert ray.get(shard.hold_restore.remote(1 << 40, facts["path"]))
        mine = np.arange(1, 400, 4)  # shard 1 of 4
        with pytest.raises(Unavailable, match="has not reached this shard"):
            client.lookup("held", mine)
        with pytest.raises(Unavailable, match="has not reached this shard"):
            client.update("held", mine, np.ones((len(mine), 4), np.float32), lr=1.0)
        client.update("held", [0, 2], np.ones((2, 4), np.float32), lr=1.0)  # other shards serve
        store.restore("engram", facts["path"])
        np.testing.assert_array_equal(client.lookup("held", np.arange(400)), at_checkpoint)
        client.update("held", mine, np.ones((len(mine), 4), np.float32), lr=1.0)
        np.testing.assert_array_equal(client.lookup("held", mine), at_checkpoint[mine] - 1.0)
        client.drop_table("held")


def test_recovery_after_a_failed_checkpoint_a_restore_and_a_re_created_table(engram_store, tmp_path):
    """A checkpoint that fails after its cut has rotated the shards' logs, then a restore:
    the restore's log generation must be a new one, or a restarted shard would replay the
    writes made before the restore on top of the restored rows. And a table dropped and
    created again with another spec since the checkpoint recovers with the new spec."""
    regen = TableSpec("regen", num_rows=2_003, dim=8, optimizer=OptimizerSpec("adagrad"))
    with MemStoreClient.connect("engram", config=ClientConfig(retry_s=120)) as client, InProcessStore() as ref:
        client.create_table(regen)
        stream_updates(client, None, "regen", 3, seed=11)
        good = store.checkpoint("engram", str(tmp_path / "good"))
        at_checkpoint = client.lookup("regen", np.arange(regen.num_rows))
        not_a_dir = tmp_path / "file"
        not_a_dir.write_text("")
        version = store.layout("engram")["recovery"]["version"]
        with pytest.raises(Exception, match="exists"):  # a root that cannot hold it: refused before the cut
            store.checkpoint("engram", str(not_a_dir))
        assert store.layout("engram")["recovery"]["version"] == version
        own = Path(store.layout("engram")["data_dir"]) / "checkpoints"
        own.rename(own.with_name("aside"))
        own.write_text("")  # where the shards write the cut: fails after it rotated every shard's log
        try:
            with pytest.raises(Exception):
                store.checkpoint("engram")
        finally:
            own.unlink()
            own.with_name("aside").rename(own)
        stream_updates(client, None, "regen", 3, seed=12)  # acknowledged, then undone by the restore
        store.restore("engram", good["path"])
        np.testing.assert_array_equal(client.lookup("regen", np.arange(regen.num_rows)), at_checkpoint)

        old = TableSpec("recreated", num_rows=1_001, dim=4, optimizer=OptimizerSpec("adam"))
        new = TableSpec("recreated", num_rows=1_001, dim=8, optimizer=OptimizerSpec("sgd"))
        client.create_table(old)
        stream_updates(client, None, "recreated", 2, seed=13)
        client.drop_table("recreated")
        client.create_table(new)
        ref.create_table(new)
        stream_updates(client, ref, "recreated", 2, seed=14)

        victim = store.layout("engram")["shards"][1]
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for_new_pid("engram", 1, victim["pid"])
        np.testing.assert_array_equal(client.lookup("regen", np.arange(regen.num_rows)), at_checkpoint)
        assert client.spec("recreated").dim == 8
        assert_same_table(client, ref, "recreated")
        # The restarted shard's gate counts the call parts it applied before it died: the
        # next cut finds every call whole, rather than hold writes until its deadline.
        assert store.checkpoint("engram", str(tmp_path / "after"))["abandoned"] == 0
        client.drop_table("regen")
        client.drop_table("recreated")


def test_removing_a_memory_node_loses_no_acknowledged_update(cluster, engram_store):
    c, _ = cluster
    spec = TableSpec("node-loss", num_rows=4_001, dim=8, optimizer=OptimizerSpec("adam"))
    with MemStoreClient.connect("engram", config=ClientConfig(retry_s=180)) as client, InProcessStore() as ref:
        client.create_table(spec)
        ref.create_table(spec)
        stream_updates(client, ref, "node-loss", 5, seed=7)
        doomed = c.memory_nodes[0]
        moved = [s["shard_index"] for s in store.layout("engram")["shards"] if s["node_id"] == doomed.node_id]
        assert moved, "no shard on the node to remove"
        c.remove_node(doomed)
        stream_updates(client, ref, "node-loss", 5, seed=8)  # retries until the shards are back
        layout = store.refresh_layout("engram")
        assert all(layout["shards"][i]["node_id"] == c.memory_nodes[1].node_id for i in moved)
        assert_same_table(client, ref, "node-loss")


def test_status_is_true_to_the_store(cluster, engram_store):
    import json
    import subprocess
    import sys

    c, _ = cluster
    with MemStoreClient.connect("engram") as client:
        for _ in range(5):
            client.lookup("engram.l1", np.arange(1000))
            client.lookup_many({"engram.l1": np.arange(1000, 2000)})
        cli = subprocess.run([sys.executable, "-m", "memstore.cli.main", "status", "engram", "--address", c.address,
                              "--json"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    doc = json.loads(cli.stdout)
    layout = store.layout("engram")
    assert doc["num_shards"] == 4 and [s["state"] for s in doc["shards"]] == ["SERVING"] * 4
    assert doc["summary"]["rows"] == sum(t["num_rows"] for t in layout["tables"].values())
    assert doc["summary"]["bytes_held"] >= sum(t["num_rows"] * t["dim"] * 4 for t in layout["tables"].values())
    assert doc["summary"]["lookups_per_s"] > 0  # the lookups above, within the last 10 s
    assert all(s["latency_ms"][m]["p99"] >= s["latency_ms"][m]["p50"] > 0 for s in doc["shards"]
               for m in ("Lookup", "LookupMany"))
    # The driver shares the shards' host: they wrote its rows into its memory, mapped while it runs.
    assert all(s["mapped_segment_bytes"] > 0 for s in doc["shards"])
    assert all(s["rss_bytes"] > s["bytes_held"] for s in doc["shards"])
    assert all(s["available_bytes"] >= 0 for s in doc["shards"])  # room for a new table on each shard's host (0: full)
    assert doc["last_checkpoint"]["version"] == layout["recovery"]["version"]
    assert all(s["log_bytes"] is not None for s in doc["shards"])
    assert all(s["log"]["failed"] == "" and s["log"]["bytes"] >= 0 for s in doc["shards"])  # each shard's own view
    from memstore.cli.status import degraded, render

    assert doc["restoring"] is None and doc["resumed"] is None and not degraded(doc)
    doc["shards"][1]["available_bytes"], doc["shards"][3]["available_bytes"] = 3 * 2**30, None
    head, *rows = render(doc).splitlines()[:5]
    at = head.index("free GiB") + len("free GiB")  # right-aligned under its heading
    assert rows[1][:at].endswith(" 3.00") and rows[3][:at].endswith(" -")
    doc["shards"][2]["log"]["failed"] = "OSError: [Errno 30] Read-only file system"
    assert "shard 2: its write-ahead log failed (OSError: [Errno 30] Read-only file system): it refuses every " \
           "write until it restarts" in render(doc)
    assert degraded(doc)  # the exit code says so too
    doc["shards"][2]["log"]["failed"] = ""
    doc["restoring"] = {"version": 9, "path": "/data/checkpoints/ckpt-9"}
    assert "a restore of /data/checkpoints/ckpt-9 (version 9) is not finished" in render(doc)
    assert degraded(doc)


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
    names = [s["store"] for s in store.list_stores()]
    assert "short-lived" not in names and "engram" in names


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie awaiting its parent counts as gone
        return f.read().split()[2] != "Z"


def test_two_deploys_of_one_name_at_once_get_the_same_store(cluster):
    spec = TableSpec("t", num_rows=100, dim=2)
    results, errors = [], []

    def up() -> None:
        try:
            results.append(store.deploy("twin", 2, [spec]))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=up) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors
        assert [len(r["shards"]) for r in results] == [2, 2]
        assert [s["address"] for s in results[0]["shards"]] == [s["address"] for s in results[1]["shards"]]
    finally:
        store.shutdown("twin")


def test_a_shard_restarted_where_its_log_is_not_fails_instead_of_serving_fresh_rows(cluster, tmp_path, capsys):
    """As after losing a node with a node-local data dir: the restarted shard must not come
    up empty as if nothing had been acknowledged."""
    layout = store.deploy("lost", 1, [TableSpec("t", num_rows=100, dim=2)], data_dir=str(tmp_path))
    try:
        with MemStoreClient.connect("lost", config=ClientConfig(retry_s=3)) as client:
            client.update("t", np.arange(10), np.ones((10, 2), np.float32), lr=1.0)
            (tmp_path / "wal").rename(tmp_path / "elsewhere")
            os.kill(layout["shards"][0]["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 60
            while store.shard_states("lost") != ["DEAD"] and time.monotonic() < deadline:
                time.sleep(0.5)
            assert store.shard_states("lost") == ["DEAD"]
            with pytest.raises(Unavailable):
                client.lookup("t", np.arange(100))
        # The operator sees why, in one line, without reading the shard's Ray worker log.
        (shard,) = store.status("lost")["shards"]
        assert shard["state"] == "DEAD"
        assert shard["cause"].startswith("RuntimeError: shard 0 of store 'lost' restarted on "), shard["cause"]
        assert "where its write-ahead log is not" in shard["cause"] and "\x1b" not in shard["cause"]
        assert store.death_causes("lost") == [shard["cause"]]
        capsys.readouterr()
        assert cli_main(["health", "lost"]) == 1
        assert f"DEAD: {shard['cause']}" in capsys.readouterr().out
        assert cli_main(["status", "lost"]) == 1  # degraded, as health says
        assert f"shard 0: dead for good, Ray will not restart it: {shard['cause']}" in capsys.readouterr().out
    finally:
        store.shutdown("lost")


def _kill_coordinator_and_shards(name: str) -> list[int]:
    """As when the whole Ray cluster goes down: the store's actors die at once, none to be
    restarted, and nothing is shut down gracefully. Returns the shard pids."""
    layout = store.layout(name)
    ray.kill(store.find(name), no_restart=True)
    for i in range(layout["num_shards"]):
        ray.kill(ray.get_actor(f"shard:{name}/{i}", namespace="memstore"), no_restart=True)
    pids = [s["pid"] for s in layout["shards"]]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (any(_alive(p) for p in pids) or name in
                                           [s["store"] for s in store.list_stores()]):
        time.sleep(0.2)
    return pids


def test_a_killed_coordinator_comes_back_and_its_shards_serve_on(cluster, tmp_path):
    spec = TableSpec("t", num_rows=3_001, dim=8, optimizer=OptimizerSpec("adam"))
    before = store.deploy("phoenix", 2, [spec], data_dir=str(tmp_path))
    try:
        with MemStoreClient.connect("phoenix", config=ClientConfig(retry_s=120)) as client, \
                InProcessStore() as ref:
            ref.create_table(spec)
            stream_updates(client, ref, "t", 3, seed=21)
            first = store.checkpoint("phoenix")
            stream_updates(client, ref, "t", 2, seed=22)
            ray.kill(store.find("phoenix"), no_restart=False)  # Ray restarts it
            # The data path does not go through the coordinator: the shards serve on.
            stream_updates(client, ref, "t", 2, seed=23)
            after = store.layout("phoenix")  # waits for the restarted coordinator
            assert [s["pid"] for s in after["shards"]] == [s["pid"] for s in before["shards"]]
            assert after["epoch"] > before["epoch"] and after["recovery"] == store.layout("phoenix")["recovery"]
            assert after["recovery"]["version"] == first["version"] and list(after["tables"]) == ["t"]
            # It knows the recovery point and the versions handed out: a shard killed now
            # recovers through it, and the next checkpoint takes a new version.
            victim = after["shards"][0]
            os.kill(victim["pid"], signal.SIGKILL)
            wait_for_new_pid("phoenix", 0, victim["pid"])
            assert_same_table(client, ref, "t")
            assert store.checkpoint("phoenix")["version"] > first["version"]
            assert store.status("phoenix")["summary"]["serving"] == 2
    finally:
        store.shutdown("phoenix")
    with pytest.raises(ValueError):  # detached shard actors go with `down`
        ray.get_actor("shard:phoenix/0", namespace="memstore")


def test_up_on_the_data_dir_of_a_store_that_went_down_resumes_it(cluster, tmp_path):
    """A whole cluster lost (every actor killed at once), then `up` on the same data dir: every
    acknowledged write is back, from the last checkpoint and the logs after it; likewise after
    a graceful `down`; and a client connected before finds the store brought up again."""
    from memstore.errors import InvalidArgument

    spec = TableSpec("t", num_rows=4_001, dim=8, optimizer=OptimizerSpec("adam"))
    later = TableSpec("later", num_rows=501, dim=4)
    data = str(tmp_path / "data")
    store.deploy("lazarus", 2, [spec], data_dir=data)
    with InProcessStore() as ref:
        ref.create_table(spec)
        ref.create_table(later)
        with MemStoreClient.connect("lazarus") as client:
            stream_updates(client, ref, "t", 3, seed=31)
            store.checkpoint("lazarus")
            stream_updates(client, ref, "t", 3, seed=32)  # only in the logs
            client.create_table(later)
            stream_updates(client, ref, "later", 2, seed=33)
        pids = _kill_coordinator_and_shards("lazarus")
        assert not any(_alive(p) for p in pids)

        with pytest.raises(InvalidArgument, match=r"holds store 'lazarus' of 2 shards, not 3"):
            store.deploy("lazarus", 3, [], data_dir=data)
        with pytest.raises(InvalidArgument, match=r"holds store 'lazarus', not 'other'"):
            store.deploy("other", 2, [], data_dir=data)
        layout = store.deploy("lazarus", 2, [TableSpec("extra", num_rows=10, dim=2)], data_dir=data)
        try:
            assert layout["resumed"]["version"] >= 1 and layout["resumed"]["replayed"] > 0
            assert sorted(layout["tables"]) == ["extra", "later", "t"]
            with pytest.raises(InvalidArgument, match=r"already up on data dir .*data, not .*elsewhere"):
                store.deploy("lazarus", 2, [], data_dir=str(tmp_path / "elsewhere"))
            assert store.deploy("lazarus", 2, [], data_dir=data)["epoch"] == layout["epoch"]  # joins it
            with MemStoreClient.connect("lazarus", config=ClientConfig(retry_s=120)) as client:
                assert_same_table(client, ref, "t")
                assert_same_table(client, ref, "later")
                stream_updates(client, ref, "t", 2, seed=34)  # optimizer state came back too
                assert_same_table(client, ref, "t")
                # Down and up again: the data dir is the store's; a client connected before
                # re-finds the store under its name once it is back.
                store.shutdown("lazarus")
                again = store.deploy("lazarus", 2, [], data_dir=data)
                assert again["resumed"] is not None
                assert_same_table(client, ref, "t")
                assert set(client._directory.addresses()) == {s["address"] for s in again["shards"]}
            # A new store under the name (another data dir) holds other rows: not adopted.
            with MemStoreClient.connect("lazarus", config=ClientConfig(retry_s=3)) as old:
                store.shutdown("lazarus")
                store.deploy("lazarus", 2, [spec], data_dir=str(tmp_path / "new"))
                with pytest.raises(Unavailable):
                    old.lookup("t", np.arange(10))
        finally:
            store.shutdown("lazarus")


def test_a_coordinator_killed_while_it_resumes_leaves_the_store_resumable(cluster, tmp_path):
    spec = TableSpec("t", num_rows=3_001, dim=8, optimizer=OptimizerSpec("adam"))
    data = str(tmp_path / "data")
    store.deploy("ember", 2, [spec], data_dir=data)
    with InProcessStore() as ref:
        ref.create_table(spec)
        with MemStoreClient.connect("ember") as client:
            stream_updates(client, ref, "t", 3, seed=61)
        store.shutdown("ember")
        outcome = []

        def up() -> None:
            try:
                outcome.append(store.deploy("ember", 2, [], data_dir=data))
            except Unavailable as e:
                outcome.append(e)

        resuming = threading.Thread(target=up)
        resuming.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ray.kill(store.find("ember"), no_restart=False)  # mid-resume, by Ray's restart
                break
            except StoreNotFound:
                time.sleep(0.02)
        resuming.join(180)
        assert outcome, "the deploy did not return"
        try:
            # Whatever the deploy made of it, the record survived: the store comes back whole.
            layout = store.deploy("ember", 2, [], data_dir=data)
            assert layout["resumed"] is not None or not isinstance(outcome[0], Exception)
            with MemStoreClient.connect("ember", config=ClientConfig(retry_s=60)) as client:
                assert_same_table(client, ref, "t")
        finally:
            store.shutdown("ember")


def test_checkpoints_go_on_while_shards_are_killed_under_them(engram_store, tmp_path):
    """Checkpoints back to back while a shard is SIGKILLed twice: a cut that the shard's
    restart voided (its frozen gate or its copy died with it) is taken again, so every
    checkpoint succeeds; the last one holds every acknowledged update."""
    spec = TableSpec("cuts", num_rows=50_021, dim=16, optimizer=OptimizerSpec("adam"))
    with MemStoreClient.connect("engram", config=ClientConfig(retry_s=120)) as client, InProcessStore() as ref:
        client.create_table(spec)
        ref.create_table(spec)
        stream_updates(client, ref, "cuts", 2, seed=41)
        facts, errors, stop = [], [], threading.Event()

        def checkpoints() -> None:
            while not stop.is_set():
                try:
                    facts.append(store.checkpoint("engram", str(tmp_path)))
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)

        runner = threading.Thread(target=checkpoints)
        runner.start()
        try:
            for _ in range(2):
                victim = store.layout("engram")["shards"][3]
                time.sleep(0.3)
                os.kill(victim["pid"], signal.SIGKILL)
                wait_for_new_pid("engram", 3, victim["pid"])
                stream_updates(client, ref, "cuts", 1, seed=42)
        finally:
            stop.set()
            runner.join(120)
        assert not errors, errors
        assert facts, "no checkpoint finished"
        last = store.checkpoint("engram", str(tmp_path))
        client.drop_table("cuts")
        store.restore("engram", last["path"])
        assert_same_table(client, ref, "cuts")
        client.drop_table("cuts")


def _edit_record(data: str, **changes) -> dict:
    """Rewrites the store's record by hand: the state a crash at one point of a restore leaves."""
    from cluster import storefile

    record = storefile.read(data)
    record.update(changes)
    del record["format"]
    storefile.write(data, record)
    return record


def _restoring(data: str, source: str, version: int, request: str | None = None) -> dict:
    """The record's entry for a restore of `source` whose swap began at `version`."""
    from memstore import checkpoint

    pinned = checkpoint.link_checkpoint(source, checkpoint.checkpoint_dir(os.path.join(data, "checkpoints"), version))
    manifest = checkpoint.read_manifest(pinned)
    return {"checkpoint": str(pinned), "wal_since": version, "version": version, "created": 1.0,
            "tables": manifest["tables"], "request": request, "result": {"path": source, "tables": 1}}


def test_a_restore_cut_short_mid_swap_is_finished_by_the_next_recovery(cluster, tmp_path):
    """A restore is recorded before any shard swaps; a coordinator that died in the swap left
    the record naming it. Its restarted incarnation finishes it on the live shards (and lets
    their frozen writes flow); a resume after the whole cluster went down finishes it from the
    files: shard 0 had swapped (its log of the restore's generation, with a write after the
    swap), shard 1 had not (its older logs are what the restore replaced)."""
    from memstore import wal

    spec = TableSpec("t", num_rows=2_001, dim=8, optimizer=OptimizerSpec("adagrad"))
    data = str(tmp_path / "data")
    store.deploy("midswap", 2, [spec], data_dir=data)
    try:
        with MemStoreClient.connect("midswap", config=ClientConfig(retry_s=120)) as client:
            stream_updates(client, None, "t", 2, seed=51)
            saved = store.checkpoint("midswap", str(tmp_path / "saved"))
            at_saved = client.lookup("t", np.arange(2_001))
            stream_updates(client, None, "t", 2, seed=52)  # undone by the restore
            version = store.layout("midswap")["recovery"]["version"] + 10
            _edit_record(data, restoring=_restoring(data, saved["path"], version, request="r1"))
            for a in ray.get(store.find("midswap").actors.remote()):
                ray.get(a.cut_freeze.remote())  # as the dead incarnation's cut left them
            ray.kill(store.find("midswap"), no_restart=False)
            deadline = time.monotonic() + 60
            while store.layout("midswap")["recovery"]["version"] != version and time.monotonic() < deadline:
                time.sleep(0.5)
            np.testing.assert_array_equal(client.lookup("t", np.arange(2_001)), at_saved)
            client.update("t", np.arange(5), np.ones((5, 8), np.float32), lr=0.1)  # writes flow again
            # Ray runs the dead incarnation's restore() call again on the restarted one: it was
            # finished, so it returns its result and does not swap over the write just made.
            acknowledged = client.lookup("t", np.arange(2_001))
            assert ray.get(store.find("midswap").restore.remote(saved["path"], "r1"))["path"] == saved["path"]
            np.testing.assert_array_equal(client.lookup("t", np.arange(2_001)), acknowledged)
            assert store.layout("midswap")["recovery"]["version"] == version

            # Now across a lost cluster: a restore begun, shard 0 swapped and wrote since.
            stream_updates(client, None, "t", 2, seed=53)
            later = version + 10
            _edit_record(data, restoring=_restoring(data, saved["path"], later))
        _kill_coordinator_and_shards("midswap")
        from memstore.partition import shard_of

        key = int(np.flatnonzero(shard_of(np.arange(2_001), 2) == 0)[0])
        shard0 = tmp_path / "data" / "wal" / "shard-00000-of-00002"
        with wal.WriteAheadLog(wal.wal_path(shard0, later), sync="none") as log:
            log.append(wal.assign_record("t", np.array([key]), torch.full((1, 8), 7.0), False, "after-swap"))
        layout = store.deploy("midswap", 2, [], data_dir=data)
        assert layout["recovery"]["version"] == later and layout["resumed"]["replayed"] == 1
        expected = at_saved.copy()
        expected[key] = 7.0
        with MemStoreClient.connect("midswap") as client:
            np.testing.assert_array_equal(client.lookup("t", np.arange(2_001)), expected)
    finally:
        store.shutdown("midswap")


def test_an_unborn_record_is_brought_up_anew_and_down_finds_orphaned_shards(cluster, tmp_path):
    """A first `up` cut short (its record says the store never came up, its shard logs hold
    only what start wrote) is brought up anew; a coordinator that died for good leaves its
    detached shards, and `down` still takes them."""
    from cluster import storefile
    from memstore import wal

    data = tmp_path / "data"
    data.mkdir()
    storefile.write(data, {"store": "unborn", "num_shards": 1, "came_up": False})
    shard_dir = data / "wal" / "shard-00000-of-00001"
    with wal.WriteAheadLog(wal.wal_path(shard_dir, 0), sync="none") as log:
        log.append(wal.create_record(TableSpec("t", num_rows=10, dim=2)))
    store.check_deploy(1, [], name="unborn", data_dir=str(data))  # no refusal up front
    layout = store.deploy("unborn", 1, [TableSpec("u", num_rows=10, dim=2)], data_dir=str(data))
    assert layout["resumed"] is None and sorted(layout["tables"]) == ["u"]
    assert storefile.read(data)["came_up"] is True
    pid = layout["shards"][0]["pid"]
    ray.kill(store.find("unborn"), no_restart=True)
    assert _alive(pid), "a detached shard outlives its coordinator"
    assert store.shutdown("unborn") is None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    assert not _alive(pid)
    with pytest.raises(StoreNotFound):
        store.shutdown("unborn")


def test_a_run_resumed_on_a_store_shared_with_another_run_changes_nothing(cluster, tmp_path):
    """A run's store checkpoint is a cut of the whole store: resuming it where another run's
    tables live would roll those back. It is refused, and nothing changes; once the store
    holds only the run's tables it resumes."""
    from test_train import tiny_config, write_corpus
    from trainer.train import train

    corpus = (write_corpus(tmp_path / "corpus"), tmp_path / "cache")
    cfg = tiny_config(corpus, steps=4, eval_every=2, table_prefix="runA.")
    other = TableSpec("runB.t", num_rows=64, dim=4, optimizer=OptimizerSpec("sgd"))
    store.deploy("shared", 2, [other])
    try:
        with MemStoreClient.connect("shared") as client:
            train(cfg, client, progress=False, until_step=2, checkpoint_dir=tmp_path / "A", store_name="shared")
            client.update("runB.t", np.arange(64), np.ones((64, 4), np.float32), lr=1.0)  # after A's checkpoint
            before = client.lookup("runB.t", np.arange(64))
            with pytest.raises(ValueError, match=r"holds tables of other runs \(runB.t\)"):
                train(cfg, client, progress=False, resume=tmp_path / "A", store_name="shared")
            np.testing.assert_array_equal(client.lookup("runB.t", np.arange(64)), before)
            client.drop_table("runB.t")
            assert train(cfg, client, progress=False, resume=tmp_path / "A", store_name="shared")["step"] == 4
    finally:
        store.shutdown("shared")


def test_a_table_one_shard_refuses_is_dropped_again_on_the_others(engram_store):
    """The store's own create (a resumed `up`'s new tables) leaves no table on the shards
    that made it when another refuses it: an `up` with the spec corrected is not refused."""
    from memstore.errors import TableExists

    actors = ray.get(store.find("engram").actors.remote())
    other = TableSpec("partial", num_rows=64, dim=8)
    assert ray.get(actors[2].create_table.remote(other.to_dict())) is True  # made by this call
    with pytest.raises(TableExists, match="different spec"):
        ray.get(store.find("engram").create_table.remote(TableSpec("partial", num_rows=64, dim=4).to_dict()))
    with MemStoreClient.connect("engram") as client:
        assert ["partial" in [t.spec.name for t in s.tables] for s in client.stats()] == [False, False, True, False]
        assert "partial" not in store.layout("engram")["tables"]  # not recorded: no restart recreates it
        ray.get(store.find("engram").create_table.remote(other.to_dict()))
        assert client.lookup("partial", np.arange(64)).shape == (64, 8)
        assert "partial" in store.layout("engram")["tables"]
        client.drop_table("partial")


def test_a_shard_wedged_while_writing_its_copy_fails_the_checkpoint_in_time(cluster, tmp_path):
    """After the cut, with writes flowing, each shard writes its copy: one whose written bytes
    stop (SIGSTOP: a hung disk, a swapped-out host) fails the checkpoint, named, once its
    progress has stood still for the stall window, where before `checkpoint` hung."""
    from cluster.coordinator import _ShardCut, write_copies
    from memstore.cut import take_cut

    layout = store.deploy("wedged-copy", 2, [TableSpec("t", num_rows=1000, dim=8)])
    try:
        actors = ray.get(store.find("wedged-copy").actors.remote())
        generation = layout["recovery"]["version"] + 1000  # a store of its own: no later cut meets it
        take_cut([_ShardCut(a, i) for i, a in enumerate(actors)],
                 lambda: sum(ray.get([a.cut_snapshot.remote(generation) for a in actors])))
        os.kill(layout["shards"][1]["pid"], signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(Unavailable, match="shard 1 wrote nothing of its checkpoint copy for 3 s"):
                write_copies(actors, str(tmp_path), stall_s=3.0, poll_s=0.5)
            assert time.monotonic() - t0 < 30
            assert (tmp_path / "shard-00000-of-00002").is_dir()  # the healthy shard wrote its copy
        finally:
            os.kill(layout["shards"][1]["pid"], signal.SIGCONT)
        with MemStoreClient.connect("wedged-copy") as client:
            client.update("t", np.arange(10), np.ones((10, 8), np.float32), lr=1.0)  # both shards
            assert client.lookup("t", np.arange(10)).shape == (10, 8)
    finally:
        store.shutdown("wedged-copy")


def test_a_cut_completes_a_call_though_writes_crowd_a_frozen_shard(cluster):
    """More writes than a shard's server has threads wait at its frozen gate: the part of a
    call the cut releases must still get a thread. Before, the waiting writes took all 8,
    the released part queued until the cut's 30 s deadline, and the cut abandoned its call
    half applied (the checkpoint held it on one shard, the client saw it acknowledged)."""
    from memstore import checkpoint
    from memstore.engine import ShardEngine
    from memstore.spec import InitSpec

    store.deploy("crowded", 2, [TableSpec("t", num_rows=1000, dim=8, init=InitSpec("zeros"),
                                          optimizer=OptimizerSpec("sgd"))])
    try:
        actors = ray.get(store.find("crowded").actors.remote())
        clients = [MemStoreClient.connect("crowded", config=ClientConfig(retry_s=120)) for _ in range(13)]
        # Rows in replies: a lookup asks only the shards its keys live on (a shard delivering
        # into shared memory is asked for every lookup).
        clients.append(MemStoreClient.connect("crowded", config=ClientConfig(shared_memory=False)))
        for c in clients:
            c.spec("t")  # read while shard 0 answers: only the writes below meet its frozen gate
        ray.get(actors[0].cut_freeze.remote(60.0, "crowding"))  # ended by the checkpoint's thaw
        failed = []

        def push(c, keys):
            try:
                c.update("t", keys, np.ones((len(keys), 8), np.float32), lr=1.0)
            except Exception as e:  # noqa: BLE001 - reported below
                failed.append(e)

        crowd = [threading.Thread(target=push, args=(clients[i], np.array([2 * i]))) for i in range(12)]  # shard 0
        for t in crowd:
            t.start()
        time.sleep(2.0)
        call = threading.Thread(target=push, args=(clients[12], np.array([100, 101])))  # shards 0 and 1
        call.start()
        with clients[13] as client:
            deadline = time.monotonic() + 30
            while client.lookup("t", np.array([101]))[0, 0] == 0 and time.monotonic() < deadline:
                time.sleep(0.1)  # shard 1 (not frozen) applied its part
            assert client.lookup("t", np.array([101]))[0, 0] == -1
            t0 = time.monotonic()
            result = store.checkpoint("crowded")
            assert (result["abandoned"], result["completed_in_cut"]) == (0, 1), result
            assert time.monotonic() - t0 < 25
            for t in (*crowd, call):
                t.join(120)
            assert not failed, failed
            np.testing.assert_array_equal(client.lookup("t", np.array([*range(0, 24, 2), 100, 101]))[:, 0], -1.0)
        for c in clients[:13]:
            c.close()
        saved = checkpoint.load_shard(result["path"], 0, 1, engine=ShardEngine(0, 1)).table("t").snapshot()[1]
        assert saved[100, 0] == saved[101, 0] == -1.0  # the call, wholly in the cut
    finally:
        store.shutdown("crowded")


def test_a_wedged_shard_fails_the_cut_and_leaves_no_other_frozen(engram_store):
    """A shard that stops answering (SIGSTOP: a hung disk, a swapped-out host) fails a cut
    within its deadline, naming the shard; the shards frozen before it are thawed at once
    rather than holding their writes until the freeze's lease lapses."""
    from cluster.coordinator import _ShardCut
    from memstore.cut import take_cut

    actors = ray.get(store.find("engram").actors.remote())
    layout = store.layout("engram")
    with MemStoreClient([s["address"] for s in layout["shards"]], ClientConfig(timeout_s=5, retry_s=0)) as client:
        client.spec("engram.l1")  # read while every shard answers
        os.kill(layout["shards"][2]["pid"], signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(Unavailable, match="shard 2 did not answer the cut within 6 s"):
                take_cut([_ShardCut(a, i, timeout_s=3.0) for i, a in enumerate(actors)], lambda: None)
            assert time.monotonic() - t0 < 30
            client.update("engram.l1", np.array([0, 1, 4, 5]), np.ones((4, 16), np.float32), lr=0.01)  # shards 0, 1
        finally:
            os.kill(layout["shards"][2]["pid"], signal.SIGCONT)
    # The stopped shard wakes to the cut's freeze and thaw, in either order: it must not stay
    # frozen (for the 300 s lease) when the freeze comes last.
    with MemStoreClient([s["address"] for s in layout["shards"]], ClientConfig(timeout_s=30, retry_s=0)) as client:
        client.update("engram.l1", np.arange(8), np.ones((8, 16), np.float32), lr=0.01)  # every shard
