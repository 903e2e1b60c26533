"""Lookups delivered into a same-host client's shared memory (memstore.segments).

Delivered rows equal replied rows and the in-process reference bit for bit; results keep
their segment until they are gone; a shard that cannot map a segment makes the client fall
back to replies; bad deliveries get the right code and write nothing; shards drop the
mappings of closed segments and of exited clients.

Run: python -m pytest tests/test_segments.py -q
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest
import torch

from memstore import ClientConfig, InProcessStore, MemStoreClient, OptimizerSpec, TableSpec, segments, wire
from memstore import client as client_module
from memstore.errors import InvalidArgument, SegmentUnreachable, TableChanged
from memstore.launch import LocalShards
from memstore.server import CHANNEL_OPTIONS, ERROR_KEY, SERVICE
from memstore.v1 import memstore_pb2 as pb

pytestmark = pytest.mark.skipif(not segments.supported(), reason="shared-memory segments need Linux memfds")

REPLIES = ClientConfig(shared_memory=False)


@pytest.fixture(scope="module")
def shards_1():
    with LocalShards(1) as s:
        yield s


def mixed_keys(rng: np.random.Generator, num_rows: int) -> dict[str, np.ndarray]:
    return {
        "distinct": rng.choice(num_rows, size=(40, 25), replace=False),
        "repeated": rng.integers(0, 50, size=(7, 130)),
        "one": np.array([num_rows - 1]),
        "empty": np.zeros(0, np.int64),
    }


def train(store, specs: list[TableSpec], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for spec in specs:
        store.create_table(spec)
        keys = rng.integers(0, spec.num_rows, 3000)
        store.update(spec.name, keys, rng.standard_normal((3000, spec.dim)).astype(np.float32), lr=0.1)


@pytest.mark.parametrize("fixture", ["shards_1", "shards_2", "shards_3"])
def test_delivered_rows_equal_replies_and_the_reference(request, fixture):
    shards = request.getfixturevalue(fixture)
    specs = [TableSpec(f"d.{fixture}.{dt}.{wdt}", num_rows=4001, dim=dim, dtype=dt, wire_dtype=wdt,
                       optimizer=OptimizerSpec("adagrad"))
             for dt, wdt, dim in [("float32", "float32", 24), ("float32", "bfloat16", 8), ("float16", "float16", 5)]]
    rng = np.random.default_rng(4)
    with MemStoreClient(shards.addresses) as shm, MemStoreClient(shards.addresses, REPLIES) as replies, \
            InProcessStore() as ref:
        train(shm, specs, seed=1)
        train(ref, specs, seed=1)
        for spec in specs:
            for kind, keys in mixed_keys(rng, spec.num_rows).items():
                got = shm.lookup(spec.name, keys)
                assert got.shape == keys.shape + (spec.dim,), kind
                np.testing.assert_array_equal(got, replies.lookup(spec.name, keys), err_msg=kind)
                np.testing.assert_array_equal(got, ref.lookup(spec.name, keys), err_msg=kind)
                t = shm.lookup(spec.name, keys, as_tensor=True)
                assert t.dtype == spec.wire_torch_dtype and torch.equal(t, replies.lookup(spec.name, keys, as_tensor=True))
        many = {s.name: k for s, k in zip(specs, mixed_keys(rng, 4001).values())}
        got = shm.lookup_many(many)
        for name, rows in ref.lookup_many(many).items():
            np.testing.assert_array_equal(got[name], rows, err_msg=name)
        assert all(s.delivers for s in shm._shards), "every local shard should deliver"
        for spec in specs:
            shm.drop_table(spec.name)


def test_some_shards_deliver_and_others_reply(shards_3):
    spec = TableSpec("d.mixed", num_rows=3001, dim=16, optimizer=OptimizerSpec("adam"))
    rng = np.random.default_rng(5)
    with MemStoreClient(shards_3.addresses) as client, InProcessStore() as ref:
        train(client, [spec], seed=2)
        train(ref, [spec], seed=2)
        client._shards[1].cannot_deliver()  # as if shard 1 ran on another host
        for kind, keys in mixed_keys(rng, spec.num_rows).items():
            np.testing.assert_array_equal(client.lookup(spec.name, keys), ref.lookup(spec.name, keys), err_msg=kind)
            np.testing.assert_array_equal(client.lookup_many({spec.name: keys})[spec.name], ref.lookup(spec.name, keys))
        assert [s.delivers for s in client._shards] == [True, False, True]
        client.drop_table(spec.name)


def test_results_keep_their_segment_until_they_are_gone(shards_2):
    spec = TableSpec("d.life", num_rows=5000, dim=128)  # 1,000 rows: 512 KiB, kept in the segment
    rng = np.random.default_rng(6)
    with MemStoreClient(shards_2.addresses) as client:
        client.create_table(spec)
        first = client.lookup(spec.name, np.arange(1000))
        kept = first.copy()
        view = client.lookup(spec.name, np.arange(1000, 2000), as_tensor=True)[10:20]  # only a view survives
        kept_view = view.clone()
        gc.collect()
        for _ in range(30):  # results dropped at once: their segments are reused
            client.lookup(spec.name, rng.choice(5000, 1000, replace=False))
        np.testing.assert_array_equal(first, kept)
        assert torch.equal(view, kept_view)
        pool = client._segment_pool
        assert 3 <= pool.created <= 4, f"{pool.created} segments for 2 live results and one in use at a time"
        del first, view
        gc.collect()
        before = pool.created
        for _ in range(10):
            client.lookup(spec.name, rng.choice(5000, 1000, replace=False))
        assert pool.created == before, "freed results' segments are not reused"
        client.drop_table(spec.name)


def memfds() -> int:
    """This process's open memstore segment descriptors."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{segments.MEMFD_NAME}")
        except OSError:  # the listing's own descriptor, gone
            pass
    return count


def test_a_client_dropped_without_close_closes_its_segments(shards_2):
    """A client collected unclosed (its *_async threads still idle) gives its segments'
    descriptors back; one whose result outlived it, once that result is gone too."""
    spec = TableSpec("d.unclosed", num_rows=5000, dim=128)
    with MemStoreClient(shards_2.addresses) as setup:
        setup.create_table(spec)
    gc.collect()
    before = memfds()
    for keep_a_result in (False, True):
        client = MemStoreClient(shards_2.addresses)
        held = client.lookup(spec.name, np.arange(1000))
        client.lookup_async(spec.name, np.arange(2000)).result()
        assert memfds() > before
        if not keep_a_result:
            del held
        del client
        gc.collect()
        if keep_a_result:
            assert held.shape == (1000, 128)
            del held
            gc.collect()
        assert memfds() == before, f"segments left open (a result kept: {keep_a_result})"
    with MemStoreClient(shards_2.addresses) as other:
        other.drop_table(spec.name)


def test_small_results_and_many_live_ones_are_copied_out(shards_2):
    spec = TableSpec("d.copy", num_rows=50_000, dim=64)
    with MemStoreClient(shards_2.addresses) as client:
        client.create_table(spec)
        pool = client._segments()
        small = client.lookup(spec.name, np.arange(100))  # 25 KiB: a copy, the segment free again
        assert not pool.leased
        kept = [client.lookup(spec.name, np.arange(i, i + 1024)) for i in range(segments.MAX_LEASED + 8)]  # 256 KiB each
        assert len(pool.leased) <= segments.MAX_LEASED + 1, "live results hold at most MAX_LEASED segments"
        ref = client.lookup(spec.name, np.arange(50_000))
        for i, rows in enumerate(kept):
            np.testing.assert_array_equal(rows, ref[i : i + 1024])
        np.testing.assert_array_equal(small, ref[:100])
        client.drop_table(spec.name)


def test_a_forked_child_keeps_its_results(shards_1):
    spec = TableSpec("d.fork", num_rows=20_000, dim=64)
    with MemStoreClient(shards_1.addresses) as client:
        client.create_table(spec)
        rows = client.lookup(spec.name, np.arange(4096))  # 1 MiB: in a segment
        expected = rows.copy()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: once the parent has looked up more, its inherited rows are unchanged
            os.read(read, 1)
            os._exit(0 if np.array_equal(rows, expected) else 1)
        del rows
        gc.collect()
        for i in range(1, 6):  # the parent's next calls must not reuse the segment the child still reads
            client.lookup(spec.name, np.arange(i * 2000, i * 2000 + 4096))
        os.write(write, b"x")
        _, status = os.waitpid(pid, 0)
        os.close(read)
        os.close(write)
        assert os.waitstatus_to_exitcode(status) == 0, "the parent reused a segment a forked child held"
        client.drop_table(spec.name)


def test_a_forked_child_can_use_the_client_it_inherited(shards_1):
    """A child forked from a process whose client has made calls (gRPC's threads, the
    client's thread pools) calls through that client on channels of its own; the parent's
    go on working. Before, the child's first call waited forever."""
    spec = TableSpec("d.fork.use", num_rows=20_000, dim=16, optimizer=OptimizerSpec("sgd"))
    with MemStoreClient(shards_1.addresses) as client:
        client.create_table(spec)
        expected = client.lookup(spec.name, np.arange(4096))
        client.lookup_async(spec.name, np.arange(10)).result()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ok = np.array_equal(client.lookup(spec.name, np.arange(4096)), expected)
                ok &= np.array_equal(client.lookup_async(spec.name, np.arange(5)).result(timeout=30), expected[:5])
                client.update(spec.name, [7], np.ones((1, 16), np.float32), lr=1.0)
                client.close()
                code = 0 if ok else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's calls hung")
        assert os.waitstatus_to_exitcode(done[1]) == 0, "the child's calls failed or read wrong rows"
        np.testing.assert_array_equal(client.lookup(spec.name, [7]), expected[7:8] - 1.0)  # the child's update
        # The parent's same update next is its own (the child's ids are not the parent's): applied too.
        client.update(spec.name, [7], np.ones((1, 16), np.float32), lr=1.0)
        np.testing.assert_array_equal(client.lookup(spec.name, [7]), expected[7:8] - 1.0 - 1.0)
        client.drop_table(spec.name)


def test_a_shard_from_before_shared_memory_is_asked_for_replies(monkeypatch):
    import memstore.server
    from memstore.engine import ShardEngine
    from memstore.server import MemStoreServicer, ShardServer

    answer = MemStoreServicer.Lookup

    def old_lookup(self, frame, context):  # as a shard before deliveries: the keys' payload is missing
        header, _ = wire.decode_frame(frame, pb.LookupRequest)
        if header.HasField("delivery"):
            raise InvalidArgument(f"key payload is 0 bytes; {header.num_keys} int64 keys need more")
        return answer(self, frame, context)

    monkeypatch.setattr(MemStoreServicer, "Lookup", old_lookup)
    monkeypatch.setattr(memstore.server, "ERROR_KEY", "not-memstore-error")  # nor did it name error classes
    server = ShardServer(ShardEngine()).start()
    try:
        with MemStoreClient([server.address]) as client, MemStoreClient([server.address], REPLIES) as replies:
            client.create_table(TableSpec("d.old", num_rows=300, dim=4))
            np.testing.assert_array_equal(client.lookup("d.old", np.arange(300)), replies.lookup("d.old", np.arange(300)))
            assert client._shards[0].delivers is False
    finally:
        server.stop(0)


def test_a_failed_call_never_reuses_its_segment(shards_2):
    spec = TableSpec("d.fail", num_rows=100, dim=4)
    with MemStoreClient(shards_2.addresses) as client, MemStoreClient(shards_2.addresses) as other:
        client.create_table(spec)
        client.lookup(spec.name, np.arange(10))  # one segment, now free
        created = client._segment_pool.created
        other.drop_table(spec.name)  # the client still has the spec: its next call reaches the shards
        gc.disable()  # the failure's traceback holds the call in a cycle: it must let go of its lease itself
        try:
            with pytest.raises(Exception, match="does not exist"):
                client.lookup(spec.name, np.arange(10))
            assert client._segment_pool.take_closed(), "the failed call's segment is closed at once, not freed"
        finally:
            gc.enable()
        client.create_table(spec)
        client.lookup(spec.name, np.arange(10))
        assert client._segment_pool.created == created + 1
        client.drop_table(spec.name)


@pytest.mark.parametrize("config", [ClientConfig(), REPLIES], ids=["delivered", "replied"])
def test_a_table_recreated_with_another_dim_is_caught_and_read_anew(shards_2, config):
    """The shards (a delivery sized for dim 4) or the client (a reply of dim 8) catch the
    change (TableChanged); a lookup, a read, then runs once more on the spec read anew."""
    with MemStoreClient(shards_2.addresses, config) as client, MemStoreClient(shards_2.addresses) as other:
        client.create_table(TableSpec("d.recreated", num_rows=100, dim=4))
        client.lookup_many({"d.recreated": np.arange(10)})  # the spec is cached
        other.drop_table("d.recreated")
        other.create_table(TableSpec("d.recreated", num_rows=100, dim=8))
        rows = client.lookup("d.recreated", np.arange(10))  # raised TableChanged before
        assert rows.shape == (10, 8), "the spec is read again"
        np.testing.assert_array_equal(rows, other.lookup("d.recreated", np.arange(10)))
        other.drop_table("d.recreated")


def test_unmappable_segments_fall_back_to_replies(shards_2, monkeypatch):
    spec = TableSpec("d.unmappable", num_rows=700, dim=6)
    made = segments.Segment.__init__

    def foreign(self, capacity):  # a segment whose header does not hold its token: "another host"
        made(self, capacity)
        self.mm[len(segments.MAGIC) : len(segments.MAGIC) + segments.TOKEN_BYTES] = bytes(segments.TOKEN_BYTES)

    monkeypatch.setattr(segments.Segment, "__init__", foreign)
    with MemStoreClient(shards_2.addresses) as client, MemStoreClient(shards_2.addresses, REPLIES) as replies:
        client.create_table(spec)
        keys = np.random.default_rng(7).integers(0, 700, (30, 3))
        np.testing.assert_array_equal(client.lookup(spec.name, keys), replies.lookup(spec.name, keys))
        assert [s.delivers for s in client._shards] == [False, False]
        np.testing.assert_array_equal(client.lookup_many({spec.name: keys})[spec.name], replies.lookup(spec.name, keys))
        client.drop_table(spec.name)


# ---- the shard's side: mapping, checks, release ---------------------------------------------
def test_a_gather_sized_for_another_dim_writes_nothing():
    # A table recreated between a request's checks and its read: the region was sized from
    # the old spec, so the read refuses it under the table's lock before writing a byte.
    from memstore.engine import ShardEngine

    engine = ShardEngine()
    table = engine.create_table(TableSpec("d.resized", num_rows=50, dim=8))
    out = torch.zeros(3, 4)
    with pytest.raises(TableChanged, match="made room for dim 4"):
        table.gather(torch.tensor([1, 2, 3]), lambda version: out, np.array([0, 1, 2]))
    with pytest.raises(TableChanged):
        table.gather(torch.tensor([1, 2, 3]), lambda version: torch.zeros(3, 8, dtype=torch.float16))
    assert not out.any()



def test_segment_map_rejects_what_it_cannot_or_must_not_map(tmp_path):
    mine = segments.Segment(1 << 20)
    seg_map = segments.SegmentMap()
    ref = mine.ref
    data = seg_map.region(ref, segments.HEADER_BYTES, 64)
    data[:] = 7
    assert (mine.region(64) == 7).all(), "the mapping is the client's memory"
    with open(tmp_path / "plain", "wb+") as f:  # not a memfd
        f.truncate(ref.size)
        bad = [
            (segments.SegmentRef(2**22 + 12345, 3, ref.size, b"\0" * 16), "cannot map"),  # no such process
            (segments.SegmentRef(os.getpid(), f.fileno(), ref.size, ref.token), "not a memstore segment"),
            (segments.SegmentRef(ref.pid, ref.fd, ref.size, os.urandom(16)), "token mismatch"),
        ]
        for bad_ref, message in bad:
            with pytest.raises(SegmentUnreachable, match=message):
                seg_map.region(bad_ref, segments.HEADER_BYTES, 8)
    other = os.memfd_create("something-else")
    os.ftruncate(other, ref.size)
    with pytest.raises(SegmentUnreachable, match="not a memstore segment"):
        seg_map.region(segments.SegmentRef(ref.pid, other, ref.size, ref.token), segments.HEADER_BYTES, 8)
    os.close(other)
    unsealed = os.memfd_create(segments.MEMFD_NAME)  # the right name and token, but resizable
    os.ftruncate(unsealed, ref.size)
    os.pwrite(unsealed, segments.MAGIC + ref.token, 0)
    with pytest.raises(SegmentUnreachable, match="not sealed"):
        seg_map.region(segments.SegmentRef(ref.pid, unsealed, ref.size, ref.token), segments.HEADER_BYTES, 8)
    os.close(unsealed)
    with pytest.raises(SegmentUnreachable, match="exceeds this shard's budget"):
        segments.SegmentMap(budget_bytes=ref.size - 1).region(ref, segments.HEADER_BYTES, 8)
    for offset, n in [(0, 8), (segments.HEADER_BYTES - 8, 16), (ref.size - 8, 16)]:
        with pytest.raises(InvalidArgument, match="outside segment data"):
            seg_map.region(ref, offset, n)
    with pytest.raises(InvalidArgument, match="segment token"):
        seg_map.region(segments.SegmentRef(ref.pid, ref.fd, ref.size, b"short"), segments.HEADER_BYTES, 8)
    assert len(seg_map) == 1
    assert seg_map.release({ref.token}) == 1 and len(seg_map) == 0
    mine.close()


def test_segment_map_drops_exited_processes_and_keeps_a_budget():
    script = textwrap.dedent("""
        import sys, time
        from memstore import segments
        s = segments.Segment(1 << 20)
        print(s.ref.pid, s.ref.fd, s.ref.size, s.ref.token.hex(), flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid, fd, size, token = proc.stdout.readline().split()
        theirs = segments.SegmentRef(int(pid), int(fd), int(size), bytes.fromhex(token))
        seg_map = segments.SegmentMap(budget_bytes=3 * theirs.size)
        seg_map.region(theirs, segments.HEADER_BYTES, 8)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(seg_map) == 1, "its mapping outlives the process until a sweep"
    mine = [segments.Segment(1 << 20) for _ in range(4)]
    seg_map.region(mine[0].ref, segments.HEADER_BYTES, 8)  # a new mapping sweeps the exited process's
    assert len(seg_map) == 1
    for s in mine[1:]:
        seg_map.region(s.ref, segments.HEADER_BYTES, 8)
    assert len(seg_map) == 3 and seg_map.mapped_bytes <= seg_map.budget_bytes  # the oldest was dropped
    for s in mine:
        s.close()


def test_closed_segments_are_released_on_every_shard(shards_2):
    spec = TableSpec("d.release", num_rows=100_000, dim=16)
    with MemStoreClient(shards_2.addresses) as probe:
        probe.create_table(spec)

        def mapped() -> list[int]:
            return [s.mapped_segments for s in probe.stats()]

        base = mapped()
        client = MemStoreClient(shards_2.addresses)
        for n in (10, 20_000, 70_000):  # three sizes: three segments
            client.lookup(spec.name, np.arange(n))
        assert [m - b for m, b in zip(mapped(), base)] == [3, 3]
        held = client.lookup(spec.name, np.arange(70_000))  # its segment stays leased past close()
        client.close()
        assert mapped() == base, "close() releases the client's mappings on every shard, held results' too"
        np.testing.assert_array_equal(held, probe.lookup(spec.name, np.arange(70_000)))
        probe.drop_table(spec.name)


def test_a_shard_that_once_could_not_map_a_segment_is_asked_again(shards_2, monkeypatch):
    """A mapping can fail for a moment (a shard out of descriptors): after the backoff the
    shard delivers again, and segments it mapped are released by close() all the same."""
    spec = TableSpec("d.transient", num_rows=5_000, dim=8)
    made, unmappable = segments.Segment.__init__, [True]

    def for_a_while_foreign(self, capacity):  # segments read as another host's, until unmappable[0] is False
        made(self, capacity)
        if unmappable[0]:
            self.mm[len(segments.MAGIC) : len(segments.MAGIC) + segments.TOKEN_BYTES] = bytes(segments.TOKEN_BYTES)

    monkeypatch.setattr(segments.Segment, "__init__", for_a_while_foreign)
    monkeypatch.setattr(client_module, "DELIVERY_RETRY_S", (0.5, 0.5))
    with MemStoreClient(shards_2.addresses, REPLIES) as probe:  # maps nothing itself
        probe.create_table(spec)
        base = [s.mapped_segments for s in probe.stats()]
        client = MemStoreClient(shards_2.addresses)
        keys = np.arange(0, 5_000, 3)
        np.testing.assert_array_equal(client.lookup(spec.name, keys), probe.lookup(spec.name, keys))
        assert [s.delivers for s in client._shards] == [False, False]
        unmappable[0] = False
        np.testing.assert_array_equal(client.lookup(spec.name, keys), probe.lookup(spec.name, keys))
        assert [s.delivers for s in client._shards] == [False, False], "replies until the backoff is over"
        time.sleep(0.6)
        np.testing.assert_array_equal(client.lookup(spec.name, np.arange(4_000)), probe.lookup(spec.name, np.arange(4_000)))
        assert [s.delivers for s in client._shards] == [True, True], "delivery is tried again after the backoff"
        assert [s.mapped_segments - b for s, b in zip(probe.stats(), base)] == [1, 1]
        client.close()
        assert [s.mapped_segments for s in probe.stats()] == base
        probe.drop_table(spec.name)


# ---- raw deliveries: the codes, and nothing written ------------------------------------------
def lookup_call(address: str, frame: bytes, method: str = "Lookup") -> bytes:
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as ch:
        return ch.unary_unary(f"/{SERVICE}/{method}")(frame, timeout=10)


def delivery(seg: segments.Segment, keys_at: int, rows_at: int, first: int = 0, dim: int = 4) -> pb.Delivery:
    r = seg.ref
    return pb.Delivery(segment=pb.Segment(pid=r.pid, fd=r.fd, size=r.size, token=r.token),
                       keys_offset=segments.HEADER_BYTES + keys_at, rows_offset=segments.HEADER_BYTES + rows_at,
                       first=first, dim=dim, dtype=pb.FLOAT32)


def test_bad_deliveries_get_their_code_and_write_nothing(shards_1):
    spec = TableSpec("d.raw", num_rows=50, dim=4)
    with MemStoreClient(shards_1.addresses) as client:
        client.create_table(spec)
        address = shards_1.addresses[0]
        seg = segments.Segment(1 << 20)
        data = seg.region(1 << 20)
        data[:] = 0xAB
        keys = np.arange(10, dtype=np.int64)
        data[:80] = keys.view(np.uint8)
        route = pb.Route(shard_index=0, num_shards=1)

        def frame(d: pb.Delivery, n: int = 10, *payload, table: str = spec.name) -> bytes:
            return wire.encode_frame(pb.LookupRequest(table=table, route=route, num_keys=n, delivery=d), *payload)

        good = delivery(seg, 0, 1024)
        cases = [
            (frame(good, 10, keys), grpc.StatusCode.INVALID_ARGUMENT, "no payload"),
            (frame(delivery(seg, 0, 40)), grpc.StatusCode.INVALID_ARGUMENT, "overlap"),
            (frame(delivery(seg, 0, (1 << 20) - 64)), grpc.StatusCode.INVALID_ARGUMENT, "outside segment data"),
            # Beyond the segment, whatever else: said so (it was called an overlap of its regions).
            (frame(delivery(seg, 0, 1024, first=2**64 - 1), 1), grpc.StatusCode.INVALID_ARGUMENT, "outside segment data"),
            (frame(good, -1), grpc.StatusCode.INVALID_ARGUMENT, "-1 keys"),
            (frame(good, table="nope"), grpc.StatusCode.NOT_FOUND, "does not exist"),
            (frame(delivery(seg, 0, 1024, dim=2)), grpc.StatusCode.INVALID_ARGUMENT, "made room for dim 2"),
        ]
        bad_key = segments.Segment(1 << 20)
        bad_key.region(80)[:] = np.array([1, 2, 50, 3, 4, 5, 6, 7, 8, 9], np.int64).view(np.uint8)
        cases.append((frame(delivery(bad_key, 0, 1024)), grpc.StatusCode.INVALID_ARGUMENT, "key 50 is out of range"))
        foreign = pb.Delivery()
        foreign.CopyFrom(good)
        foreign.segment.token = os.urandom(16)
        cases.append((frame(foreign), grpc.StatusCode.FAILED_PRECONDITION, "token mismatch"))
        lookups = client.stats()[0]
        for f, code, message in cases:
            with pytest.raises(grpc.RpcError) as e:
                lookup_call(address, f)
            assert e.value.code() == code and message in e.value.details(), (code, e.value.details())
        assert dict(e.value.trailing_metadata())[ERROR_KEY] == "SegmentUnreachable"
        # A LookupMany whose second part is bad reads neither.
        many = pb.LookupManyRequest(route=route)
        many.parts.add(table=spec.name, num_keys=10, delivery=good)
        many.parts.add(table=spec.name, num_keys=10, delivery=delivery(bad_key, 0, 1024))
        with pytest.raises(grpc.RpcError) as e:
            lookup_call(address, wire.encode_frame(many), "LookupMany")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (data[1024:] == 0xAB).all(), "a rejected delivery wrote rows"
        after = client.stats()[0]
        assert [m.rows for m in after.methods if m.method == "Lookup"] == \
            [m.rows for m in lookups.methods if m.method == "Lookup"]
        # The good one writes exactly its rows.
        reply = lookup_call(address, frame(good))
        head, payload = wire.decode_frame(reply, pb.LookupResponse)
        assert head.delivered and head.num_keys == 10 and not len(payload)
        np.testing.assert_array_equal(data[1024 : 1024 + 160].view(np.float32).reshape(10, 4),
                                      client.lookup(spec.name, keys))
        assert (data[1024 + 160 :] == 0xAB).all()
        seg.close()
        bad_key.close()
        client.drop_table(spec.name)


def test_the_delivery_backoff_grows_once_per_round_and_resets_on_success():
    shard = client_module._Shard(0, "127.0.0.1:1")
    try:
        for _ in range(7):  # one failure seen by seven calls at once
            shard.cannot_deliver()
        first = shard.retry_delivery_at - time.monotonic()
        assert client_module.DELIVERY_RETRY_S[0] - 1 < first <= client_module.DELIVERY_RETRY_S[0]
        shard.retry_delivery_at = 0.0  # the backoff is over; the retry fails again
        shard.cannot_deliver()
        assert shard.retry_delivery_at - time.monotonic() > 1.5 * client_module.DELIVERY_RETRY_S[0]
        shard.delivered()
        shard.cannot_deliver()  # a new failure after a success starts from the first backoff again
        assert shard.retry_delivery_at - time.monotonic() <= client_module.DELIVERY_RETRY_S[0]
    finally:
        shard.channel.close()
