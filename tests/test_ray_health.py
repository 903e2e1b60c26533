"""Operator commands against a store on Ray: a killed shard shows RESTARTING and makes `memstore
health` exit 1 until Ray brings it back, then 0; an unknown store exits 2; `memstore stats`
finds the shards by the store's name; every shard announces its metrics port in the layout.

One single-node Ray cluster for the module; the commands run in this process (the real CLI
entry point, `main`), which is already connected to it, so they answer within the restart.
Run: python -m pytest tests/test_ray_health.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray.cluster_utils import Cluster

from cluster import store
from memstore import MemStoreClient, OptimizerSpec, TableSpec
from memstore.cli.main import ExitStatus, main

from conftest import start_ray_head  # tests/ is on sys.path under pytest

NAME = "probe"


@pytest.fixture(scope="module")
def probe_store():
    c = start_ray_head(lambda: Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}))
    ray.init(address=c.address, namespace="memstore", log_to_driver=False)
    try:
        yield store.deploy(NAME, 2, [TableSpec("t", num_rows=1_000, dim=8)])
        store.shutdown(NAME)
    finally:
        ray.shutdown()
        c.shutdown()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def json_doc(out: str):
    """The one JSON document a --json command printed. This test process is the store's
    Ray driver, so Ray may print its own notices (a killed shard's worker) on its stdout too."""
    docs = [line[line.index('{"'):] for line in out.splitlines() if '{"' in line]
    assert len(docs) == 1, out
    return json.loads(docs[0])


def test_layout_announces_every_shards_metrics_port(probe_store):
    for shard in store.layout(NAME)["shards"]:
        with urllib.request.urlopen(f"http://{shard['metrics_address']}/metrics", timeout=10) as reply:
            families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
        (sample,) = families["memstore_shard"].samples
        assert sample.labels == {"shard_index": str(shard["shard_index"]), "num_shards": "2"}


def test_stats_finds_the_shards_by_store_name(probe_store, capsys):
    with MemStoreClient.connect(NAME) as client:
        for _ in range(3):
            client.lookup("t", np.arange(40))
    code, out, err = cli(capsys, "stats", NAME, "--table", "t", "--json")
    assert code == 0, err
    (t,) = json_doc(out)["tables"]
    assert (t["lookup_keys"], t["rows_touched"], t["lookups"]) == (120, 40, 6)


def test_status_json_stdout_holds_the_document_only_while_ray_sends_notices(probe_store):
    """`memstore status --json` as its own process is a Ray driver; Ray's notices to every driver
    (here published by this test, every 20 ms while it runs) go to its stderr, not its stdout."""
    from ray._private.utils import publish_error_to_driver

    gcs = ray._private.worker.global_worker.gcs_client
    done, sent = threading.Event(), []

    def publish():
        while not done.wait(0.02):
            sent.append(f"notice {len(sent)} for every driver")
            publish_error_to_driver("memstore_test", sent[-1], gcs)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "memstore.cli.main", "status", NAME, "--json",
                               "--address", ray.get_runtime_context().gcs_address],
                              capture_output=True, text=True, timeout=120)
    finally:
        done.set()
        publisher.join()
    assert "for every driver" in proc.stderr, (proc.stderr, len(sent))  # the notices reached it
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["serving"] == 2, proc.stdout[-3000:]


def test_killed_shard_is_restarting_and_degraded_until_it_is_back(probe_store, capsys):
    # A restart with only small tables takes ~1.7 s here; 2 M rows x 64 to initialise again
    # per shard stretch it by ~3 s, so the polls below see it under way on a loaded machine too.
    with MemStoreClient.connect(NAME) as client:
        client.create_table(TableSpec("slow-restart", num_rows=4_000_000, dim=64, optimizer=OptimizerSpec("sgd")))
    assert cli(capsys, "health", NAME)[0] == 0
    victim = store.layout(NAME)["shards"][1]
    os.kill(victim["pid"], signal.SIGKILL)

    code, out, _ = cli(capsys, "health", NAME)
    assert code == 1, out  # exit 1: degraded
    assert "1/2 shards serving" in out

    states, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        code, out, err = cli(capsys, "status", NAME, "--json")
        doc = json_doc(out)
        state = doc["shards"][1]["state"]
        assert code == (0 if doc["summary"]["serving"] == 2 else 1), (state, err)  # exit 1: degraded
        states.append(state)
        if state == "SERVING":
            break
    assert "RESTARTING" in states, f"never seen restarting: {states}"
    assert states[-1] == "SERVING", f"shard 1 did not come back: {states}"

    while time.monotonic() < deadline:  # the restarted shard announces its new address itself
        code, out, _ = cli(capsys, "health", NAME)
        if code == 0:
            break
        assert code == 1, out
        time.sleep(0.5)
    assert code == 0 and "2/2 shards serving" in out
    assert store.layout(NAME)["shards"][1]["pid"] != victim["pid"]


@pytest.mark.parametrize("command", ["health", "status", "stats"])
def test_an_unknown_store_exits_2(probe_store, capsys, command):
    code, _, err = cli(capsys, command, "no-such-store")
    assert code == ExitStatus.UNAVAILABLE == 2
    assert err.strip() == f"memstore {command}: error: no store named 'no-such-store' on this Ray cluster"


def test_a_coordinator_that_does_not_answer_fails_health_within_its_deadline(probe_store, capsys):
    """`health` is a probe: a stopped coordinator process (SIGSTOP, as a hung node) must not
    hang it, nor `ls` or `status`."""
    from ray._private import state

    pid = state.actors(store.find(NAME)._actor_id.hex())["Pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        for argv, code in ((("health", NAME, "--timeout", "1"), ExitStatus.UNAVAILABLE),
                           (("status", NAME), ExitStatus.UNAVAILABLE), (("ls",), 1)):
            t0 = time.monotonic()
            got, out, err = cli(capsys, *argv)
            assert got == code and "did not answer within" in out + err, (argv, got, out, err)
            assert time.monotonic() - t0 < 20, f"{argv} took {time.monotonic() - t0:.0f} s"
    finally:
        os.kill(pid, signal.SIGCONT)
    assert cli(capsys, "health", NAME)[0] == ExitStatus.OK
