"""Trains the MoE + Engram language model on any row source, with exact checkpoints.

`train(cfg, store)` runs the whole job on whatever holds the Engram tables: an
`InProcessStore`, a `MemStoreClient` over local shard processes, or one connected by name to a
store on Ray. The store is only used through the row-source interface, so every kind of store
gives the same losses and parameters (sync semantics, DESIGN.md section 3).

One step: a batch (trainer.data, fixed by (seed, step)) -> hash ids (NgramHashMapping on the
trained tokenizer) -> rows (EngramRows.fetch) -> forward/backward -> clip the dense gradients
and step AdamW while the row gradients travel to the store (which applies Adam at 5x the lr,
no decay) -> wait for the store -> the routers' balancing-bias update. The rows of the next
prefetch_depth steps are looked up while a step computes (trainer.prefetch); each update's
reply carries the rows it changed among them, which are patched in before a step uses them, so
every step reads up-to-date rows, exactly as without prefetch. With data parallelism
(trainer.parallel) each worker trains on its slice of every batch and the workers' gradients
are summed, dense and rows, so W workers train what one worker would. The learning
rate warms up linearly, then decays by a cosine to min_lr_ratio * lr; the tables follow the
same schedule. Gradient clipping covers the dense parameters only: the rows' gradients go to
the store unclipped (its Adam normalises their scale anyway).

A checkpoint is a directory: `config.json` (the resolved config), `dense.pt` (model with the
routers' biases, AdamW, step, RNG states), `tokenizer.json`, `store/` (the tables), and
`checkpoint.json`, written last, which marks it complete. The tables are saved by kind of store
(`StoreCheckpoint`): an in-process store's rows, optimizer state and versions exactly; a store
on Ray through `cluster.store.checkpoint` / `restore` (a consistent cut of rows and optimizer
state on every shard, restorable into any shard count); any other remote store as rows only (looked up), since optimizer state
cannot be read over the wire: resuming from such a checkpoint restarts the tables' Adam
moments and is not the same trajectory. Resuming an exact checkpoint continues the run exactly:
k steps + save + resume + k steps equals 2k steps, bit for bit.

Relies on torch, trainer.{data,hashing,engram,model} and the row-source interface; Ray only
through cluster.store, imported when a Ray store is checkpointed.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote

import numpy as np
import torch

from memstore.spec import DTYPES, OptimizerSpec
from memstore.threads import serial_torch
from trainer.data import DataConfig, TokenData, load_data, tokenizer_digest
from trainer.engram import EngramConfig, EngramRows, create_tables
from trainer.hashing import NgramHashMapping
from trainer.metrics import TrainerMetrics
from trainer.model import Model, ModelConfig
from trainer.parallel import STORE_WAIT_S, DataParallel
from trainer.prefetch import RowPrefetcher

log = logging.getLogger("trainer.train")


@dataclass
class TrainConfig:
    """One training run, resolved and recorded next to every checkpoint (config.json).

    Small by default so that `memstore train` finishes in about 1.5 minutes on 2 CPU cores:
    a 4-layer MoE (4 routed experts, top-2, 1 shared) with Engram at block 1 (2- and 3-grams,
    4 heads each, ~50k rows per head: 8 tables, 0.4 M rows x 32).
    """

    # data (trainer.data)
    corpus: str | None = None  # None: the standard library's .py files
    corpus_max_bytes: int = 8 << 20
    vocab_size: int = 4096
    heldout_fraction: float = 0.05
    cache_dir: str = "~/.cache/memstore"
    # backbone
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128
    n_routed_experts: int = 4
    top_k: int = 2
    n_shared_experts: int = 1
    d_expert: int = 256
    # Engram (False: the baseline without it)
    engram: bool = True
    engram_layer_ids: list[int] = field(default_factory=lambda: [1])
    max_ngram_size: int = 3
    n_head_per_ngram: int = 4
    n_embed_per_ngram: int = 128
    engram_vocab_size: list[int] = field(default_factory=lambda: [50_000, 50_000])
    # Rows start N(0, 0.02), the backbone's init scale, not the demo's N(0, 1): at 1.0 the Engram
    # output drowns this small model's 0.02-scale residual stream, and after 300 default steps
    # Engram trails the baseline by 0.65 nats (5.70 vs 5.06); at 0.02 it leads (4.99). Measured.
    table_init_std: float = 0.02
    table_prefix: str = ""  # prepended to every table name (several runs in one store)
    # How the store holds the rows (and sends them, and their gradients): float32, bfloat16
    # or float16; 16-bit tables halve the store's memory and traffic. stochastic_rounding
    # (16-bit tables only) rounds each update up or down at random, unbiased, where
    # round-to-nearest drops updates below half a unit in the last place.
    table_dtype: str = "float32"
    table_stochastic_rounding: bool = False
    # optimisation
    steps: int = 300  # length of the schedule
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    # "auto": CUDA when available, else CPU. On CUDA, rows are staged in pinned host memory
    # and copied non-blocking (trainer.engram.EngramRows).
    device: str = "auto"
    # Rows of the next prefetch_depth steps are looked up while a step computes, and patched
    # exactly before use (trainer.prefetch); 0 = off. Same parameters at every depth.
    prefetch_depth: int = 1
    # Prometheus metrics of the run (trainer.metrics) served on this port: None = not served,
    # 0 = a free port; data-parallel worker r serves on metrics_port + r.
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        if self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, got {self.prefetch_depth}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be a port number, got {self.metrics_port}")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "d_model", "n_layers",
                     "n_heads", "d_expert", "n_routed_experts", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:  # numpy's generators take no negative seed
            raise ValueError(f"seed must lie in [0, 2**63), got {self.seed}")
        if self.engram and (not self.engram_vocab_size or min(self.engram_vocab_size) < 2):
            raise ValueError(f"engram_vocab_size (rows per head) must be at least 2 each, got {self.engram_vocab_size}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must lie in [0, steps={self.steps}], got {self.warmup_steps}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if self.table_dtype not in DTYPES:
            raise ValueError(f"table_dtype must be one of {tuple(DTYPES)}, got {self.table_dtype!r}")
        if self.table_stochastic_rounding and self.table_dtype == "float32":
            raise ValueError("table_stochastic_rounding is for 16-bit tables: set table_dtype to bfloat16 or float16")

    def data_config(self) -> DataConfig:
        return DataConfig(corpus=self.corpus, max_bytes=self.corpus_max_bytes, vocab_size=self.vocab_size,
                          cache_dir=self.cache_dir, heldout_fraction=self.heldout_fraction)

    def model_config(self, vocab_size: int, pad_id: int) -> ModelConfig:
        engram = None
        if self.engram:
            engram = EngramConfig(engram_vocab_size=list(self.engram_vocab_size), max_ngram_size=self.max_ngram_size,
                                  n_embed_per_ngram=self.n_embed_per_ngram, n_head_per_ngram=self.n_head_per_ngram,
                                  layer_ids=list(self.engram_layer_ids), pad_id=pad_id, seed=self.seed,
                                  table_init_std=self.table_init_std, table_prefix=self.table_prefix,
                                  table_dtype=self.table_dtype,
                                  table_optimizer=OptimizerSpec("adam", weight_decay=0.0,
                                                                stochastic_rounding=self.table_stochastic_rounding))
        return ModelConfig(vocab_size=vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                           seq_len=self.seq_len, n_routed_experts=self.n_routed_experts, top_k=self.top_k,
                           n_shared_experts=self.n_shared_experts, d_expert=self.d_expert, engram=engram)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**d)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over warmup_steps, then a cosine from lr down to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


# ---------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything a step touches, built from a config and a store."""

    cfg: TrainConfig
    data: TokenData
    model: Model
    opt: torch.optim.AdamW
    rows: dict[int, EngramRows]  # per Engram layer; empty for the baseline
    mapping: NgramHashMapping | None
    specs: list  # the store tables (TableSpec)
    # Row gradients go to the store from here while the dense step runs on torch's threads.
    pusher: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        1, thread_name_prefix="engram-push", initializer=serial_torch))
    prefetch: RowPrefetcher | None = None  # None for the baseline
    push_wait_s: float = 0.0  # seconds blocked on the store's acknowledgement of pushes
    parallel: DataParallel | None = None  # this worker's place among data-parallel workers
    metrics: TrainerMetrics | None = None  # step time, row wait, prefetch depth, tokens/s

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This worker's slice of a whole batch (all of it without data parallelism)."""
        return batch if self.parallel is None else self.parallel.local(batch)

    def close(self) -> None:
        try:
            if self.prefetch is not None:
                self.prefetch.close()
        finally:  # an interrupt while the lookups drain still stops the push thread and metrics
            self.pusher.shutdown(wait=True)
            if self.metrics is not None:
                self.metrics.close()


def build(cfg: TrainConfig, store: Any, data: TokenData | None = None, parallel: DataParallel | None = None) -> Run:
    """Model, AdamW and the Engram tables on `store` (created if missing); the model's init
    depends on cfg.seed only, so every data-parallel worker starts from the same one."""
    if parallel is not None and cfg.batch_size % parallel.world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {parallel.world} workers")
    data = data if data is not None else load_data(cfg.data_config())
    model_cfg = cfg.model_config(data.vocab_size, data.pad_id)
    torch.manual_seed(cfg.seed)
    model = Model(model_cfg).to(resolve_device(cfg.device))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "_hc." not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "_hc." not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    ec = model_cfg.engram
    mapping, specs, rows = None, [], {}
    if ec is not None:
        if store is None:
            raise ValueError("an Engram model needs a store for its tables")
        mapping = NgramHashMapping(ec.engram_vocab_size, ec.max_ngram_size, ec.n_head_per_ngram, ec.layer_ids,
                                   ec.pad_id, ec.seed, data.tokenizer)
        specs = create_tables(store, ec, mapping)
        rows = {l: EngramRows(store, ec, l, device=resolve_device(cfg.device)) for l in ec.layer_ids}
        for block in model.blocks:  # on CUDA the rows arrive on a side stream: wait where they are used
            if block.layer_id in rows:
                block.engram.register_forward_pre_hook(lambda module, args, r=rows[block.layer_id]: r.wait_ready())
    rank = 0 if parallel is None else parallel.rank
    run = Run(cfg, data, model, opt, rows, mapping, specs, parallel=parallel, metrics=TrainerMetrics(worker=rank))
    if cfg.metrics_port is not None:
        port = run.metrics.serve(cfg.metrics_port + rank if cfg.metrics_port else 0)
        log.info("worker %d serves Prometheus metrics on port %d", rank, port)
    if rows:
        run.prefetch = RowPrefetcher(rows, mapping, cfg.prefetch_depth, limit=cfg.steps,
                                     batch_fn=lambda s: run.local(data.batch("train", cfg.batch_size, cfg.seq_len, cfg.seed, s)[0]))
    return run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _on_model_device(run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch where the model is (hashing reads the CPU copy)."""
    device = next(run.model.parameters()).device
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _fetch(run: Run, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    if not run.rows:
        return {}
    hashes = run.mapping.hash(input_ids)  # {layer: (B, T, H)}
    return {l: r.fetch(hashes[l], defer_wait=True) for l, r in run.rows.items()}


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss over cfg.eval_batches fixed held-out batches; changes no state. Data-parallel
    workers each evaluate their slice of every batch and average."""
    cfg = run.cfg
    run.model.eval()
    try:
        losses = []
        for i in range(cfg.eval_batches):
            x, y = (run.local(t) for t in run.data.batch("heldout", cfg.batch_size, cfg.seq_len, cfg.seed, i))
            rows = _fetch(run, x)
            for r in run.rows.values():
                r.discard()
            losses.append(run.model.loss(*_on_model_device(run, x, y), rows).item())
        loss = float(np.mean(losses))
        return loss if run.parallel is None else run.parallel.mean(loss)
    finally:
        run.model.train()


def train_step(run: Run, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """One optimizer step on this worker's batch (x, y); returns (loss, seconds blocked
    waiting for rows). With data parallelism the loss is the mean over all workers.

    The step's rows come from the prefetcher (looked up during earlier steps, refreshed from
    the replies of the updates acknowledged since: exact), then the lookups of the next
    prefetch_depth steps start and run while this step computes. The row gradients travel to
    the store while the dense parameters step (disjoint state), each update's reply carrying
    the rows it changed among those already prefetched; the step ends only once the store has
    applied them (sync semantics). The time blocked on that acknowledgement adds to
    run.push_wait_s, not to the returned wait."""
    lr = lr_at(run.cfg, step)
    for group in run.opt.param_groups:
        group["lr"] = lr
    dp = run.parallel
    hashes, rows, wait = {}, {}, 0.0
    if run.rows:
        waited = run.prefetch.wait_s
        hashes, fetched = run.prefetch.take(step, x)
        wait = run.prefetch.wait_s - waited
        run.prefetch.ahead(step)  # steps step+1 .. step+depth, looked up while this one computes
        rows = {l: r.fetch(hashes[l], prefetched=fetched[l], defer_wait=True) for l, r in run.rows.items()}
    loss = run.model.loss(*_on_model_device(run, x, y), rows)
    run.opt.zero_grad(set_to_none=True)
    (loss if dp is None else loss / dp.world).backward()  # W workers' sum: the whole batch's mean
    watch = run.prefetch.watch() if run.rows else {}
    push = {} if dp is None else {"parallel": dp, "update_id": dp.update_id(step)}
    pushes = run.pusher.submit(_push_layers, run.rows, lr, watch, push)
    loss_value = loss.item() if dp is None else dp.all_reduce_grads(run.model.parameters(), loss.item())
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.opt.step()
    t0 = time.perf_counter()
    fresh = pushes.result()
    run.push_wait_s += time.perf_counter() - t0
    if run.rows:
        run.prefetch.acknowledge(step, fresh)
    run.model.update_router_biases()
    return loss_value, wait


def _push_layers(rows: dict, lr: float, watch: dict, push: dict) -> dict:
    """Every Engram layer's push, in layer order (the push thread). The first failure ends
    them: a worker that went on would pair its next layer's row exchange with the other
    workers' exchange of the layer that failed here, and send that mix under a real id."""
    return {l: r.push(lr, watch=watch.get(l), **push) for l, r in rows.items()}


class _Progress:
    """One updating line on a terminal; a line every `every` steps otherwise."""

    def __init__(self, enabled: bool, total: int, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.every = max(1, total // 10)
        self.total = total
        self.dirty = False  # an unfinished updating line is on the terminal

    def step(self, step: int, text: str) -> None:
        if self.tty:
            self.stream.write(f"\r\033[K{text}")
            self.stream.flush()
            self.dirty = True
        elif self.enabled and (step % self.every == 0 or step == self.total):
            print(text, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """A line that stays (an eval result)."""
        if self.tty and self.dirty:
            self.stream.write("\r\033[K")
            self.dirty = False
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty and self.dirty:
            self.stream.write("\n")
            self.stream.flush()


def train(cfg: TrainConfig, store: Any, *, progress: bool = True, data: TokenData | None = None,
          until_step: int | None = None, resume: Path | str | None = None,
          checkpoint_dir: Path | str | None = None, store_name: str | None = None,
          parallel: DataParallel | None = None, progress_stream=None) -> dict:
    """Trains from step 0 (or the `resume` checkpoint's step) to `until_step` (default
    cfg.steps, the schedule's length); saves a checkpoint to `checkpoint_dir` at the end.

    store: any row source (None for the baseline, cfg.engram False); store_name: the store's
    name on Ray, for an exact store checkpoint; parallel: this worker's place among
    data-parallel workers (trainer.parallel; each runs train() with the same arguments, rank 0
    writes the checkpoint and restores the store's part of one). Returns a summary: final
    train and eval loss, tokens/s (of all workers), wait_share (share of step time blocked
    waiting for rows), push_wait_share (blocked on the store applying the row gradients),
    steps, and the prefetcher's counts (rows_fetched, rows_refreshed: unique keys per table
    and step). progress_stream: where progress goes (default stdout).
    """
    run = build(cfg, store, data, parallel)
    lead = parallel is None or parallel.rank == 0
    try:
        store_ckpt = StoreCheckpoint(store, run.specs, store_name)
        restore_store = store_ckpt.restore if lead else (lambda directory, meta: None)
        start = load_checkpoint(resume, run, restore_store) if resume is not None else 0
        if parallel is not None:
            parallel.barrier(STORE_WAIT_S)  # the store is restored before any worker reads it
        until = cfg.steps if until_step is None else until_step
        if not start <= until <= cfg.steps:
            raise ValueError(f"cannot train from step {start} to {until} of a {cfg.steps}-step schedule")
        wall0 = time.perf_counter()
        losses, evals, busy, waited, step_s = _train_loop(run, start, until, progress, progress_stream)
        if checkpoint_dir is not None and lead:  # the workers' dense states are identical
            save_checkpoint(checkpoint_dir, run.model, run.opt, until, cfg, store_ckpt.save, data=run.data)
        if parallel is not None:
            parallel.barrier(STORE_WAIT_S)
    finally:
        run.close()
    n = until - start
    return {
        "steps": n, "step": until, "losses": losses,
        "train_loss": float(np.mean(losses[-10:])) if losses else None,
        "eval_loss": evals[-1][1], "evals": evals,
        "tokens_per_s": n * cfg.batch_size * cfg.seq_len / busy if busy else None,
        "wait_share": waited / busy if busy else None,
        "train_s": busy, "wall_s": time.perf_counter() - wall0,
        "engram": cfg.engram, "table_rows": sum(s.num_rows for s in run.specs),
        "dense_params": sum(p.numel() for p in run.model.parameters()),
        "store_checkpoint": store_ckpt.kind,
        "push_wait_share": run.push_wait_s / busy if busy else None,
        "workers": 1 if parallel is None else parallel.world, "step_s": step_s,
        **({} if parallel is None or not busy else
           {"exchange_share": parallel.exchange_s / busy, "dense_reduce_share": parallel.reduce_s / busy}),
        **(run.prefetch.stats() if run.prefetch is not None else {"prefetch_depth": cfg.prefetch_depth}),
    }


@contextmanager
def _settled_heap() -> Iterator[None]:
    """Keeps the objects alive before the loop (torch's modules, the model, the data, the
    store's client) out of the cyclic garbage collector's walks while it runs. A step
    allocates enough container objects that Python ran a full collection over all of them
    every few steps: 4 % of the trainer's CPU time (perf, bench/bench_train.py). Objects
    made during the loop are collected as usual; the rest are handed back afterwards."""
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _train_loop(run: Run, start: int, until: int, progress: bool, stream=None) -> tuple[list[float], list, float, float, list[float]]:
    """Steps start..until-1 with periodic evals; (losses, [(step, eval loss)], step seconds,
    seconds of them spent waiting for the store, each step's seconds)."""
    cfg = run.cfg
    bar = _Progress(progress, until, stream)
    batches = run.data.batches("train", cfg.batch_size, cfg.seq_len, cfg.seed, start)
    if run.prefetch is not None:
        run.prefetch.limit = until  # nothing to look up past the last step
    with _settled_heap():
        losses, evals, busy, waited, step_s = _steps(run, start, until, batches, bar)
    bar.close()
    if start == until:
        evals.append((until, evaluate(run)))
    return losses, evals, busy, waited, step_s


def _steps(run: Run, start: int, until: int, batches, bar: "_Progress") -> tuple[list[float], list, float, float, list[float]]:
    """The loop of _train_loop, with its results."""
    cfg = run.cfg
    tokens_per_step = cfg.batch_size * cfg.seq_len
    losses, evals, step_s = [], [], []
    busy = waited = 0.0
    for step, (x, y) in zip(range(start, until), batches):
        t0, pushed = time.perf_counter(), run.push_wait_s
        loss, wait = train_step(run, step, run.local(x), run.local(y))
        step_s.append(time.perf_counter() - t0)
        busy += step_s[-1]
        run.metrics.step(step_s[-1], tokens=tokens_per_step // (run.parallel.world if run.parallel else 1),
                         row_wait_s=wait, push_wait_s=run.push_wait_s - pushed, prefetch_depth=cfg.prefetch_depth)
        waited += wait
        losses.append(loss)
        bar.step(step + 1, f"step {step + 1}/{until}  loss {loss:.4f}  "
                           f"{(step + 1 - start) * tokens_per_step / busy:,.0f} tok/s  waiting for rows {waited / busy:.0%}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == until:
            evals.append((step + 1, evaluate(run)))
            bar.note(f"step {step + 1}: eval loss {evals[-1][1]:.4f}")
    return losses, evals, busy, waited, step_s


# ---------------------------------------------------------------------------- checkpoints


class StoreCheckpoint:
    """Saves and restores the Engram tables of a run, by kind of store.

    "engine": an in-process store (`store.engine`): rows, optimizer state and version, exact.
    "ray": a store on Ray (store_name given, cluster.store.checkpoint present): its own
    consistent cut, exact. "rows": any other row source: rows looked up, no optimizer state.
    Files (engine, rows): `store/<quoted table name>.pt` = {spec, rows, state?, version?}.
    Restoring writes every saved row back; optimizer state too where the target is in process
    and the file has it, else the tables' optimizer state restarts (`exact` False).
    """

    LOOKUP_CHUNK = 1 << 16  # keys per lookup or assign while copying whole tables

    def __init__(self, store: Any, specs: list, store_name: str | None = None) -> None:
        self.store = store
        self.specs = specs
        self.store_name = store_name
        if store is None or not specs:
            self.kind = "none"
        elif hasattr(store, "engine"):
            self.kind = "engine"
        elif store_name is not None and self._cluster_has("checkpoint"):
            self.kind = "ray"
        else:
            self.kind = "rows"

    @staticmethod
    def _cluster_has(fn: str) -> bool:
        from cluster import store as cluster_store  # imports Ray: only for a store on Ray

        return hasattr(cluster_store, fn)

    def save(self, directory: Path) -> dict:
        directory = Path(directory)
        if self.kind == "ray":  # cluster.store.checkpoint makes the directory itself
            from cluster import store as cluster_store

            facts = cluster_store.checkpoint(self.store_name, str(directory))  # root/ckpt-<n> + LATEST
            facts = dict(facts) if isinstance(facts, dict) else {"path": str(facts)}
            facts["path"] = os.path.relpath(facts["path"], os.path.abspath(directory))  # true once moved
            return {"kind": "ray", "exact": True, "facts": facts}
        directory.mkdir(parents=True, exist_ok=True)
        for spec in self.specs:
            torch.save(self._table_state(spec), directory / f"{quote(spec.name, safe='')}.pt")
        if self.kind == "rows":
            log.warning("the store's optimizer state cannot be read remotely: this checkpoint holds the "
                        "tables' rows only, and resuming from it restarts their Adam moments")
        return {"kind": self.kind, "exact": self.kind in ("engine", "none"), "tables": [s.name for s in self.specs]}

    def _check_cut_specs(self, directory: Path) -> None:
        """The store's cut under `directory` holds this run's tables with this run's specs (a
        resume with another --engram-rows would otherwise train on the cut's tables, sized
        for the saved hashing, without a word)."""
        from memstore import checkpoint as ckpt

        cut = ckpt.latest_checkpoint(directory)
        if cut is None:
            raise ValueError(f"{directory} holds no complete checkpoint of the store")
        held = ckpt.read_manifest(cut)["tables"]
        for spec in self.specs:
            if spec.name not in held:
                raise ValueError(f"the store checkpoint {cut} has no table {spec.name!r}")
            _check_saved_spec(spec, held[spec.name], cut)

    def _table_state(self, spec) -> dict:
        if self.kind == "engine":
            table = self.store.engine.table(spec.name)
            with table.lock.read():  # rows, state and version of one moment
                return {"spec": spec.to_dict(), "rows": table.rows.clone(), "version": table.version,
                        "state": {k: v.clone() for k, v in table.state.items()}}
        parts = [self.store.lookup(spec.name, np.arange(lo, min(lo + self.LOOKUP_CHUNK, spec.num_rows)), as_tensor=True)
                 for lo in range(0, spec.num_rows, self.LOOKUP_CHUNK)]
        return {"spec": spec.to_dict(), "rows": torch.cat(parts)}

    def restore(self, directory: Path, meta: dict) -> None:
        directory = Path(directory)
        if not self.specs:
            return
        if meta["kind"] == "ray":
            if self.store_name is None or not self._cluster_has("restore"):
                raise ValueError(f"{directory} holds a checkpoint of a store on Ray: resume it on a store "
                                 f"on Ray whose cluster.store offers restore()")
            from cluster import store as cluster_store

            # A store's cut restores every table it holds: on a store shared with other runs it
            # would roll theirs back and drop those made since, losing their acknowledged updates.
            ours = {s.name for s in self.specs}
            others = sorted(set(cluster_store.layout(self.store_name)["tables"]) - ours)
            if others:
                shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
                raise ValueError(f"store {self.store_name!r} holds tables of other runs ({shown}): resuming "
                                 f"{directory}, a cut of the whole store, would roll them back; resume on a "
                                 "store of this run's own, or once the others' tables are dropped")
            self._check_cut_specs(directory)
            cluster_store.restore(self.store_name, str(directory))  # the root: its LATEST names the cut
            return
        for spec in self.specs:
            path = directory / f"{quote(spec.name, safe='')}.pt"
            if not path.exists():
                raise ValueError(f"checkpoint {directory} has no file for table {spec.name!r}")
            saved = torch.load(path, weights_only=True, map_location="cpu")
            _check_saved_spec(spec, saved["spec"], path)
            if self.kind == "engine" and "state" in saved:
                table = self.store.engine.table(spec.name)
                with table.lock.write():
                    table.rows.copy_(saved["rows"])  # in place: the numpy view of the rows stays valid
                    for k, v in table.state.items():
                        v.copy_(saved["state"][k])
                    table.version = saved["version"]
                continue
            for lo in range(0, spec.num_rows, self.LOOKUP_CHUNK):
                hi = min(lo + self.LOOKUP_CHUNK, spec.num_rows)
                self.store.assign(spec.name, np.arange(lo, hi), saved["rows"][lo:hi])
        if self.kind != "engine" or not meta.get("exact"):
            log.warning("restored the tables' rows only: their optimizer state restarts, so this "
                        "resume does not continue the saved trajectory exactly")


def _check_saved_spec(spec, saved: dict, where: Path) -> None:
    """A table's spec saved at `where` is the run's, or ValueError naming both."""
    if saved != spec.to_dict():
        raise ValueError(f"table {spec.name!r} in {where} has spec {saved}, the run has {spec.to_dict()}")


def _rng_states() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, key, *rest = states["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))


def save_checkpoint(directory: Path | str, model: Model, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                    store_checkpoint_fn: Callable[[Path], dict], *, data: TokenData | None = None) -> Path:
    """Writes a checkpoint of the run at `step` into `directory` (replacing one there):
    dense state, resolved config, the store's tables (store_checkpoint_fn(dir/"store") ->
    meta), and last `checkpoint.json`, whose presence marks the checkpoint complete.

    Everything is written aside first (`<file>.new`, `store.new/`) and moved into place only
    once all of it is: a failure meanwhile (a store cut refused, a full disk) leaves the
    checkpoint there whole, so a run resumed from its own --out can be resumed again."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = ("config.json", "dense.pt", "tokenizer.json")
    aside = {name: directory / f"{name}.new" for name in names}
    store_aside = directory / "store.new"
    shutil.rmtree(store_aside, ignore_errors=True)  # a failed save's
    resolved = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model.cfg)}
    aside["config.json"].write_text(json.dumps(resolved, indent=2) + "\n")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "rng": _rng_states()},
               aside["dense.pt"])
    meta = {"step": step, "store": store_checkpoint_fn(store_aside)}
    if data is not None:
        data.tokenizer.save(str(aside["tokenizer.json"]))
        meta["tokenizer"] = tokenizer_digest(data.tokenizer)
    # All written: swap it in. Incomplete (no checkpoint.json) only for these renames.
    (directory / "checkpoint.json").unlink(missing_ok=True)
    for name, path in aside.items():
        if path.exists():
            path.replace(directory / name)
        else:
            (directory / name).unlink(missing_ok=True)  # none this time (no tokenizer)
    old_store = directory / "store.old"
    shutil.rmtree(old_store, ignore_errors=True)
    if (directory / "store").exists():
        (directory / "store").rename(old_store)
    if store_aside.exists():
        store_aside.rename(directory / "store")
    shutil.rmtree(old_store, ignore_errors=True)
    (directory / "checkpoint.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_checkpoint(directory: Path | str) -> tuple[TrainConfig, dict]:
    """(the checkpoint's TrainConfig, its checkpoint.json); ValueError if incomplete."""
    directory = Path(directory)
    if not (directory / "checkpoint.json").exists():
        raise ValueError(f"{directory} is not a complete checkpoint (no checkpoint.json)")
    resolved = json.loads((directory / "config.json").read_text())
    return TrainConfig.from_dict(resolved["train"]), json.loads((directory / "checkpoint.json").read_text())


def load_checkpoint(directory: Path | str, run: Run, store_restore_fn: Callable[[Path, dict], None]) -> int:
    """Restores `run` (model, AdamW, RNG states, tables) from a checkpoint; returns its step."""
    directory = Path(directory)
    _, meta = read_checkpoint(directory)
    if "tokenizer" in meta and meta["tokenizer"] != tokenizer_digest(run.data.tokenizer):
        raise ValueError(f"the tokenizer differs from the one {directory} was trained with "
                         f"(has the corpus or the vocabulary size changed?)")
    dense = torch.load(directory / "dense.pt", weights_only=True, map_location="cpu")
    run.model.load_state_dict(dense["model"])
    run.opt.load_state_dict(dense["optimizer"])
    _set_rng_states(dense["rng"])
    store_restore_fn(directory / "store", meta["store"])
    return int(dense["step"])
