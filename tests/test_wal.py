"""Write-ahead log: framing, torn tails, group commit, and replay on top of a checkpoint.

Run: python -m pytest tests/test_wal.py -q

Real files under tmp_path. "Direct" engines apply writes as a server would (apply, then log the
record with the version the engine returned); replayed engines must end bit-identical.
"""

from __future__ import annotations

import os
import re
import resource
import threading
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from memstore import checkpoint as ck
from memstore import snapshot
from memstore import wal, walfile
from memstore.engine import ShardEngine
from memstore.spec import OptimizerSpec, TableSpec
from test_checkpoint import assert_same_tables  # tests/ is on sys.path under pytest

SPECS = [
    TableSpec("adam", num_rows=401, dim=6, seed=1, optimizer=OptimizerSpec("adam", weight_decay=0.01)),
    TableSpec("adagrad.bf16", num_rows=199, dim=4, dtype="bfloat16", seed=2, optimizer=OptimizerSpec("adagrad")),
    TableSpec("sgd", num_rows=97, dim=3, seed=3, optimizer=OptimizerSpec("sgd", momentum=0.9)),
]


def sample_record(rng: np.random.Generator, n: int = 16, dim: int = 4, version: int | None = None) -> dict:
    keys = rng.choice(1000, n, replace=False)
    grads = torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32))
    return wal.update_record("t", keys, grads, 0.01, f"id{rng.integers(1 << 30)}", version)


def as_plain(record: dict) -> dict:
    """A record as replay returns it (memoryviews become bytes)."""
    return {k: bytes(v) if isinstance(v, memoryview) else v for k, v in record.items()}


class Server:
    """The engine side of a shard: apply each write, then log it, as a servicer would."""

    def __init__(self, shard_index: int, num_shards: int, log: wal.WriteAheadLog | None) -> None:
        self.engine = ShardEngine(shard_index, num_shards)
        self.log = log
        for spec in SPECS:
            self.engine.create_table(spec)

    def update(self, name, keys, grads, lr, uid):
        version, _, _ = self.engine.update(name, keys, grads, lr, uid)
        if self.log is not None:
            self.log.append(wal.update_record(name, keys, grads, lr, uid, version))

    def assign(self, name, keys, rows, keep_state, uid):
        version, _ = self.engine.assign(name, keys, rows, keep_state, uid)
        if self.log is not None:
            self.log.append(wal.assign_record(name, keys, rows, keep_state, uid, version))


def drive(servers: list[Server], steps: int, seed: int, prefix: str) -> None:
    """Zipfian-ish overlapping updates (order matters for Adam) and a few assigns."""
    rng = np.random.default_rng(seed)
    num_shards = len(servers)
    for step in range(steps):
        for spec in SPECS:
            keys = np.unique(rng.integers(0, spec.num_rows, 40) % (spec.num_rows // 3 + 1))
            grads = torch.from_numpy(rng.standard_normal((len(keys), spec.dim)).astype(np.float32))
            grads = grads.to(spec.wire_torch_dtype)
            for s in servers:
                mine = keys % num_shards == s.engine.shard_index
                uid = f"{prefix}{step}:{s.engine.shard_index}"
                s.update(spec.name, keys[mine], grads[torch.from_numpy(mine)], 0.02 * (1 + step % 3), uid)
                if step % 4 == 3:
                    rows = torch.full((int(mine.sum()), spec.dim), 0.5)
                    s.assign(spec.name, keys[mine], rows, step % 8 == 3, f"a{uid}")


@pytest.mark.parametrize("sync", wal.SYNC_MODES)
def test_round_trip(tmp_path, sync):
    rng = np.random.default_rng(0)
    records = [sample_record(rng, version=v) for v in range(20)]
    records += [wal.create_record(SPECS[0]), wal.drop_record("adam")]
    records.append(wal.assign_record("t", np.arange(3), torch.ones(3, 2, dtype=torch.bfloat16), True, "x"))
    path = wal.wal_path(tmp_path, 0)
    with wal.WriteAheadLog(path, sync=sync) as log:
        for r in records:
            log.append(r)
    assert list(wal.replay(path)) == [as_plain(r) for r in records]
    with wal.WriteAheadLog(path, sync=sync) as log:  # reopening appends after what is there
        log.append(records[0])
    assert len(list(wal.replay(path))) == len(records) + 1


def five_records(tmp_path, seed: int) -> tuple:
    """A log of five sample records: (its path, the records)."""
    rng = np.random.default_rng(seed)
    records = [sample_record(rng) for _ in range(5)]
    path = tmp_path / "wal-0.log"
    with wal.WriteAheadLog(path, sync="none") as log:
        for r in records:
            log.append(r)
    return path, records


def test_torn_tail_is_ignored_and_cut_on_reopen(tmp_path):
    path, records = five_records(tmp_path, seed=1)
    whole = path.read_bytes()
    # A crash mid-write: the last frame is cut short, at any byte.
    for cut in (1, 7, 9, len(whole) // 10):
        path.write_bytes(whole[:-cut])
        assert list(wal.replay(path)) == [as_plain(r) for r in records[:4]], cut
    # A crash after the length reached the disk but before the payload: garbage where it was.
    path.write_bytes(whole + b"\x10\x00\x00\x00\xde\xad\xbe\xef" + os.urandom(5))
    assert len(list(wal.replay(path))) == 5
    # Reopened for writing, the log cuts the torn frame so new records stay reachable.
    with wal.WriteAheadLog(path, sync="always") as log:
        log.append(records[0])
    assert list(wal.replay(path)) == [as_plain(r) for r in records + records[:1]]
    # A machine crash can leave the file longer, zero-filled where the data never landed.
    longer = path.read_bytes()
    path.write_bytes(longer + bytes(40))
    assert len(list(wal.replay(path))) == 6
    path.write_bytes(longer)
    # A file torn while its magic was written holds nothing; another file is refused.
    path.write_bytes(wal.MAGIC[:3])
    assert list(wal.replay(path)) == []
    path.write_bytes(b"NOTAWAL!" + whole[8:])
    with pytest.raises(wal.WalError, match="not a memstore write-ahead log"):
        list(wal.replay(path))


@pytest.mark.parametrize("flip", [
    (20, 1),  # a bit of the third record's payload
    (0, 1),  # its length's lowest bit: it ends a byte off, inside the next record
    (2, 1),  # a high bit of its length: it runs past the end of the file, as a torn one does
    (4, 0x80),  # its crc32
])
def test_a_damaged_record_with_records_after_it_stops_replay_and_truncates_nothing(tmp_path, flip):
    path, records = five_records(tmp_path, seed=2)
    ends = [end for end, _ in walfile._frames(path)]
    data = bytearray(path.read_bytes())
    at, bit = flip
    data[ends[1] + at] ^= bit
    path.write_bytes(bytes(data))
    with pytest.raises(wal.WalError, match=f"offset {ends[1]} is damaged and whole records follow"):
        list(wal.replay(path))
    # Opening it to append (a restarting shard) refuses too, and cuts nothing away.
    with pytest.raises(wal.WalError, match="damaged"):
        wal.WriteAheadLog(path, sync="always")
    assert path.read_bytes() == bytes(data)
    # The way out the message names: truncate at the damaged record, keeping what precedes it.
    os.truncate(path, ends[1])
    assert list(wal.replay(path)) == [as_plain(r) for r in records[:2]]


def test_group_commit_from_eight_threads(tmp_path):
    path = tmp_path / "wal-0.log"
    per_thread, threads = 40, 8
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def appender(t: int, log: wal.WriteAheadLog) -> None:
        rng = np.random.default_rng(t)
        barrier.wait()
        try:
            for i in range(per_thread):
                rec = sample_record(rng, n=64, dim=16)
                rec["update_id"] = f"{t}:{i}"
                log.append(rec)
        except BaseException as e:  # surfaced below
            errors.append(e)

    with wal.WriteAheadLog(path, sync="group", group_window_s=0.05) as log:
        workers = [threading.Thread(target=appender, args=(t, log)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        syncs = log.syncs
    assert not errors, errors
    ids = [r["update_id"] for r in wal.replay(path)]
    assert sorted(ids) == sorted(f"{t}:{i}" for t in range(threads) for i in range(per_thread))
    for t in range(threads):  # each thread's records in the order it appended them
        mine = [int(x.split(":")[1]) for x in ids if x.startswith(f"{t}:")]
        assert mine == sorted(mine)
    # Appenders shared fsyncs (with a 50 ms window, threads that met at the barrier join one).
    assert syncs < threads * per_thread, syncs


def test_rotate_during_group_commit_loses_nothing(tmp_path):
    """Appenders keep going while the log rotates (a checkpoint cut): every record lands once,
    in one generation or the next, and no appender waits forever."""
    threads, per_thread = 8, 60
    errors: list[BaseException] = []
    log = wal.WriteAheadLog(wal.wal_path(tmp_path, 0), sync="group")

    def appender(t: int) -> None:
        try:
            for i in range(per_thread):
                log.append(wal.drop_record(f"{t}:{i}"))
        except BaseException as e:  # surfaced below
            errors.append(e)

    workers = [threading.Thread(target=appender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for gen in (1, 2, 3):
        log.rotate(wal.wal_path(tmp_path, gen))
    for w in workers:
        w.join(timeout=60)
        assert not w.is_alive(), "an appender is stuck"
    log.close()
    assert not errors, errors
    names = [r["table"] for r in wal.replay_dir(tmp_path)]
    assert sorted(names) == sorted(f"{t}:{i}" for t in range(threads) for i in range(per_thread))


@pytest.mark.parametrize("sync", ["always", "group"])
def test_replay_into_reproduces_direct_application(tmp_path, sync):
    path = wal.wal_path(tmp_path, 0)
    with wal.WriteAheadLog(path, sync=sync) as log:
        direct = Server(0, 1, log)
        drive([direct], steps=10, seed=2, prefix="u")
    replayed = Server(0, 1, None).engine
    stats = wal.replay_into(replayed, wal.replay(path))
    assert stats.applied == len(list(wal.replay(path))) and stats.duplicates == 0
    assert_same_tables([direct.engine], [replayed], SPECS)
    for spec in SPECS:
        assert replayed.table(spec.name).version == direct.engine.table(spec.name).version
    # Replayed twice: every id is remembered, nothing changes.
    again = wal.replay_into(replayed, wal.replay(path))
    assert again.applied == 0 and again.duplicates == stats.applied
    assert_same_tables([direct.engine], [replayed], SPECS)


def test_replay_restores_version_order(tmp_path):
    """Concurrent writes can reach the log out of order; replay applies them in version order."""
    records: list[dict] = []

    class Collect:
        def append(self, rec):
            records.append(msgpack.unpackb(wal.encode_frame(rec)[1]))  # as replay returns it

    direct = Server(0, 1, Collect())
    drive([direct], steps=6, seed=3, prefix="u")
    rng = np.random.default_rng(0)
    swapped = list(records)
    for i in rng.choice(len(swapped) - 1, len(swapped) // 3, replace=False):
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    replayed = Server(0, 1, None).engine
    stats = wal.replay_into(replayed, swapped)
    assert stats.late == 0
    assert_same_tables([direct.engine], [replayed], SPECS)


@pytest.mark.parametrize("new_shards", [1, 2, 3])
def test_checkpoint_plus_wal_recovers_every_acknowledged_write(tmp_path, new_shards):
    """Two shards log to generation 0, checkpoint 1 is cut (logs rotate while frozen), more
    writes go to generation 1; a crash loses the memory. Checkpoint 1 + every log of generation
    >= 1, replayed into 2 or 3 new shards, equals the shards that never crashed. Writes applied
    before the cut but logged after it (a straddler) are skipped by their ids."""
    logs = [wal.WriteAheadLog(wal.wal_path(tmp_path / f"wal{i}", 0), sync="group") for i in range(2)]
    servers = [Server(i, 2, log) for i, log in enumerate(logs)]
    drive(servers, steps=4, seed=4, prefix="a")
    # A straddler: applied before the cut, its record appended after the rotation.
    keys = np.arange(0, 40, 2)
    straddler = (keys, torch.ones(len(keys), 6), 0.1, "straddle:0")
    version, _, _ = servers[0].engine.update("adam", *straddler)
    freezes = [snapshot.ShardFreeze(s.engine).acquire() for s in servers]
    snapshots = [snapshot.snapshot_shard(s.engine, freeze=f) for s, f in zip(servers, freezes)]
    for i, log in enumerate(logs):
        log.rotate(wal.wal_path(tmp_path / f"wal{i}", 1))
    for f in freezes:
        f.release()
    logs[0].append(wal.update_record("adam", *straddler, version))
    drive(servers, steps=5, seed=5, prefix="b")
    staging = ck.begin_checkpoint(ck.checkpoint_dir(tmp_path / "ckpt", 1))
    path = ck.commit_checkpoint(staging, [ck.write_shard(s, staging) for s in snapshots], {"version": 1})
    for i in range(2):
        assert [p.name for p in wal.prune_wal(tmp_path / f"wal{i}", 1)] == ["wal-0.log"]
    drive(servers, steps=2, seed=6, prefix="c")
    for log in logs:
        log.close()

    recovered = [ck.load_shard(ck.latest_checkpoint(tmp_path / "ckpt"), i, new_shards) for i in range(new_shards)]
    total = wal.ReplayStats()
    for engine in recovered:
        for i in range(2):  # each old shard's logs, one after the other
            stats = wal.replay_into(engine, wal.replay_dir(tmp_path / f"wal{i}", since=1))
            total.duplicates += stats.duplicates
    assert_same_tables([s.engine for s in servers], recovered, SPECS)
    assert total.duplicates >= 1  # the straddler, in the checkpoint and in generation 1
    if new_shards == 2:  # same layout: the versions too
        for spec in SPECS:
            assert [e.table(spec.name).version for e in recovered] == [
                s.engine.table(spec.name).version for s in servers
            ], spec.name
    assert path == ck.latest_checkpoint(tmp_path / "ckpt")


def test_closed_log_refuses_appends(tmp_path):
    log = wal.WriteAheadLog(tmp_path / "wal-0.log")
    log.close()
    with pytest.raises(wal.WalError, match="closed"):
        log.append(wal.drop_record("t"))
    with pytest.raises(ValueError, match="sync must be one of"):
        wal.WriteAheadLog(tmp_path / "wal-1.log", sync="sometimes")


def test_generations(tmp_path):
    for gen in (3, 1, 10):
        with wal.WriteAheadLog(wal.wal_path(tmp_path, gen)) as log:
            log.append(wal.drop_record(f"g{gen}"))
    assert [g for g, _ in wal.wal_files(tmp_path)] == [1, 3, 10]
    assert [r["table"] for r in wal.replay_dir(tmp_path, since=3)] == ["g3", "g10"]
    wal.prune_wal(tmp_path, 10)
    assert [g for g, _ in wal.wal_files(tmp_path)] == [10]


def test_a_restarted_shard_counts_the_call_parts_it_applied_before_it_died(tmp_path):
    """Shard 1 dies after applying its part of a two-part call; restarted, it replays its
    log. The next cut must see that call complete on both shards, as it is, and not wait for
    a part that will never come (it waited out its deadline with every write held)."""
    from memstore.cut import take_cut

    spec = TableSpec("t", num_rows=100, dim=4, optimizer=OptimizerSpec("sgd"))
    grads = torch.ones(2, 4)
    a, b = ShardEngine(0, 2), ShardEngine(1, 2)
    log = wal.WriteAheadLog(wal.wal_path(tmp_path, 0), sync="none")
    b.journal = log.append
    for engine in (a, b):
        engine.create_table(spec)

    def call(group: str) -> None:  # one client call: a part on each shard
        a.update("t", np.array([0, 2]), grads, 0.1, f"{group}/0", group, 2)
        b.update("t", np.array([1, 3]), grads, 0.1, f"{group}/1", group, 2)

    call("before-the-cut")
    _, completed, abandoned = take_cut([a.gate, b.gate], lambda: log.rotate(wal.wal_path(tmp_path, 1)))
    assert (completed, abandoned) == ([], [])  # the cut forgets the groups it saw
    log.append(wal.cut_record())  # as a shard actor marks a completed cut (cut_unfreeze)
    call("after-the-cut")

    def failing_snapshot():  # a cut that fails after this shard rotated: the gates keep their groups
        log.rotate(wal.wal_path(tmp_path, 2))
        raise OSError("no space left on device")

    with pytest.raises(OSError):
        take_cut([a.gate, b.gate], failing_snapshot)
    log.close()

    restarted = ShardEngine(1, 2)
    wal.replay_into(restarted, wal.replay_dir(tmp_path))
    assert torch.equal(restarted.table("t").rows, b.table("t").rows)
    _, completed, abandoned = take_cut([a.gate, restarted.gate], lambda: None, deadline_s=0.5)
    assert (completed, abandoned) == ([], []), "the restarted shard's gate lost (or invented) a part"


def test_a_write_the_disk_refuses_fails_that_append_only(tmp_path):
    """A full disk (here: the file size limit, EFBIG) mid-frame: the partial frame is cut off,
    that append fails, and the log takes the next ones once there is room again."""
    path = tmp_path / "wal-0.log"
    rng = np.random.default_rng(9)
    records = [sample_record(rng, n=64) for _ in range(4)]
    log = wal.WriteAheadLog(path)
    for r in records[:2]:
        log.append(r)
    size = os.path.getsize(path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))  # room for 100 bytes of a ~1.3 KB frame
    try:
        with pytest.raises(wal.WalError, match="File too large"):
            log.append(records[2])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert os.path.getsize(path) == size and log.failed is None
    log.append(records[3])
    log.close()
    assert list(wal.replay(path)) == [as_plain(r) for r in (records[0], records[1], records[3])]


def test_the_directories_a_log_creates_are_made_durable_in_their_parents(tmp_path, monkeypatch):
    """A log fsynced in a directory whose own entry never reached the disk is lost with it
    at a machine crash: every directory made for a log is fsynced into its parent."""
    synced = []
    real = wal.fsync_dir
    monkeypatch.setattr(wal, "fsync_dir", lambda p: (synced.append(Path(p)), real(p)))
    path = tmp_path / "data" / "shard-00000-of-00001" / "wal-0.log"
    with wal.WriteAheadLog(path, sync="always") as log:
        log.append(wal.drop_record("t"))
    assert {tmp_path, tmp_path / "data", path.parent} <= set(synced)
    synced.clear()  # and the directory a checkpoint (a standalone shard's base) is made in
    ck.begin_checkpoint(tmp_path / "data" / "base" / "ckpt-1")
    assert tmp_path / "data" in synced


@pytest.mark.parametrize("sync", ["always", "group"])
def test_a_failed_fdatasync_cuts_off_the_records_nobody_was_told_are_durable(tmp_path, monkeypatch, sync):
    """An fdatasync that fails (EIO: a dying disk) refuses its appends, and the log fails for
    good; the records after the last durable one are cut off the file, so a restart does not
    replay a write its client was told failed. Where the cut fails too, the error says they
    may replay."""
    import errno

    path = tmp_path / "wal-0.log"
    rng = np.random.default_rng(4)
    records = [sample_record(rng, n=32) for _ in range(3)]
    log = wal.WriteAheadLog(path, sync=sync)
    log.append(records[0])
    durable = os.path.getsize(path)
    real, failures = os.fdatasync, [OSError(errno.EIO, "Input/output error")]

    def fdatasync(fd):  # the next sync fails; the cut's own sync finds the disk again
        if failures:
            raise failures.pop()
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(wal.WalError, match=f"Input/output error; the records after byte {durable}, none of them "
                                           "acknowledged, were cut off"):
        log.append(records[1])
    assert os.path.getsize(path) == durable and log.failed is not None
    with pytest.raises(wal.WalError, match="failed earlier"):
        log.append(records[2])
    log.close()
    assert list(wal.replay(path)) == [as_plain(records[0])]

    again = wal.WriteAheadLog(tmp_path / "wal-1.log", sync=sync)
    again.append(records[0])
    failures.extend([OSError(errno.EIO, "Input/output error")] * 2)  # the cut's sync fails too
    with pytest.raises(wal.WalError, match="may still replay at a restart"):
        again.append(records[1])
    again.close()


def test_a_damaged_last_record_of_a_generation_a_newer_one_follows_stops_replay(tmp_path):
    """A log is made durable whole before the next generation begins (rotate): a bad last
    record there is damage (an acknowledged write), not a torn one, and replay stops instead
    of dropping it and applying the next generation on top. In the newest it is torn."""
    rng = np.random.default_rng(6)
    records = [sample_record(rng) for _ in range(4)]
    log = wal.WriteAheadLog(wal.wal_path(tmp_path, 0), sync="always")
    for r in records[:2]:
        log.append(r)
    log.rotate(wal.wal_path(tmp_path, 1))
    for r in records[2:]:
        log.append(r)
    log.close()
    old = wal.wal_path(tmp_path, 0)
    ends = [len(wal.MAGIC)] + [end for end, _ in walfile._frames(old)]
    data = bytearray(old.read_bytes())
    data[-3] ^= 1  # in the last record's payload
    old.write_bytes(bytes(data))
    with pytest.raises(wal.WalError, match=f"wal-0.log: its last record, at offset {ends[1]}, is damaged, and a newer "
                                           "log generation follows it"):
        list(wal.replay_dir(tmp_path))
    assert list(wal.replay_dir(tmp_path, since=1)) == [as_plain(r) for r in records[2:]]  # not read
    os.truncate(old, ends[1])  # the way out the message names
    assert list(wal.replay_dir(tmp_path)) == [as_plain(r) for r in (records[0], *records[2:])]
    newest = wal.wal_path(tmp_path, 1)
    newest.write_bytes(newest.read_bytes()[:-3])  # torn: the newest generation's last write
    assert list(wal.replay_dir(tmp_path)) == [as_plain(r) for r in (records[0], records[2])]


_KEYS2 = np.arange(2, dtype="<i8").tobytes()


@pytest.mark.parametrize("record, why", [
    (5, "a int"),
    ({"kind": "rename", "table": "t"}, "kind 'rename'"),
    ({"kind": "update", "table": "t"}, "missing or mistyped ['dim', 'dtype', 'keys', 'lr', 'values']"),
    ({"kind": "drop", "table": 5, "drop_id": 3}, "missing or mistyped ['table', 'drop_id']"),
    ({"kind": "update", "table": "t", "lr": 0.1, "dtype": "float32", "dim": 2, "keys": _KEYS2, "version": "3",
      "values": np.zeros(4, "<f4").tobytes()}, "mistyped ['version']"),
    ({"kind": "update", "table": "t", "lr": 0.1, "dtype": "float32", "dim": 3, "keys": _KEYS2,
      "values": np.zeros(4, "<f4").tobytes()}, "2 keys x dim 3 with 16 value bytes, not 24"),
    ({"kind": "assign", "table": "t", "keep_state": False, "dtype": "float64", "dim": 2, "keys": _KEYS2,
      "values": np.zeros(4, "<f8").tobytes()}, "dtype 'float64'"),
])
def test_a_whole_frame_that_is_no_record_stops_replay_naming_the_file_and_offset(tmp_path, record, why):
    """A frame whose checksum holds but whose record this version never writes (a writer's
    bug, a newer format): WalError with the file, the offset and what is wrong, not a raw
    KeyError or TypeError from deep in the apply."""
    path = tmp_path / "wal-0.log"
    with wal.WriteAheadLog(path) as log:
        log.append(wal.create_record(TableSpec("t", num_rows=10, dim=2)))
    payload = msgpack.packb(record)
    with open(path, "ab") as f:
        f.write(wal._FRAME.pack(len(payload), zlib.crc32(payload)) + payload)
    end = path.stat().st_size
    with pytest.raises(wal.WalError, match=f"{path}: the record ending at offset {end} .*{re.escape(why)}"):
        wal.replay_into(ShardEngine(), wal.replay(path))
    assert path.stat().st_size == end  # nothing cut off
