"""Several tables in one request per shard (`lookup_many`, `update_many`), over real shard
processes, against the same calls made table by table and against the in-process store.

Run: python -m pytest tests/test_many.py -q
"""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch

from memstore import ClientConfig, InProcessStore, InvalidArgument, MemStoreClient, OptimizerSpec, TableSpec
from memstore import TableChanged, TableNotFound, Unavailable, wire
from memstore.engine import ShardEngine
from memstore.server import CHANNEL_OPTIONS, SERVICE
from memstore.v1 import memstore_pb2 as pb

SPECS = [
    TableSpec("many.a", num_rows=5003, dim=8, seed=1, optimizer=OptimizerSpec("adam")),
    TableSpec("many.b", num_rows=2999, dim=4, seed=2, optimizer=OptimizerSpec("adagrad")),
    TableSpec("many.c", num_rows=7001, dim=8, seed=3, dtype="bfloat16", optimizer=OptimizerSpec("sgd", momentum=0.9)),
]
NAMES = [s.name for s in SPECS]


@pytest.fixture()
def stores(shards_3):
    """Two remote stores over the same shards (tables `many.*` and their twins `twin.*`,
    updated table by table) and the in-process reference."""
    client = MemStoreClient(shards_3.addresses)
    ref = InProcessStore()
    for spec in SPECS:
        client.create_table(spec)
        client.create_table(twin(spec))
        ref.create_table(spec)
    yield client, ref
    for spec in SPECS:
        client.drop_table(spec.name)
        client.drop_table(twin(spec).name)
    client.close()
    ref.close()


def twin(spec: TableSpec) -> TableSpec:
    return TableSpec(f"twin.{spec.name}", num_rows=spec.num_rows, dim=spec.dim, seed=spec.seed, dtype=spec.dtype,
                     optimizer=spec.optimizer)


def step_batch(rng, steps: int = 1):
    """{table: (keys (4, 60) with repeats, grads (4, 60, dim))}."""
    return {s.name: (rng.integers(0, s.num_rows, (4, 60)), rng.standard_normal((4, 60, s.dim)).astype(np.float32))
            for s in SPECS}


def test_many_equals_table_by_table_and_the_reference(stores):
    client, ref = stores
    rng = np.random.default_rng(0)
    for step in range(5):
        batch = step_batch(rng)
        watch = {NAMES[0]: rng.integers(0, SPECS[0].num_rows, 500), NAMES[2]: rng.integers(0, SPECS[2].num_rows, 500)}
        many = client.lookup_many({n: k for n, (k, _) in batch.items()})
        for spec in SPECS:
            keys = batch[spec.name][0]
            one = client.lookup(twin(spec).name, keys)
            assert many[spec.name].shape == keys.shape + (spec.dim,)
            np.testing.assert_array_equal(many[spec.name], one, err_msg=f"step {step} {spec.name}")
            np.testing.assert_array_equal(many[spec.name], ref.lookup(spec.name, keys))
        fresh = client.update_many(batch, 0.01, watch=watch)
        ref_fresh = ref.update_many(batch, 0.01, watch=watch)
        assert set(fresh) == set(watch) == set(ref_fresh)
        for spec in SPECS:
            keys, grads = batch[spec.name]
            if spec.name in watch:
                want = client.update_read(twin(spec).name, keys, grads, 0.01, watch[spec.name])
                np.testing.assert_array_equal(fresh[spec.name][0], want[0])
                np.testing.assert_array_equal(fresh[spec.name][1].float().numpy(), want[1].float().numpy())
                np.testing.assert_array_equal(fresh[spec.name][1].float().numpy(), ref_fresh[spec.name][1].float().numpy())
            else:
                client.update(twin(spec).name, keys, grads, 0.01)
    for spec in SPECS:  # every row of every table: bit for bit
        every = np.arange(spec.num_rows)
        np.testing.assert_array_equal(client.lookup(spec.name, every), client.lookup(twin(spec).name, every))
        np.testing.assert_array_equal(client.lookup(spec.name, every), ref.lookup(spec.name, every))


def test_packing_splits_requests_and_keeps_update_ids(shards_3):
    """A limit of a few rows per request splits every table into many parts, packed several
    to a request; resent under the same ids, the update applies once."""
    specs = [TableSpec(f"many.small{i}", num_rows=1000 + i, dim=4, seed=i, optimizer=OptimizerSpec("sgd"))
             for i in range(3)]
    rng = np.random.default_rng(1)
    batch = {s.name: (rng.integers(0, s.num_rows, 300), rng.standard_normal((300, 4)).astype(np.float32)) for s in specs}
    ids = {s.name: f"step-3/{s.name}" for s in specs}
    with MemStoreClient(shards_3.addresses, ClientConfig(max_request_bytes=4 * 4 * 25)) as client, InProcessStore() as ref:
        for s in specs:
            client.create_table(s)
            ref.create_table(s)
        rows = client.lookup_many({n: k for n, (k, _) in batch.items()})
        for s in specs:
            np.testing.assert_array_equal(rows[s.name], ref.lookup(s.name, batch[s.name][0]))
        client.update_many(batch, 0.5, update_ids=ids)
        client.update_many(batch, 0.5, update_ids=ids)  # a retry: applied once
        ref.update_many(batch, 0.5)
        for s in specs:
            np.testing.assert_array_equal(client.lookup(s.name, np.arange(s.num_rows)), ref.lookup(s.name, np.arange(s.num_rows)))
            client.drop_table(s.name)


def test_rows_smaller_than_their_keys_are_packed_by_their_keys(shards_3):
    """Rows of 2 bytes (dim 1 of float16): a LookupMany request carries 8 bytes of key per
    row, so packing counts keys where they outweigh the rows; every request stays within
    max_request_bytes, and the rows come back right."""
    specs = [TableSpec(f"many.tiny{i}", num_rows=5000, dim=1, dtype="float16", seed=i) for i in range(3)]
    keys = {s.name: np.arange(s.num_rows) for s in specs}
    limit = 8 * 200  # 200 keys a request
    config = ClientConfig(max_request_bytes=limit, shared_memory=False)
    with MemStoreClient(shards_3.addresses, config) as client, InProcessStore() as ref:
        for s in specs:
            client.create_table(s)
            ref.create_table(s)
        before = [next(m.bytes_in for m in st.methods if m.method == "LookupMany") for st in client.stats()]
        calls0 = [next(m.calls for m in st.methods if m.method == "LookupMany") for st in client.stats()]
        rows = client.lookup_many(keys)
        after = [next(m.bytes_in for m in st.methods if m.method == "LookupMany") for st in client.stats()]
        calls = [next(m.calls for m in st.methods if m.method == "LookupMany") - c for st, c in zip(client.stats(), calls0)]
        for s in specs:
            np.testing.assert_array_equal(rows[s.name], ref.lookup(s.name, keys[s.name]))
            client.drop_table(s.name)
    for shard, (b0, b1, n) in enumerate(zip(before, after, calls)):
        # 5,000 keys x 3 tables / 3 shards: 5,000 keys a shard, 40,000 bytes of them
        assert n >= 5000 * 8 // limit, f"shard {shard}: {n} requests for 40,000 bytes of keys"
        assert (b1 - b0) / n <= limit + 4096, f"shard {shard}: {(b1 - b0) / n:.0f} bytes a request"


def test_bad_part_rejects_the_whole_call(stores, shards_3):
    client, _ = stores
    every = {s.name: np.arange(s.num_rows) for s in SPECS}
    before = client.lookup_many(every)
    rng = np.random.default_rng(2)
    batch = step_batch(rng)
    bad_key = dict(batch)
    bad_key[NAMES[1]] = (np.array([5, SPECS[1].num_rows]), np.ones((2, 4), np.float32))
    with pytest.raises(InvalidArgument, match=f"key {SPECS[1].num_rows} is out of range"):
        client.update_many(bad_key, 0.1)
    nan = dict(batch)
    nan[NAMES[2]] = (np.array([1, 2]), np.array([[0.0] * 8, [np.nan] * 8], np.float32))
    with pytest.raises(InvalidArgument, match="NaN or Inf"):
        client.update_many(nan, 0.1)
    with pytest.raises(InvalidArgument, match="no update"):
        client.update_many(batch, 0.1, watch={"many.nothing": [1]})
    with pytest.raises(TableNotFound):
        client.lookup_many({NAMES[0]: [1], "many.absent": [1]})
    # Raw frames that pass the client's checks: a good part and a bad one in one request.
    good = pb.UpdateRequest(table=NAMES[0], num_keys=1, dim=8, dtype=pb.FLOAT32, lr=0.1, update_id="raw:0")
    other_shard = pb.UpdateRequest(table=NAMES[0], num_keys=1, dim=8, dtype=pb.FLOAT32, lr=0.1, update_id="raw:1")
    head = pb.UpdateManyRequest(route=pb.Route(shard_index=0, num_shards=3), parts=[good, other_shard])
    g = np.ones((1, 8), np.float32)
    with grpc.insecure_channel(shards_3.addresses[0], options=CHANNEL_OPTIONS) as ch:
        update_many = ch.unary_unary(f"/{SERVICE}/UpdateMany")
        lookup_many = ch.unary_unary(f"/{SERVICE}/LookupMany")
        cases = [
            (update_many, wire.encode_frame(head, np.array([3], np.int64), g, np.array([4], np.int64), g),
             grpc.StatusCode.FAILED_PRECONDITION, "key 4"),
            (update_many, wire.encode_frame(head, np.array([3], np.int64), g, np.array([6], np.int64)),
             grpc.StatusCode.INVALID_ARGUMENT, "too short"),
            (update_many, wire.encode_frame(head, np.array([3], np.int64), g, np.array([6], np.int64), g, b"x"),
             grpc.StatusCode.INVALID_ARGUMENT, "parts take"),
            (lookup_many, wire.encode_frame(pb.LookupManyRequest(route=pb.Route(shard_index=0, num_shards=3),
                                                                 parts=[pb.LookupRequest(table=NAMES[0], num_keys=2)]),
                                            np.array([3], np.int64)),
             grpc.StatusCode.INVALID_ARGUMENT, "payload"),
        ]
        for call, frame, code, text in cases:
            with pytest.raises(grpc.RpcError) as e:
                call(frame, timeout=10)
            assert e.value.code() == code and text in e.value.details(), e.value.details()
    after = client.lookup_many(every)
    for name in NAMES:
        np.testing.assert_array_equal(after[name], before[name], err_msg=f"{name} changed by a rejected call")


def test_empty_and_single_table_calls(stores):
    client, ref = stores
    assert client.lookup_many({}) == {} and client.update_many({}, 0.1) == {}
    rows = client.lookup_many({NAMES[0]: np.empty((0, 3), np.int64)})[NAMES[0]]
    assert rows.shape == (0, 3, 8)
    one = client.lookup_many({NAMES[1]: [[7, 7], [8, 1]]}, as_tensor=True)[NAMES[1]]
    np.testing.assert_array_equal(one.numpy(), ref.lookup(NAMES[1], [[7, 7], [8, 1]]))


# ---- a request's writes against drops, on one shard's engine --------------------------------------
def sgd_table(name: str) -> TableSpec:
    return TableSpec(name, num_rows=10, dim=4, optimizer=OptimizerSpec("sgd"))


class HeldJournal:
    """An engine's journal that keeps (kind, table) of each record; the first update of
    table `held` waits for `go` before it is kept (a write on its way to the log)."""

    def __init__(self, held: str) -> None:
        self.held, self.records = held, []
        self.entered, self.go = threading.Event(), threading.Event()

    def __call__(self, record: dict) -> None:
        if (record["kind"], record["table"]) == ("update", self.held) and not self.entered.is_set():
            self.entered.set()
            assert self.go.wait(30)
        self.records.append((record["kind"], record["table"]))


def write(engine: ShardEngine, table: str, uid: str):
    return engine.prepare_update(table, np.array([1]), torch.ones(1, 4), 0.1, uid)


def test_a_table_dropped_since_a_request_was_checked_applies_none_of_its_parts():
    engine = ShardEngine()
    for name in "ab":
        engine.create_table(sgd_table(name))
    prepared = [write(engine, "a", "1"), write(engine, "b", "2")]
    engine.drop_table("b")
    engine.create_table(sgd_table("b"))
    with pytest.raises(Unavailable, match="'b'"):
        engine.apply_together(prepared)
    assert engine.table("a").version == 0 and engine.table("b").version == 0


@pytest.mark.parametrize("together", [False, True])
def test_a_drop_waits_for_the_writes_that_found_its_table_and_is_logged_after_them(together):
    """A drop logged while a write that had found its table was still on its way to the log
    put the write's record after the drop's (replayed after a re-create, it changed the new
    table); a drop between two parts of one request failed the request with its first part
    applied. Here the write to `a` waits in the journal while `a` (alone) or `b` (the
    request's second part) is dropped."""
    engine = ShardEngine()
    for name in "ab":
        engine.create_table(sgd_table(name))
    engine.journal = journal = HeldJournal("a")
    if together:
        prepared, dropped = [write(engine, "a", "1"), write(engine, "b", "2")], "b"
        writer = threading.Thread(target=engine.apply_together, args=(prepared,))
    else:
        writer, dropped = threading.Thread(target=write(engine, "a", "1")), "a"
    writer.start()
    assert journal.entered.wait(30)
    dropper = threading.Thread(target=engine.drop_table, args=(dropped,))
    dropper.start()
    dropper.join(0.5)
    assert dropper.is_alive(), "the drop did not wait for the write"
    journal.go.set()
    writer.join(30)
    dropper.join(30)
    applied = [("update", "a"), ("update", "b")] if together else [("update", "a")]
    assert journal.records == applied + [("drop", dropped)]
    if together:
        assert engine.table("a").version == 1


@pytest.mark.parametrize("then", ["dropped", "created smaller"])
def test_a_call_with_a_table_dropped_since_its_spec_was_read_applies_on_no_shard(shards_2, then):
    """Another client drops table y (or creates it anew, smaller) after this client read its
    spec. Shard 1 gets only x's keys: it applied them, while shard 0, which got y's part too,
    refused the call. Every request now names all of the call's tables."""
    x, y = (TableSpec(name, num_rows=100, dim=4, optimizer=OptimizerSpec("sgd")) for name in ("stale.x", "stale.y"))
    with MemStoreClient(shards_2.addresses) as other, MemStoreClient(shards_2.addresses) as stale:
        for spec in (x, y):
            other.create_table(spec)
        try:
            stale.lookup_many({"stale.x": [0], "stale.y": [0]})  # caches both specs
            other.drop_table("stale.y")
            if then == "created smaller":
                other.create_table(TableSpec("stale.y", num_rows=50, dim=4, optimizer=OptimizerSpec("sgd")))
            before = other.lookup("stale.x", np.arange(100))
            updates = {"stale.x": (np.arange(4), np.ones((4, 4), np.float32)),  # keys on both shards
                       "stale.y": (np.array([60]), np.ones((1, 4), np.float32))}  # on shard 0 alone
            with pytest.raises(TableNotFound if then == "dropped" else TableChanged):
                stale.update_many(updates, lr=1.0)
            np.testing.assert_array_equal(other.lookup("stale.x", np.arange(100)), before)
        finally:
            other.drop_table("stale.x")
            other.drop_table("stale.y")


def test_an_update_many_is_one_call_for_a_cut_whole_in_it_or_out():
    """Every table's parts of one update_many share one group, counting them all: a cut keeps
    the call whole (not some tables in and the others out), and a shard remembers one call,
    not one per table. Given every table's update id, the group derives from them, so the
    call sent again (a retry, a data-parallel worker's copy) is the same call."""
    from memstore.server import ShardServer

    engines = [ShardEngine(i, 2) for i in range(2)]
    servers = [ShardServer(e).start() for e in engines]
    try:
        specs = [TableSpec(f"head{h}", num_rows=40, dim=4, optimizer=OptimizerSpec("sgd")) for h in range(3)]
        updates = {s.name: (np.arange(0, 40, 3), np.ones((14, 4), np.float32)) for s in specs}
        updates["head2"] = (np.array([2, 4]), np.ones((2, 4), np.float32))  # shard 0 only
        ids = {s.name: f"step-7/{s.name}" for s in specs}
        with MemStoreClient([s.address for s in servers]) as client, \
                MemStoreClient([s.address for s in servers]) as other:
            for s in specs:
                client.create_table(s)
            client.update_many(updates, lr=1.0, update_ids=ids)
            groups = [dict(e.gate.freeze()) for e in engines]
            for e in engines:
                e.gate.unfreeze(forget=False)
            assert [len(g) for g in groups] == [1, 1]
            (g0, (parts, applied0, _)), = groups[0].items()
            assert groups[1][g0][:2] == (5, 2) and (parts, applied0) == (5, 3)  # 2 + 2 + 1 parts, one call
            other.update_many(updates, lr=1.0, update_ids=ids)  # the same call: nothing applies again
            counts = lambda seen: {g: v[:2] for g, v in seen.items()}  # noqa: E731
            assert [counts(e.gate.freeze()) for e in engines] == [counts(g) for g in groups]
            for e in engines:
                e.gate.unfreeze()
            client.update_many(updates, lr=1.0)  # fresh ids: another call
            assert [len(e.gate.freeze()) for e in engines] == [1, 1]
    finally:
        for s in servers:
            s.stop(0)
