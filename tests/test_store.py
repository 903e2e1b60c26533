"""The sharded store against the in-process reference, over real `memstore serve` processes.

Run: python -m pytest tests/test_store.py -q
"""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest
import torch

from memstore import ClientConfig, InProcessStore, InvalidArgument, MemStoreClient, OptimizerSpec, TableSpec
from memstore.lookups import chunks
from memstore.spec import InitSpec

OPTIMIZERS = {
    "adam": OptimizerSpec("adam", weight_decay=0.01),
    "adagrad": OptimizerSpec("adagrad"),
    "sgd": OptimizerSpec("sgd", momentum=0.9),
}


def zipf_keys(rng: np.random.Generator, n: int, num_rows: int, shape=None) -> np.ndarray:
    """Keys with many repeats, as N-gram hash ids are: Zipfian ranks scattered over the table."""
    ranks = np.minimum(rng.zipf(1.3, n), num_rows) - 1
    perm = np.random.default_rng(7).permutation(num_rows)
    keys = perm[ranks]
    return keys.reshape(shape) if shape else keys


def run_mixed(store, spec: TableSpec, steps: int, seed: int) -> list[np.ndarray]:
    """Creates the table, then alternates lookups and updates; returns every lookup."""
    rng = np.random.default_rng(seed)
    store.create_table(spec)
    seen = []
    for step in range(steps):
        keys = zipf_keys(rng, 600, spec.num_rows, shape=(20, 30))
        seen.append(np.asarray(store.lookup(spec.name, keys)))
        grads = rng.standard_normal((20, 30, spec.dim)).astype(np.float32)
        store.update(spec.name, keys, grads, lr=0.01 * (1 + step % 3))
    seen.append(np.asarray(store.lookup(spec.name, np.arange(spec.num_rows))))
    return seen


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_three_shards_match_in_process_reference(shards_3, kind):
    spec = TableSpec(f"mixed.{kind}", num_rows=5003, dim=16, seed=11, optimizer=OPTIMIZERS[kind])
    with MemStoreClient(shards_3.addresses) as client, InProcessStore() as ref:
        remote = run_mixed(client, spec, steps=6, seed=3)
        local = run_mixed(ref, spec, steps=6, seed=3)
        client.drop_table(spec.name)
    for i, (r, l) in enumerate(zip(remote, local)):
        # Same engine, same gradient sums, same order of float operations: bit-identical.
        np.testing.assert_array_equal(r, l, err_msg=f"lookup {i} differs")


@pytest.mark.parametrize("dtype,wire_dtype,stochastic", [
    ("bfloat16", "float32", False), ("bfloat16", "bfloat16", False), ("float16", "float16", False),
    ("bfloat16", "float32", True), ("float16", "float16", True),  # the same noise on 2 shards as on 1
])
def test_two_shards_16_bit_storage_match_reference(shards_2, dtype, wire_dtype, stochastic):
    spec = TableSpec(f"mixed.{dtype}.{wire_dtype}.{stochastic}", num_rows=2048, dim=8, dtype=dtype,
                     wire_dtype=wire_dtype, optimizer=OptimizerSpec("adagrad", stochastic_rounding=stochastic))
    with MemStoreClient(shards_2.addresses) as client, InProcessStore() as ref:
        remote = run_mixed(client, spec, steps=4, seed=5)
        local = run_mixed(ref, spec, steps=4, seed=5)
        client.drop_table(spec.name)
    for i, (r, l) in enumerate(zip(remote, local)):
        np.testing.assert_array_equal(r, l, err_msg=f"lookup {i} differs")


def test_rows_do_not_depend_on_shard_count(shards_2, shards_3):
    spec = TableSpec("init.same", num_rows=3001, dim=12, seed=99, init=InitSpec("uniform", bound=0.5))
    keys = np.arange(spec.num_rows)
    with MemStoreClient(shards_2.addresses) as two, MemStoreClient(shards_3.addresses) as three, InProcessStore() as one:
        rows = []
        for store in (one, two, three):
            store.create_table(spec)
            rows.append(store.lookup(spec.name, keys))
        two.drop_table(spec.name)
        three.drop_table(spec.name)
    np.testing.assert_array_equal(rows[0], rows[1])
    np.testing.assert_array_equal(rows[0], rows[2])
    assert np.abs(rows[0]).max() <= 0.5 and rows[0].std() > 0.2


def test_a_lookup_asks_only_the_shards_holding_its_keys(shards_2):
    """Rows in replies: a shard none of the keys live on is not asked, so a lookup does not
    wait on it (here stopped, as a wedged or crowded shard)."""

    spec = TableSpec("one-sided", num_rows=100, dim=4, seed=2)
    with MemStoreClient(shards_2.addresses, ClientConfig(shared_memory=False, timeout_s=5, retry_s=0)) as client:
        client.create_table(spec)
        full = client.lookup("one-sided", np.arange(100))
        os.kill(shards_2.procs[0].pid, signal.SIGSTOP)
        try:
            np.testing.assert_array_equal(client.lookup("one-sided", [1, 7, 99, 7]), full[[1, 7, 99, 7]])
        finally:
            os.kill(shards_2.procs[0].pid, signal.SIGCONT)
        client.drop_table("one-sided")


def test_lookup_shapes_and_key_types(shards_2):
    spec = TableSpec("shapes", num_rows=100, dim=4, seed=1)
    with MemStoreClient(shards_2.addresses) as client:
        client.create_table(spec)
        full = client.lookup("shapes", np.arange(100))
        for keys in ([3, 3, 97], np.array([[5, 6], [7, 5]], dtype=np.int32), torch.tensor([[1], [2]]),
                     np.array([], dtype=np.int64), np.uint16(42)):
            rows = client.lookup("shapes", keys)
            k = np.asarray(keys.numpy() if isinstance(keys, torch.Tensor) else keys)
            assert rows.shape == k.shape + (4,)
            np.testing.assert_array_equal(rows, full[k.astype(np.int64)])
        t = client.lookup("shapes", [1, 2], as_tensor=True)
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
        assert client.lookup_async("shapes", [9]).result().shape == (1, 4)
        client.drop_table("shapes")


def test_large_batches_are_split_below_message_limits(shards_2):
    # 40,000 keys x 256 float32 = 40 MiB of rows: far above gRPC's 4 MiB default and above
    # one request's 12 MiB cap, so the client must split both lookups and updates.
    spec = TableSpec("big", num_rows=50_000, dim=256, init=InitSpec("zeros"), optimizer=OptimizerSpec("sgd"))
    keys = np.random.default_rng(0).permutation(50_000)[:40_000]
    grads = np.ones((len(keys), 256), dtype=np.float32)
    with MemStoreClient(shards_2.addresses) as client:
        client.create_table(spec)
        client.update("big", keys, grads, lr=0.5)
        rows = client.lookup("big", keys)
        assert rows.shape == (40_000, 256)
        assert (rows == -0.5).all()
        info = client.describe("big")
        assert sum(i.local_rows for i in info) == 50_000
        assert all(i.version >= 2 for i in info)  # at least two chunks per shard
        client.drop_table("big")


def test_a_shards_part_goes_in_the_fewest_near_equal_requests(shards_2):
    # Rows of 16 bytes, at most 100 rows a request. Shard 0 owns 201 of the keys, shard 1
    # owns 100: three requests of 67 rows to shard 0 (not 100, 100 and a straggler of 1),
    # one of 100 to shard 1, for lookups and updates alike.
    assert [len(c) for c in chunks(np.arange(201), 16, 100 * 16)] == [67, 67, 67]
    assert [len(c) for c in chunks(np.arange(202), 16, 100 * 16)] == [67, 67, 68]
    assert [len(c) for c in chunks(np.arange(100), 16, 100 * 16)] == [100]
    assert chunks(np.arange(0), 16, 100 * 16) == []
    # Rows of 2 bytes: their 8-byte keys are what must fit (they dwarf the rows).
    assert [len(c) for c in chunks(np.arange(300), 2, 100 * 16)] == [150, 150]
    spec = TableSpec("split", num_rows=1000, dim=4, init=InitSpec("zeros"), optimizer=OptimizerSpec("sgd"))
    keys = np.concatenate([np.arange(0, 402, 2), np.arange(1, 200, 2)])
    config = ClientConfig(max_request_bytes=100 * 16, shared_memory=False)

    def calls(client, method):  # (calls, rows) per shard
        return [next((m.calls, m.rows) for m in s.methods if m.method == method) for s in client.stats()]

    with MemStoreClient(shards_2.addresses, config) as client:
        client.create_table(spec)
        before = calls(client, "Lookup"), calls(client, "Update")
        client.update("split", keys, np.ones((len(keys), 4), np.float32), lr=1.0)
        assert (client.lookup("split", keys) == -1.0).all()
        for method, was in zip(("Lookup", "Update"), before):
            got = [(c - c0, r - r0) for (c, r), (c0, r0) in zip(calls(client, method), was)]
            assert got == [(3, 201), (1, 100)], method
        client.drop_table("split")


def test_duplicate_gradients_are_summed(shards_2):
    spec = TableSpec("dups", num_rows=10, dim=3, init=InitSpec("zeros"), optimizer=OptimizerSpec("sgd"))
    with MemStoreClient(shards_2.addresses) as client:
        client.create_table(spec)
        keys = np.array([4, 4, 4, 7])
        grads = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 2], [1, 1, 1]], dtype=np.float32)
        assert client.update("dups", keys, grads, lr=1.0) == 2
        rows = client.lookup("dups", [4, 7, 0])
        np.testing.assert_array_equal(rows, [[-1, -1, -2], [-1, -1, -1], [0, 0, 0]])
        client.drop_table("dups")


def test_assign_writes_rows_verbatim_and_resets_state(shards_3):
    spec = TableSpec("assign", num_rows=30, dim=5, optimizer=OptimizerSpec("adagrad"))
    rng = np.random.default_rng(1)
    with MemStoreClient(shards_3.addresses) as client, InProcessStore() as ref:
        for store in (client, ref):
            store.create_table(spec)
            store.update("assign", np.arange(30), np.ones((30, 5), np.float32), lr=0.1)
        values = rng.standard_normal((7, 5)).astype(np.float32)
        keys = np.array([29, 0, 3, 4, 5, 17, 11])
        for store in (client, ref):
            store.assign("assign", keys, values)
            np.testing.assert_array_equal(store.lookup("assign", keys), values)
            store.update("assign", np.arange(30), np.ones((30, 5), np.float32), lr=0.1)
        np.testing.assert_array_equal(client.lookup("assign", np.arange(30)), ref.lookup("assign", np.arange(30)))
        client.drop_table("assign")


@pytest.mark.parametrize("shared_memory", [True, False], ids=["delivered", "replied"])
def test_concurrent_lookups_never_see_torn_rows(shards_2, shared_memory):
    # Every update moves each row by the same amount in all columns, so a row read half
    # before and half after an update would hold two different values.
    # Wide rows make each row's write long enough for a lock-free read to catch it midway.
    dim = 65536
    spec = TableSpec("torn", num_rows=16, dim=dim, init=InitSpec("zeros"), optimizer=OptimizerSpec("sgd"))
    keys = np.arange(16)
    grads = np.ones((16, dim), dtype=np.float32)
    stop = threading.Event()
    errors: list[str] = []

    with MemStoreClient(shards_2.addresses, ClientConfig(shared_memory=shared_memory)) as client:
        client.create_table(spec)

        def writer():
            while not stop.is_set():
                client.update("torn", keys, grads, lr=1.0)

        def reader():
            for _ in range(60):
                rows = client.lookup("torn", keys)
                spread = rows.max(axis=1) - rows.min(axis=1)
                if (spread != 0).any():
                    errors.append(f"row {int(np.argmax(spread))} torn: spread {spread.max()}")
                    return

        threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join()
        stop.set()
        threads[0].join()
        final = client.lookup("torn", keys)
        client.drop_table("torn")
    assert not errors, errors
    assert final.min() < -1  # the writer really ran during the reads


@pytest.mark.parametrize("where", ["client", "in-process"])
def test_async_calls_copy_their_inputs(shards_2, where):
    """A caller may refill its buffers as soon as an *_async call returns (a prefetcher
    reuses one key buffer per step): each call keeps the inputs it was given. The calls
    may run in any order, so each updates its own keys, once."""
    spec = TableSpec("refilled", num_rows=400, dim=8, seed=5, optimizer=OptimizerSpec("adagrad"))
    store = MemStoreClient(shards_2.addresses) if where == "client" else InProcessStore()
    with store, InProcessStore() as ref:
        for s in (store, ref):
            s.create_table(spec)
        initial = ref.lookup(spec.name, np.arange(400))
        rng = np.random.default_rng(0)
        steps = [(k, rng.standard_normal((32, 8)).astype(np.float32)) for k in np.split(rng.permutation(400)[:384], 12)]
        keys, grads = np.empty(32, np.int64), torch.empty(32, 8)
        updates, lookups = [], []
        for k, g in steps:
            keys[:], grads[:] = k, torch.from_numpy(g)
            updates.append(store.update_async(spec.name, keys, grads, lr=0.1))
            lookups.append(store.lookup_async(spec.name, keys))
        keys[:] = 0
        for (k, g), f in zip(steps, updates):
            ref.update(spec.name, k, g, lr=0.1)
            assert f.result() == 32
        final = ref.lookup(spec.name, np.arange(400))
        np.testing.assert_array_equal(store.lookup(spec.name, np.arange(400)), final)
        for (k, _), f in zip(steps, lookups):  # each row read before or after its one update
            rows = f.result()
            assert ((rows == initial[k]).all(1) | (rows == final[k]).all(1)).all()
        store.drop_table(spec.name)


def test_client_config_values_are_checked():
    for bad, field in ((dict(timeout_s=0), "timeout_s"), (dict(retry_s=float("inf")), "retry_s"),
                       (dict(backoff_s=(2.0, 1.0)), "backoff_s"), (dict(max_request_bytes=0), "max_request_bytes"),
                       (dict(max_request_bytes=1 << 30), "max_request_bytes")):
        with pytest.raises(InvalidArgument, match=f"ClientConfig.{field} = "):
            ClientConfig(**bad)


def test_a_shard_server_on_a_taken_port_fails_naming_it():
    from memstore.engine import ShardEngine
    from memstore.server import ShardServer

    first = ShardServer(ShardEngine(0, 1)).start()
    try:
        with pytest.raises(OSError, match=f"could not bind 127.0.0.1:{first.port} \\(in use"):
            ShardServer(ShardEngine(0, 1), port=first.port)
    finally:
        first.stop(0)
