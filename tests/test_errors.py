"""Bad input gets the right status code and a message naming the problem, and changes nothing.

Run: python -m pytest tests/test_errors.py -q
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from memstore import (
    ClientClosed,
    ClientConfig,
    InitSpec,
    InProcessStore,
    InvalidArgument,
    MemStoreError,
    MemStoreClient,
    OptimizerSpec,
    ResourceExhausted,
    TableChanged,
    TableExists,
    TableNotFound,
    TableSpec,
    WrongShard,
)
from memstore import wire
from memstore.keys import first_non_finite_row
from memstore.server import CHANNEL_OPTIONS, SERVICE
from memstore.v1 import memstore_pb2 as pb

from conftest import start_shard, wait_serving

SPEC = TableSpec("guarded", num_rows=1000, dim=4, seed=3, optimizer=OptimizerSpec("adam"))


@pytest.fixture(scope="module")
def store(shards_2):
    client = MemStoreClient(shards_2.addresses)
    client.create_table(SPEC)
    yield client
    client.drop_table(SPEC.name)
    client.close()


def raw(address: str, method: str, frame: bytes) -> bytes:
    """One framed call straight to a shard, bypassing the client's checks."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        return ch.unary_unary(f"/{SERVICE}/{method}")(frame, timeout=10)


def raw_code(address: str, method: str, frame: bytes) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        raw(address, method, frame)
    return e.value.code(), e.value.details()


def update_frame(shard: int, keys, grads, *, table="guarded", dim=4, dtype=pb.FLOAT32, lr=0.1, uid="", num_keys=None):
    keys = np.asarray(keys, dtype=np.int64)
    header = pb.UpdateRequest(table=table, route=pb.Route(shard_index=shard, num_shards=2),
                              num_keys=len(keys) if num_keys is None else num_keys, dim=dim, dtype=dtype, lr=lr, update_id=uid)
    return wire.encode_frame(header, keys, np.ascontiguousarray(grads))


def lookup_frame(shard: int, keys, table="guarded", num_shards=2, num_keys=None):
    keys = np.asarray(keys, dtype=np.int64)
    header = pb.LookupRequest(table=table, route=pb.Route(shard_index=shard, num_shards=num_shards),
                              num_keys=len(keys) if num_keys is None else num_keys)
    return wire.encode_frame(header, keys)


def all_rows(client) -> np.ndarray:
    return client.lookup(SPEC.name, np.arange(SPEC.num_rows))


# ---- server: status codes on raw requests ----------------------------------------------------
def test_unknown_table_is_not_found(shards_2):
    code, msg = raw_code(shards_2.addresses[0], "Lookup", lookup_frame(0, [0, 2], table="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "'nope'" in msg


def test_out_of_range_key_names_the_first_bad_key(store, shards_2):
    before = all_rows(store)
    for keys in ([2, 1000, 4000], [0, -2, 1002]):
        code, msg = raw_code(shards_2.addresses[0], "Update", update_frame(0, keys, np.ones((3, 4), np.float32)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"key {keys[1]} is out of range" in msg
    code, msg = raw_code(shards_2.addresses[0], "Lookup", lookup_frame(0, [4, 1000]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "key 1000" in msg
    np.testing.assert_array_equal(all_rows(store), before)


def test_shape_dtype_and_duplicate_mismatches(store, shards_2):
    before = all_rows(store)
    addr = shards_2.addresses[0]
    cases = {
        "dim": update_frame(0, [0, 2], np.ones((2, 5), np.float32), dim=5),
        "dtype": update_frame(0, [0, 2], np.ones((2, 4), np.float16), dtype=pb.FLOAT16),
        "unknown dtype": update_frame(0, [0, 2], np.ones((2, 4), np.float32), dtype=9),
        "duplicate": update_frame(0, [2, 2], np.ones((2, 4), np.float32)),
    }
    for what, frame in cases.items():
        code, msg = raw_code(addr, "Update", frame)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, what
    assert "key 2 appears twice" in raw_code(addr, "Update", cases["duplicate"])[1]
    # The first repeated key in request order, not the smallest.
    assert "key 8 appears twice" in raw_code(addr, "Update", update_frame(0, [8, 4, 8, 4], np.ones((4, 4), np.float32)))[1]
    np.testing.assert_array_equal(all_rows(store), before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradients_are_rejected(store, shards_2, bad):
    before = all_rows(store)
    grads = np.ones((3, 4), np.float32)
    grads[1, 2] = bad
    code, msg = raw_code(shards_2.addresses[0], "Update", update_frame(0, [0, 2, 4], grads))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "key 2" in msg and "NaN or Inf" in msg
    code, msg = raw_code(shards_2.addresses[0], "Update", update_frame(0, [0], np.ones((1, 4), np.float32), lr=float(bad)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "learning rate" in msg
    np.testing.assert_array_equal(all_rows(store), before)


def test_truncated_and_oversized_payloads(store, shards_2):
    before = all_rows(store)
    addr = shards_2.addresses[1]
    good = update_frame(1, [1, 3], np.ones((2, 4), np.float32))
    for frame in (good[:-4], good + b"\0" * 8, update_frame(1, [1, 3], np.ones((2, 4), np.float32), num_keys=3),
                  good[:3], (10_000).to_bytes(4, "little") + b"abc", (3).to_bytes(4, "little") + b"\xff\xff\xff"):
        code, msg = raw_code(addr, "Update", frame)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, msg
    code, _ = raw_code(addr, "Lookup", lookup_frame(1, [1, 3])[:-1])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = raw_code(addr, "Lookup", lookup_frame(1, [1, 3], num_keys=-1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    np.testing.assert_array_equal(all_rows(store), before)


def test_wrong_route_is_failed_precondition(store, shards_2):
    code, msg = raw_code(shards_2.addresses[0], "Lookup", lookup_frame(1, [1]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "shard 0 of 2" in msg
    code, msg = raw_code(shards_2.addresses[0], "Lookup", lookup_frame(0, [1]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "key 1" in msg
    code, msg = raw_code(shards_2.addresses[0], "Lookup", lookup_frame(0, [2], num_shards=3))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_retried_update_id_applies_once(store, shards_2):
    frame = update_frame(0, [10, 12], np.ones((2, 4), np.float32), uid="test-retry-1")
    first, _ = wire.decode_frame(raw(shards_2.addresses[0], "Update", frame), pb.UpdateResponse)
    after_first = all_rows(store)
    second, _ = wire.decode_frame(raw(shards_2.addresses[0], "Update", frame), pb.UpdateResponse)
    assert not first.duplicate and second.duplicate and second.version == first.version
    np.testing.assert_array_equal(all_rows(store), after_first)


def drop_raw(address: str, name: str, drop_id: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(f"/{SERVICE}/DropTable", request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=pb.DropTableResponse.FromString)
        return call(pb.DropTableRequest(name=name, drop_id=drop_id), timeout=30).dropped


def test_a_retried_drop_drops_nothing_created_since(shards_2):
    """A drop whose reply was lost is retried with its id: it must not drop the table someone
    created again meanwhile (nor one created after a first try that found none)."""
    spec = TableSpec("dropped.twice", num_rows=100, dim=4, seed=5)
    address = shards_2.addresses[0]
    with MemStoreClient(shards_2.addresses) as client:
        client.create_table(spec)
        assert drop_raw(address, spec.name, "drop-1")  # the first try: applied, its reply "lost"
        client.create_table(spec)
        client.update(spec.name, [0, 2, 4], np.ones((3, 4), np.float32), lr=0.5)
        kept = client.lookup(spec.name, np.arange(100))
        assert drop_raw(address, spec.name, "drop-1")  # the retry: answered as the first was...
        np.testing.assert_array_equal(client.lookup(spec.name, np.arange(100)), kept)  # ...and nothing dropped
        assert not drop_raw(address, "no.such.table", "drop-2")
        client.create_table(TableSpec("no.such.table", num_rows=10, dim=2))
        assert not drop_raw(address, "no.such.table", "drop-2")  # its retry drops nothing either
        assert [t.local_rows for t in client.describe("no.such.table")] == [5, 5]
        code, msg = raw_code(address, "DropTable", pb.DropTableRequest(name=spec.name, drop_id="z" * 300)
                             .SerializeToString())
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "drop id" in msg and "300 characters" in msg
        assert client.drop_table(spec.name) and client.drop_table("no.such.table")  # a fresh id: dropped
        assert spec.name not in [t.name for t in client.list_tables()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_first_non_finite_row_is_found_in_every_dtype(dtype):
    # 16-bit floats are checked on their bits (numpy lacks bfloat16): the largest finite
    # values, and subnormals, pass; NaN, Inf and -Inf are found, the first row named.
    big = torch.finfo(dtype).max
    t = torch.tensor([[big, -big, torch.finfo(dtype).tiny / 2], [0.0, -0.0, 1.0]], dtype=dtype).repeat(3, 1)
    assert first_non_finite_row(t) is None and first_non_finite_row(t[:0]) is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[4, 1], u[5, 2] = bad, bad
        assert first_non_finite_row(u) == 4, bad
        assert first_non_finite_row(u.t().contiguous().t()) == 4, "strided"


# ---- client: typed errors, validated before fan-out ----------------------------------------
def test_client_rejects_bad_updates_before_any_shard_changes(store):
    before = all_rows(store)
    keys = np.array([0, 1, 2, 3, 1000, 5])  # keys of both shards, one out of range
    with pytest.raises(InvalidArgument, match="key 1000 is out of range"):
        store.update(SPEC.name, keys, np.ones((6, 4), np.float32), lr=0.1)
    with pytest.raises(InvalidArgument, match="key -1"):
        store.update(SPEC.name, [3, -1], np.ones((2, 4), np.float32), lr=0.1)
    grads = np.ones((4, 4), np.float32)
    grads[3, 0] = np.nan
    with pytest.raises(InvalidArgument, match="NaN or Inf"):
        store.update(SPEC.name, [0, 1, 2, 3], grads, lr=0.1)
    with pytest.raises(InvalidArgument, match="shape"):
        store.update(SPEC.name, [0, 1], np.ones((2, 3), np.float32), lr=0.1)
    with pytest.raises(InvalidArgument, match="floating point"):
        store.update(SPEC.name, [0, 1], np.ones((2, 4), np.int32), lr=0.1)
    with pytest.raises(InvalidArgument, match="integers"):
        store.lookup(SPEC.name, np.array([0.5]))
    with pytest.raises(InvalidArgument, match="appears more than once"):
        store.assign(SPEC.name, [1, 1], np.ones((2, 4), np.float32))
    with pytest.raises(TableNotFound, match="'missing'"):
        store.lookup("missing", [0])
    np.testing.assert_array_equal(all_rows(store), before)


HALF = TableSpec("guarded16", num_rows=1000, dim=4, dtype="float16", optimizer=OptimizerSpec("sgd"))


@pytest.mark.parametrize("backend", ["sharded", "in_process"])
def test_values_that_overflow_once_summed_or_cast_are_rejected_on_every_shard(shards_2, backend):
    """Finite input whose summed or narrowed form is Inf: each shard would reject only its own
    part, so the client must reject the whole call first (the in-process store alike)."""
    store = MemStoreClient(shards_2.addresses) if backend == "sharded" else InProcessStore()
    with store:
        for spec in (SPEC, HALF):
            store.create_table(spec)
        before = {s.name: store.lookup(s.name, np.arange(1000)) for s in (SPEC, HALF)}
        keys = np.array([0, 1, 2, 3])  # both shards' keys
        big = np.ones((4, 4), np.float32)
        big[1, 0] = 1e5  # beyond float16's 65,504
        with pytest.raises(InvalidArgument, match="key 1 .* not finite once cast to float16"):
            store.update(HALF.name, keys, big, lr=0.1)
        with pytest.raises(InvalidArgument, match="key 1 .* not finite once cast to float16"):
            store.assign(HALF.name, keys, big)
        with pytest.raises(InvalidArgument, match="key 1 .* not finite once cast to float16"):
            store.update(HALF.name, keys, torch.from_numpy(big).to(torch.bfloat16), lr=0.1)
        twice = np.full((2, 4), 3e38, np.float32)  # two finite float32 gradients of key 1 sum to Inf
        with pytest.raises(InvalidArgument, match="key 1 .* summed over its repeats"):
            store.update(SPEC.name, [1, 1, 0, 2], np.concatenate([twice, np.ones((2, 4), np.float32)]), lr=0.1)
        huge = np.ones((4, 4), np.float64)
        huge[2, 3] = 1e300  # finite in float64, Inf in float32
        with pytest.raises(InvalidArgument, match="key 2 .* cast to float32"):
            store.update(SPEC.name, keys, huge, lr=0.1)
        # One table's overflow rejects the whole multi-table call.
        with pytest.raises(InvalidArgument, match="not finite"):
            store.update_many({SPEC.name: (keys, np.ones((4, 4), np.float32)), HALF.name: (keys, big)}, lr=0.1)
        for s in (SPEC, HALF):
            np.testing.assert_array_equal(store.lookup(s.name, np.arange(1000)), before[s.name], err_msg=s.name)
        if backend == "sharded":
            store.drop_table(HALF.name)


def test_gradient_layouts(shards_2):
    """Gradients must be keys.shape + (dim,) or flattened to (n, dim); any numpy layout of
    those (reversed, big-endian) is taken as its values."""
    spec = TableSpec("layouts", num_rows=100, dim=4, optimizer=OptimizerSpec("adam"))
    keys = np.array([[10, 11, 12], [13, 14, 15]])
    rng = np.random.default_rng(4)
    grads = rng.standard_normal((6, 4)).astype(np.float32)
    with MemStoreClient(shards_2.addresses) as store, InProcessStore() as ref:
        store.create_table(spec)
        ref.create_table(spec)
        with pytest.raises(InvalidArgument, match=r"shape keys.shape \+ \(4,\) = \(2, 3, 4\)"):
            store.update(spec.name, keys, np.ones((3, 2, 4), np.float32), lr=0.1)  # batch dims transposed
        with pytest.raises(InvalidArgument, match="shape"):
            store.update(spec.name, [10], np.ones(4, np.float32), lr=0.1)
        for layout in (grads.reshape(2, 3, 4), grads, grads[::-1][::-1], grads.astype(">f4")):
            store.update(spec.name, keys, layout, lr=0.1)
            ref.update(spec.name, keys, grads.reshape(2, 3, 4), lr=0.1)
        reversed_keys = keys.reshape(-1)[::-1]
        store.update(spec.name, reversed_keys, grads[::-1], lr=0.1)  # negative strides
        ref.update(spec.name, reversed_keys, grads[::-1].copy(), lr=0.1)
        np.testing.assert_array_equal(store.lookup(spec.name, np.arange(100)), ref.lookup(spec.name, np.arange(100)))
        store.drop_table(spec.name)


def test_keys_beyond_int64_name_the_first_bad_key(store):
    for keys in (np.array([3, 2**63 + 5, 2**64 - 1], np.uint64), torch.tensor([3, 2**63 + 5], dtype=torch.uint64),
                 [3, 2**63 + 5, -1], [3, 2**63 + 5, 2**64]):  # Python ints: numpy makes them float64 or object
        with pytest.raises(InvalidArgument, match=f"key {2**63 + 5} is out of range"):
            store.lookup(SPEC.name, keys)
    with pytest.raises(InvalidArgument, match="key -1 is out of range"):
        store.lookup(SPEC.name, [3, -1, 2**63])


def test_a_table_created_again_bigger_or_wider_is_read_anew_not_refused(shards_2):
    """A client's cached spec of a table another client created again: its own checks (key
    range, gradient shape) failed against the old spec, or the shards refused its writes,
    on every call. It now reads the spec anew once such a check fails, and the shards tell
    a write checked against another dim or dtype (TableChanged)."""
    small, big, wide = (TableSpec("regrown", num_rows=n, dim=d, optimizer=OptimizerSpec("sgd"))
                        for n, d in ((100, 4), (1000, 4), (1000, 8)))
    with MemStoreClient(shards_2.addresses) as other, MemStoreClient(shards_2.addresses) as stale:
        other.create_table(small)
        try:
            stale.lookup("regrown", [0])  # caches the spec
            other.drop_table("regrown")
            other.create_table(big)
            assert stale.lookup("regrown", [1, 500]).shape == (2, 4)  # was: key 500 out of range [0, 100)
            stale.update("regrown", [1, 700], np.ones((2, 4), np.float32), lr=1.0)
            other.drop_table("regrown")
            other.create_table(wide)
            assert stale.lookup("regrown", [1, 500]).shape == (2, 8)  # a reply of another dim: read anew
            other.drop_table("regrown")
            other.create_table(big)
            stale.update("regrown", [2, 3], np.ones((2, 4), np.float32), lr=1.0)  # caches dim 4
            other.drop_table("regrown")
            other.create_table(wide)
            stale.update("regrown", [2, 3], np.ones((2, 8), np.float32), lr=1.0)  # was: refused by the client
            other.drop_table("regrown")
            other.create_table(big)
            with pytest.raises(TableChanged, match="of dim 4 .* checked against 1,000 of dim 8"):
                stale.update("regrown", [2, 3], np.ones((2, 8), np.float32), lr=1.0)  # cached dim 8: the shards say
            np.testing.assert_array_equal(other.lookup("regrown", [2, 3]), stale.lookup("regrown", [2, 3]))
        finally:
            other.drop_table("regrown")


def test_addresses_out_of_shard_order_are_refused_before_any_write(shards_3):
    with MemStoreClient(shards_3.addresses) as good:
        good.create_table(TableSpec("ordered", num_rows=30, dim=2, optimizer=OptimizerSpec("sgd")))
        try:
            before = good.lookup("ordered", np.arange(30))
            a0, a1, a2 = shards_3.addresses
            with MemStoreClient([a0, a2, a1]) as mixed:
                with pytest.raises(WrongShard, match=f"the shard at {a2}, position 1 .* is shard 2 of 3"):
                    mixed.update("ordered", np.arange(9), np.ones((9, 2), np.float32), lr=1.0)
            np.testing.assert_array_equal(good.lookup("ordered", np.arange(30)), before)
        finally:
            good.drop_table("ordered")


def test_a_client_closed_twice_with_results_held_closes_once(shards_2):
    client = MemStoreClient(shards_2.addresses)
    client.create_table(TableSpec("closing", num_rows=5000, dim=64))
    rows = client.lookup("closing", np.arange(5000))  # held: its segment is released at close
    client.drop_table("closing")
    client.close()
    client.close()
    assert rows.shape == (5000, 64)


def test_calls_queued_at_close_finish_and_calls_after_it_raise_client_closed(shards_2):
    """close() lets *_async calls made before it run to the end, even those that find
    segments to release (results dropped beyond what the pool keeps free); any call after
    it raises ClientClosed, and so does an async call, at once."""
    from memstore import segments

    if not segments.supported():
        pytest.skip("shared-memory segments are Linux only")
    client = MemStoreClient(shards_2.addresses)
    client.create_table(TableSpec("closing_queued", num_rows=200_000, dim=64))
    want = client.lookup("closing_queued", np.arange(20_000))
    held = [client.lookup("closing_queued", np.arange(20_000)) for _ in range(segments.FREE_PER_CAPACITY + 6)]
    # Large lookups keep the client's 4 threads busy while close() begins; the next lookup
    # finds held's segments come back, more than stay free, and closes them; the one
    # after it finds their tokens to release.
    busy = [client.lookup_async("closing_queued", np.arange(200_000)) for _ in range(4)]
    del held
    queued = [client.lookup_async("closing_queued", np.arange(20_000)) for _ in range(4)]
    client.close()
    for f in busy:
        assert f.result(timeout=60).shape == (200_000, 64)
    for f in queued:
        np.testing.assert_array_equal(f.result(timeout=60), want)
    with pytest.raises(ClientClosed, match="closed"):
        client.lookup("closing_queued", [1])
    with pytest.raises(ClientClosed, match="closed"):
        client.lookup_async("closing_queued", [1])
    with pytest.raises(ClientClosed, match="closed"):
        client.update("closing_queued", [1], np.ones((1, 64), np.float32), lr=0.1)
    with pytest.raises(ClientClosed, match="closed"):  # a check of its own failing, that reads the spec anew
        client.lookup("closing_queued", [10**9])
    with MemStoreClient(shards_2.addresses) as other:
        other.drop_table("closing_queued")


def close_in_own_callback(store, table: str):
    """Closes `store` from the callback of one of its lookup_async futures; the future, once
    close() returned there without an error."""
    outcome: list = []
    done = threading.Event()

    def on_done(f) -> None:
        try:
            store.close()
            outcome.append("closed")
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            outcome.append(e)
        done.set()

    fut = store.lookup_async(table, np.arange(100))
    fut.add_done_callback(on_done)
    assert done.wait(30) and outcome == ["closed"], outcome
    return fut


def test_close_from_a_callback_of_the_clients_own_future(shards_2):
    """A future's callback runs on the client's own thread, which close() cannot wait for:
    close() returns there, and the client is closed once the callback has returned."""
    client = MemStoreClient(shards_2.addresses)
    client.create_table(TableSpec("closing_callback", num_rows=100, dim=4))
    assert close_in_own_callback(client, "closing_callback").result().shape == (100, 4)
    client.close()  # from this thread: returns once the closing thread has finished
    assert client._pool._shutdown and client._ended
    with pytest.raises(ClientClosed):
        client.lookup("closing_callback", [1])
    with MemStoreClient(shards_2.addresses) as other:
        other.drop_table("closing_callback")


def test_an_in_process_store_closes_as_a_client_does():
    store = InProcessStore()
    store.create_table(TableSpec("closing_local", num_rows=100, dim=4))
    close_in_own_callback(store, "closing_local")
    with pytest.raises(ClientClosed, match="closed"):
        store.lookup_async("closing_local", [1])


def test_a_write_checked_against_a_table_since_re_created_applies_nowhere(shards_2):
    """Another client drops the table and creates it smaller: this client's cached spec still
    passes key 61, valid only for the old size. Every shard refuses the write (TableChanged),
    and the next call, on the spec read anew, names the key."""
    old, new = (TableSpec("shrunk", num_rows=n, dim=4, optimizer=OptimizerSpec("sgd")) for n in (100, 50))
    keys, grads = np.array([10, 61]), np.ones((2, 4), np.float32)  # one key on each shard
    writes = {"update": lambda c: c.update("shrunk", keys, grads, lr=1.0),
              "update_many": lambda c: c.update_many({"shrunk": (keys, grads)}, lr=1.0),
              "assign": lambda c: c.assign("shrunk", keys, grads)}
    with MemStoreClient(shards_2.addresses) as other:
        for what, write in writes.items():
            other.drop_table("shrunk")
            other.create_table(old)
            with MemStoreClient(shards_2.addresses) as stale:
                stale.lookup("shrunk", [0])  # caches the spec
                other.drop_table("shrunk")
                other.create_table(new)
                before = other.lookup("shrunk", np.arange(50))
                with pytest.raises(TableChanged, match="has 50 rows of dim 4 .*; this write was checked against 100 "):
                    write(stale)
                with pytest.raises(InvalidArgument, match=r"key 61 is out of range \[0, 50\)"):
                    write(stale)  # the spec was read again
                np.testing.assert_array_equal(other.lookup("shrunk", np.arange(50)), before, err_msg=what)
        other.drop_table("shrunk")


def test_recreating_with_a_different_spec(store):
    store.create_table(SPEC)  # same spec: fine
    with pytest.raises(TableExists, match="different spec"):
        store.create_table(TableSpec(SPEC.name, num_rows=1000, dim=8))
    with pytest.raises(InvalidArgument, match="optimizer kind"):
        store.create_table(TableSpec("x", num_rows=10, dim=2, optimizer=OptimizerSpec("lamb")))


def test_a_create_one_shard_refuses_is_dropped_again_where_it_was_made(shards_3):
    """A shard holding the name with another spec (a create that was cut short, another
    client's) refuses the create; the shards this call made it on drop it again, so a
    create with the spec that shard holds is not refused by the others' leftovers."""
    other = TableSpec("leftover", num_rows=90, dim=8, seed=3)
    assert create_raw(shards_3.addresses[1], wire.spec_to_pb(other), shard=1, num_shards=3)[0] == grpc.StatusCode.OK
    with MemStoreClient(shards_3.addresses) as client:
        client.create_table(TableSpec("kept", num_rows=30, dim=2))  # there before: no create drops it
        with pytest.raises(TableExists, match=r"different spec.*; dropped again on shards \[0, 2\], where this "
                                              "call had created it"):
            client.create_table(TableSpec("leftover", num_rows=90, dim=4))
        held = [sorted(t.spec.name for t in shard.tables) for shard in client.stats()]
        assert held == [["kept"], ["kept", "leftover"], ["kept"]]
        with pytest.raises(TableExists):  # a table there on every shard is never dropped by a refused create
            client.create_table(TableSpec("kept", num_rows=30, dim=3))
        assert client.spec("kept") == TableSpec("kept", num_rows=30, dim=2)
        client.create_table(other)  # the spec shard 1 holds: now on every shard
        assert client.lookup("leftover", np.arange(90)).shape == (90, 8)
        client.drop_table("leftover")
        client.drop_table("kept")


def test_invalid_spec_sent_raw_is_invalid_argument(shards_2):
    bad = pb.TableSpec(name="bad", num_rows=-5, dim=4, dtype=pb.FLOAT32, wire_dtype=pb.FLOAT32,
                       init=pb.InitSpec(kind="normal", std=1), optimizer=pb.OptimizerSpec(kind="sgd", eps=1e-8))
    with grpc.insecure_channel(shards_2.addresses[0]) as ch:
        call = ch.unary_unary(f"/{SERVICE}/CreateTable", request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=pb.TableInfo.FromString)
        with pytest.raises(grpc.RpcError) as e:
            call(pb.CreateTableRequest(spec=bad, route=pb.Route(shard_index=0, num_shards=2)), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_rows" in e.value.details()


def create_raw(address: str, spec: pb.TableSpec, shard: int = 0, num_shards: int = 2) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(f"/{SERVICE}/CreateTable", request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=pb.TableInfo.FromString)
        try:
            call(pb.CreateTableRequest(spec=spec, route=pb.Route(shard_index=shard, num_shards=num_shards)), timeout=30)
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("change, named", [
    ({"optimizer": OptimizerSpec("adam", eps=float("inf"))}, "eps"),
    ({"optimizer": OptimizerSpec("adam", weight_decay=float("inf"))}, "weight_decay"),
    ({"optimizer": OptimizerSpec("adam", eps=1e39)}, "eps"),  # finite as a float, Inf in float32
    ({"optimizer": OptimizerSpec("adagrad", eps=1e-45)}, "eps"),  # 1 / eps overflows: NaN for a zero gradient
    ({"init": InitSpec(std=float("inf"))}, "std"),
    ({"init": InitSpec("uniform", bound=1e39)}, "bound"),
    ({"init": InitSpec(std=1e5), "dtype": "float16"}, "std"),  # rows beyond float16's 65504
    ({"init": InitSpec("uniform", bound=1e6), "wire_dtype": "float16"}, "bound"),  # stored, but Inf on the wire
])
def test_specs_whose_rows_or_updates_cannot_be_finite_are_refused(store, shards_2, change, named):
    spec = dataclasses.replace(SPEC, name="infinite", **change)
    with pytest.raises(InvalidArgument, match=named):
        store.create_table(spec)
    code, msg = create_raw(shards_2.addresses[0], wire.spec_to_pb(spec))  # the shard's own check
    assert code == grpc.StatusCode.INVALID_ARGUMENT and named in msg, (code, msg)
    assert "infinite" not in [t.name for t in store.list_tables()]


def test_a_learning_rate_infinite_in_float32_changes_no_row(store, shards_2):
    before = all_rows(store)
    with pytest.raises(InvalidArgument, match="learning rate"):
        store.update(SPEC.name, [0, 1], np.ones((2, 4), np.float32), lr=1e39)
    for lr in (1e39, -1.0):
        code, msg = raw_code(shards_2.addresses[0], "Update", update_frame(0, [0], np.zeros((1, 4), np.float32), lr=lr))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "learning rate" in msg
    spec = dataclasses.replace(SPEC, name="decayed", optimizer=OptimizerSpec("sgd", weight_decay=1e10))
    with MemStoreClient(shards_2.addresses) as client:
        client.create_table(spec)
        try:
            with pytest.raises(InvalidArgument, match="weight_decay"):
                client.update("decayed", [0], np.ones((1, 4), np.float32), lr=1e30)  # lr * wd = 1e40
            with pytest.raises(InvalidArgument, match="would be negative"):  # 1 - lr * wd = -9: rows flip and grow
                client.update("decayed", [0], np.ones((1, 4), np.float32), lr=1e-9)
        finally:
            client.drop_table("decayed")
    with pytest.raises(InvalidArgument, match="Adam's first step size"):  # 3e38 / 0.1 is Inf in float32
        store.update(SPEC.name, [0, 1], np.ones((2, 4), np.float32), lr=3e38)
    np.testing.assert_array_equal(all_rows(store), before)


def test_assigned_rows_that_overflow_the_storage_dtype_are_refused(shards_2):
    spec = TableSpec("narrow", num_rows=100, dim=4, dtype="float16", wire_dtype="float32")
    with MemStoreClient(shards_2.addresses) as client:
        client.create_table(spec)
        try:
            before = client.lookup("narrow", np.arange(100))
            rows = np.ones((2, 4), np.float32)
            rows[1, 3] = 1e5  # finite in float32, Inf once stored as float16
            with pytest.raises(InvalidArgument, match="key 2"):
                client.assign("narrow", [0, 2], rows)
            header = pb.AssignRequest(table="narrow", route=pb.Route(shard_index=0, num_shards=2), num_keys=2,
                                      dim=4, dtype=pb.FLOAT32)
            code, msg = raw_code(shards_2.addresses[0], "Assign", wire.encode_frame(header, np.array([0, 2]), rows))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "key 2" in msg and "float16" in msg
            np.testing.assert_array_equal(client.lookup("narrow", np.arange(100)), before)
        finally:
            client.drop_table("narrow")


def test_update_ids_are_bounded_and_named_once_per_request(store, shards_2):
    before = all_rows(store)
    with pytest.raises(InvalidArgument, match="update id"):
        store.update(SPEC.name, [0, 1], np.ones((2, 4), np.float32), lr=0.1, update_id="x" * 1000)
    code, msg = raw_code(shards_2.addresses[0], "Update", update_frame(0, [0], np.ones((1, 4), np.float32), uid="y" * 300))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "300 characters" in msg
    # One id in two parts of one request: which one would be the update?
    part = pb.UpdateRequest(table=SPEC.name, num_keys=1, dim=4, dtype=pb.FLOAT32, lr=0.1, update_id="twice")
    frame = wire.encode_frame(pb.UpdateManyRequest(route=pb.Route(shard_index=0, num_shards=2), parts=[part, part]),
                              np.array([0]), np.ones((1, 4), np.float32), np.array([2]), np.ones((1, 4), np.float32))
    code, msg = raw_code(shards_2.addresses[0], "UpdateMany", frame)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'twice'" in msg
    np.testing.assert_array_equal(all_rows(store), before)


def test_a_table_larger_than_the_host_is_resource_exhausted(shards_2):
    huge = TableSpec("huge", num_rows=1 << 40, dim=1024)
    with MemStoreClient(shards_2.addresses) as client:
        with pytest.raises(ResourceExhausted, match="'huge' needs .* GiB"):
            client.create_table(huge)
        assert "huge" not in [t.name for t in client.list_tables()]
    code, msg = create_raw(shards_2.addresses[1], wire.spec_to_pb(huge), shard=1)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "available" in msg


def test_a_malformed_control_message_is_invalid_argument(shards_2):
    code, msg = raw_code(shards_2.addresses[0], "CreateTable", b"\xff\xff\xff")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "CreateTableRequest" in msg


def test_client_retries_until_a_shard_comes_up():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs: list[subprocess.Popen] = []

    def start_late():
        time.sleep(1.5)
        procs.append(start_shard(0, 1, port=port))

    threading.Thread(target=start_late).start()
    spec = TableSpec("late", num_rows=10, dim=2)
    try:
        with MemStoreClient([f"127.0.0.1:{port}"], ClientConfig(retry_s=60)) as client:
            client.create_table(spec)  # UNAVAILABLE until the shard is up, then succeeds
            assert client.lookup("late", [1, 2]).shape == (2, 2)
    finally:
        while not procs:
            time.sleep(0.1)
        wait_serving(procs[0])
        procs[0].terminate()
        procs[0].wait(10)


def test_close_ends_calls_still_in_flight(monkeypatch):
    """close() cancels another thread's calls still waiting on a shard (the fan-out's calls
    run on the client's threads): it returns at once, and the lookup fails, named."""
    from memstore.engine import ShardEngine
    from memstore.server import MemStoreServicer, ShardServer

    answered, release = threading.Event(), threading.Event()
    lookup = MemStoreServicer.Lookup

    def held_lookup(self, frame, context):
        answered.set()
        release.wait(30)
        return lookup(self, frame, context)

    monkeypatch.setattr(MemStoreServicer, "Lookup", held_lookup)
    servers = [ShardServer(ShardEngine(i, 2)).start() for i in range(2)]
    try:
        client = MemStoreClient([s.address for s in servers], ClientConfig(shared_memory=False, timeout_s=30))
        client.create_table(TableSpec("held", num_rows=100, dim=4))
        failed = []

        def read() -> None:
            try:
                client.lookup("held", np.arange(10))
            except MemStoreError as e:
                failed.append(e)

        reader = threading.Thread(target=read)
        reader.start()
        assert answered.wait(10), "the lookup never reached a shard"
        t0 = time.monotonic()
        client.close()
        reader.join(10)
        assert time.monotonic() - t0 < 5 and not reader.is_alive()
        assert len(failed) == 1 and "Lookup" in str(failed[0]), failed
    finally:
        release.set()
        for s in servers:
            s.stop(0)


def test_an_update_id_reused_for_another_write_is_refused(store):
    """A retry (same keys and learning rate) is acknowledged once; another write under a used
    id would be answered as applied while its rows never changed: it is INVALID_ARGUMENT."""
    keys, grads = np.array([5, 6, 7, 8]), np.ones((4, 4), np.float32)
    store.update(SPEC.name, keys, grads, lr=0.1, update_id="once")
    before = all_rows(store)
    assert store.update(SPEC.name, keys, 2 * grads, lr=0.1, update_id="once") == 4  # a retry: not applied again
    for other_keys, lr in ((np.array([5, 6, 7, 9]), 0.1), (keys[:2], 0.1), (keys, 0.2)):
        with pytest.raises(InvalidArgument, match=r"update id 'once:\d:0' was already applied .* another write"):
            store.update(SPEC.name, other_keys, np.ones((len(other_keys), 4), np.float32), lr=lr, update_id="once")
    np.testing.assert_array_equal(all_rows(store), before)


def test_a_reused_id_in_one_part_of_update_many_applies_no_part(shards_2):
    """The id check runs with the other checks, before any part applies: update_many of two
    tables, one of them under an id used before for another write, changes neither."""
    specs = [TableSpec(f"many.{n}", num_rows=100, dim=4, optimizer=OptimizerSpec("sgd")) for n in "ab"]
    with MemStoreClient(shards_2.addresses) as client:
        for spec in specs:
            client.create_table(spec)
        try:
            client.update_many({"many.b": ([1, 2], np.ones((2, 4), np.float32))}, 0.1, update_ids={"many.b": "used"})
            before = [client.lookup(s.name, np.arange(100)) for s in specs]
            with pytest.raises(InvalidArgument, match="already applied .* another write"):
                client.update_many({"many.a": ([5, 6], np.ones((2, 4), np.float32)),
                                    "many.b": ([3, 4], np.ones((2, 4), np.float32))}, 0.1,
                                   update_ids={"many.a": "fresh", "many.b": "used"})
            for spec, rows in zip(specs, before):
                np.testing.assert_array_equal(client.lookup(spec.name, np.arange(100)), rows)
            assert [i.version for i in client.describe("many.a")] == [0, 0]
        finally:
            for spec in specs:
                client.drop_table(spec.name)


@pytest.mark.parametrize("backend", ["client", "raw"])
@pytest.mark.parametrize("kind, lr, grad, dim", [
    ("sgd", 1e30, 1e10, 2), ("adam", 0.1, 1e20, 2), ("adagrad", 0.1, 1e20, 2),
    ("adagrad", 0.1, 3e18, 64),  # below 2^63, but 64 squares of it sum beyond float32 (Adagrad's row mean)
])
def test_finite_gradients_that_would_make_rows_inf_are_refused(shards_2, backend, kind, lr, grad, dim):
    """lr x gradient (SGD's step) or gradient squared (Adam's, Adagrad's state) beyond float32
    would leave Inf rows, or a row frozen by an Inf moment: refused, naming the key."""
    spec = TableSpec(f"scale.{kind}", num_rows=10, dim=dim, optimizer=OptimizerSpec(kind))
    with MemStoreClient(shards_2.addresses) as client:
        client.create_table(spec)
        try:
            before = client.lookup(spec.name, np.arange(10))
            grads = np.ones((3, dim), np.float32)
            grads[1, 0] = grad
            if backend == "client":
                with pytest.raises(InvalidArgument, match=r"key 4 .* overflows float32"):
                    client.update(spec.name, [2, 4, 6], grads, lr=lr)
            else:  # straight to shard 0, past the client's checks
                frame = update_frame(0, [2, 4, 6], grads, table=spec.name, dim=dim, lr=lr)
                code, msg = raw_code(shards_2.addresses[0], "Update", frame)
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "key 4" in msg and "overflows float32" in msg
            np.testing.assert_array_equal(client.lookup(spec.name, np.arange(10)), before)
            client.update(spec.name, [2, 4, 6], np.ones((3, dim), np.float32) * 1e3, lr=0.1)  # large, but fine
        finally:
            client.drop_table(spec.name)


@pytest.mark.parametrize("down", [0, 1])
def test_bad_input_with_a_shard_down_is_invalid_argument_not_unavailable(down):
    """A check of the client's own that fails (a key beyond the table) reads the table's spec
    anew from one shard that answers, not from all: with a shard down (the first, or
    another), the caller learns of its bad key at once, not of Unavailable once retry_s has
    passed."""
    from memstore.engine import ShardEngine
    from memstore.server import ShardServer

    servers = [ShardServer(ShardEngine(i, 2)).start() for i in range(2)]
    try:
        with MemStoreClient([s.address for s in servers], ClientConfig(shared_memory=False, retry_s=20)) as client:
            client.create_table(TableSpec("half_down", num_rows=100, dim=4))
            servers[down].stop(0)
            t0 = time.monotonic()
            with pytest.raises(InvalidArgument, match="1000"):
                client.update("half_down", [3, 1000], np.ones((2, 4), np.float32), lr=0.1)
            with pytest.raises(InvalidArgument, match="1000"):
                client.lookup("half_down", [1000])
            assert time.monotonic() - t0 < 15  # inside retry_s: no fan-out that waits it out
    finally:
        for s in servers:
            s.stop(0)


def test_a_request_whose_reply_would_not_fit_a_message_changes_nothing(shards_2):
    """Keys may repeat, so a small request can ask for a reply beyond the message limit (1,100
    keys of 256 KiB rows: 288 MB): refused before anything is read or written. An update of
    such read keys was applied and then failed on its reply (RESOURCE_EXHAUSTED: the caller
    took it for not applied)."""
    dim = 65_536
    spec = TableSpec("wide", num_rows=4, dim=dim, optimizer=OptimizerSpec("sgd"))
    address = shards_2.addresses[0]
    route = pb.Route(shard_index=0, num_shards=2)
    many_keys = np.zeros(1_100, np.int64)  # key 0, on shard 0, again and again
    with MemStoreClient(shards_2.addresses) as client:
        client.create_table(spec)
        try:
            before = client.lookup("wide", np.arange(4))
            lookup = pb.LookupRequest(table="wide", route=route, num_keys=len(many_keys))
            halves = [pb.LookupRequest(table="wide", num_keys=550)] * 2
            update = pb.UpdateRequest(table="wide", route=route, num_keys=1, dim=dim, dtype=pb.FLOAT32, lr=1.0,
                                      num_read_keys=len(many_keys))
            grads = np.ones((1, dim), np.float32)
            for method, frame in (
                ("Lookup", wire.encode_frame(lookup, many_keys)),
                ("LookupMany", wire.encode_frame(pb.LookupManyRequest(route=route, parts=halves), many_keys)),
                ("Update", wire.encode_frame(update, np.array([2]), grads, many_keys)),
                ("UpdateMany", wire.encode_frame(pb.UpdateManyRequest(route=route, parts=[update]), np.array([2]),
                                                 grads, many_keys)),
            ):
                code, message = raw_code(address, method, frame)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, message)
                assert f"reply to this {method} would carry 288,358,400 bytes of rows" in message, message
            np.testing.assert_array_equal(client.lookup("wide", np.arange(4)), before)
            assert [i.version for i in client.describe("wide")] == [0, 0]
        finally:
            client.drop_table("wide")


def test_an_update_many_part_whose_id_another_call_took_since_its_checks_applies_no_part():
    """The race of two calls under one update id, made deterministic: update_many's parts are
    checked (prepare_update), then another write takes one part's id, then they apply. The
    request is refused whole; its other part changed a row before."""
    from memstore.engine import ShardEngine

    engine = ShardEngine(0, 1)
    for name in ("a", "b"):
        engine.create_table(TableSpec(name, num_rows=10, dim=2, optimizer=OptimizerSpec("sgd")))
    ones = torch.ones(1, 2)
    writes = [engine.prepare_update("a", np.array([1]), ones, 0.5, "fresh"),
              engine.prepare_update("b", np.array([2]), ones, 0.5, "taken")]
    engine.update("b", np.array([3]), ones, 0.5, "taken")  # the same id, other keys: another write
    before = engine.lookup("a", np.arange(10))
    with pytest.raises(InvalidArgument, match="'taken' was already applied to table 'b' as another write"):
        engine.apply_together(writes)
    assert torch.equal(engine.lookup("a", np.arange(10)), before)
    assert (engine.table("a").version, engine.table("b").version) == (0, 1)


@pytest.mark.parametrize("eps, lr", [(1.2e-38, 5.0), (1e-8, 1e38)])
def test_an_adagrad_learning_rate_whose_scale_is_infinite_is_refused(store, shards_2, eps, lr):
    """Adagrad scales gradients by lr / (sqrt(acc) + eps), up to lr / eps: infinite, it turned a
    row's zero gradients into NaN (0 x Inf) and the row with them. Refused, by the client and
    by a shard."""
    spec = TableSpec("scaled", num_rows=10, dim=4, optimizer=OptimizerSpec("adagrad", eps=eps))
    with MemStoreClient(shards_2.addresses) as client:
        client.create_table(spec)
        try:
            before = client.lookup("scaled", np.arange(10))
            grads = np.zeros((1, 4), np.float32)
            grads[0, 0] = 1.0
            with pytest.raises(InvalidArgument, match="Adagrad's largest gradient scale"):
                client.update("scaled", [2], grads, lr=lr)
            code, message = raw_code(shards_2.addresses[0], "Update",
                                     update_frame(0, [2], grads, table="scaled", lr=lr))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "Adagrad's largest gradient scale" in message
            np.testing.assert_array_equal(client.lookup("scaled", np.arange(10)), before)
            client.update("scaled", [2], grads, lr=lr / 1e3 if eps < 1e-30 else 1e30)  # within the bound: finite
            assert np.isfinite(client.lookup("scaled", [2])).all()
        finally:
            client.drop_table("scaled")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("delivered", [False, True])
def test_rows_an_update_takes_past_a_narrower_wire_dtype_read_as_its_largest(shards_2, delivered, dtype):
    """float32 or bfloat16 rows on a float16 wire: a row that updates take past 65,504 reads as
    +-65,504 (it was Inf), in a reply and delivered into a same-host client's memory; the
    shard keeps the stored value."""
    spec = TableSpec("narrow", num_rows=10, dim=2, dtype=dtype, wire_dtype="float16", init=InitSpec("zeros"),
                     optimizer=OptimizerSpec("sgd"))
    config = ClientConfig(shared_memory=delivered)
    with MemStoreClient(shards_2.addresses, config=config) as client:
        client.create_table(spec)
        try:
            for _ in range(2):
                client.update("narrow", [3, 4], np.array([[-5e4, 5e4], [1.0, 2.0]], np.float32), lr=1.0)
            np.testing.assert_array_equal(client.lookup("narrow", [3, 4, 5]),
                                          [[65_504, -65_504], [-2, -4], [0, 0]])
        finally:
            client.drop_table("narrow")
