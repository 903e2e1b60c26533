"""Tests for trainer.allocation: the parameter arithmetic of the allocation and slot sweeps.

Run from the repository root:
    .venv/bin/python -m pytest tests/test_allocation.py -q

The budget invariant is checked on the arithmetic and on models actually built from each
point (shapes only, on the meta device): every point holds the same sparse parameters within
one routed expert or one row block, and the same activated parameters up to the Engram
module's own dense layers and the router's rows, which the module documents.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from trainer.allocation import (
    AllocationConfig,
    allocation_point,
    allocation_points,
    head_rows,
    shards_for_rows,
    slot_point,
    solve_vocab_size,
    total_rows,
)
from trainer.hashing import NgramHashMapping
from trainer.train import TrainConfig

CONFIGS = [
    AllocationConfig(),  # the sweep's default: 4 MoE layers, E_0 = 12, top-2, 8 tables of 32
    AllocationConfig(d_model=64, n_layers=3, n_dense_layers=1, n_routed_experts=9, top_k=1, d_expert=48,
                     engram_layers=2, max_ngram_size=4, n_head_per_ngram=3, n_embed_per_ngram=48),
]
RHOS = [i / 20 for i in range(21)]


def test_hand_checked_budget_of_the_default_sweep():
    cfg = AllocationConfig()
    assert cfg.expert_params == 3 * 128 * 256 * 4 == 393_216  # w1, w3, w2 in each of 4 MoE layers
    assert cfg.sparse_budget == 10 * 393_216  # 12 routed experts, 2 active
    assert (cfg.num_tables, cfg.head_dim) == (8, 32)  # 1 layer x 2 orders x 4 heads; 128 / 4
    p = allocation_point(cfg, 0.8)
    assert p.n_routed_experts == 10 and p.moe_sparse_params == 8 * 393_216
    assert p.table_rows * 32 == p.table_params and abs(p.table_params - 2 * 393_216) <= p.row_block_params / 2


@pytest.mark.parametrize("sizes,max_n,heads,layers", [([50, 50], 3, 4, 1), ([1000, 300, 77], 4, 3, 2),
                                                       ([12_474, 12_474], 3, 4, 1)])
def test_head_rows_are_the_mappings_primes(sizes, max_n, heads, layers):
    # calculate_vocab_size_across_layers reads only these four attributes (no tokenizer needed)
    fake = SimpleNamespace(vocab_size_per_ngram=sizes, max_ngram_size=max_n, n_head_per_ngram=heads,
                           layer_ids=list(range(layers)))
    per_layer = NgramHashMapping.calculate_vocab_size_across_layers(fake)
    expected = [p for l in range(layers) for order in per_layer[l] for p in order]
    assert head_rows(sizes, max_n, heads, layers) == expected


@pytest.mark.parametrize("cfg", CONFIGS)
def test_every_point_spends_the_same_sparse_budget(cfg):
    for rho in RHOS:
        p = allocation_point(cfg, rho)
        # the experts: the nearest whole number to rho * P_sparse
        assert abs(p.moe_sparse_params - rho * cfg.sparse_budget) <= cfg.expert_params / 2, rho
        assert p.moe_sparse_params == (p.n_routed_experts - cfg.top_k) * cfg.expert_params
        # the tables take the rest, to within half a row block
        if p.engram:
            assert abs(p.budget_error) <= p.row_block_params / 2, (rho, p.budget_error, p.row_block_params)
            assert 0 < p.row_block_params < cfg.expert_params  # tables grow in finer steps than experts
            assert p.table_rows == total_rows(cfg, p.engram_vocab_size)
        else:
            assert p.budget_error == 0 and p.n_routed_experts == cfg.n_routed_experts
        assert abs(p.rho_realised - rho) <= (cfg.expert_params / 2 + p.row_block_params) / cfg.sparse_budget + 1e-12


def _built_counts(cfg: AllocationConfig, rho: float) -> tuple[dict, object]:
    """Counts of the model the sweep trains at rho (trainer.experiments.param_counts)."""
    from trainer.experiments import allocation_sweep, param_counts

    base = TrainConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=4, n_routed_experts=cfg.n_routed_experts,
                       top_k=cfg.top_k, d_expert=cfg.d_expert, max_ngram_size=cfg.max_ngram_size,
                       n_head_per_ngram=cfg.n_head_per_ngram, n_embed_per_ngram=cfg.n_embed_per_ngram,
                       engram_vocab_size=[1000] * (cfg.max_ngram_size - 1))
    [point] = allocation_sweep(base, [rho], [0], num_shards=1)
    a = point.meta["allocation"]
    return param_counts(point.cfg, SimpleNamespace(vocab_size=512, pad_id=0), a["table_params"]), a


def test_built_models_have_equal_total_and_activated_counts():
    cfg = CONFIGS[0]
    ref, _ = _built_counts(cfg, 1.0)
    assert ref["engram_dense"] == 0 and ref["tables"] == 0
    for rho in (0.9, 0.8, 0.6, 0.4, 0.0):
        c, a = _built_counts(cfg, rho)
        tolerance = max(cfg.expert_params, a["row_block_params"])
        # the sparse budget, as the built model holds it
        sparse = lambda x: x["routed_experts"] - cfg.top_k * cfg.expert_params + x["tables"]  # noqa: E731
        assert abs(sparse(c) - sparse(ref)) <= tolerance, rho
        # totals: equal up to the Engram module's dense layers and the router's rows (documented)
        drift = c["engram_dense"] + c["router"] - ref["router"]
        assert abs((c["total"] - drift) - ref["total"]) <= tolerance, rho
        # activated: exactly equal once those and the table values a token reads are set apart
        read = cfg.num_tables * cfg.head_dim  # count_params: engram_hidden_size per Engram layer
        assert c["activated"] - drift - read == ref["activated"], rho
        assert 0 < c["engram_dense"] < 0.05 * ref["activated"]  # small, as the module says


def test_solve_vocab_size_is_closest_and_rejects_too_few_rows():
    cfg = AllocationConfig()
    for target in (100, 1_001, 54_321, 1_000_000):
        c = solve_vocab_size(cfg, target)
        assert abs(c.error_rows) <= c.row_block / 2
        assert total_rows(cfg, c.vocab_size) == c.rows
        # no other vocab size nearby lands closer
        assert all(abs(total_rows(cfg, v) - target) >= abs(c.error_rows)
                   for v in range(max(2, c.vocab_size - 30), c.vocab_size + 30))
    with pytest.raises(ValueError, match="cannot fill 8 tables"):
        solve_vocab_size(cfg, 15)


def test_rho_validation_and_indistinguishable_points():
    cfg = AllocationConfig()
    with pytest.raises(ValueError, match=r"rho must lie in \[0, 1\]"):
        allocation_point(cfg, 1.2)
    with pytest.raises(ValueError, match="give the same model"):
        allocation_points(cfg, [0.8, 0.81])  # both 8 inactive experts
    with pytest.raises(ValueError, match="experts a token does not use"):
        dataclasses.replace(cfg, n_routed_experts=2)


def test_shards_grow_with_rows():
    assert [shards_for_rows(r, 500_000, 4) for r in (1, 10_000, 500_000, 500_001, 1_000_040, 10**7)] == [1, 1, 1, 2, 3, 4]
    cfg = AllocationConfig()
    points = [slot_point(cfg, r, 500_000, 4) for r in (10**4, 10**5, 10**6, 10**7)]
    assert [p.num_shards for p in points] == [1, 1, 3, 4]
    for p in points:
        assert abs(p.table_rows - p.target_rows) <= 0.002 * p.target_rows and p.table_params == p.table_rows * 32
