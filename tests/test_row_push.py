"""The data-parallel row push (trainer.parallel.DataParallel.push) against real shards.

Run from the repository root:
    .venv/bin/python -m pytest tests/test_row_push.py -q

W worker processes (gloo on loopback) each hold the row gradients of their own positions,
with keys repeated within and across workers. Together they push a step's update, each
worker one piece of it, to `memstore serve` shards; a second store receives the same step as
one plain update of every worker's positions. The gradients are small integers, so their sums
are exact in any order: the tables must then end equal bit for bit, each worker must have
pushed only the keys of its own piece (so no key's gradient twice), and every worker must
get back exactly the rows of its watched keys that the step changed, as the store holds them.
And the workers wait out rank 0's store restore or checkpoint past the groups' timeout.
"""

from __future__ import annotations

import multiprocessing as mp
import socket

import numpy as np
import pytest
import torch

from memstore import MemStoreClient, OptimizerSpec, TableSpec
from memstore.launch import LocalShards

TABLES = ["t0", "t1", "t2"]
ROWS, DIM, POSITIONS = 500, 4, 96
STEPS = 2


def _specs() -> list[TableSpec]:
    return [TableSpec(name, ROWS, DIM, seed=i, optimizer=OptimizerSpec("adam")) for i, name in enumerate(TABLES)]


def _step_input(step: int, rank: int, world: int) -> tuple[np.ndarray, torch.Tensor, dict[str, np.ndarray]]:
    """Rank `rank`'s hash ids (1, P, H), integer gradients (1, P, H, d) and watched keys."""
    rng = np.random.default_rng(1000 * step + rank)
    keys = rng.integers(0, 60, size=(1, POSITIONS, len(TABLES)))  # few distinct keys: many repeats
    keys[..., 2] = world * rng.integers(0, 20, size=(1, POSITIONS))  # head 2: piece 0 only, others push none of it
    grads = torch.from_numpy(rng.integers(-3, 4, size=(1, POSITIONS, len(TABLES), DIM)).astype(np.float32))
    # Rank 1 watches nothing of t1; the others watch keys of every table, some not updated.
    watch = {name: np.unique(rng.integers(0, 80, size=30)) for name in TABLES if not (rank == 1 and name == "t1")}
    return keys, grads, watch


class _Recording:
    """The real client, with every update_many call recorded (what this worker sent)."""

    def __init__(self, client: MemStoreClient) -> None:
        self.client, self.sent = client, []

    def update_many(self, updates, lr, **kw):
        self.sent.append({name: np.asarray(k).copy() for name, (k, _) in updates.items()})
        return self.client.update_many(updates, lr, **kw)

    def spec(self, name):
        return self.client.spec(name)


def _worker(rank: int, world: int, port: int, addresses: list[str], out: str) -> None:
    import torch.distributed as dist

    from trainer.parallel import DataParallel

    torch.set_num_threads(1)
    dp = DataParallel.init(rank, world, f"127.0.0.1:{port}", run_id="pushtest")
    try:
        with MemStoreClient(addresses) as client:
            store = _Recording(client)
            result = []
            for step in range(STEPS):
                keys, grads, watch = _step_input(step, rank, world)
                fresh = dp.push(store, TABLES, keys, grads, 1e-2, watch, dp.update_id(step))
                dist.barrier(group=dp.rows_group)  # every piece applied and answered
                now = {name: client.lookup(name, watch[name]) for name in watch}
                result.append({"fresh": fresh, "now": now, "sent": store.sent})
                store.sent = []
            torch.save(result, out)
    finally:
        dp.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stores():
    with LocalShards(2) as pushed, LocalShards(2) as reference:
        yield pushed, reference


@pytest.mark.parametrize("world", [2, 3])
def test_pieces_add_up_to_one_update(stores, tmp_path, world):
    pushed, reference = stores
    with MemStoreClient(pushed.addresses) as a, MemStoreClient(reference.addresses) as b:
        for client in (a, b):
            for spec in _specs():
                client.drop_table(spec.name)
                client.create_table(spec)
        ctx = mp.get_context("spawn")
        port = _free_port()
        outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
        procs = [ctx.Process(target=_worker, args=(r, world, port, pushed.addresses, str(outs[r])))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0, f"a worker failed (exit {p.exitcode})"
        results = [torch.load(o, weights_only=False) for o in outs]

        for step in range(STEPS):
            inputs = [_step_input(step, r, world) for r in range(world)]
            keys = np.concatenate([k for k, _, _ in inputs], axis=1)  # (1, W*P, H)
            grads = torch.cat([g for _, g, _ in inputs], dim=1)
            b.update_many({name: (keys[..., h], grads[:, :, h]) for h, name in enumerate(TABLES)}, 1e-2)
            for h, name in enumerate(TABLES):
                sent = [np.concatenate([call[name] for call in results[r][step]["sent"] if name in call] or
                                       [np.empty(0, np.int64)]) for r in range(world)]
                for r in range(world):
                    assert (sent[r] % world == r).all(), f"worker {r} pushed keys of another piece of {name}"
                # A piece repeats a key once per worker holding it (the client sums those).
                every = np.concatenate(sent)
                assert np.array_equal(np.unique(every), np.unique(keys[..., h])), f"{name}: pushed keys != the step's keys"
            for r in range(world):
                fresh, now = results[r][step]["fresh"], results[r][step]["now"]
                _, _, watch = inputs[r]
                assert fresh.keys() == watch.keys()
                for h, name in enumerate(TABLES):
                    if name not in watch:
                        continue
                    fk, rows = fresh[name]
                    expect = np.intersect1d(watch[name], keys[..., h])
                    assert np.array_equal(fk, expect), f"rank {r}, {name}: fresh keys"
                    at = np.searchsorted(watch[name], fk)
                    assert torch.equal(rows, torch.from_numpy(now[name][at])), f"rank {r}, {name}: fresh rows"
        for name in TABLES:
            every = np.arange(ROWS)
            assert np.array_equal(a.lookup(name, every), b.lookup(name, every)), name


def _barrier_worker(rank: int, port: int, timeout_s: float | None, out: str) -> None:
    import time

    from trainer.parallel import DataParallel

    dp = DataParallel.init(rank, 2, f"127.0.0.1:{port}", "barrier", timeout_s=2.0)
    try:
        if rank == 0:
            time.sleep(4.0)  # rank 0's store restore or checkpoint, past the groups' timeout
        try:
            dp.barrier(timeout_s)
            outcome = "passed"
        except RuntimeError:
            outcome = "timed out"
        with open(out, "w") as f:
            f.write(outcome)
    finally:
        dp.close()


@pytest.mark.parametrize("timeout_s, outcome", [(30.0, "passed"), (None, "timed out")], ids=["store-wait", "default"])
def test_workers_wait_out_rank_0s_store_work_past_the_groups_timeout(tmp_path, timeout_s, outcome):
    """The others wait at a barrier while rank 0 restores or checkpoints the store: with
    STORE_WAIT_S-like timeouts they outlast the groups' own (2 s here), without they fail."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    outs = [tmp_path / f"rank{r}.txt" for r in range(2)]
    procs = [ctx.Process(target=_barrier_worker, args=(r, port, timeout_s, str(outs[r]))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert outs[1].read_text() == outcome  # rank 1 waited 4 s on rank 0
