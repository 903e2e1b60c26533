"""memstore.alloc: zeroed table memory on huge pages, and its place under shard tables."""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from memstore import alloc
from memstore.errors import Unavailable
from memstore.optim import make_optimizer
from memstore.spec import OptimizerSpec, TableSpec
from memstore.table import ShardTable, table_row_bytes
from memstore.telemetry import TableTelemetry

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


def resident_bytes(t: torch.Tensor) -> int:
    """Bytes of the mapping that holds `t` that sit in memory now (its smaps Rss)."""
    return int(mapping_flags(t.data_ptr())["Rss"].split()[0]) * 1024


def test_large_tensors_are_resident_when_made():
    """Promised memory is taken memory: a table's check sees the tables made before it."""
    t = alloc.zeros((1 << 24,), torch.float32)  # 64 MiB, never written by the test
    assert resident_bytes(t) >= t.numel() * t.element_size()


def test_a_table_takes_all_it_counts_when_made():
    spec = TableSpec("t", num_rows=300_000, dim=16, optimizer=OptimizerSpec("adam"))
    table = ShardTable(spec, 0, 1)
    held = [table.rows, *table.state.values(), table.telemetry._reads]
    assert table.telemetry._reads.element_size() == TableTelemetry.ROW_BYTES
    assert sum(t.numel() * t.element_size() for t in held) == 300_000 * table_row_bytes(spec)  # the need it checked
    for t in held:  # optimizer state and read counters included, never written yet
        assert resident_bytes(t) >= t.numel() * t.element_size()


MADE = """
import sys
from memstore.spec import TableSpec
from memstore.table import ShardTable
print("ready", flush=True)
ShardTable(TableSpec("t", num_rows=10, dim=4), 0, 1)
print("made", flush=True)
"""


def test_tables_are_reserved_one_at_a_time_across_processes():
    """Two shard processes of one host creating tables at once would each count the other's
    memory as free: the second waits for the first's reservation."""
    with alloc.reserving_memory():
        proc = subprocess.Popen([sys.executable, "-c", MADE], stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parents[1])
        try:
            assert proc.stdout.readline().strip() == "ready"
            ready, _, _ = select.select([proc.stdout], [], [], 1.5)
            assert not ready and proc.poll() is None  # waiting on this process's reservation
        except BaseException:
            proc.kill()
            raise
    out, _ = proc.communicate(timeout=60)
    assert out.strip() == "made" and proc.returncode == 0


def test_tables_are_reserved_one_at_a_time_across_threads():
    made = threading.Event()
    with alloc.reserving_memory():
        worker = threading.Thread(target=lambda: (ShardTable(TableSpec("t", num_rows=10, dim=4), 0, 1), made.set()))
        worker.start()
        assert not made.wait(0.5)
    worker.join(30)
    assert made.is_set()


def reserve_and_let_go() -> None:
    with alloc.reserving_memory():
        pass


def test_a_child_forked_during_a_reservation_holds_none_of_it():
    with alloc.reserving_memory():
        pid = os.fork()
        if pid == 0:  # the child: reserves (must not wait on itself or the parent), then stays alive
            try:
                with alloc.reserving_memory():
                    pass
                time.sleep(5)
            finally:
                os._exit(0)
    try:
        # The parent reserves again while the child lives: its copy of the file must not hold the flock.
        again = threading.Thread(target=reserve_and_let_go)
        again.start()
        again.join(10)
        assert not again.is_alive(), "the forked child kept the parent's reservation"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        again.join(10)


def lock_is_free() -> bool:
    """Whether another process can take LOCK_FILE's flock now."""
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY)\n"
             "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError: sys.exit(3)")
    return subprocess.run([sys.executable, "-c", probe, str(alloc.LOCK_FILE)], timeout=30).returncode == 0


def test_a_child_forked_while_a_thread_awaits_the_flock_holds_none_of_it():
    """Thread T waits in flock (another description holds it); the main thread forks; once T
    has reserved and let go, the lock is free although the child lives on."""
    other = os.open(alloc.LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(other, fcntl.LOCK_EX)
    waiting = threading.Thread(target=reserve_and_let_go)
    waiting.start()
    time.sleep(0.5)  # T is in flock now
    pid = os.fork()
    if pid == 0:
        time.sleep(5)
        os._exit(0)
    try:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
        waiting.join(10)
        assert not waiting.is_alive()
        assert lock_is_free(), "the forked child kept the waiting thread's lock"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_child_forked_inside_a_reservation_leaves_it_without_closing_a_file_twice():
    read, write = os.pipe()
    pid = -1
    try:
        with alloc.reserving_memory():
            pid = os.fork()
            if pid == 0:
                mine = os.open(os.devnull, os.O_RDONLY)  # may get the number the reservation's file had
    except BaseException:
        if pid == 0:  # the child never runs on into the rest of the test session
            os._exit(1)
        raise
    if pid == 0:
        try:
            os.fstat(mine)
            os.write(write, b"ok")
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 2) == b"ok", "the child's own file was closed by the reservation's exit"
    os.close(read)


def attempt(**wait) -> BaseException | None:
    """Reserves on a thread and returns its error (None: it reserved); a wait that never ends
    fails the test instead of hanging it."""
    out = []

    def run():
        try:
            with alloc.reserving_memory(**wait):
                pass
            out.append(None)
        except BaseException as e:
            out.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(10)
    assert out, "the reservation waited on past its limit"
    return out[0]


def test_a_reservation_held_too_long_by_another_process_is_unavailable_naming_it(monkeypatch):
    """A stuck holder (stopped, hung mid-create) must not keep a create's handler thread for
    good: it gives up with Unavailable naming the holder."""
    other = os.open(alloc.LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(other, fcntl.LOCK_EX)  # /proc/locks names this process as the holder
    try:
        start = time.monotonic()
        error = attempt(stuck_s=0.3)
        assert isinstance(error, Unavailable) and 0.3 <= time.monotonic() - start < 5
        assert f"process {os.getpid()} on this host has held the memory reservation" in str(error)
        monkeypatch.setattr(alloc, "RESERVE_STUCK_S", 0.2)  # a table's create gives up as soon
        with pytest.raises(Unavailable, match="memory reservation"):
            ShardTable(TableSpec("t", num_rows=10, dim=4), 0, 1)
    finally:
        os.close(other)
    with alloc.reserving_memory(stuck_s=5):  # free again
        pass


def test_a_reservation_held_too_long_by_another_thread_is_unavailable():
    held, done = threading.Event(), threading.Event()

    def hold():
        with alloc.reserving_memory():
            held.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        error = attempt(stuck_s=0.2)
        assert isinstance(error, Unavailable) and "another thread of this process" in str(error)
    finally:
        done.set()
        holder.join(10)


QUEUED = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
print("waiting", flush=True)
fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: in the kernel's queue, ahead of a poller
time.sleep(0.4)
"""


def test_a_queue_of_quick_holders_is_waited_out_however_long():
    """Shards restoring side by side take the reservation in turn: a waiter behind 4 holders
    of 0.4 s each (1.6 s) with stuck_s=1 reserves; only one holder that long is stuck."""
    other = os.open(alloc.LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(other, fcntl.LOCK_EX)
    queue = [subprocess.Popen([sys.executable, "-c", QUEUED, str(alloc.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    try:
        for proc in queue:
            assert proc.stdout.readline().strip() == "waiting"
        time.sleep(0.3)  # each is blocked in flock now
        fcntl.flock(other, fcntl.LOCK_UN)
        assert attempt(stuck_s=1.0) is None
    finally:
        os.close(other)
        for proc in queue:
            proc.wait(30)


def test_a_reservation_waits_a_finite_time():
    for bad in (-1, float("inf"), float("nan"), "5"):
        with pytest.raises(ValueError, match="stuck_s"):
            with alloc.reserving_memory(stuck_s=bad):
                pass
