"""memstore.alloc: zeroed table memory on huge pages, and its place under shard tables."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from memstore import alloc
from memstore.optim import make_optimizer
from memstore.spec import OptimizerSpec, TableSpec
from memstore.table import ShardTable

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The bracketed THP mode ("always", "madvise", "never"), or None off Linux."""
    try:
        return re.search(r"\[(\w+)\]", THP.read_text()).group(1)
    except (OSError, AttributeError):
        return None


def mapping_flags(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds `address`."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) <= address < int(head.group(2), 16)
        elif inside and ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_large_tensors_are_zero_aligned_and_writable(dtype):
    t = alloc.zeros((40_000, 64), dtype)  # 2.5-10 MiB: its own mapping
    assert t.shape == (40_000, 64) and t.dtype == dtype and t.is_contiguous()
    assert t.data_ptr() % alloc.HUGE_PAGE_BYTES == 0
    assert not t.any()
    t[::7] = 3
    assert int((t == 3).sum()) == len(range(0, 40_000, 7)) * 64


def test_small_tensors_are_plain_zeros():
    t = alloc.zeros((10, 3), torch.int64)
    assert t.shape == (10, 3) and not t.any()


def test_a_view_keeps_the_mapping_alive():
    t = alloc.zeros((1 << 20,), torch.float32)
    view = t[5:9]
    del t  # the view alone keeps the mapping alive
    view.fill_(2.0)
    assert view.tolist() == [2.0] * 4


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off on this machine")
def test_table_rows_and_state_are_advised_for_huge_pages():
    spec = TableSpec("t", num_rows=200_000, dim=16, optimizer=OptimizerSpec("adam"))
    table = ShardTable(spec, 0, 1)
    for t in [table.rows, *table.state.values()]:
        if t.numel() * t.element_size() >= alloc.HUGE_PAGE_BYTES:
            assert mapping_flags(t.data_ptr()).get("THPeligible") == "1"


def test_optimizer_state_is_zero_and_table_rows_deterministic():
    """Rows and state in mapped memory behave exactly as before: init values depend on
    (seed, key) only, state starts at zero."""
    spec = TableSpec("t", num_rows=100_000, dim=8, optimizer=OptimizerSpec("adam"), seed=7)
    whole = ShardTable(spec, 0, 1)
    halves = [ShardTable(spec, i, 2) for i in range(2)]
    assert torch.equal(whole.rows[0::2], halves[0].rows) and torch.equal(whole.rows[1::2], halves[1].rows)
    state = make_optimizer(spec.optimizer).init_state(100_000, 8)
    assert set(state) == set(whole.state) and all(not t.any() for t in state.values())
    assert np.isfinite(whole.rows.numpy()).all()
