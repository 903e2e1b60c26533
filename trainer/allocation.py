"""Parameter arithmetic of the sparsity-allocation and slot-scaling experiments (pure).

The Engram paper (arXiv 2601.07372, section 3.1) fixes the total and the activated
parameters of a model and splits the "free" sparse budget

    P_sparse = P_total - P_active

between routed experts that a token does not use, P_MoE = rho * P_sparse, and Engram table
values, P_Engram = (1 - rho) * P_sparse. rho = 1 is the pure MoE. Between points only the
number of routed experts and the number of table rows change; top-k, the shared experts and
every dense layer stay as they are, so the activated parameters stay fixed.

Here the budget is set by the rho = 1 model: P_sparse = (E_0 - top_k) * p_e, where E_0 is its
number of routed experts and p_e the values of one routed expert summed over every MoE layer
(3 * d_model * d_expert per layer: w1, w3, w2). A point takes round(rho * P_sparse / p_e)
inactive experts and gives the rest of the budget, P_sparse - P_MoE, to the tables; so the
expert rounding is absorbed by the tables and the realised rho differs from the nominal one
by at most half an expert.

Table sizes are primes (trainer.hashing: every head of every layer gets the next unused prime
above engram_vocab_size[n - 2] - 1), so with one size v for every order, a model's tables are
the N consecutive primes from the first prime >= v (N = layers * orders * heads). Their total
is a step function of v; `solve_vocab_size` picks the v whose total lies closest to a target.
One step of that function is the "row block": the rows added when v passes the next prime
(the smallest amount by which such tables can grow); every point lands within half a row block
of its target.

Not counted in P_sparse, and reported apart by the experiments: the Engram module's own dense
layers (key and value projections, norms, ShortConv: activated, present at every rho < 1 and
absent at rho = 1) and the router's row per routed expert (D values per expert and MoE layer,
activated since every token scores every expert). Both are small; the paper treats the
comparison as iso-activated all the same.

Relies only on trainer.hashing (for the primes); no torch, no store, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from trainer.hashing import find_next_prime


@dataclass(frozen=True)
class AllocationConfig:
    """The shapes that set the budget and the table layout; everything else is the trainer's.

    n_routed_experts is E_0, the experts of the rho = 1 (pure MoE) model.
    """

    d_model: int = 128
    n_layers: int = 4
    n_dense_layers: int = 0  # blocks with a dense FFN (no experts)
    n_routed_experts: int = 12
    top_k: int = 2
    d_expert: int = 256
    engram_layers: int = 1  # how many blocks carry Engram
    max_ngram_size: int = 3
    n_head_per_ngram: int = 4
    n_embed_per_ngram: int = 128

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "d_expert", "engram_layers", "n_head_per_ngram", "n_embed_per_ngram"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.n_dense_layers < self.n_layers:
            raise ValueError(f"n_dense_layers must lie in [0, n_layers={self.n_layers}), got {self.n_dense_layers}")
        if not 1 <= self.top_k < self.n_routed_experts:
            raise ValueError(f"the rho = 1 model needs experts a token does not use: top_k={self.top_k} must lie "
                             f"in [1, n_routed_experts={self.n_routed_experts})")
        if self.max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2, got {self.max_ngram_size}")
        if self.n_embed_per_ngram % self.n_head_per_ngram:
            raise ValueError(f"n_embed_per_ngram ({self.n_embed_per_ngram}) must be a multiple of "
                             f"n_head_per_ngram ({self.n_head_per_ngram})")

    @classmethod
    def from_train_config(cls, cfg: Any) -> "AllocationConfig":
        """From a trainer.train.TrainConfig (read by field name; the MoE blocks are all blocks)."""
        return cls(d_model=cfg.d_model, n_layers=cfg.n_layers, n_routed_experts=cfg.n_routed_experts,
                   top_k=cfg.top_k, d_expert=cfg.d_expert, engram_layers=len(cfg.engram_layer_ids),
                   max_ngram_size=cfg.max_ngram_size, n_head_per_ngram=cfg.n_head_per_ngram,
                   n_embed_per_ngram=cfg.n_embed_per_ngram)

    @property
    def moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def expert_params(self) -> int:
        """p_e: one routed expert's values over every MoE layer (w1, w3: D x F; w2: F x D)."""
        return 3 * self.d_model * self.d_expert * self.moe_layers

    @property
    def sparse_budget(self) -> int:
        """P_sparse: the inactive routed experts of the rho = 1 model."""
        return (self.n_routed_experts - self.top_k) * self.expert_params

    @property
    def num_tables(self) -> int:
        """N: hash heads (one table each) over every Engram layer."""
        return self.engram_layers * (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def head_dim(self) -> int:
        """Values per table row."""
        return self.n_embed_per_ngram // self.n_head_per_ngram


# ---------------------------------------------------------------------------- table sizes


def head_rows(engram_vocab_size: Sequence[int], max_ngram_size: int, n_head_per_ngram: int,
              engram_layers: int) -> list[int]:
    """Rows of every table, in NgramHashMapping's order (layer, order, head): the same primes
    as `NgramHashMapping.calculate_vocab_size_across_layers`, without a tokenizer."""
    seen: set[int] = set()
    rows = []
    for _ in range(engram_layers):
        for n in range(2, max_ngram_size + 1):
            start = int(engram_vocab_size[n - 2]) - 1
            for _ in range(n_head_per_ngram):
                start = find_next_prime(start, seen)
                seen.add(start)
                rows.append(start)
    return rows


def total_rows(cfg: AllocationConfig, vocab_size: int) -> int:
    """Rows of all tables when every order has engram_vocab_size = vocab_size."""
    return sum(head_rows([vocab_size] * (cfg.max_ngram_size - 1), cfg.max_ngram_size,
                         cfg.n_head_per_ngram, cfg.engram_layers))


@dataclass(frozen=True)
class VocabChoice:
    """engram_vocab_size (one value for every order) for a target number of rows."""

    vocab_size: int
    rows: int  # rows of all tables at vocab_size
    target_rows: int
    row_block: int  # rows between the two achievable totals around the target

    @property
    def error_rows(self) -> int:
        return self.rows - self.target_rows


def solve_vocab_size(cfg: AllocationConfig, target_rows: int) -> VocabChoice:
    """The vocab size v whose tables hold the number of rows closest to target_rows.

    total_rows(v) is non-decreasing in v, so bisection finds lo, the largest v with
    total <= target, and hi = lo + 1 (the next value whose total exceeds it); the closer of
    the two wins. |rows - target| <= row_block / 2.
    """
    n = cfg.num_tables
    if target_rows < 2 * n:
        raise ValueError(f"{target_rows} rows cannot fill {n} tables of at least 2 rows each")
    lo, hi = 2, target_rows // n + 1  # total(lo) = first n primes >= 2; total(hi) >= n * hi > target
    if total_rows(cfg, lo) > target_rows:  # only for targets near 2 * n: the smallest tables there are
        return VocabChoice(lo, total_rows(cfg, lo), target_rows, 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total_rows(cfg, mid) <= target_rows:
            lo = mid
        else:
            hi = mid
    lo_rows, hi_rows = total_rows(cfg, lo), total_rows(cfg, hi)
    best = (lo, lo_rows) if target_rows - lo_rows <= hi_rows - target_rows else (hi, hi_rows)
    return VocabChoice(best[0], best[1], target_rows, hi_rows - lo_rows)


# ---------------------------------------------------------------------------- points


@dataclass(frozen=True)
class AllocationPoint:
    """One rho of the sweep: what the trainer changes, and its parameter accounting."""

    rho: float  # nominal: the share of P_sparse asked for the routed experts
    n_routed_experts: int
    engram: bool  # False at rho = 1 (no tables)
    engram_vocab_size: int  # rows per head and order asked for (the tables round up to primes); 0 without Engram
    table_rows: int  # rows of all tables
    table_params: int  # P_Engram = table_rows * head_dim
    moe_sparse_params: int  # P_MoE = inactive routed experts' values
    sparse_budget: int  # P_sparse, the same at every point
    expert_params: int  # p_e
    row_block_params: int  # values of one row block at this size (0 without Engram)

    @property
    def sparse_params(self) -> int:
        return self.moe_sparse_params + self.table_params

    @property
    def rho_realised(self) -> float:
        return self.moe_sparse_params / self.sparse_params

    @property
    def budget_error(self) -> int:
        """sparse_params - P_sparse (values)."""
        return self.sparse_params - self.sparse_budget

    def to_dict(self) -> dict:
        return {"rho": self.rho, "rho_realised": self.rho_realised, "n_routed_experts": self.n_routed_experts,
                "engram": self.engram, "engram_vocab_size": self.engram_vocab_size, "table_rows": self.table_rows,
                "table_params": self.table_params, "moe_sparse_params": self.moe_sparse_params,
                "sparse_params": self.sparse_params, "sparse_budget": self.sparse_budget,
                "budget_error": self.budget_error, "expert_params": self.expert_params,
                "row_block_params": self.row_block_params}


def allocation_point(cfg: AllocationConfig, rho: float) -> AllocationPoint:
    """The model at allocation ratio rho in [0, 1]."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    budget, p_e = cfg.sparse_budget, cfg.expert_params
    inactive = round(rho * budget / p_e)
    moe = inactive * p_e
    rest = budget - moe  # what the tables get, expert rounding included
    if rest == 0:
        return AllocationPoint(rho, cfg.top_k + inactive, False, 0, 0, 0, moe, budget, p_e, 0)
    choice = solve_vocab_size(cfg, round(rest / cfg.head_dim))
    if choice.target_rows < 2 * cfg.num_tables:
        raise ValueError(f"rho={rho} leaves {rest:,} table values, too few for {cfg.num_tables} tables")
    return AllocationPoint(rho, cfg.top_k + inactive, True, choice.vocab_size, choice.rows,
                           choice.rows * cfg.head_dim, moe, budget, p_e, choice.row_block * cfg.head_dim)


def allocation_points(cfg: AllocationConfig, rhos: Sequence[float]) -> list[AllocationPoint]:
    points = [allocation_point(cfg, r) for r in rhos]
    seen: dict[int, float] = {}
    for p in points:  # two nominal rhos may round to the same model
        if p.n_routed_experts in seen and seen[p.n_routed_experts] != p.rho:
            raise ValueError(f"rho {seen[p.n_routed_experts]} and {p.rho} give the same model "
                             f"({p.n_routed_experts} routed experts): one expert is "
                             f"{cfg.expert_params / cfg.sparse_budget:.1%} of the budget")
        seen[p.n_routed_experts] = p.rho
    return points


# ---------------------------------------------------------------------------- slot scaling


@dataclass(frozen=True)
class SlotPoint:
    """One size of the slot sweep: a fixed backbone, table rows near `target_rows`."""

    target_rows: int
    engram_vocab_size: int
    table_rows: int
    table_params: int
    num_shards: int


def shards_for_rows(rows: int, rows_per_shard: int, max_shards: int) -> int:
    """Shards that hold `rows`: one per rows_per_shard, at least 1, at most max_shards."""
    if rows_per_shard < 1 or max_shards < 1:
        raise ValueError(f"rows_per_shard and max_shards must be positive, got {rows_per_shard}, {max_shards}")
    return max(1, min(max_shards, math.ceil(rows / rows_per_shard)))


def slot_point(cfg: AllocationConfig, target_rows: int, rows_per_shard: int, max_shards: int) -> SlotPoint:
    choice = solve_vocab_size(cfg, target_rows)
    return SlotPoint(target_rows, choice.vocab_size, choice.rows, choice.rows * cfg.head_dim,
                     shards_for_rows(choice.rows, rows_per_shard, max_shards))
