"""Per-table telemetry (reads, occupancy, skew, updates) and `memstore stats`, exact on crafted
key streams: in process, then through two real `memstore serve` processes on loopback.

Run: python -m pytest tests/test_telemetry.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from memstore import MemStoreClient, OptimizerSpec, TableSpec
from memstore.cli.main import ExitStatus, main
from memstore.telemetry import TableTelemetry, combine, hot_rows


def test_hot_rows_is_one_percent_rounded_up():
    assert [hot_rows(n) for n in (1, 99, 100, 101, 1_000, 2_262_400)] == [1, 1, 1, 2, 10, 22_624]


def test_counts_repeats_within_a_call_and_reports_the_hottest_rows():
    tele = TableTelemetry(1_000)
    tele.record_lookup(torch.tensor([7, 7, 7, 3]))  # repeats inside one request count each time
    tele.record_lookup(torch.arange(100))
    tele.record_update(5)
    s = tele.snapshot("t", 1_000)
    assert (s.lookups, s.lookup_keys, s.updates, s.update_keys, s.rows_touched) == (2, 104, 1, 5, 100)
    assert s.hot_counts.tolist()[:2] == [4, 2] and len(s.hot_counts) == 10  # row 7: 3 + 1, row 3: 1 + 1
    assert s.hot_keys.tolist()[:2] == [7, 3]
    assert s.skew == (4 + 2 + 8 * 1) / 104 and s.occupancy == 0.1


def test_concurrent_lookups_lose_no_count():
    """Shard handlers record from many threads at once (index_add_ releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    t = TableTelemetry(10)
    keys = torch.zeros(1000, dtype=torch.int64)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: [t.record_lookup(keys) for _ in range(200)], range(8)))
    assert int(t._reads[0]) == 8 * 200 * 1000 and t.lookups == 8 * 200


def test_combining_shards_finds_the_store_wide_hottest_rows():
    """The hottest 1 % of a 1,000-row table may all sit on one shard: each shard sends its
    top 10 (1 % of the whole table), not 1 % of its own rows, so the merge stays exact."""
    parts = []
    for shard in range(2):
        tele = TableTelemetry(500)
        local = torch.arange(20)  # 20 rows read on each shard
        tele.record_lookup(local)
        if shard == 0:
            for _ in range(9):
                tele.record_lookup(torch.arange(10))  # shard 0's rows 0..9 (keys 0, 2, .., 18) read 10x
        parts.append(tele.snapshot("t", 1_000, shard, 2))
    table = combine(parts)
    assert table["lookup_keys"] == 40 + 90 and table["rows_touched"] == 40 and table["occupancy"] == 0.04
    assert table["hot_reads"] == 100 and table["skew"] == 100 / 130
    assert {k for k, _ in table["hot_keys"][:10]} == set(range(0, 20, 2))
    assert [p["skew"] for p in table["per_shard"]] == [50 / 110, 5 / 20]  # 1 % of 500 rows = 5


# ---- through real servers --------------------------------------------------------------------------
NUM_ROWS = 1_000


@pytest.fixture(scope="module")
def crafted(shards_2):
    """A 1,000-row table read so that exactly 250 rows are touched and its hottest 1 % (10
    rows) take a known share: every one of the 250 read once, the 10 hot rows 30 more times,
    40 warm rows 2 more times; the hot rows updated 3 times. The client de-duplicates keys
    within a call, so repeats come from calls."""
    rng = np.random.default_rng(7)
    touched = rng.choice(NUM_ROWS, size=250, replace=False)
    hot, warm = touched[:10], touched[10:50]
    calls = [touched] + [hot] * 30 + [warm] * 2
    with MemStoreClient(shards_2.addresses) as client:
        client.create_table(TableSpec("tele", num_rows=NUM_ROWS, dim=8, optimizer=OptimizerSpec("adam")))
        for keys in calls:
            client.lookup("tele", keys)
        for _ in range(3):
            client.update("tele", hot, np.ones((10, 8), np.float32), lr=0.01)
    shards_per_call = lambda keys: len(set((keys % 2).tolist()))  # noqa: E731 -- requests a call fans out to
    return {
        "hot": hot, "touched": touched,
        "lookups": sum(shards_per_call(k) for k in calls), "updates": 3 * shards_per_call(hot),
        "reads_per_shard": [sum(int((k % 2 == i).sum()) for k in calls) for i in range(2)],
    }


def memstore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memstore.cli.main", *args], capture_output=True, text=True,
                          timeout=120)


def test_stats_cli_reports_exact_occupancy_and_skew(shards_2, crafted):
    r = memstore("stats", "--shards", ",".join(reversed(shards_2.addresses)), "--table", "tele", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (t,) = doc["tables"]
    assert t["num_rows"] == NUM_ROWS and t["shards"] == 2
    assert t["lookup_keys"] == 250 + 30 * 10 + 2 * 40
    assert t["rows_touched"] == 250 and t["occupancy"] == 0.25
    assert t["hot_rows"] == 10 and t["hot_reads"] == 10 * 31
    assert t["skew"] == 310 / 630
    assert sorted(k for k, _ in t["hot_keys"][:10]) == sorted(crafted["hot"].tolist())
    assert all(c == 31 for _, c in t["hot_keys"][:10])
    assert t["lookups"] == crafted["lookups"]
    assert (t["updates"], t["update_keys"]) == (crafted["updates"], 30)
    for shard in t["per_shard"]:  # key k lives on shard k % 2
        i = shard["shard_index"]
        assert shard["rows_touched"] == int((crafted["touched"] % 2 == i).sum())
        assert shard["occupancy"] == shard["rows_touched"] / 500
        assert shard["lookup_keys"] == crafted["reads_per_shard"][i]


def test_stats_cli_prints_a_table(shards_2, crafted, capsys):
    assert main(["stats", "--shards", ",".join(shards_2.addresses), "--table", "tele"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("tele "))
    assert "25.00%" in row and f"{310 / 630:.2%}" in row
    assert "hottest keys (reads):" in out and "1 tables over 2 shards" in out


@pytest.mark.parametrize("argv, status, message", [
    (["--table", "nope"], ExitStatus.UNAVAILABLE, "'nope' does not exist"),
    ([], None, None),  # every table
])
def test_stats_cli_tables(shards_2, crafted, capsys, argv, status, message):
    code = main(["stats", "--shards", ",".join(shards_2.addresses), "--json", *argv])
    captured = capsys.readouterr()
    if status is None:
        assert code == 0 and "tele" in [t["table"] for t in json.loads(captured.out)["tables"]]
    else:
        assert code == status and message in captured.err and len(captured.err.strip().splitlines()) == 1


def test_stats_cli_wants_every_shard_exactly_once(shards_2, capsys):
    assert main(["stats", "--shards", shards_2.addresses[1]]) == ExitStatus.USAGE
    assert "not every shard of one store" in capsys.readouterr().err
    assert main(["stats"]) == ExitStatus.USAGE
    assert "give a store NAME or --shards" in capsys.readouterr().err


def test_stats_cli_reports_a_table_some_shards_lack_as_degraded(shards_2, crafted, capsys):
    """A table created on shard 0 only (a create that failed part-way): figures from the shard
    that has it, a line naming the gap, exit 1."""
    import grpc

    from memstore import wire
    from memstore.server import CHANNEL_OPTIONS, SERVICE
    from memstore.v1 import memstore_pb2 as pb

    spec = TableSpec("half", num_rows=100, dim=4)
    with grpc.insecure_channel(shards_2.addresses[0], options=CHANNEL_OPTIONS) as ch:
        create = ch.unary_unary(f"/{SERVICE}/CreateTable", request_serializer=lambda m: m.SerializeToString(),
                                response_deserializer=pb.TableInfo.FromString)
        create(pb.CreateTableRequest(spec=wire.spec_to_pb(spec), route=pb.Route(shard_index=0, num_shards=2)), timeout=10)
    try:
        for only in ([], ["--table", "half"]):  # named, too: the shard without it is no error
            code = main(["stats", "--shards", ",".join(shards_2.addresses), *only])
            out = capsys.readouterr().out
            assert code == 1 and "table 'half' is on 1 of 2 shards only" in out, (only, out)
    finally:
        with MemStoreClient(shards_2.addresses) as client:
            client.drop_table("half")
