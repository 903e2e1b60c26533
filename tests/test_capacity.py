"""Tests for the capacity planner (trainer.capacity, trainer.dedup, `memstore plan`).

Run from the repository root:
    .venv/bin/python -m pytest tests/test_capacity.py -q

Planner figures are checked against numbers worked out by hand in the comments; the
de-duplication estimate against a brute-force count on a small corpus written by the test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from memstore.cli import main as cli
from memstore.cli.plan import PRESET_NAMES
from trainer.capacity import PAPER_TABLE_PARAMS, PRESETS, PlanConfig, place, plan, preset
from trainer.data import DataConfig, load_data
from trainer.dedup import DedupConfig, estimate, measure
from trainer.hashing import NgramHashMapping

GIB = 1 << 30

# 1 layer x 2 orders x 2 heads = 4 tables of exactly 1,000 rows; d_mem 64 -> 16 values a row
HAND = PlanConfig(name="hand", engram_layers=1, max_ngram_size=3, n_head_per_ngram=2, rows_per_head=1000, d_mem=64,
                  exact_primes=False, tokens_per_step=1000, workers=2, step_time_s=1.0, prefetch_depth=1,
                  node_memory_gib=0.0005, usable_fraction=1.0, max_shard_gib=0.0001, bandwidth_gbps=0.008)


def test_hand_checked_plan():
    p = plan(HAND, [0.5, 0.8])
    assert p.rows == 4000 and p.table_params == 64_000
    assert p.table_bytes == 4000 * 16 * 4 == 256_000
    assert p.optimizer_bytes == 4000 * (16 * 4 * 2 + 8) == 544_000  # Adam: two float32 moments + int64 step
    assert p.counter_bytes == 4000 * 8 == 32_000  # each shard's int64 read count per row
    # 832,000 bytes; a node holds 0.0005 GiB = 536,870.9 -> 2 nodes; shards of at most
    # 107,374.2 bytes -> 7.75 -> 4 per node
    assert (p.nodes, p.shards) == (2, 8) and p.bytes_per_shard == 104_000
    # per worker: 500 tokens; 2-gram heads 250 distinct keys each, 3-gram heads 400 -> 1,300
    assert p.keys_per_step == 2 * 500 * 4 == 4000 and p.rows_per_step == 2 * 1300
    assert p.dedup_rate == pytest.approx(1 - 2600 / 4000)
    # Each worker pushes its piece, half of the step's update; without the step's distinct
    # share, the bound of no key shared between the workers: 2 x 1,300 keys, 1,300 each
    assert (p.lookup_out_bytes, p.lookup_in_bytes, p.update_out_bytes) == (1300 * 8, 1300 * 64, 1300 * 72)
    # Among the workers, half of each worker's traffic goes to the other: its 1,300 float32
    # sums with keys (72 bytes), the 1,300 watched keys of 1 prefetched step, and 10 % of its
    # 1,300 rows back refreshed: (93,600 + 10,400 + 9,360) / 2
    assert p.exchange_bytes == 56_680 and p.exchange_bytes_per_step == 2 * 56_680
    # 0.008 Gbit/s = 1e6 B/s; two workers over two store nodes: each link carries one worker's worth
    assert p.lookup_s == pytest.approx(0.0832) and p.push_s == pytest.approx(0.0936)
    assert p.exchange_s == pytest.approx(0.05668) and p.sync_s == pytest.approx(0.0936 + 0.05668)
    # The busiest link: a worker's NIC outbound, its lookup keys and piece plus the exchange
    assert p.link_utilisation == pytest.approx((10_400 + 93_600 + 56_680) / 1e6)
    # Measured at the step's 1,000 tokens: 2-gram heads 300 distinct keys each, 3-gram heads 600
    assert plan(HAND, [0.5, 0.8], [0.3, 0.6]).update_out_bytes == (2 * 300 + 2 * 600) // 2 * 72
    # One worker: no exchange, the whole update its piece
    solo = plan(PlanConfig(**{**HAND.__dict__, "workers": 1}), [0.5, 0.8])
    assert solo.exchange_bytes == 0 and solo.update_out_bytes == solo.rows_per_step * 72
    assert p.prefetch_hides_lookups
    assert not plan(PlanConfig(**{**HAND.__dict__, "step_time_s": 0.05}), [0.5, 0.8]).prefetch_hides_lookups
    assert not plan(PlanConfig(**{**HAND.__dict__, "prefetch_depth": 0}), [0.5, 0.8]).prefetch_hides_lookups
    # one store node for both workers: its NIC carries twice a worker's rows
    one_node = plan(PlanConfig(**{**HAND.__dict__, "node_memory_gib": 1.0}), [0.5, 0.8])
    assert one_node.nodes == 1 and one_node.lookup_s == pytest.approx(2 * 0.0832)


def test_optimizer_state_and_dtypes():
    def opt_bytes(**kw):
        return plan(PlanConfig(**{**HAND.__dict__, **kw}), [1.0, 1.0]).optimizer_bytes

    assert opt_bytes(optimizer="adagrad") == 4000 * 4  # one float32 per row
    assert opt_bytes(optimizer="sgd") == 0
    assert opt_bytes(optimizer="sgd", momentum=0.9) == 4000 * 16 * 4
    assert opt_bytes(dtype="bfloat16", stochastic_rounding=True) == 4000 * (16 * 4 * 2 + 8 + 4)  # + int32 rounds
    assert opt_bytes(dtype="float16", optimizer="adagrad", stochastic_rounding=True) == 4000 * 8
    with pytest.raises(ValueError, match="16-bit tables"):
        PlanConfig(**{**HAND.__dict__, "stochastic_rounding": True})
    p = plan(PlanConfig(**{**HAND.__dict__, "dtype": "bfloat16"}), [1.0, 1.0])
    assert p.table_bytes == 4000 * 16 * 2 and p.lookup_in_bytes == 2000 * 32  # bf16 on the wire too
    p = plan(PlanConfig(**{**HAND.__dict__, "wire_dtype": "bfloat16"}), [1.0, 1.0])
    assert p.table_bytes == 4000 * 16 * 4 and p.lookup_in_bytes == 2000 * 32
    assert p.dedup_rate == 0.0  # every key distinct


@pytest.mark.parametrize("kw", [{}, {"optimizer": "adagrad"}, {"optimizer": "sgd", "momentum": 0.9},
                                {"dtype": "bfloat16", "stochastic_rounding": True}])
def test_the_plan_holds_what_a_shard_takes(kw):
    """Bytes a row the plan counts = bytes a row a shard checks and takes (memstore.table)."""
    from memstore.spec import OptimizerSpec, TableSpec
    from memstore.table import table_row_bytes

    cfg = PlanConfig(**{**HAND.__dict__, **kw})
    p = plan(cfg, [1.0, 1.0])
    spec = TableSpec("t", num_rows=10, dim=cfg.head_dim, dtype=cfg.dtype,
                     optimizer=OptimizerSpec(cfg.optimizer, momentum=cfg.momentum,
                                             stochastic_rounding=cfg.stochastic_rounding))
    assert p.held_bytes == p.rows * table_row_bytes(spec)


def test_presets_match_the_paper():
    assert PRESET_NAMES == tuple(sorted(PRESETS))  # the CLI names them without importing trainer
    p27, p40 = plan(preset("engram-27b"), [1.0, 1.0]), plan(preset("engram-40b"), [1.0, 1.0])
    # 32 tables of 80 values; each a prime just above 2,262,400 rows (gaps ~15, 32 consecutive primes)
    assert 32 * 2_262_400 < p27.rows < 32 * 2_262_400 + 32 * 1_000
    assert p27.table_params == p27.rows * 80
    assert abs(p27.table_params / PAPER_TABLE_PARAMS["engram-27b"] - 1) < 0.02  # 5.79 B, which the paper calls 5.7 B
    assert abs(p40.table_params / PAPER_TABLE_PARAMS["engram-40b"] - 1) < 0.001
    assert p27.table_bytes == p27.rows * 320 and p27.optimizer_bytes == p27.rows * 648
    # 27B: 65.3 GiB held -> one 512 GiB node at 80 %, shards of at most 64 GiB -> 2
    assert (p27.nodes, p27.shards) == (1, 2)
    assert (p40.nodes, p40.shards) == (1, 4)  # 208.5 GiB -> 4 shards of 52 GiB
    assert p27.keys_per_step == 1280 * 4096 * 32


def test_place_balances_shards_over_nodes():
    cfg = PlanConfig(node_memory_gib=100, usable_fraction=0.5, max_shard_gib=16)
    assert place(10 * GIB, cfg) == (1, 1)
    assert place(120 * GIB, cfg) == (3, 9)  # 3 nodes of 50 GiB; 7.5 shards -> 3 per node
    with pytest.raises(ValueError, match="usable_fraction"):
        PlanConfig(usable_fraction=0)
    with pytest.raises(ValueError, match="split evenly"):
        PlanConfig(d_mem=1000)
    with pytest.raises(ValueError, match="one unique fraction per order"):
        plan(HAND, [0.5])


# ---------------------------------------------------------------------------- de-duplication


@pytest.fixture(scope="module")
def corpus_cfg(tmp_path_factory) -> DataConfig:
    """A Zipfian corpus of 40 words: short N-grams repeat a lot, as in text."""
    root = tmp_path_factory.mktemp("dedup")
    folder = root / "corpus"
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    p = 1.0 / np.arange(1, 41)
    for d in range(20):
        text = " ".join(words[i] for i in rng.choice(40, 400, p=p / p.sum()))
        (folder / f"d{d}.txt").write_text(text + "\n")
    return DataConfig(corpus=str(folder), vocab_size=300, cache_dir=str(root / "cache"))


def test_dedup_counts_are_the_brute_force_ones(corpus_cfg):
    data = load_data(corpus_cfg)
    cfg = DedupConfig(max_ngram_size=3, n_head_per_ngram=2, rows_per_head=5000, seq_len=64, sizes=(64, 256, 1024),
                      samples=2, seed=5)
    est = measure(data, cfg)
    # the same samples, counted one head at a time with np.unique
    mapping = NgramHashMapping([5000, 5000], 3, 2, [0], data.pad_id, 5, data.tokenizer)
    rng = np.random.default_rng(5)
    tokens = data.split("train")
    for i, size in enumerate(cfg.sizes):
        shares = {2: [], 3: []}
        for _ in range(cfg.samples):
            starts = rng.integers(0, len(tokens) - 64, size=size // 64)
            ids = mapping.hash(tokens[starts[:, None] + np.arange(64)].astype(np.int64))[0]
            for n in (2, 3):
                shares[n].append(np.mean([len(np.unique(ids[..., h])) for h in range(2 * (n - 2), 2 * (n - 1))]) / size)
        for n in (2, 3):
            assert est.distinct_share[n][i] == pytest.approx(np.mean(shares[n]))
    # Zipfian text: the distinct share falls as the sample grows, and 3-grams repeat less than 2-grams
    for n in (2, 3):
        assert est.distinct_share[n][0] > est.distinct_share[n][-1]
    assert est.distinct_share[3][-1] > est.distinct_share[2][-1]
    # measured sizes read back exactly; past the ladder the last segment's slope extends it
    assert est.unique_fraction(2, 256) == pytest.approx(est.distinct_share[2][1])
    d1, d2 = est.distinct_share[2][1] * 256, est.distinct_share[2][2] * 1024
    beta = np.log(d2 / d1) / np.log(4)
    assert est.beta(2) == pytest.approx(beta)
    assert est.unique_fraction(2, 4096) == pytest.approx(min(1.0, d2 * 4 ** beta / 4096))
    assert est.unique_fraction(2, 10**9) <= 5003 / 10**9  # never more distinct keys than the table has rows
    with pytest.raises(ValueError, match="at least one token, got 0"):
        est.unique_fraction(2, 0)


def test_dedup_estimate_is_cached(corpus_cfg):
    cfg = DedupConfig(n_head_per_ngram=2, rows_per_head=5000, seq_len=64, sizes=(64, 256), samples=1)
    first = estimate(cfg, corpus_cfg)
    second = estimate(cfg, corpus_cfg)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert second.distinct_share == first.distinct_share and second.table_rows == first.table_rows
    third = estimate(DedupConfig(**{**cfg.__dict__, "rows_per_head": 6000}), corpus_cfg)
    assert not third.cache_hit  # another table size is another estimate


def test_plan_cli_prints_a_table_then_json(capsys, corpus_cfg):
    rc = cli.main(["plan", "--preset", "engram-40b", "--unique-fraction", "0.25", "0.5", "--workers", "8"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and out[0] == "plan engram-40b+flags"
    doc = json.loads(out[-1])
    assert doc["plan"]["config"]["workers"] == 8 and doc["dedup"] == {"source": "--unique-fraction"}
    # 655,360 tokens per worker, 16 heads per order: 163,840 x 16 + 327,680 x 16 distinct keys
    assert doc["plan"]["rows_per_step"] == 8 * 16 * (163_840 + 327_680)
    assert doc["plan"]["dedup_rate"] == pytest.approx(0.625)
    # measured on a corpus: the JSON says where the rate came from
    rc = cli.main(["plan", "--engram-layers", "1", "--rows-per-head", "5000", "--workers", "4", "--tokens-per-step",
                   "1024", "--seq-len", "64", "--corpus", corpus_cfg.corpus, "--vocab-size", "300",
                   "--cache-dir", corpus_cfg.cache_dir])
    out = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(out[-1])
    assert rc == 0 and doc["dedup"]["source"] == "corpus" and doc["dedup"]["sizes"] == [64, 256, 1024, 4096]
    assert 0.0 < doc["plan"]["dedup_rate"] < 1.0
    assert cli.main(["plan", "--d-mem", "1000"]) == cli.ExitStatus.USAGE  # 1000 does not split over 16 heads


def test_tokens_per_step_must_split_over_the_workers():
    from trainer.capacity import PlanConfig

    with pytest.raises(ValueError, match="split evenly over 3 workers"):
        PlanConfig(tokens_per_step=1000, workers=3)
