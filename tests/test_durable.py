"""A standalone shard's data dir: its log compacted into a base, recovered exactly.

Run: python -m pytest tests/test_durable.py -q

Real files under tmp_path. A "crash" is a copy of the directory taken while its shard still
serves it, recovered by a second engine: with sync "always" every acknowledged write is on disk
by then, and nothing the first would do at a clean shutdown has run. `memstore serve --data-dir` processes
killed with SIGKILL mid-compaction are in tests/test_serve_cli.py.
"""

from __future__ import annotations

import os
import resource
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from memstore import checkpoint as ck
from memstore import wal
from memstore.durable import DurableShard
from memstore.engine import ShardEngine
from memstore.errors import InvalidArgument
from memstore.spec import OptimizerSpec, TableSpec
from test_checkpoint import SPECS, assert_same_tables, drive  # tests/ is on sys.path under pytest


def crashed(directory, into) -> "os.PathLike":
    """The directory's files as a crash would leave them now (its shard keeps serving the original)."""
    shutil.copytree(directory, into)
    return into


def open_shard(directory, shard_index: int = 0, num_shards: int = 1, **kw) -> DurableShard:
    durable = DurableShard(ShardEngine(shard_index, num_shards), directory, **kw)
    durable.recover()
    return durable


def assert_same_shard(a: ShardEngine, b: ShardEngine, specs=SPECS) -> None:
    """Rows, optimizer state, versions and remembered update ids: bit for bit."""
    assert sorted(t.spec.name for t in a.tables()) == sorted(t.spec.name for t in b.tables())
    assert_same_tables([a], [b], specs)
    for spec in specs:
        ta, tb = a.table(spec.name), b.table(spec.name)
        assert (ta.spec, ta.version, list(ta.applied_ids.items())) == (tb.spec, tb.version, list(tb.applied_ids.items()))


def bases(directory) -> list[str]:
    return sorted(p.name for p in (directory / "base").iterdir()) if (directory / "base").is_dir() else []


def test_a_compacted_shard_recovers_every_write_from_its_base_and_the_log_since(tmp_path):
    d = tmp_path / "shard"
    first = open_shard(d, compact_bytes=0)  # compacted by hand here
    for spec in SPECS:
        first.engine.create_table(spec)
    drive([first.engine], steps=3, seed=1)
    before = first.log_bytes()
    base = first.compact()
    assert base.name == "ckpt-1" and ck.read_manifest(base)["kind"] == ck.SHARD_KIND
    # The logs before the base are gone; what a restart replays is the new, empty log.
    assert [g for g, _ in wal.wal_files(d)] == [1] and first.log_bytes() < before // 100
    drive([first.engine], steps=2, seed=2)
    gone = TableSpec("gone", num_rows=30, dim=2)
    first.engine.create_table(gone)
    first.engine.drop_table("gone")
    second = open_shard(crashed(d, tmp_path / "crash"), compact_bytes=0)
    try:
        assert_same_shard(first.engine, second.engine)
        # A retried update (its id remembered from before the base) applies nowhere; another
        # write under its id is refused (the id's digest survived the base too).
        spec, uid = SPECS[0], "s1.0:0"
        assert uid in second.engine.table(spec.name).applied_ids
        keys = np.random.default_rng(1).choice(spec.num_rows, min(spec.num_rows, 60), replace=False)  # drive's first
        grads = torch.ones(len(keys), spec.dim, dtype=spec.wire_torch_dtype)
        _, duplicate, _ = second.engine.update(spec.name, keys, grads, 0.05, uid)
        assert duplicate
        with pytest.raises(InvalidArgument, match=r"update id 's1.0:0' was already applied .* as another write"):
            second.engine.update(spec.name, keys[:3], grads[:3], 0.05, uid)
        assert_same_shard(first.engine, second.engine)
    finally:
        second.close()
        first.close()


def test_a_base_of_one_shard_is_read_back_into_that_shard_only(tmp_path):
    d = tmp_path / "shard"
    durable = open_shard(d, shard_index=1, num_shards=2, compact_bytes=0)
    try:
        for spec in SPECS:
            durable.engine.create_table(spec)
        base = durable.compact()
    finally:
        durable.close()
    again = ck.load_shard(base, 1, 2)
    assert_same_tables([durable.engine], [again])
    with pytest.raises(ck.CheckpointError, match=r"of shard\(s\) \[1\] of 2 alone; shard 0 of 2 needs shard\(s\) \[0\]"):
        ck.load_shard(base, 0, 2)
    with pytest.raises(ck.CheckpointError, match=r"shard 0 of 1 needs shard\(s\) \[0\]"):
        ck.load_shard(base, 0, 1)


def test_a_failed_compaction_keeps_the_old_base_and_every_log(tmp_path):
    d = tmp_path / "shard"
    first = open_shard(d, compact_bytes=0)
    try:
        for spec in SPECS:
            first.engine.create_table(spec)
        drive([first.engine], steps=2, seed=1)
        first.compact()
        drive([first.engine], steps=2, seed=2)
        # The next base's directory cannot be made: a file holds its name.
        blocker = ck.checkpoint_dir(d / "base", 2)
        blocker.write_text("")
        with pytest.raises(ck.CheckpointError, match="already exists"):
            first.compact()
        assert bases(d) == ["LATEST", "ckpt-1", "ckpt-2"]  # no staging left behind
        assert [g for g, _ in wal.wal_files(d)] == [1, 2]  # the log rotated; both kept
        drive([first.engine], steps=2, seed=3)  # writes go on, into log 2
        blocker.unlink()
        second = open_shard(crashed(d, tmp_path / "crash-1"), compact_bytes=0)  # base 1, logs 1 and 2
        assert second.since == 1
        assert_same_shard(first.engine, second.engine)
        second.close()
        # The next compaction takes a generation never used before.
        assert first.compact().name == "ckpt-3"
        assert bases(d) == ["LATEST", "ckpt-3"] and [g for g, _ in wal.wal_files(d)] == [3]
        third = open_shard(crashed(d, tmp_path / "crash-2"), compact_bytes=0)
        assert_same_shard(first.engine, third.engine)
        third.close()
    finally:
        first.close()


@pytest.mark.parametrize("cleanup_fails", [False, True])
def test_a_rotation_that_fails_leaves_no_newer_log_so_a_later_torn_record_is_only_torn(
        tmp_path, monkeypatch, cleanup_fails):
    """The disk fails the directory fsync of the next log's file, once it exists (an I/O error:
    injected, the one thing faked here). Writes go on in the current log; a crash tears its
    last record. Recovery drops that record as torn: the failed rotation removed the newer
    file, which replay took for proof that this log had been closed whole ("damaged", and
    recovery refused). If the file cannot be removed either, the log stops writes instead."""
    d = tmp_path / "shard"
    first = open_shard(d, compact_bytes=0)
    try:
        for spec in SPECS:
            first.engine.create_table(spec)
        drive([first.engine], steps=2, seed=1)
        real = wal.fsync_dir
        failures = iter([OSError(5, "Input/output error")] + [OSError(5, "again")] * cleanup_fails)

        def flaky_fsync_dir(path):
            error = next(failures, None)
            if error is not None:
                raise error
            real(path)

        monkeypatch.setattr(wal, "fsync_dir", flaky_fsync_dir)
        with pytest.raises(OSError, match="Input/output error"):
            first.compact()
        if cleanup_fails:
            with pytest.raises(wal.WalError, match="could not be removed"):
                drive([first.engine], steps=1, seed=2)
            return
        assert [g for g, _ in wal.wal_files(d)] == [0]
        drive([first.engine], steps=2, seed=2)  # acknowledged, into log 0
        crash = crashed(d, tmp_path / "crash")
        head, payload = wal.encode_frame(wal.drop_record("t"))
        with open(wal.wal_path(crash, 0), "ab") as f:
            f.write(head + payload[: len(payload) // 2])  # torn mid-append
        second = open_shard(crash, compact_bytes=0)
        assert_same_shard(first.engine, second.engine)
        second.close()
    finally:
        first.close()


def test_the_log_is_compacted_in_the_background_under_concurrent_writes(tmp_path):
    """Compaction past a tiny threshold, twice or more, while two threads update and one
    creates and drops tables: a recovery then equals the live shard bit for bit."""
    d = tmp_path / "shard"
    durable = open_shard(d, compact_bytes=1)
    engine = durable.engine
    for spec in SPECS:
        engine.create_table(spec)
    stop, errors = threading.Event(), []

    def writer(seed: int) -> None:
        try:
            for step in range(10_000):
                if stop.is_set():
                    return
                drive([engine], steps=1, seed=seed * 100_000 + step)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def tables() -> None:
        try:
            for i in range(1_000_000):
                if stop.is_set():
                    return
                engine.create_table(TableSpec(f"t{i}", num_rows=20, dim=2))
                if i % 2:
                    engine.drop_table(f"t{i - 1}")
                time.sleep(0.002)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)] + [threading.Thread(target=tables)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while durable.compactions < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        assert durable.compactions >= 2
        again = open_shard(crashed(d, tmp_path / "crash"), compact_bytes=0)
        try:
            specs = [t.spec for t in engine.tables()]
            assert_same_shard(engine, again.engine, specs)
        finally:
            again.close()
    finally:
        durable.close()


def test_a_data_dir_of_logs_only_is_compacted_when_served_again(tmp_path):
    """A data dir written before compaction existed (logs only) recovers as before, and the
    watcher compacts it once it is over the threshold."""
    d = tmp_path / "shard"
    d.mkdir()
    log = wal.WriteAheadLog(wal.wal_path(d, 0))
    engine = ShardEngine(0, 1)
    engine.journal = log.append
    for spec in SPECS:
        engine.create_table(spec)
    drive([engine], steps=2, seed=4)
    log.close()
    durable = open_shard(d, compact_bytes=1)
    try:
        assert_same_shard(engine, durable.engine)
        deadline = time.monotonic() + 30
        while not durable.compactions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert durable.compactions and bases(d)[0] == "LATEST"
        assert [g for g, _ in wal.wal_files(d)] == [durable.since]
    finally:
        durable.close()
    again = open_shard(d, compact_bytes=0)
    try:
        assert_same_shard(engine, again.engine)
    finally:
        again.close()


def test_one_process_serves_a_data_dir(tmp_path):
    first = open_shard(tmp_path, compact_bytes=0)
    try:
        with pytest.raises(RuntimeError, match=rf"is in use by another process \(pid {os.getpid()}\)"):
            open_shard(tmp_path, compact_bytes=0)
    finally:
        first.close()
    open_shard(tmp_path, compact_bytes=0).close()  # free again once closed


def test_a_compaction_the_disk_refuses_changes_nothing_and_writes_go_on(tmp_path):
    """Base files the disk will not take (the file size limit: EFBIG, as a full disk gives
    ENOSPC): the compaction fails and leaves no base, writes go on into the log, a crash
    then recovers them all, and the next compaction, with room, succeeds."""
    d = tmp_path / "shard"
    spec = TableSpec("big", num_rows=20_000, dim=8, optimizer=OptimizerSpec("adam"))  # 640 KB of rows
    first = open_shard(d, compact_bytes=0)
    try:
        first.engine.create_table(spec)
        drive([first.engine], steps=2, seed=1, specs=[spec])
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, hard))
        try:
            with pytest.raises(OSError, match="File too large"):
                first.compact()
            drive([first.engine], steps=2, seed=2, specs=[spec])  # small records: the log takes them
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert bases(d) == [] and [g for g, _ in wal.wal_files(d)] == [0, 1] and first.log.failed is None
        second = open_shard(crashed(d, tmp_path / "crash"), compact_bytes=0)
        assert_same_shard(first.engine, second.engine, [spec])
        second.close()
        assert first.compact().name == "ckpt-2" and bases(d) == ["LATEST", "ckpt-2"]
    finally:
        first.close()


def test_recovery_clears_what_an_interrupted_compaction_left(tmp_path):
    """A crash mid-delete of the old base (its MANIFEST may go first), a staging directory,
    a LATEST being replaced: recovery keeps the base LATEST names and removes the rest."""
    d = tmp_path / "shard"
    first = open_shard(d, compact_bytes=0)
    for spec in SPECS:
        first.engine.create_table(spec)
    drive([first.engine], steps=2, seed=1)
    base = first.compact()
    first.close()
    shutil.copytree(base, d / "base" / "ckpt-0")
    (d / "base" / "ckpt-0" / ck.MANIFEST).unlink()
    (d / "base" / "ckpt-2.tmp-0123").mkdir()
    (d / "base" / "LATEST.tmp-4567").write_text("ckpt-2\n")
    again = open_shard(d, compact_bytes=0)
    try:
        assert bases(d) == ["LATEST", base.name]
        assert_same_shard(first.engine, again.engine)
    finally:
        again.close()


def test_no_compaction_starts_without_room_for_its_base(tmp_path, monkeypatch):
    from memstore import durable as durable_module

    d = tmp_path / "shard"
    first = open_shard(d, compact_bytes=0)
    try:
        first.engine.create_table(SPECS[0])
        monkeypatch.setattr(durable_module, "ROOM_BYTES", shutil.disk_usage(d).free + (1 << 30))
        with pytest.raises(durable_module.NoRoom, match="MiB free on .*not compacting"):
            first.compact()
        assert [g for g, _ in wal.wal_files(d)] == [0] and bases(d) == [] and not first.engine.gate.frozen
    finally:
        first.close()


def test_a_failed_log_makes_the_shard_not_serving_and_says_why(tmp_path):
    """The disk under the log goes read-only: the write that meets it applies nowhere, the log
    stops for good, and the shard says so (health NOT_SERVING, Stats, metrics)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from memstore import ClientConfig, MemStoreClient
    from memstore.errors import MemStoreError
    from memstore.server import SERVICE, ShardServer

    durable = open_shard(tmp_path, compact_bytes=0)
    server = ShardServer(durable.engine, "127.0.0.1", 0).start()
    spec = TableSpec("t", num_rows=100, dim=4)

    def health() -> str:
        with grpc.insecure_channel(server.address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    metric = server.servicer.metrics.registry.get_sample_value
    watch_channel = grpc.insecure_channel(server.address)
    watch = health_pb2_grpc.HealthStub(watch_channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with MemStoreClient([server.address], ClientConfig(retry_s=0.5)) as client:
            client.create_table(spec)
            client.update("t", np.arange(10), np.ones((10, 4), np.float32), lr=0.1)
            [stats] = client.stats()
            assert stats.log.bytes > 0 and stats.log.failed == "" and health() == "SERVING"
            assert metric("memstore_log_failed") == 0 and metric("memstore_log_bytes") == stats.log.bytes
            before = client.lookup("t", np.arange(100))
            read_only = os.open(durable.log.path, os.O_RDONLY)
            os.dup2(read_only, durable.log._fd)  # writes fail, and so does cutting the failed one off
            os.close(read_only)
            with pytest.raises(MemStoreError, match="UNAVAILABLE|failed"):
                client.update("t", np.arange(10), np.ones((10, 4), np.float32), lr=0.1)
            np.testing.assert_array_equal(client.lookup("t", np.arange(100)), before)
            [stats] = client.stats()
            assert "Bad file descriptor" in stats.log.failed and health() == "NOT_SERVING"
            assert metric("memstore_log_failed") == 1
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # Watch streams learn it too
        with pytest.raises(wal.WalError, match="nothing to compact until a restart"):
            durable.compact()
        assert "nothing to compact" in durable.state()["compaction_error"]
    finally:
        watch.cancel()
        watch_channel.close()
        server.stop()
        durable.close()


def test_a_log_state_that_cannot_be_read_leaves_stats_health_and_metrics_working(tmp_path):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from memstore import MemStoreClient
    from memstore.server import SERVICE, ShardServer

    durable = open_shard(tmp_path, compact_bytes=0)
    server = ShardServer(durable.engine, "127.0.0.1", 0).start()
    durable.engine.log_state = lambda: {}["no such key"]  # a bug in the host: logged, not fatal
    try:
        with MemStoreClient([server.address]) as client:
            [stats] = client.stats()
        assert not stats.HasField("log")
        with grpc.insecure_channel(server.address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert server.servicer.metrics.registry.get_sample_value("memstore_held_bytes") == 0
    finally:
        server.stop()
        durable.close()


def test_a_create_or_drop_the_disk_refuses_changes_nothing(tmp_path):
    d = tmp_path / "shard"
    first = open_shard(d, compact_bytes=0)
    try:
        kept, new = SPECS[2], TableSpec("new", num_rows=10, dim=2)
        first.engine.create_table(kept)
        size = os.path.getsize(first.log.path)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, hard))  # no room for a record
        try:
            with pytest.raises(wal.WalError, match="File too large"):
                first.engine.create_table(new)
            with pytest.raises(wal.WalError, match="File too large"):
                first.engine.drop_table(kept.name)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert [t.spec.name for t in first.engine.tables()] == [kept.name]
        first.engine.create_table(new)  # the retry creates it, and logs it
        assert first.engine.drop_table(kept.name)
        again = open_shard(crashed(d, tmp_path / "crash"), compact_bytes=0)
        assert [t.spec.name for t in again.engine.tables()] == ["new"]
        again.close()
    finally:
        first.close()


def test_a_drop_id_outlives_a_crash_so_its_retry_drops_nothing(tmp_path):
    d = tmp_path / "shard"
    first = open_shard(d, compact_bytes=0)
    try:
        spec = SPECS[2]
        first.engine.create_table(spec)
        assert first.engine.drop_table(spec.name, "call-1")
        again = open_shard(crashed(d, tmp_path / "crash"), compact_bytes=0)  # crashed before the reply
        try:
            again.engine.create_table(spec)  # created again before the retry arrives
            assert again.engine.drop_table(spec.name, "call-1")  # answered as the first was
            assert [t.spec.name for t in again.engine.tables()] == [spec.name]
            assert again.engine.drop_table(spec.name, "call-2") and not again.engine.tables()
            # A drop that found no table: its retry after a crash and a create drops nothing either.
            assert not again.engine.drop_table(spec.name, "call-5")
        finally:
            again.close()
        fourth = open_shard(crashed(tmp_path / "crash", tmp_path / "crash-2"), compact_bytes=0)  # again's
        try:
            fourth.engine.create_table(spec)
            assert not fourth.engine.drop_table(spec.name, "call-5")  # answered as the first was
            assert [t.spec.name for t in fourth.engine.tables()] == [spec.name]
        finally:
            fourth.close()
        # Past a compaction, whose base replaces the log that held the drop, too.
        first.engine.create_table(SPECS[1])
        assert first.engine.drop_table(SPECS[1].name, "call-3") and not first.engine.drop_table("none", "call-4")
        first.engine.create_table(SPECS[1])
        first.compact()
        third = open_shard(crashed(d, tmp_path / "compacted"), compact_bytes=0)
        try:
            third.engine.create_table(spec)
            assert third.engine.drop_table(SPECS[1].name, "call-3") and not third.engine.drop_table("none", "call-4")
            assert sorted(t.spec.name for t in third.engine.tables()) == sorted([spec.name, SPECS[1].name])
        finally:
            third.close()
    finally:
        first.close()


def test_a_missing_base_stops_recovery_and_deletes_nothing(tmp_path):
    d = tmp_path / "shard"
    first = open_shard(d, compact_bytes=0)
    for spec in SPECS:
        first.engine.create_table(spec)
    drive([first.engine], steps=1, seed=1)
    base = first.compact()
    first.close()
    (base / ck.MANIFEST).rename(tmp_path / "manifest")  # a damaged base
    for _ in range(2):  # a failed recovery leaves the directory free for the next attempt
        with pytest.raises(ck.CheckpointError, match="names ckpt-1, which is not a complete base"):
            open_shard(d, compact_bytes=0)
    assert bases(d) == ["LATEST", "ckpt-1"]
    (d / "base" / ck.LATEST).unlink()  # no base at all, and logs from generation 1 on
    with pytest.raises(ck.CheckpointError, match="oldest log is generation 1 but there is no base"):
        open_shard(d, compact_bytes=0)
    assert bases(d) == ["ckpt-1"] and [g for g, _ in wal.wal_files(d)] == [1]
    (tmp_path / "manifest").rename(base / ck.MANIFEST)
    (d / "base" / ck.LATEST).write_text("ckpt-1\n")
    again = open_shard(d, compact_bytes=0)
    try:
        assert_same_shard(first.engine, again.engine)
    finally:
        again.close()


def test_a_write_that_fails_after_it_was_logged_stops_the_shard_and_its_retry_applies_once(tmp_path, monkeypatch):
    """Its record is in the log, its rows may be half updated (memory ran out inside the
    optimizer; here a raised error): the shard refuses lookups and writes, its log fails
    (health NOT_SERVING), and after a restart the write is there once, its retry a duplicate."""
    from memstore.errors import Unavailable
    from memstore.table import ShardTable

    d = tmp_path / "shard"
    spec = TableSpec("t", num_rows=64, dim=4, optimizer=OptimizerSpec("adam"))
    first = open_shard(d, compact_bytes=0)
    first.engine.create_table(spec)
    keys, grads = np.array([1, 5, 9]), torch.ones(3, 4)
    real = ShardTable.apply
    monkeypatch.setattr(ShardTable, "apply", lambda *a: (_ for _ in ()).throw(MemoryError("k x dim temporaries")))
    with pytest.raises(Unavailable, match="failed after it was logged \\(MemoryError: k x dim temporaries\\)"):
        first.engine.update("t", keys, grads, 0.1, "u1")
    monkeypatch.setattr(ShardTable, "apply", real)
    with pytest.raises(Unavailable, match="refuses calls till then"):
        first.engine.lookup("t", keys)
    with pytest.raises(Unavailable, match="refuses calls till then"):
        first.engine.update("t", keys, grads, 0.1, "u2")
    assert "failed after it was logged" in first.state()["failed"]
    first.close()

    again = open_shard(d, compact_bytes=0)  # the restart
    try:
        reference = ShardEngine(0, 1)
        reference.create_table(spec)
        reference.update("t", keys, grads, 0.1, "u1")
        _, dup, _ = again.engine.update("t", keys, grads, 0.1, "u1")  # the client's retry
        assert dup and again.engine.table("t").version == 1
        np.testing.assert_array_equal(again.engine.lookup("t", np.arange(64)), reference.lookup("t", np.arange(64)))
    finally:
        again.close()


def test_a_base_whose_manifest_is_damaged_or_misnamed_stops_recovery_and_deletes_no_log(tmp_path):
    """The base's MANIFEST says which logs recovery deletes: one flipped bit (version 1 to 3)
    would delete the log holding acknowledged writes. Its crc32 catches that; a base named
    for another version than it holds is refused too; one from before the crc still loads."""
    import msgpack

    d = tmp_path / "shard"
    first = open_shard(d, compact_bytes=0)
    first.engine.create_table(SPECS[0])
    drive([first.engine], steps=1, seed=3, specs=SPECS[:1])
    base = first.compact()
    drive([first.engine], steps=1, seed=4, specs=SPECS[:1])  # in the log after the base only
    first.close()
    manifest_path = base / ck.MANIFEST
    good = manifest_path.read_bytes()
    at = good.find(b"\xa7version\x01")
    flipped = bytearray(good)
    flipped[at + 8] ^= 0x02
    manifest_path.write_bytes(bytes(flipped))
    logs = [g for g, _ in wal.wal_files(d)]
    with pytest.raises(ck.CheckpointError, match="crc32 does not match"):
        open_shard(d, compact_bytes=0)
    manifest = msgpack.unpackb(good)
    manifest["store"]["version"] = 3
    manifest.pop("crc32")
    manifest["crc32"] = __import__("zlib").crc32(msgpack.packb(manifest))
    manifest_path.write_bytes(msgpack.packb(manifest))
    with pytest.raises(ck.CheckpointError, match="names itself version 3"):
        open_shard(d, compact_bytes=0)
    assert [g for g, _ in wal.wal_files(d)] == logs
    manifest = msgpack.unpackb(good)
    manifest.pop("crc32")  # as written before MANIFEST had one
    manifest_path.write_bytes(msgpack.packb(manifest))
    again = open_shard(d, compact_bytes=0)
    try:
        assert_same_shard(again.engine, first.engine, SPECS[:1])  # every write, the log's after the base too
    finally:
        again.close()
