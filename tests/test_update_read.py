"""Updates that read back the rows they changed (`update_read`), over real shard processes.

Run: python -m pytest tests/test_update_read.py -q
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from memstore import ClientConfig, InitSpec, InProcessStore, InvalidArgument, MemStoreClient, OptimizerSpec, TableSpec
from memstore import wire
from memstore.server import CHANNEL_OPTIONS, SERVICE
from memstore.v1 import memstore_pb2 as pb

SPEC = TableSpec("readback", num_rows=4001, dim=8, seed=5, optimizer=OptimizerSpec("adam"))


@pytest.fixture(scope="module")
def stores(shards_3):
    client = MemStoreClient(shards_3.addresses)
    client.create_table(SPEC)
    ref = InProcessStore()
    ref.create_table(SPEC)
    yield client, ref
    client.drop_table(SPEC.name)
    client.close()
    ref.close()


def test_read_back_equals_a_lookup_after_the_update(stores):
    client, ref = stores
    rng = np.random.default_rng(0)
    for step in range(4):
        keys = rng.integers(0, SPEC.num_rows, (6, 50))  # repeats within the batch
        grads = rng.standard_normal((6, 50, SPEC.dim)).astype(np.float32)
        watch = rng.integers(0, SPEC.num_rows, 900)  # some updated, some not, with repeats
        fresh, rows = client.update_read(SPEC.name, keys, grads, 0.01, watch)
        ref_fresh, ref_rows = ref.update_read(SPEC.name, keys, grads, 0.01, watch)
        want = np.intersect1d(np.unique(watch), np.unique(keys))
        np.testing.assert_array_equal(fresh, want)
        np.testing.assert_array_equal(ref_fresh, want)
        assert want.size > 0, "the test should watch some updated keys"
        np.testing.assert_array_equal(rows.numpy(), client.lookup(SPEC.name, want))
        # Same engine and gradient sums as the in-process reference: bit-identical.
        np.testing.assert_array_equal(rows.numpy(), ref_rows.numpy(), err_msg=f"step {step}")


def test_read_back_spans_chunks(shards_3):
    """Split into many requests per shard, every watched, updated key still comes back once."""
    spec = TableSpec("readback.chunked", num_rows=3001, dim=16, seed=1, optimizer=OptimizerSpec("sgd"))
    with MemStoreClient(shards_3.addresses, ClientConfig(max_request_bytes=16 * 4 * 20)) as client:
        client.create_table(spec)
        keys = np.arange(0, 3000, 2)
        fresh, rows = client.update_read(spec.name, keys, np.ones((len(keys), 16), np.float32), 0.5, np.arange(0, 3001, 3))
        np.testing.assert_array_equal(fresh, np.arange(0, 3000, 6))
        np.testing.assert_array_equal(rows.numpy(), client.lookup(spec.name, fresh))
        client.drop_table(spec.name)


def test_tiny_rows_read_back_stay_within_the_message_limit(shards_3):
    """Rows of 2 bytes: a request carries 8 bytes of key and up to 8 of read key a row, so it
    is split until both with the rows fit in twice max_request_bytes (a shard's message
    limit at the largest setting)."""
    spec = TableSpec("readback.tiny", num_rows=3000, dim=1, dtype="float16", init=InitSpec("zeros"),
                     optimizer=OptimizerSpec("sgd"))
    limit = 900
    with MemStoreClient(shards_3.addresses, ClientConfig(max_request_bytes=limit)) as client:
        client.create_table(spec)

        def updates():  # (calls, bytes in) per shard
            return [next((m.calls, m.bytes_in) for m in s.methods if m.method == "Update") for s in client.stats()]

        before = updates()
        keys = np.arange(3000)
        fresh, rows = client.update_read(spec.name, keys, np.ones((3000, 1), np.float32), 0.5, keys)
        np.testing.assert_array_equal(fresh, keys)
        assert (rows.numpy() == -0.5).all()
        for (c0, b0), (c1, b1) in zip(before, updates()):
            assert (b1 - b0) / (c1 - c0) <= 2 * limit + 200, f"{(b1 - b0) / (c1 - c0):.0f} bytes a request"
        client.drop_table(spec.name)


def test_same_update_id_applies_once_and_each_sender_reads_it(stores):
    """Data-parallel workers each send the step's summed update under one id: applied once,
    and every sender's reply carries the updated rows it watches."""
    client, ref = stores
    rng = np.random.default_rng(1)
    keys = rng.choice(SPEC.num_rows, 300, replace=False)
    grads = rng.standard_normal((300, SPEC.dim)).astype(np.float32)
    with MemStoreClient(client.addresses) as other:
        a = client.update_read(SPEC.name, keys, grads, 0.02, keys[:100], update_id="step-7/readback")
        b = other.update_read(SPEC.name, keys, grads, 0.02, keys[50:200], update_id="step-7/readback")
    ref.update(SPEC.name, keys, grads, 0.02)
    np.testing.assert_array_equal(client.lookup(SPEC.name, keys), ref.lookup(SPEC.name, keys))  # applied once
    np.testing.assert_array_equal(a[1].numpy(), ref.lookup(SPEC.name, a[0]))
    np.testing.assert_array_equal(b[1].numpy(), ref.lookup(SPEC.name, b[0]))
    np.testing.assert_array_equal(b[0], np.sort(keys[50:200]))


def test_bad_read_key_rejects_the_update(stores, shards_3):
    client, _ = stores
    before = client.lookup(SPEC.name, np.arange(SPEC.num_rows))
    with pytest.raises(InvalidArgument, match="out of range"):
        client.update_read(SPEC.name, [3, 6], np.ones((2, SPEC.dim), np.float32), 0.1, [3, SPEC.num_rows])
    # Raw frames: a read key of another shard, and read keys longer than the payload.
    head = pb.UpdateRequest(table=SPEC.name, route=pb.Route(shard_index=0, num_shards=3), num_keys=1, dim=SPEC.dim,
                            dtype=pb.FLOAT32, lr=0.1, num_read_keys=1)
    grads = np.ones((1, SPEC.dim), np.float32)
    with grpc.insecure_channel(shards_3.addresses[0], options=CHANNEL_OPTIONS) as ch:
        call = ch.unary_unary(f"/{SERVICE}/Update")
        for read, code, text in ((np.array([4], np.int64), grpc.StatusCode.FAILED_PRECONDITION, "key 4"),
                                 (np.empty(0, np.int64), grpc.StatusCode.INVALID_ARGUMENT, "payload")):
            with pytest.raises(grpc.RpcError) as e:
                call(wire.encode_frame(head, np.array([3], np.int64), grads, read), timeout=10)
            assert e.value.code() == code and text in e.value.details(), e.value.details()
    np.testing.assert_array_equal(client.lookup(SPEC.name, np.arange(SPEC.num_rows)), before)


def test_in_process_read_back_is_a_fresh_copy():
    with InProcessStore() as store:
        store.create_table(SPEC)
        fresh, rows = store.update_read(SPEC.name, [1, 2], torch.ones(2, SPEC.dim), 0.1, [2])
        store.update(SPEC.name, [2], torch.ones(1, SPEC.dim), 0.1)
        assert fresh.tolist() == [2]
        assert not torch.equal(rows, store.lookup(SPEC.name, [2], as_tensor=True)), "read-back aliases the table"
