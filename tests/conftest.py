"""Shared fixtures: real `memstore serve` processes on loopback."""

from __future__ import annotations

import os
import warnings

import pytest

from memstore.launch import LocalShards, start_shard, wait_serving  # noqa: F401  (re-exported for tests)

# A new Ray head whose GCS server never publishes its port fails the whole module that
# started it. Seen twice in CI, each time the first in-process head after another module's:
# the GCS left no log at all (it died at birth, not slowly), and the next head started at
# once. Such a head is started again (start_ray_head); Ray's wait for the port, 30 s by
# default, is 60 here, for hosts slowed by their neighbours.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "60")
HEAD_ATTEMPTS = 3


def start_ray_head(start):
    """start() (a Ray Cluster, or ray.init), again after a GCS that never came up."""
    import ray

    for attempt in range(1, HEAD_ATTEMPTS + 1):
        try:
            return start()
        except RuntimeError as e:
            if "gcs_server_port" not in str(e) or attempt == HEAD_ATTEMPTS:
                raise
            ray.shutdown()
            warnings.warn(f"Ray head attempt {attempt}: its GCS never published its port; starting another")


@pytest.fixture(scope="module")
def shards_2():
    with LocalShards(2) as s:
        yield s


@pytest.fixture(scope="module")
def shards_3():
    with LocalShards(3) as s:
        yield s
