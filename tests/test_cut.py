"""The write gate and the cut protocol: every call is wholly in a cut or wholly out.

Two engines stand for two shards; threads stand for clients whose calls are in flight.
Run: python -m pytest tests/test_cut.py -q
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from memstore.cut import WriteGate, take_cut
from memstore.engine import ShardEngine
from memstore.spec import InitSpec, OptimizerSpec, TableSpec

SPEC = TableSpec("t", num_rows=8, dim=2, init=InitSpec("zeros"), optimizer=OptimizerSpec("sgd"))


def two_shards() -> list[ShardEngine]:
    engines = [ShardEngine(i, 2) for i in range(2)]
    for e in engines:
        e.create_table(SPEC)
    return engines


def part(engine: ShardEngine, group: str, key: int, parts: int = 2) -> None:
    engine.update("t", np.array([key]), torch.ones(1, 2), lr=1.0, update_id=f"{group}:{key}", group=group, parts=parts)


def rows(engines) -> np.ndarray:
    out = np.zeros((8, 2))
    for i, e in enumerate(engines):
        out[i::2] = e.table("t").snapshot()[1]
    return out


def test_frozen_gate_holds_writes_until_unfrozen():
    gate = WriteGate()
    gate.freeze()
    entered = threading.Event()

    def writer():
        with gate.write("g", 1) as applied:
            applied[0] = True
            entered.set()

    t = threading.Thread(target=writer)
    t.start()
    assert not entered.wait(0.2), "a write passed a frozen gate"
    gate.unfreeze()
    assert entered.wait(5)
    t.join()


def test_a_call_in_flight_at_the_cut_is_completed_on_every_shard():
    engines = two_shards()
    part(engines[0], "done", 0)
    part(engines[1], "done", 1)
    part(engines[0], "in-flight", 2)  # its other part reaches shard 1 only after the freeze
    snapshots = {}
    late = threading.Thread(target=lambda: (time.sleep(0.3), part(engines[1], "in-flight", 3)))
    late.start()
    gates = [e.gate for e in engines]

    def snapshot():
        snapshots["rows"] = rows(engines)

    _, completed, abandoned = take_cut(gates, snapshot, deadline_s=10)
    late.join()
    assert completed == ["in-flight"] and abandoned == []
    cut = snapshots["rows"]
    assert (cut[[0, 1, 2, 3]] == -1).all() and (cut[4:] == 0).all()


def test_a_call_that_starts_during_the_cut_stays_out_of_it():
    engines = two_shards()
    gates = [e.gate for e in engines]
    started = threading.Event()
    snapshots = {}

    def snapshot():
        started.set()
        time.sleep(0.3)  # a new call arrives while we snapshot
        snapshots["rows"] = rows(engines)

    def new_call():
        started.wait(5)
        part(engines[0], "new", 4)
        part(engines[1], "new", 5)

    t = threading.Thread(target=new_call)
    t.start()
    take_cut(gates, snapshot)
    t.join()
    assert (snapshots["rows"] == 0).all()
    assert (rows(engines)[[4, 5]] == -1).all()  # applied after the cut


def test_a_client_that_died_mid_call_does_not_block_the_cut():
    engines = two_shards()
    part(engines[0], "orphan", 0)  # its second part never comes
    t0 = time.monotonic()
    _, completed, abandoned = take_cut([e.gate for e in engines], lambda: None, deadline_s=0.5)
    assert abandoned == ["orphan"] and completed == [] and time.monotonic() - t0 < 5
    part(engines[1], "after", 1, parts=1)  # the gates are open again


def test_a_write_held_through_a_restore_is_retried_not_applied_to_the_old_table():
    from memstore.errors import Unavailable
    from memstore.table import ShardTable

    engine = ShardEngine(0, 1)
    old = engine.create_table(SPEC)
    engine.gate.freeze()
    outcome = []

    def held_write():
        try:
            part(engine, "g", 1, parts=1)
            outcome.append("applied")
        except Unavailable as e:
            outcome.append(str(e))

    t = threading.Thread(target=held_write)
    t.start()
    time.sleep(0.2)
    engine.replace_tables([ShardTable(SPEC)])  # what a restore swaps in
    engine.gate.unfreeze()
    t.join(5)
    assert outcome and "replaced or dropped" in outcome[0]
    assert old.version == 0 and engine.table("t").version == 0


def test_a_failed_log_append_changes_nothing():
    engine = ShardEngine(0, 1)
    engine.create_table(SPEC)

    def broken_log(record):
        raise OSError("disk full")

    engine.journal = broken_log
    before = engine.table("t").snapshot()
    try:
        part(engine, "g", 1, parts=1)
    except OSError:
        pass
    else:
        raise AssertionError("the update was acknowledged without being logged")
    after = engine.table("t").snapshot()
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    assert "g:1" not in engine.table("t").applied_ids


def test_a_freeze_nobody_ends_lapses_after_its_lease():
    gate = WriteGate()
    gate.freeze(lease_s=0.3)
    t0 = time.monotonic()
    with gate.write("g", 1) as applied:  # waits out the lease, then passes
        applied[0] = True
    assert 0.25 < time.monotonic() - t0 < 5 and not gate.frozen


def test_a_freeze_without_a_lease_holds_writes_until_it_is_ended():
    import math

    gate = WriteGate()
    gate.freeze(lease_s=math.inf)  # a freeze its own thread ends (a standalone shard's compaction)
    done = threading.Event()

    def write() -> None:
        with gate.write("g", 1) as applied:
            applied[0] = True
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    assert not done.wait(0.5) and gate.frozen
    gate.unfreeze(forget=False)
    writer.join(5)
    assert done.is_set()


class _FullDiskGate(WriteGate):
    """A shard whose thaw fails as one on a full disk does (its cut record is refused)."""

    def unfreeze(self, forget: bool = True) -> None:
        super().unfreeze(forget)  # the gate itself opens; the record after it fails
        raise OSError(28, "No space left on device")


def test_one_shard_failing_to_thaw_leaves_no_other_frozen():
    for failing in (0, 1):
        gates = [WriteGate(), WriteGate(), WriteGate()]
        gates[failing] = _FullDiskGate()
        with pytest.raises(OSError, match="No space"):  # a cut that completed: its thaw's failure
            take_cut(gates, lambda: None)
        assert [g.frozen for g in gates] == [False] * 3, f"shard {failing} failing left others frozen"
        with pytest.raises(ZeroDivisionError):  # a cut that failed: its own error, not the thaw's
            take_cut(gates, lambda: 1 / 0)
        assert [g.frozen for g in gates] == [False] * 3, f"shard {failing} failing left others frozen"


def test_a_held_shard_refuses_writes_and_lookups_until_the_hold_ends():
    """A restore whose swap failed part-way holds the shards it did not reach: a write waiting
    at the frozen gate, and every later call, fail UNAVAILABLE, and the cut's thaw does not
    lift the hold; ending it does."""
    from memstore.errors import Unavailable

    [engine, _] = two_shards()
    engine.gate.freeze()
    failed: list[BaseException] = []

    def waiting_write() -> None:
        try:
            part(engine, "w", 0, parts=1)
        except BaseException as e:  # noqa: BLE001 -- asserted below
            failed.append(e)

    writer = threading.Thread(target=waiting_write)
    writer.start()
    time.sleep(0.1)
    engine.gate.hold("shard 0: a restore began and has not reached this shard")
    writer.join(5)
    engine.gate.unfreeze()  # the cut ends; the hold stays
    assert len(failed) == 1 and isinstance(failed[0], Unavailable) and "restore began" in str(failed[0])
    for call in (lambda: part(engine, "x", 2, parts=1), lambda: engine.lookup("t", np.array([0])),
                 lambda: engine.drop_table("t")):
        with pytest.raises(Unavailable, match="restore began"):
            call()
    np.testing.assert_array_equal(engine.table("t").snapshot()[1], np.zeros((4, 2)))  # nothing applied
    engine.gate.end_hold()
    part(engine, "x", 2, parts=1)
    assert engine.lookup("t", np.array([2])).tolist() == [[-1.0, -1.0]]


def _started(target) -> threading.Thread:
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def test_a_drop_waiting_at_a_frozen_gate_lets_the_parts_a_cut_released_apply():
    """A drop held back by a cut must not hold back the UpdateMany parts the cut released:
    the cut would give up on their call and hold it applied on one shard only."""
    engines = two_shards()
    for e in engines:
        e.create_table(dataclasses.replace(SPEC, name="other"))
    part(engines[1], "G", 1)  # shard 1's part of call G applied before the cut
    gates = [e.gate for e in engines]
    seen = [g.freeze() for g in gates]
    assert seen[1]["G"][:2] == (2, 1) and "G" not in seen[0]
    dropped = []
    drop = _started(lambda: dropped.append(engines[0].drop_table("other", "d")))
    time.sleep(0.2)  # the drop waits at shard 0's frozen gate
    write = engines[0].prepare_update("t", np.array([0]), torch.ones(1, 2), 1.0, "G:0", "G", 2)
    applied = _started(lambda: engines[0].apply_together([write]))
    time.sleep(0.1)
    for g in gates:
        g.release(["G"])  # what take_cut does for a call some shard applied
    applied.join(5)
    assert not applied.is_alive(), "a waiting drop held back a released part"
    assert [e.gate.applied(["G"])["G"] for e in engines] == [1, 1] and not dropped
    for g in gates:
        g.unfreeze()
    drop.join(5)
    assert dropped == [True]


def test_a_drop_waiting_for_a_request_steps_out_of_a_cuts_way():
    """A drop inside the gate, waiting for a request of two writes, when a cut freezes the
    gate meanwhile: the request, inside the gate, applies whole, and the drop steps out of
    the freeze's way (the freeze drains) instead of keeping its place in the gate."""
    [engine, _] = two_shards()
    engine.create_table(dataclasses.replace(SPEC, name="other"))
    writes = [engine.prepare_update("t", np.array([k]), torch.ones(1, 2), 1.0, f"R:{k}", "R", 1) for k in (0, 2)]
    table = engine.table("t")
    table.ids_lock.acquire()  # the first write waits inside the gate
    request = _started(lambda: engine.apply_together(writes))
    time.sleep(0.1)
    dropped = []
    drop = _started(lambda: dropped.append(engine.drop_table("other")))
    time.sleep(0.2)  # the drop is in the gate, waiting for the request
    froze = []
    freeze = _started(lambda: froze.append(engine.gate.freeze(timeout_s=10)))
    time.sleep(0.2)
    table.ids_lock.release()  # both writes apply: the request passed the gate as one
    freeze.join(10)
    assert froze, "the freeze did not drain: the drop kept its place in the gate"
    request.join(5)
    assert not request.is_alive() and table.version == 2 and not dropped
    engine.gate.unfreeze()
    drop.join(5)
    assert dropped == [True]


def test_a_call_whose_parts_stopped_long_ago_does_not_hold_the_cut(monkeypatch):
    """A call applied on one shard whose other part never came (its client died), minutes
    ago, is abandoned at once, not waited for with every write held; a shard forgets such
    calls once they are that old."""
    from memstore import cut

    monkeypatch.setattr(cut, "STALE_GROUP_S", 0.5)
    engines = two_shards()
    part(engines[0], "dead", 0)
    time.sleep(0.6)
    part(engines[1], "live", 1, parts=1)  # shard 1 remembers only its own call
    t0 = time.monotonic()
    _, completed, abandoned = take_cut([e.gate for e in engines], lambda: None, deadline_s=20)
    assert abandoned == ["dead"] and completed == [] and time.monotonic() - t0 < 5
    part(engines[0], "dead again", 0)
    time.sleep(0.6)
    part(engines[0], "other", 2, parts=1)  # a later write on shard 0 forgets the stale call
    assert set(engines[0].gate.freeze()) == {"other"}
    engines[0].gate.unfreeze()


def test_a_frozen_gate_parks_writes_up_to_its_bound_and_refuses_the_rest_not_released_parts():
    """A server's threads: a frozen gate parks at most max_waiting writes, each on one; the
    next is UNAVAILABLE (its client retries), while a part the cut released still passes."""
    from memstore.errors import Unavailable

    gate = WriteGate()
    gate.max_waiting = 2
    gate.freeze()
    passed = []

    def writer(group):
        with gate.write(group, 2) as applied:
            applied[0] = True
            passed.append(group)

    parked = [threading.Thread(target=writer, args=(g,)) for g in ("a", "b")]
    for t in parked:
        t.start()
    deadline = time.monotonic() + 5
    while gate._waiting < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(Unavailable, match="taking a cut and 2 writes wait for it already"):
        writer("c")
    gate.release(["d"])
    writer("d")  # released: passes the bound and the freeze
    assert passed == ["d"]
    gate.unfreeze()
    for t in parked:
        t.join(5)
    assert sorted(passed) == ["a", "b", "d"] and gate._waiting == 0
    writer("c")  # thawed: no bound


def test_a_held_part_of_a_request_does_not_stop_a_released_part_behind_it():
    """One request (UpdateMany) to shard 0 carries a call applied nowhere else (its only
    part) and then a part of a call shard 1 applied before the freeze, which the cut
    releases. The request applies, in order, within the cut: both calls wholly in it.
    Before, its first part waited for the thaw with the released part behind it, and the cut
    waited out its deadline and gave up on that call half applied."""
    engines = two_shards()
    engines[0].create_table(dataclasses.replace(SPEC, name="other"))
    part(engines[1], "B", 1)  # shard 1's part of call B
    gates = [e.gate for e in engines]
    seen = [g.freeze() for g in gates]
    assert seen[1]["B"][:2] == (2, 1)
    writes = [engines[0].prepare_update("other", np.array([0]), torch.ones(1, 2), 1.0, "A:0", "A", 1),
              engines[0].prepare_update("t", np.array([0]), torch.ones(1, 2), 1.0, "B:0", "B", 2)]
    results = []
    request = _started(lambda: results.append(engines[0].apply_together(writes)))
    time.sleep(0.2)
    assert engines[0].gate._waiting == 1 and not results  # one request, one waiting write
    for g in gates:
        g.release(["B"])
    request.join(5)
    assert [v for v, _, _ in results[0]] == [1, 1]
    assert [g.applied(["A", "B"]) for g in gates] == [{"A": 1, "B": 1}, {"A": 0, "B": 1}]
    for g in gates:
        g.unfreeze()


def test_a_request_with_a_part_held_for_another_shard_waits_for_the_thaw():
    """A call of the request with parts on other shards that the cut did not release stays
    out of the cut, and with it the whole request (its parts apply in order)."""
    engines = two_shards()
    engines[0].create_table(dataclasses.replace(SPEC, name="other"))
    gate = engines[0].gate
    gate.freeze()
    writes = [engines[0].prepare_update("other", np.array([0]), torch.ones(1, 2), 1.0, "A:0", "A", 2),
              engines[0].prepare_update("t", np.array([0]), torch.ones(1, 2), 1.0, "B:0", "B", 2)]
    results = []
    request = _started(lambda: results.append(engines[0].apply_together(writes)))
    gate.release(["B"])
    time.sleep(0.2)
    assert request.is_alive() and gate.applied(["A", "B"]) == {"A": 0, "B": 0}
    gate.unfreeze(forget=False)
    request.join(5)
    assert [v for v, _, _ in results[0]] == [1, 1] and gate.applied(["A", "B"]) == {"A": 1, "B": 1}
