"""memstore.keys: a batch's key plan — distinct keys grouped by shard, each shard's ascending.

Run: python -m pytest tests/test_keys.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memstore.keys import plan_keys
from memstore.partition import shard_of
from memstore.spec import TableSpec


def check_plan(batch: np.ndarray, num_rows: int, num_shards: int) -> None:
    plan = plan_keys(batch, TableSpec("t", num_rows=num_rows, dim=4), num_shards)
    unique = np.unique(batch)
    assert sorted(plan.unique.tolist()) == unique.tolist()
    for s in range(num_shards):
        mine = plan.shard_keys(s)
        assert (shard_of(mine, num_shards) == s).all()
        assert (np.diff(mine) > 0).all(), f"shard {s}'s keys do not ascend"  # as they go out
    if plan.position is not None:  # repeats: each key of the batch finds its distinct row
        np.testing.assert_array_equal(plan.unique[plan.position.numpy()], batch)
        return
    slot = plan.slot.numpy() if plan.slot is not None else np.arange(len(batch))
    np.testing.assert_array_equal(batch[slot], plan.unique)  # distinct key i is the batch's slot[i]
    values = torch.arange(len(batch), dtype=torch.float32).unsqueeze(1)  # (N, 1)
    np.testing.assert_array_equal(plan.to_unique_order(values).squeeze(1).numpy(), slot)  # values go with keys


@pytest.mark.parametrize("num_shards", [1, 2, 3])
@pytest.mark.parametrize("kind", ["distinct", "repeats", "ascending"])
def test_each_shard_gets_its_keys_ascending(num_shards, kind):
    rng = np.random.default_rng(num_shards)
    batch = rng.choice(1_000_000, 5_000, replace=False)
    if kind == "repeats":
        batch = rng.choice(batch[:1_000], 5_000)
    elif kind == "ascending":
        batch = np.sort(batch)
    check_plan(batch.astype(np.int64), 1_000_000, num_shards)


@pytest.mark.parametrize("num_shards", [1, 4])
def test_keys_of_a_huge_table_are_ordered_too(num_shards):
    """key * batch size overflows int64 here: the plan sorts by argsort instead."""
    rng = np.random.default_rng(7)
    batch = rng.integers(0, 2**61, 3_000, dtype=np.int64)
    check_plan(batch, 2**61, num_shards)


def test_a_distinct_batch_of_one_shard_in_order_needs_no_slots():
    batch = np.arange(0, 100, 3, dtype=np.int64)
    plan = plan_keys(batch, TableSpec("t", num_rows=100, dim=4), 1)
    assert plan.slot is None and plan.position is None and plan.unique is batch


def test_an_ungrouped_plan_keeps_a_distinct_batch_in_order():
    batch = np.array([9, 2, 7, 0], dtype=np.int64)
    plan = plan_keys(batch, TableSpec("t", num_rows=10, dim=4), 2, group=False)
    assert plan.bounds is None and plan.unique.tolist() == [9, 2, 7, 0]


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.uint64, np.int16])
def test_keys_of_any_integer_type_are_planned_as_int64(dtype):
    batch = np.array([5, 30_000, 3, 5, 29_999], dtype=dtype)  # key * n would wrap in int16/int32
    plan = plan_keys(batch, TableSpec("t", num_rows=2**31 - 1, dim=4), 2)
    assert plan.unique.dtype == np.int64 and sorted(plan.unique.tolist()) == [3, 5, 29_999, 30_000]
    np.testing.assert_array_equal(plan.unique[plan.position.numpy()], batch.astype(np.int64))
