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
    """start() (a Ray Cluster and its nodes, or ray.init), again after a head or node that never came up: its GCS
    never published its port, or its raylet never registered with the GCS (Ray waits 30 s,
    not configurable; seen once on a loaded 2-core host). What the failed attempt started is
    killed first."""
    import ray

    for attempt in range(1, HEAD_ATTEMPTS + 1):
        try:
            return start()
        except Exception as e:  # Ray raises a bare Exception for the raylet's timeout
            if not any(m in str(e) for m in HEAD_FAILURES) or attempt == HEAD_ATTEMPTS:
                raise
            ray.shutdown()
            _kill_ray_children()
            warnings.warn(f"Ray head attempt {attempt} did not come up ({str(e)[:80]}); starting another")


HEAD_FAILURES = ("gcs_server_port", "timed out during startup")


def _kill_ray_children() -> None:
    """SIGKILLs the Ray daemons this test process started (a head that failed to come up)."""
    import signal

    from cluster.store import _descendants

    for pid in _descendants([os.getpid()]):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"ray" in argv[0] or any(b"/ray/" in a for a in argv[:2]):
                os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


@pytest.fixture(scope="module")
def shards_2():
    with LocalShards(2) as s:
        yield s


@pytest.fixture(scope="module")
def shards_3():
    with LocalShards(3) as s:
        yield s
