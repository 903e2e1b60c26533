"""Shared fixtures: real `memstore serve` processes on loopback."""

from __future__ import annotations

import os

import pytest

from memstore.launch import LocalShards, start_shard, wait_serving  # noqa: F401  (re-exported for tests)

# Ray's own deadline for a new head's GCS server to publish its port is 30 s. A CI run on a
# host slowed by its neighbours once missed it while starting test_parallel's Ray (every test
# of the module errored; the same module passed at once on a rerun). A longer wait changes
# nothing when the GCS is quick; Ray heads started by this process and its children read it.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")


@pytest.fixture(scope="module")
def shards_2():
    with LocalShards(2) as s:
        yield s


@pytest.fixture(scope="module")
def shards_3():
    with LocalShards(3) as s:
        yield s
