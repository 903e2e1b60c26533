"""Shared fixtures: real `memstore serve` processes on loopback."""

from __future__ import annotations

import pytest

from memstore.launch import LocalShards, start_shard, wait_serving  # noqa: F401  (re-exported for tests)


@pytest.fixture(scope="module")
def shards_2():
    with LocalShards(2) as s:
        yield s


@pytest.fixture(scope="module")
def shards_3():
    with LocalShards(3) as s:
        yield s
