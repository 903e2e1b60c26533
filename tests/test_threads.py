"""serial_torch: one thread's torch ops go single-threaded, every other thread keeps its own.

Run: python -m pytest tests/test_threads.py -q
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from memstore.threads import serial_torch


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or torch.get_num_threads() < 2,
                    reason="needs torch running more than one intra-op thread")
def test_serial_torch_changes_the_calling_thread_only():
    before = torch.get_num_threads()
    with ThreadPoolExecutor(1, initializer=serial_torch) as serial, ThreadPoolExecutor(1) as plain:
        assert serial.submit(torch.get_num_threads).result() == 1
        # The same ops give the same bits on one thread as on several.
        x = torch.randn(1 << 16, 8)
        assert torch.equal(serial.submit(lambda: (x * 3).exp().sum(1)).result(), (x * 3).exp().sum(1))
        assert plain.submit(torch.get_num_threads).result() == before, "a thread started later keeps the default"
    assert torch.get_num_threads() == before
