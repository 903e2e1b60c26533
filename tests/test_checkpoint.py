"""Checkpoints: a cut of every shard written, committed and restored, also with another shard count.

Run: python -m pytest tests/test_checkpoint.py -q

Real files under tmp_path; crashes are real (a writer killed with SIGKILL) or are the files
such a crash leaves behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from memstore import checkpoint as ck
from memstore import snapshot
from memstore.engine import ShardEngine
from memstore.spec import InitSpec, OptimizerSpec, TableSpec

REPO = Path(__file__).resolve().parents[1]
SPECS = [
    TableSpec("adam.f32", num_rows=1009, dim=8, seed=1, optimizer=OptimizerSpec("adam", weight_decay=0.01)),
    TableSpec("adagrad/bf16", num_rows=503, dim=4, dtype="bfloat16", seed=2, optimizer=OptimizerSpec("adagrad")),
    TableSpec("sgd:momentum", num_rows=211, dim=5, seed=3, optimizer=OptimizerSpec("sgd", momentum=0.9)),
    TableSpec("adam.bf16.wire32", num_rows=97, dim=3, dtype="bfloat16", wire_dtype="float32", seed=4),
    TableSpec("sgd.plain.f16", num_rows=64, dim=2, dtype="float16", init=InitSpec("uniform", bound=0.1)),
    TableSpec("adam.bf16.stochastic", num_rows=151, dim=6, dtype="bfloat16", seed=5,
              optimizer=OptimizerSpec("adam", stochastic_rounding=True)),
    TableSpec("adagrad.f16.stochastic", num_rows=89, dim=3, dtype="float16", seed=6,
              init=InitSpec("uniform", bound=1e-4), optimizer=OptimizerSpec("adagrad", stochastic_rounding=True)),
]


def make_engines(num_shards: int, specs=SPECS) -> list[ShardEngine]:
    engines = [ShardEngine(i, num_shards) for i in range(num_shards)]
    for e in engines:
        for spec in specs:
            e.create_table(spec)
    return engines


def route(engines, name, keys, values, fn, uid):
    """Sends keys (and their values) to the shards that own them, as the client would."""
    results = []
    for e in engines:
        mine = keys % e.num_shards == e.shard_index
        if mine.any():
            results.append(fn(e, name, keys[mine], values[torch.from_numpy(mine)], f"{uid}:{e.shard_index}"))
    return results


def drive(engines, steps: int, seed: int, specs=SPECS) -> None:
    """Updates with ids, and one assign per table, on every table."""
    rng = np.random.default_rng(seed)
    for step in range(steps):
        for spec in specs:
            keys = rng.choice(spec.num_rows, min(spec.num_rows, 60), replace=False)
            grads = torch.from_numpy(rng.standard_normal((len(keys), spec.dim)).astype(np.float32))
            grads = grads.to(spec.wire_torch_dtype)
            route(engines, spec.name, keys, grads, lambda e, n, k, g, u: e.update(n, k, g, 0.05, u), f"s{seed}.{step}")
            if step == 1:
                rows = torch.from_numpy(rng.standard_normal((5, spec.dim)).astype(np.float32))
                route(engines, spec.name, keys[:5], rows,
                      lambda e, n, k, v, u: e.assign(n, k, v, keep_state=False, update_id=u), f"a{seed}")  # fmt: skip


def bits(t: torch.Tensor) -> np.ndarray:
    """A tensor's exact values as numpy (16-bit floats as their bit patterns)."""
    return t.view(torch.int16).numpy() if t.element_size() == 2 and t.is_floating_point() else t.numpy()


def global_table(engines: list[ShardEngine], name: str) -> dict[str, np.ndarray]:
    """Rows and every state tensor of a table, reassembled in global key order."""
    num_shards = engines[0].num_shards
    out: dict[str, np.ndarray] = {}
    for e in engines:
        t = e.table(name)
        for key, tensor in (("rows", t.rows), *t.state.items()):
            if key not in out:
                out[key] = np.zeros((t.spec.num_rows, *tensor.shape[1:]), dtype=bits(tensor).dtype)
            out[key][e.shard_index :: num_shards] = bits(tensor)
    return out


def assert_same_tables(a: list[ShardEngine], b: list[ShardEngine], specs=SPECS) -> None:
    for spec in specs:
        ta, tb = global_table(a, spec.name), global_table(b, spec.name)
        assert set(ta) == set(tb), f"{spec.name}: state {sorted(ta)} vs {sorted(tb)}"
        for key in ta:
            if not np.array_equal(ta[key], tb[key]):
                diff = np.abs(ta[key].astype(np.float64) - tb[key].astype(np.float64))
                pytest.fail(f"{spec.name}.{key} differs: max |diff| {diff.max()}, mean {diff.mean()} (bit patterns)")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two shards after some updates, checkpointed once."""
    root = tmp_path_factory.mktemp("ckpt")
    engines = make_engines(2)
    drive(engines, steps=4, seed=0)
    path = ck.save_checkpoint(engines, ck.checkpoint_dir(root, 1), {"name": "test", "version": 1})
    return root, path, engines


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_restore_reproduces_every_row_and_state(saved, num_shards):
    root, path, engines = saved
    assert ck.latest_checkpoint(root) == path
    restored = [ck.load_shard(path, i, num_shards) for i in range(num_shards)]
    assert_same_tables(engines, restored)
    for spec in SPECS:
        old = [e.table(spec.name).version for e in engines]
        new = [e.table(spec.name).version for e in restored]
        # Same layout: each shard's own version; another layout: the largest old one.
        assert new == (old if num_shards == 2 else [max(old)] * num_shards), spec.name


def test_the_same_updates_give_the_same_bits_on_any_shard_count_and_after_a_restore(tmp_path):
    """Rows, optimizer state and stochastic rounding's noise depend on keys, never on the
    layout: 1 and 3 shards driven alike hold the same bits, and so do 3 shards restored
    into 2 and driven on."""
    one, three = make_engines(1), make_engines(3)
    for engines in (one, three):
        drive(engines, steps=3, seed=11)
    assert_same_tables(one, three)
    path = ck.save_checkpoint(three, ck.checkpoint_dir(tmp_path, 1), {"name": "test", "version": 1})
    two = [ck.load_shard(path, i, 2) for i in range(2)]
    for engines in (one, two):
        drive(engines, steps=2, seed=12)
    assert_same_tables(one, two)


def test_manifest_and_memory_mapped_files(saved):
    root, path, engines = saved
    manifest = ck.read_manifest(path)
    assert manifest["store"]["name"] == "test" and manifest["store"]["num_shards"] == 2
    assert set(manifest["tables"]) == {s.name for s in SPECS}
    shard = path / ck.shard_dirname(1, 2)
    bf16 = np.load(shard / "adagrad%2Fbf16.rows.npy", mmap_mode="r")
    assert bf16.dtype == np.int16  # bfloat16 travels as its bit pattern
    np.testing.assert_array_equal(bf16, bits(engines[1].table("adagrad/bf16").rows))
    steps = np.load(shard / "adam.f32.state.step.npy", mmap_mode="r")
    np.testing.assert_array_equal(steps, engines[1].table("adam.f32").state["step"].numpy())


@pytest.mark.parametrize("num_shards", [2, 3])
def test_update_ids_survive_restore(saved, num_shards):
    """A retried update after a restore is acknowledged as a duplicate and not applied again."""
    _, path, engines = saved
    restored = [ck.load_shard(path, i, num_shards) for i in range(num_shards)]
    before = global_table(restored, "adam.f32")
    rng = np.random.default_rng(0)  # drive()'s first update of adam.f32: ids "s0.0:<old shard>"
    keys = rng.choice(1009, 60, replace=False)
    grads = torch.ones(60, 8)
    for old_shard in range(2):
        mine = keys % 2 == old_shard
        for e in restored:
            part = mine & (keys % num_shards == e.shard_index)
            if part.any():
                _, dup, _ = e.update("adam.f32", keys[part], grads[torch.from_numpy(part)], 0.05, f"s0.0:{old_shard}")
                assert dup, f"update s0.0:{old_shard} was applied again on shard {e.shard_index}"
    after = global_table(restored, "adam.f32")
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    _, dup, _ = restored[0].update("adam.f32", keys[keys % num_shards == 0][:1], grads[:1], 0.05, "fresh")
    assert not dup


def test_checksum_mismatch_names_the_file(tmp_path):
    engines = make_engines(2)
    drive(engines, steps=1, seed=5)
    path = ck.save_checkpoint(engines, tmp_path / "ckpt-1")
    bad = path / ck.shard_dirname(0, 2) / "sgd%3Amomentum.state.momentum_buffer.npy"
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0x40  # one bit of the last value
    bad.write_bytes(bytes(data))
    for num_shards in (2, 1):
        with pytest.raises(ck.CheckpointError, match="checksum mismatch") as err:
            ck.load_shard(path, 0, num_shards)
        assert err.value.path == bad and str(bad) in str(err.value)
    ck.load_shard(path, 0, 2, verify=False)  # the caller may skip the check

    meta = path / ck.shard_dirname(1, 2) / ck.SHARD_MANIFEST
    meta.write_bytes(meta.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ck.CheckpointError, match="checksum mismatch") as err:
        ck.load_shard(path, 1, 2, verify=False)
    assert err.value.path == meta


def test_snapshot_is_consistent_with_concurrent_updates(tmp_path):
    """Rows, version and remembered ids are taken at one instant: each update adds 1 to every
    row, so a restored row equals its initial value plus the restored version."""
    spec = TableSpec("count", num_rows=64, dim=4, init=InitSpec("zeros"), optimizer=OptimizerSpec("sgd"))
    engine = make_engines(1, [spec])[0]
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            engine.update("count", np.arange(64), -torch.ones(64, 4), 1.0, f"w:{n}")
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        paths = [ck.save_checkpoint([engine], ck.checkpoint_dir(tmp_path, v), {"version": v}) for v in range(1, 6)]
    finally:
        stop.set()
        thread.join()
    for p in paths:
        t = ck.load_shard(p, 0, 1).table("count")
        assert torch.equal(t.rows, torch.full((64, 4), float(t.version))), p
        assert list(t.applied_ids) == [f"w:{n}" for n in range(t.version)], p
    assert ck.latest_checkpoint(tmp_path) == paths[-1]


def test_progress_reaches_total(saved, tmp_path):
    _, _, engines = saved
    seen: list[tuple[int, int]] = []
    path = ck.save_checkpoint(engines, tmp_path / "ckpt-9", progress=lambda d, t: seen.append((d, t)))
    assert seen and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    loaded: list[tuple[int, int]] = []
    ck.load_shard(path, 1, 3, progress=lambda d, t: loaded.append((d, t)))
    assert loaded[-1][0] == loaded[-1][1] > 0


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    from memstore import checkpoint as ck
    from tests.test_checkpoint import make_engines, drive

    engines = make_engines(2)
    drive(engines, steps=2, seed=9)

    def progress(done, total):
        if done * 2 >= total:  # halfway through the files: say so, then wait to be killed
            print("midway", flush=True)
            time.sleep(60)

    ck.save_checkpoint(engines, ck.checkpoint_dir({root!r}, 2), {{"version": 2}}, progress=progress)
    """
)


def test_writer_killed_midway_leaves_previous_checkpoint(tmp_path):
    engines = make_engines(2)
    drive(engines, steps=3, seed=1)
    first = ck.save_checkpoint(engines, ck.checkpoint_dir(tmp_path, 1), {"version": 1})
    script = _KILLED_WRITER.format(repo=str(REPO), root=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "midway"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and leftovers[0].startswith("ckpt-2.tmp-"), leftovers
    assert not (tmp_path / "ckpt-2").exists()
    assert ck.latest_checkpoint(tmp_path) == first
    assert_same_tables(engines, [ck.load_shard(first, i, 2) for i in range(2)])
    # The next attempt at version 2 succeeds; pruning removes the leftover.
    second = ck.save_checkpoint(engines, ck.checkpoint_dir(tmp_path, 2), {"version": 2})
    assert ck.latest_checkpoint(tmp_path) == second
    removed = ck.prune_checkpoints(tmp_path, keep=1, remove_staging=True)
    assert sorted(p.name for p in removed) == sorted(["ckpt-1", *leftovers])


def test_crash_leftovers_between_the_steps_of_a_commit(tmp_path):
    """What a crash leaves at each step of commit: LATEST keeps naming a loadable checkpoint."""
    engines = make_engines(1)
    drive(engines, steps=2, seed=3)
    first = ck.save_checkpoint(engines, ck.checkpoint_dir(tmp_path, 1), {"version": 1})
    drive(engines, steps=1, seed=4)

    # Killed before MANIFEST: a staging directory with some shard files.
    staging = ck.begin_checkpoint(ck.checkpoint_dir(tmp_path, 2))
    summary = ck.write_shard(snapshot.snapshot_shard(engines[0]), staging)
    assert ck.latest_checkpoint(tmp_path) == first
    # Killed after the rename, before LATEST moved: LATEST still names the first, which loads.
    second = ck.commit_checkpoint(staging, [summary], {"version": 2}, set_latest=False)
    assert (second / ck.MANIFEST).is_file() and ck.latest_checkpoint(tmp_path) == first
    ck.load_shard(first, 0, 1)
    # Killed while writing LATEST's temporary file: a stray LATEST.tmp-* changes nothing.
    (tmp_path / f"{ck.LATEST}.tmp-x").write_text("ckpt-")
    assert ck.latest_checkpoint(tmp_path) == first
    # No usable LATEST (lost, or torn): the highest complete ckpt-<n>.
    (tmp_path / ck.LATEST).write_text("ckpt-")
    assert ck.latest_checkpoint(tmp_path) == second
    (tmp_path / ck.LATEST).unlink()
    assert ck.latest_checkpoint(tmp_path) == second
    assert ck.latest_checkpoint(tmp_path / "nothing-here") is None
    assert_same_tables(engines, [ck.load_shard(second, 0, 1)])


def test_commit_refuses_an_incomplete_cut(tmp_path):
    engines = make_engines(2)
    staging = ck.begin_checkpoint(tmp_path / "ckpt-1")
    summary = ck.write_shard(snapshot.snapshot_shard(engines[1]), staging)
    with pytest.raises(ck.CheckpointError, match="not shards 0..0 of 1"):
        ck.commit_checkpoint(staging, [summary], {})
    assert ck.latest_checkpoint(tmp_path) is None
    with pytest.raises(ck.CheckpointError, match="missing"):
        ck.load_shard(staging, 0, 1)


def test_restore_into_a_given_engine_replaces_its_tables(saved):
    _, path, engines = saved
    target = make_engines(2)[0]  # fresh tables of the same names
    assert ck.load_shard(path, 0, 2, engine=target) is target
    assert_same_tables([engines[0]], [target])  # shard 0 only: compare its own rows
    with pytest.raises(Exception, match="not 1 of 2"):
        ck.load_shard(path, 1, 2, engine=target)


def test_a_deletion_a_crash_interrupted_is_finished_by_the_next_prune(tmp_path):
    engines = make_engines(1)
    for v in (1, 2):
        ck.save_checkpoint(engines, ck.checkpoint_dir(tmp_path, v), {"version": v})
    (tmp_path / "ckpt-0.tmp-deleted-0123").mkdir()  # renamed aside, then the process died
    (tmp_path / "ckpt-3.tmp-4567").mkdir()  # a checkpoint being written now: kept
    ck.prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-2", "ckpt-3.tmp-4567"]


def test_a_long_table_name_and_its_fallback_file_name_do_not_collide(tmp_path):
    """A name too long to be a file name is stored under a fallback stem; a table named as
    that stem once was made the checkpoint (and every compaction of a shard) fail."""
    specs = [TableSpec(":" * 128, num_rows=50, dim=2, seed=5), TableSpec("table-00000", num_rows=50, dim=2, seed=6)]
    engines = make_engines(1, specs)
    drive(engines, steps=2, seed=7, specs=specs)
    path = ck.save_checkpoint(engines, ck.checkpoint_dir(tmp_path, 1), {"name": "test", "version": 1})
    assert_same_tables(engines, [ck.load_shard(path, 0, 1)], specs)


def test_a_table_dropped_and_made_again_while_a_cut_lists_the_tables_is_cut_as_it_is_now(tmp_path):
    """Between ShardFreeze's listing of the tables and its locks, another client drops `x`,
    makes it again (dim 4) and writes to `a`: the cut held the old `x` (dim 2) next to a's
    write made after the drop, a state the shard never was in. It lists and locks again."""
    engine = ShardEngine()
    engine.create_table(TableSpec("a", num_rows=10, dim=2))
    engine.create_table(TableSpec("x", num_rows=10, dim=2))
    listing = engine.tables

    def listed_then_changed():
        tables = listing()
        del engine.tables  # once: later listings are the engine's own
        engine.drop_table("x")
        engine.create_table(TableSpec("x", num_rows=10, dim=4))
        engine.update("a", np.arange(3), torch.ones(3, 2), 0.1, "after-the-drop")
        return tables

    engine.tables = listed_then_changed
    path = ck.save_checkpoint([engine], tmp_path / "ckpt", {"version": 1})
    restored = ck.load_shard(path, 0, 1)
    assert restored.table("x").spec.dim == 4
    for name in ("a", "x"):
        assert torch.equal(restored.lookup(name, np.arange(10)), engine.lookup(name, np.arange(10))), name
        assert restored.table(name).version == engine.table(name).version, name


def test_a_commit_that_fails_after_its_rename_says_the_checkpoint_is_whole_and_leaves_no_temporary(tmp_path,
                                                                                                     monkeypatch):
    """The disk refuses LATEST's new contents (full: injected, the one thing faked here) after the
    checkpoint's directory was renamed into place: the error says it is whole and LATEST still
    names the one before (it was a bare OSError, as if nothing were written), and the temporary
    LATEST file is removed (prune_checkpoints removes only directories)."""
    engine = ShardEngine()
    engine.create_table(TableSpec("t", num_rows=10, dim=2))
    first = ck.save_checkpoint([engine], ck.checkpoint_dir(tmp_path, 1), {"version": 1})
    real = ck._write_file

    def full_disk_for_latest(path, data):
        if path.name.startswith(ck.LATEST):
            with open(path, "wb") as f:
                f.write(data[:1])  # begun, then the disk is full
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ck, "_write_file", full_disk_for_latest)
    second = ck.checkpoint_dir(tmp_path, 2)
    with pytest.raises(ck.CheckpointError, match=r"ckpt-2 is written whole, but committing it failed .*No space left"):
        ck.save_checkpoint([engine], second, {"version": 2})
    assert ck.latest_checkpoint(tmp_path) == first
    assert ck.read_manifest(second)["store"]["version"] == 2  # whole: a restore may name it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "ckpt-1", "ckpt-2"]
