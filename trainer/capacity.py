"""Capacity planning for a store of Engram tables (pure arithmetic).

From a model's Engram configuration (layers, N-gram orders, heads, rows per head, d_mem),
how its tables are stored (dtype, wire dtype, optimizer) and the training workload (tokens
per step, data-parallel workers, step time, prefetch depth) and the machines (node memory,
network bandwidth), `plan` works out:

- tables and their bytes, and the sparse optimizer's state beside them (memstore.optim:
  Adam keeps two float32 moments per value and an int64 step per row; row-wise Adagrad one
  float32 per row; SGD nothing, or one float32 momentum per value);
- the store nodes that hold it all within `usable_fraction` of their memory, and the shards
  (at least one per node, none larger than max_shard_gib, the same number on every node);
- the rows a step moves after de-duplication: every worker hashes its own tokens_per_step /
  workers tokens; each of its (layer, head) tables gets one key per token, and the client
  looks up each distinct key once (`unique_fraction[n]`, the distinct share of an order-n
  head's keys at that many tokens, measured on a corpus by trainer.dedup). Workers do not
  de-duplicate their lookups against each other. The push is one copy of the step's summed
  update (trainer.parallel): every worker sums its own gradients per distinct key, sends
  each sum to the worker of its key's piece (key mod W) and pushes its piece, 1/W of the
  step's distinct keys (`step_unique_fraction`, at tokens_per_step tokens);
- the exchange among workers that this takes, per worker and each direction (a worker's
  traffic to the others, balanced, (W - 1)/W of it crossing its NIC): its distinct keys'
  float32 sums with their keys; the watched keys of its prefetched steps (at most
  prefetch_depth steps' distinct keys); and the changed watched rows coming back, a share
  `refresh_fraction` of the rows it looks up (trainer.prefetch measured 6.8 % at depth 1 and
  11.5 % at depth 2 on the default model);
- the bytes on the wire (framing ignored): a lookup sends 8-byte keys and gets rows back in
  the wire dtype; an update sends keys and one gradient row per key, in the wire dtype;
- whether prefetch hides the transfer. Every NIC is full duplex at `bandwidth_gbps` each way.
  The lookups of a step start prefetch_depth steps early, so they are hidden when they take
  at most prefetch_depth * step_time and no link carries more than one step's traffic per
  step. The row sync is not hidden in sync mode: the step ends when the store has applied
  the update and the changed rows are back (trainer.train), so the exchange's and the
  push's transfer times are reported as exposed.

The presets are the paper's (arXiv 2601.07372): Engram at 2 layers, N-grams 2 and 3, 8 heads
per order, d_mem 1280 (80 values per row), Adam, 1280 sequences of 4096 tokens per step.
Engram-27B has 2,262,400 rows per head (DESIGN.md; 5.79 B values, which the paper rounds to
5.7 B); the paper gives Engram-40B's memory only as 18.5 B values, so its rows per head are
18.5e9 / (2 * 16 * 80). Workers (64), step time (12 s) and the machines are assumptions, not
the paper's: 6 * 3.8e9 activated * 5.24e6 tokens = 1.2e17 FLOPs a step, 12 s on 64 GPUs at
~160 TFLOP/s sustained each.

Relies on trainer.allocation (the exact prime table sizes); no torch, no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

from trainer.allocation import head_rows

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # memstore.spec.DTYPE_BYTES, without torch
OPTIMIZERS = ("adam", "adagrad", "sgd")
KEY_BYTES = 8  # int64 keys on the wire
READ_COUNTER_BYTES = 8  # a shard's read count per row: memstore.telemetry.TableTelemetry.ROW_BYTES, without torch
GIB = 1 << 30
MAX_SHARDS = 4096  # the most shards a store may have (cluster.store.check_deploy)


@dataclass(frozen=True)
class PlanConfig:
    """A model's tables, the workload and the machines; defaults are the Engram-27B preset."""

    name: str = "engram-27b"
    # the tables
    engram_layers: int = 2
    max_ngram_size: int = 3
    n_head_per_ngram: int = 8
    rows_per_head: int = 2_262_400  # engram_vocab_size; each head gets the next unused prime above
    d_mem: int = 1280  # a position's concatenated rows per layer: (max_ngram_size - 1) * n_embed_per_ngram
    exact_primes: bool = True  # False: every head has exactly rows_per_head rows
    dtype: str = "float32"  # storage on the shards
    wire_dtype: str = ""  # rows and gradients on the wire; "" = dtype
    optimizer: str = "adam"
    momentum: float = 0.0  # sgd only: 0 keeps no state
    stochastic_rounding: bool = False  # 16-bit tables: 4 bytes a row of update count besides
    # the workload
    tokens_per_step: int = 1280 * 4096
    workers: int = 64  # data-parallel trainer processes, each de-duplicating its own keys
    step_time_s: float = 12.0
    prefetch_depth: int = 1
    refresh_fraction: float = 0.1  # of a worker's looked-up rows, refreshed from update replies
    # the machines
    node_memory_gib: float = 512.0
    usable_fraction: float = 0.8  # of a node's memory for rows and optimizer state
    max_shard_gib: float = 64.0  # a shard's rows and state at most (restart and checkpoint time grow with it)
    bandwidth_gbps: float = 100.0  # every node's NIC, each direction, Gbit/s

    def __post_init__(self) -> None:
        for name in ("engram_layers", "n_head_per_ngram", "rows_per_head", "d_mem", "tokens_per_step", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2, got {self.max_ngram_size}")
        if self.tokens_per_step % self.workers:
            raise ValueError(f"tokens_per_step ({self.tokens_per_step}) must split evenly over {self.workers} workers")
        if self.d_mem % self.num_heads_per_layer:
            raise ValueError(f"d_mem ({self.d_mem}) must split evenly over {self.num_heads_per_layer} heads "
                             f"({self.max_ngram_size - 1} orders x {self.n_head_per_ngram})")
        for name in ("dtype", "wire_dtype"):
            if getattr(self, name) and getattr(self, name) not in DTYPE_BYTES:
                raise ValueError(f"{name} must be one of {sorted(DTYPE_BYTES)}, got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, got {self.prefetch_depth}")
        for name in ("step_time_s", "node_memory_gib", "max_shard_gib", "bandwidth_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.usable_fraction <= 1:
            raise ValueError(f"usable_fraction must lie in (0, 1], got {self.usable_fraction}")
        if not 0 <= self.refresh_fraction <= 1:
            raise ValueError(f"refresh_fraction must lie in [0, 1], got {self.refresh_fraction}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.stochastic_rounding and self.dtype == "float32":
            raise ValueError("stochastic_rounding is for 16-bit tables: set dtype to bfloat16 or float16")

    @property
    def num_heads_per_layer(self) -> int:
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def num_tables(self) -> int:
        return self.engram_layers * self.num_heads_per_layer

    @property
    def head_dim(self) -> int:
        return self.d_mem // self.num_heads_per_layer

    @property
    def tokens_per_worker(self) -> int:
        return self.tokens_per_step // self.workers

    @property
    def row_bytes(self) -> int:
        return self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def wire_row_bytes(self) -> int:
        return self.head_dim * DTYPE_BYTES[self.wire_dtype or self.dtype]

    def optimizer_bytes_per_row(self) -> int:
        """What the store's own optimizer keeps a row (memstore.optim): Adam two float32
        moments and an int64 step, row-wise Adagrad one float32, SGD a float32 momentum
        buffer or nothing; stochastic rounding an int32 update count more."""
        from memstore.optim import make_optimizer
        from memstore.spec import OptimizerSpec

        spec = OptimizerSpec(self.optimizer, momentum=self.momentum, stochastic_rounding=self.stochastic_rounding)
        return make_optimizer(spec).state_row_bytes(self.head_dim)


PRESETS: dict[str, PlanConfig] = {
    "engram-27b": PlanConfig(),
    "engram-40b": PlanConfig(name="engram-40b", rows_per_head=round(18.5e9 / (2 * 16 * 80))),
}
PAPER_TABLE_PARAMS = {"engram-27b": 5.7e9, "engram-40b": 18.5e9}  # as the paper states them


def preset(preset_name: str, **overrides) -> PlanConfig:
    """A preset with some fields replaced."""
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset_name], **overrides)


@dataclass(frozen=True)
class Plan:
    """What `plan` works out; bytes are per step where they say so."""

    cfg: PlanConfig
    rows: int  # all tables
    table_params: int
    table_bytes: int
    optimizer_bytes: int
    counter_bytes: int  # the shards' per-row read counters (memstore.telemetry)
    nodes: int
    shards: int
    unique_fraction: tuple[float, ...]  # per order n = 2..max_ngram_size, at tokens_per_worker tokens
    step_unique_fraction: tuple[float, ...]  # the same at tokens_per_step tokens (the push's keys)
    keys_per_step: int  # before de-duplication, all workers
    rows_per_step: int  # after de-duplication, all workers
    lookup_out_bytes: int  # keys sent, per worker
    lookup_in_bytes: int  # rows received, per worker
    update_out_bytes: int  # keys and gradients sent, per worker: its piece of the step's update
    exchange_bytes: int  # to the other workers, per worker and each direction

    @property
    def held_bytes(self) -> int:
        return self.table_bytes + self.optimizer_bytes + self.counter_bytes

    @property
    def bytes_per_shard(self) -> float:
        return self.held_bytes / self.shards

    @property
    def dedup_rate(self) -> float:
        """Share of keys the client does not send: 1 - rows / keys."""
        return 1.0 - self.rows_per_step / self.keys_per_step

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.cfg.bandwidth_gbps * 1e9 / 8

    @property
    def wire_bytes_per_step(self) -> int:
        """Both directions, all workers."""
        return self.cfg.workers * (self.lookup_out_bytes + self.lookup_in_bytes + self.update_out_bytes)

    def _busiest_s(self, per_worker: int) -> float:
        """Seconds to move per_worker bytes from every worker through the busiest link: the
        worker's own NIC, or a store node's, which carries workers / nodes times as much."""
        return max(per_worker, self.cfg.workers * per_worker / self.nodes) / self.bandwidth_bytes_s

    @property
    def exchange_bytes_per_step(self) -> int:
        """Among the workers, all of them, one direction."""
        return self.cfg.workers * self.exchange_bytes

    @property
    def exchange_s(self) -> float:
        """One step's exchange among workers (sums out, changed rows back): each worker's NIC
        carries it both ways at once."""
        return self.exchange_bytes / self.bandwidth_bytes_s

    @property
    def sync_s(self) -> float:
        """One step's row sync, exposed in sync mode: the exchange, then the push."""
        return self.exchange_s + self.push_s

    @property
    def lookup_s(self) -> float:
        """One step's rows coming back from the lookups (store -> workers)."""
        return self._busiest_s(self.lookup_in_bytes)

    @property
    def push_s(self) -> float:
        """One step's gradient push (workers -> store); exposed in sync mode."""
        return self._busiest_s(self.update_out_bytes)

    @property
    def link_utilisation(self) -> float:
        """The busiest link direction's share of a step spent carrying one step's traffic:
        a worker's NIC (the store's traffic and the exchange) or a store node's."""
        bw, workers, nodes = self.bandwidth_bytes_s, self.cfg.workers, self.nodes
        store_out, store_in = self.lookup_in_bytes, self.lookup_out_bytes + self.update_out_bytes
        busiest = max(store_out + self.exchange_bytes, store_in + self.exchange_bytes,  # a worker's NIC
                      workers * store_out / nodes, workers * store_in / nodes)  # a store node's
        return busiest / bw / self.cfg.step_time_s

    @property
    def prefetch_hides_lookups(self) -> bool:
        return self.cfg.prefetch_depth > 0 and self.lookup_s <= self.cfg.prefetch_depth * self.cfg.step_time_s \
            and self.link_utilisation <= 1.0

    def to_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.cfg), "tables": self.cfg.num_tables, "rows": self.rows,
                "table_params": self.table_params, "table_bytes": self.table_bytes,
                "optimizer_bytes": self.optimizer_bytes, "counter_bytes": self.counter_bytes,
                "held_bytes": self.held_bytes, "nodes": self.nodes,
                "shards": self.shards, "bytes_per_shard": self.bytes_per_shard,
                "unique_fraction": list(self.unique_fraction), "step_unique_fraction": list(self.step_unique_fraction),
                "keys_per_step": self.keys_per_step,
                "rows_per_step": self.rows_per_step, "dedup_rate": self.dedup_rate,
                "lookup_out_bytes_per_worker": self.lookup_out_bytes, "lookup_in_bytes_per_worker": self.lookup_in_bytes,
                "update_out_bytes_per_worker": self.update_out_bytes, "wire_bytes_per_step": self.wire_bytes_per_step,
                "exchange_bytes_per_worker": self.exchange_bytes, "exchange_bytes_per_step": self.exchange_bytes_per_step,
                "lookup_s": self.lookup_s, "push_s": self.push_s, "exchange_s": self.exchange_s, "sync_s": self.sync_s,
                "link_utilisation": self.link_utilisation, "prefetch_hides_lookups": self.prefetch_hides_lookups,
                "push_share_of_step": self.push_s / self.cfg.step_time_s,
                "sync_share_of_step": self.sync_s / self.cfg.step_time_s}


def table_rows(cfg: PlanConfig) -> list[int]:
    """Rows of every table: the reference's primes, or rows_per_head each."""
    if not cfg.exact_primes:
        return [cfg.rows_per_head] * cfg.num_tables
    return head_rows([cfg.rows_per_head] * (cfg.max_ngram_size - 1), cfg.max_ngram_size, cfg.n_head_per_ngram,
                     cfg.engram_layers)


def place(held_bytes: int, cfg: PlanConfig) -> tuple[int, int]:
    """(nodes, shards): nodes whose usable memory holds everything; shards no larger than
    max_shard_gib, at least one per node and the same number on each."""
    nodes = max(1, math.ceil(held_bytes / (cfg.node_memory_gib * GIB * cfg.usable_fraction)))
    per_node = max(1, math.ceil(held_bytes / (cfg.max_shard_gib * GIB) / nodes))
    return nodes, nodes * per_node


def plan(cfg: PlanConfig, unique_fraction: Sequence[float], step_unique_fraction: Sequence[float] | None = None) -> Plan:
    """The plan for `cfg`; unique_fraction[i] is the distinct share of an order-(i + 2) head's
    keys among tokens_per_worker tokens (1.0 = no de-duplication), step_unique_fraction[i]
    the same among tokens_per_step tokens. Without it, the push counts each worker's distinct
    keys as distinct across workers too: an upper bound (no key shared between workers)."""
    for what, fractions in (("unique", unique_fraction), ("step unique", step_unique_fraction)):
        if fractions is None:
            continue
        if len(fractions) != cfg.max_ngram_size - 1:
            raise ValueError(f"need one {what} fraction per order 2..{cfg.max_ngram_size}, got {list(fractions)}")
        if not all(0.0 < u <= 1.0 for u in fractions):
            raise ValueError(f"{what} fractions must lie in (0, 1], got {list(fractions)}")
    rows = sum(table_rows(cfg))
    table_bytes = rows * cfg.row_bytes
    optimizer_bytes = rows * cfg.optimizer_bytes_per_row()
    counter_bytes = rows * READ_COUNTER_BYTES
    nodes, shards = place(table_bytes + optimizer_bytes + counter_bytes, cfg)
    if shards > MAX_SHARDS:
        raise ValueError(f"the tables need {shards:,} shards of at most {cfg.max_shard_gib:g} GiB; a store has at most "
                         f"{MAX_SHARDS} (raise max_shard_gib)")
    t = cfg.tokens_per_worker
    heads = cfg.engram_layers * cfg.n_head_per_ngram  # heads of one order, over all layers
    unique_per_worker = sum(min(t, round(u * t)) * heads for u in unique_fraction)
    if step_unique_fraction is None:  # the bound: no key shared between workers
        step_unique_fraction = [min(1.0, round(u * t) * cfg.workers / cfg.tokens_per_step) for u in unique_fraction]
    ts = cfg.tokens_per_step
    unique_per_step = sum(min(ts, round(u * ts)) * heads for u in step_unique_fraction)
    keys = cfg.workers * t * cfg.num_tables
    others = (cfg.workers - 1) / cfg.workers  # the share of a worker's keys whose piece is another's
    exchange = others * (unique_per_worker * (KEY_BYTES + 4 * cfg.head_dim)  # float32 sums
                         + cfg.prefetch_depth * unique_per_worker * KEY_BYTES  # watched keys
                         + cfg.refresh_fraction * unique_per_worker * (KEY_BYTES + cfg.wire_row_bytes))  # rows back
    return Plan(cfg=cfg, rows=rows, table_params=rows * cfg.head_dim, table_bytes=table_bytes,
                optimizer_bytes=optimizer_bytes, counter_bytes=counter_bytes, nodes=nodes, shards=shards,
                unique_fraction=tuple(float(u) for u in unique_fraction),
                step_unique_fraction=tuple(float(u) for u in step_unique_fraction), keys_per_step=keys,
                rows_per_step=cfg.workers * unique_per_worker,
                lookup_out_bytes=unique_per_worker * KEY_BYTES,
                lookup_in_bytes=unique_per_worker * cfg.wire_row_bytes,
                update_out_bytes=round(unique_per_step / cfg.workers) * (KEY_BYTES + cfg.wire_row_bytes),
                exchange_bytes=round(exchange))
