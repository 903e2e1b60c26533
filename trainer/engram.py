"""The Engram module and the bridge that feeds it rows from a memstore row source.

Engram (DeepSeek, arXiv 2601.07372; DESIGN.md section 2) adds hashed N-gram embedding
tables to a Transformer. `trainer.hashing` turns token ids into hash ids; this module holds
what comes after:

- `EngramConfig`: the reference's `EngramConfig` plus the tables' storage and optimizer.
- `table_specs(cfg, mapping)`: the store tables of every Engram layer.
- `EngramRows`: fetches one layer's rows from a row source (`InProcessStore` or
  `MemStoreClient`) as an autograd leaf, and pushes that leaf's gradient back as one sparse
  update per table, which the store applies with its own optimizer.
- `Engram`: the module of the reference demo (`engram_demo_v1.py`): context-aware gating of
  the looked-up memory by each hyper-connection branch, then a short causal convolution.

Table layout. One store table per (Engram layer, hash head), named
`f"{prefix}engram.l{layer}.h{head}"`, with `prime_h` rows (that head's own prime, from
`NgramHashMapping`) of `d = n_embed_per_ngram // n_head_per_ngram` values. Heads are
numbered in hash-output order (order n, then head). The reference concatenates a layer's
heads into one embedding with offsets; row k of head h here is its row `offsets[h] + k`.
One table per head keeps keys equal to hash ids (no offset arithmetic on the wire), lets the
store report load per hash head, and gives every head an independent init seed.

Deviations from the reference demo, all deliberate:
- The module takes the looked-up rows `e` instead of token ids: hashing and lookup happen
  outside (the rows live in the store and are fetched ahead of time), so forward stays pure.
- ShortConv's weight is zero-initialised (the paper's setting; the demo keeps Conv1d's
  default init), so at init `out == y` exactly and ShortConv starts as a no-op.
- The causal conv pads on the left only instead of padding both sides and cutting the
  tail; the result is the same.
- The M key projections run as one matmul over their concatenated weights and the M RMSNorms
  as one normalisation times stacked weights. Parameter names and shapes are the demo's
  (`value_proj`, `key_projs.{m}`, `norm1.{m}`, `norm2.{m}`, `short_conv.conv`,
  `short_conv.norms.{m}`), so its state dict loads (its `multi_head_embedding` lives in the
  store instead).
Kept from the demo: W_K and W_V have biases; the gating RMSNorms use torch's default eps
(the dtype's machine epsilon) and ShortConv's use 1e-5; ShortConv is norm -> conv -> SiLU
over M*D depthwise channels (branch m owns channels m*D .. m*D+D-1).

Relies on torch and on memstore's row-source interface (`lookup_many_async`, `update_many`,
`spec`); it imports nothing of gRPC or Ray.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from memstore.spec import InitSpec, OptimizerSpec, TableSpec
from trainer.hashing import table_sizes


@dataclass
class EngramConfig:
    """The reference's EngramConfig (without the tokenizer: `NgramHashMapping` takes it)
    plus how the tables are stored and trained.

    layer_ids are 0-based block indices (the demo's [1, 15] are its 2nd and 16th blocks).
    hc_mult None means "the backbone's"; when set it must equal ModelConfig.hc_mult.
    The tables' learning rate is the backbone's times table_lr_multiplier (the paper: Adam,
    5x, no weight decay); table_optimizer's own weight_decay applies to the rows.
    """

    engram_vocab_size: list[int] = field(default_factory=lambda: [129280 * 5, 129280 * 5])
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    layer_ids: list[int] = field(default_factory=lambda: [1, 15])
    pad_id: int = 2
    seed: int = 0
    kernel_size: int = 4
    hc_mult: int | None = None
    table_optimizer: OptimizerSpec = field(default_factory=lambda: OptimizerSpec("adam", weight_decay=0.0))
    table_lr_multiplier: float = 5.0
    table_init_std: float = 1.0  # nn.Embedding's N(0, 1), as in the demo
    table_dtype: str = "float32"  # storage dtype on the shards
    table_wire_dtype: str = ""  # "" = table_dtype
    table_prefix: str = ""  # prepended to every table name (several models in one store)

    def __post_init__(self) -> None:
        if self.max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2, got {self.max_ngram_size}")
        if len(self.engram_vocab_size) < self.max_ngram_size - 1:
            raise ValueError(f"engram_vocab_size needs one size per order 2..{self.max_ngram_size}, "
                             f"got {list(self.engram_vocab_size)}")
        if self.n_head_per_ngram < 1 or self.n_embed_per_ngram % self.n_head_per_ngram:
            raise ValueError(f"n_embed_per_ngram ({self.n_embed_per_ngram}) must be a multiple of "
                             f"n_head_per_ngram ({self.n_head_per_ngram})")
        if self.kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {self.kernel_size}")
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"layer_ids must be distinct, got {list(self.layer_ids)}")
        if self.table_lr_multiplier < 0:
            raise ValueError(f"table_lr_multiplier must be >= 0, got {self.table_lr_multiplier}")

    @property
    def num_heads(self) -> int:
        """Hash heads (= tables) per Engram layer."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def head_dim(self) -> int:
        """Values per table row."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def engram_hidden_size(self) -> int:
        """Size of `e`, a position's concatenated rows: (max_ngram_size - 1) * n_embed_per_ngram."""
        return self.num_heads * self.head_dim


def table_name(cfg: EngramConfig, layer_id: int, head: int) -> str:
    return f"{cfg.table_prefix}engram.l{layer_id}.h{head}"


def table_seed(cfg: EngramConfig, layer_id: int, head: int) -> int:
    """A distinct init seed per table: with one seed, key k of every head would start equal."""
    words = np.random.SeedSequence([cfg.seed, layer_id, head]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])  # < 2**63


def table_specs(cfg: EngramConfig, mapping: Any) -> list[TableSpec]:
    """The store tables of every Engram layer, layers in cfg.layer_ids order, heads in
    hash-output order. `mapping` is the `NgramHashMapping` built from the same settings."""
    sizes = table_sizes(mapping)
    if list(sizes) != list(cfg.layer_ids):
        raise ValueError(f"mapping hashes layers {list(sizes)}, config has {list(cfg.layer_ids)}")
    specs = []
    for layer_id, primes in sizes.items():
        if len(primes) != cfg.num_heads:
            raise ValueError(f"mapping has {len(primes)} heads for layer {layer_id}, config {cfg.num_heads}")
        for head, prime in enumerate(primes):
            specs.append(TableSpec(
                table_name(cfg, layer_id, head), num_rows=int(prime), dim=cfg.head_dim,
                dtype=cfg.table_dtype, wire_dtype=cfg.table_wire_dtype,
                init=InitSpec("normal", std=cfg.table_init_std), seed=table_seed(cfg, layer_id, head),
                optimizer=cfg.table_optimizer,
            ).validate())
    return specs


def create_tables(store: Any, cfg: EngramConfig, mapping: Any) -> list[TableSpec]:
    """Creates every Engram table on `store` (idempotent for identical specs)."""
    return [store.create_table(spec) for spec in table_specs(cfg, mapping)]


# ---------------------------------------------------------------------------- rows <-> autograd


class EngramRows:
    """One Engram layer's rows, fetched from a row source as an autograd leaf.

    Per step: `e = rows.fetch(hash_ids)` -> forward/backward -> `rows.push(lr)`. fetch looks
    up the H heads' rows in one call (one request per shard) and concatenates them into a leaf
    `e` (B, T, H*d) that requires grad; push sends `e.grad`, split per head, as one update per
    table (the store de-duplicates keys and sums their gradients), again in one call, and
    forgets the step.

    Prefetch: `issue(hash_ids)` starts the lookups and returns {table name: Future}; pass
    that dict (or already fetched tensors) as `fetch(hash_ids, prefetched=...)` for the same
    hash ids. Rows looked up before the previous step's push are that many updates stale;
    keeping sync semantics is the caller's business.
    """

    def __init__(self, store: Any, cfg: EngramConfig, layer_id: int, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if layer_id not in cfg.layer_ids:
            raise ValueError(f"layer {layer_id} is not an Engram layer of {list(cfg.layer_ids)}")
        self.store = store
        self.cfg = cfg
        self.layer_id = layer_id
        self.device = torch.device(device)
        self.dtype = dtype
        self.tables = [table_name(cfg, layer_id, h) for h in range(cfg.num_heads)]
        self._keys: np.ndarray | None = None  # (B, T, H) hash ids of the fetched rows
        self._leaf: torch.Tensor | None = None  # (B, T, H*d) the fetched rows
        self._copy_stream = None  # CUDA: the side stream of the host-to-device copies
        self._ready = None  # CUDA: recorded when the last fetch's copy completes

    def wait_ready(self) -> None:
        """Makes the current CUDA stream wait for the last fetch's copy (no-op on CPU or
        once waited): call before the rows are used, e.g. as the Engram module's forward
        pre-hook."""
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None

    def _check_ids(self, hash_ids: Any) -> np.ndarray:
        if isinstance(hash_ids, torch.Tensor):
            hash_ids = hash_ids.detach().cpu().numpy()
        ids = np.asarray(hash_ids)
        if ids.ndim != 3 or ids.shape[-1] != len(self.tables) or ids.dtype.kind not in "iu":
            raise ValueError(f"hash_ids must be integer (B, T, {len(self.tables)}), got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        return ids.astype(np.int64, copy=False)

    def issue(self, hash_ids: Any) -> dict[str, Future]:
        """Starts the lookups of every head, as one call for all of them (one request per
        shard); {table name: Future of (B, T, d) rows}."""
        return self._lookup(self._check_ids(hash_ids), self.tables)

    def _lookup(self, ids: np.ndarray, names: Sequence[str]) -> dict[str, Future]:
        """{name: Future of its rows} for the heads `names` of hash ids (B, T, H), looked up
        together (the row source's lookup_many)."""
        if not names:
            return {}
        head = {name: h for h, name in enumerate(self.tables)}
        both = self.store.lookup_many_async({name: ids[..., head[name]] for name in names}, as_tensor=True)
        parts = {name: Future() for name in names}

        def split(done: Future) -> None:
            try:
                rows = done.result()
            except BaseException as e:  # every head's future carries the call's error
                for part in parts.values():
                    part.set_exception(e)
            else:
                for name, part in parts.items():
                    part.set_result(rows[name])

        both.add_done_callback(split)
        return parts

    def fetch(self, hash_ids: Any, prefetched: Mapping[str, Future | torch.Tensor] | None = None, *,
              defer_wait: bool = False) -> torch.Tensor:
        """Rows of `hash_ids` (B, T, H) as a leaf `e` (B, T, H*d) that requires grad.

        prefetched: {table name: Future or (B, T, d) tensor} for these same hash ids;
        heads missing from it are looked up now. On CUDA the copy runs on a side stream and
        the current stream waits for it before `fetch` returns (without blocking the host);
        defer_wait=True leaves that wait to the caller (`wait_ready`, e.g. a forward pre-hook
        of the Engram module), so the copy overlaps the work queued before it.
        """
        if self._leaf is not None:
            raise RuntimeError(f"Engram layer {self.layer_id}: fetch() again before push() "
                               f"would drop the previous step's row gradients")
        ids = self._check_ids(hash_ids)
        prefetched = prefetched or {}
        pending = self._lookup(ids, [name for name in self.tables if name not in prefetched])
        parts = []
        for name in self.tables:
            src = prefetched.get(name, pending.get(name))
            rows = src.result() if isinstance(src, Future) else src
            if tuple(rows.shape) != (*ids.shape[:2], self.cfg.head_dim):
                raise ValueError(f"rows of {name} have shape {tuple(rows.shape)}, expected "
                                 f"{(*ids.shape[:2], self.cfg.head_dim)}")
            parts.append(rows)
        if self.device.type == "cuda":
            # Staged in pinned host memory and copied on a side stream, so the copy runs while
            # the compute stream works through what precedes the Engram layer; the compute
            # stream waits for it only when the layer starts (`wait_ready`, a forward pre-hook
            # that trainer.train installs). The caching host allocator keeps the staging
            # buffer until the copy has completed; record_stream keeps `e` from being reused
            # before the compute stream is done with it.
            staged = torch.empty((*ids.shape[:2], len(self.tables) * self.cfg.head_dim), dtype=parts[0].dtype,
                                 pin_memory=True)
            torch.cat(parts, dim=-1, out=staged)
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._copy_stream):
                e = staged.to(self.device, self.dtype, non_blocking=True)
                self._ready = torch.cuda.Event()
                self._ready.record(self._copy_stream)
            e.record_stream(torch.cuda.current_stream(self.device))
            if not defer_wait:
                self.wait_ready()
        else:
            e = torch.cat(parts, dim=-1).to(self.device, self.dtype)  # (B, T, H*d), a fresh tensor
        e.requires_grad_(True)
        self._keys, self._leaf = ids, e
        return e

    def push(self, lr: float, *, watch: Mapping[str, np.ndarray] | None = None, parallel: Any = None,
             update_id: str | None = None) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
        """Sends the rows' gradients, one update per table; lr is the backbone's learning
        rate (the tables get lr * cfg.table_lr_multiplier). Call after backward().

        watch: {table: keys} whose rows, where this update changes them, come back in the
        update's reply (`update_read`); returns {table: (sorted changed keys, rows)} for the
        watched tables. parallel: the run's trainer.parallel.DataParallel; then the workers
        together push the summed update of all their batches, each worker one piece of it
        under `update_id` + table + piece, and each gets the changed rows it watches."""
        assert (parallel is None) == (update_id is None), (
            "data-parallel pushes need both parallel and update_id: without the id a retried piece "
            "could apply twice, without parallel only this worker's part applies")
        if self._leaf is None:
            raise RuntimeError(f"Engram layer {self.layer_id}: push() without a fetch()")
        if self._leaf.grad is None:
            raise RuntimeError(f"Engram layer {self.layer_id}: no gradient reached the rows; "
                               f"call backward() on a loss that uses them before push()")
        B, T, H = self._keys.shape
        keys = self._keys
        grads = self._leaf.grad.detach().to("cpu", torch.float32).view(B, T, H, -1)  # (B, T, H, d)
        self._keys = self._leaf = None  # the step is over even if an update fails
        table_lr = float(lr) * self.cfg.table_lr_multiplier
        watch = {name: watch[name] for name in self.tables if name in watch} if watch else {}
        if parallel is not None:
            return parallel.push(self.store, self.tables, keys, grads, table_lr, watch, update_id)
        # One call for every head (one request per shard), each head's update its own.
        return self.store.update_many(
            {name: (keys[..., h], grads[:, :, h]) for h, name in enumerate(self.tables)}, table_lr, watch=watch)

    def discard(self) -> None:
        """Forgets a fetched step without pushing (e.g. a skipped batch)."""
        self._keys = self._leaf = None


# ---------------------------------------------------------------------------- the module


class ShortConv(nn.Module):
    """Per-branch RMSNorm -> depthwise causal Conv1d over T (M*D channels) -> SiLU."""

    def __init__(self, hidden_size: int, kernel_size: int = 4, dilation: int = 1,
                 norm_eps: float = 1e-5, hc_mult: int = 4, activation: bool = True):
        super().__init__()
        self.hc_mult = hc_mult
        self.activation = activation
        self.left_pad = (kernel_size - 1) * dilation
        channels = hidden_size * hc_mult
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False,
                              dilation=dilation)
        nn.init.zeros_(self.conv.weight)  # the paper's near-identity start (demo: default init)
        self.norms = nn.ModuleList([nn.RMSNorm(hidden_size, eps=norm_eps) for _ in range(hc_mult)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, M, D = x.shape
        assert M == self.hc_mult, f"input has {M} branches, ShortConv was built for {self.hc_mult}"
        weight = torch.stack([n.weight for n in self.norms])  # (M, D)
        x = F.rms_norm(x, (D,), eps=self.norms[0].eps) * weight  # (B, T, M, D)
        x = x.reshape(B, T, M * D).transpose(1, 2)  # (B, M*D, T)
        y = self.conv(F.pad(x, (self.left_pad, 0)))  # (B, M*D, T), causal: left padding only
        if self.activation:
            y = F.silu(y)
        return y.transpose(1, 2).reshape(B, T, M, D)  # (B, T, M, D)


class Engram(nn.Module):
    """Gates the looked-up memory `e` by each branch of the hidden state, then ShortConv.

    forward(hidden (B, T, M, D), e (B, T, engram_hidden_size)) -> (B, T, M, D); the block
    adds the result to the residual stream (every branch) before attention.
    """

    def __init__(self, cfg: EngramConfig, layer_id: int, hidden_size: int, hc_mult: int | None = None):
        super().__init__()
        hc_mult = hc_mult if hc_mult is not None else cfg.hc_mult
        if hc_mult is None or hc_mult < 1:
            raise ValueError(f"Engram needs hc_mult >= 1 (from the backbone or the config), got {hc_mult}")
        if cfg.hc_mult is not None and cfg.hc_mult != hc_mult:
            raise ValueError(f"EngramConfig.hc_mult={cfg.hc_mult} but the backbone has {hc_mult} branches")
        self.layer_id = layer_id
        self.hidden_size = hidden_size
        self.hc_mult = hc_mult
        E = cfg.engram_hidden_size
        self.short_conv = ShortConv(hidden_size, cfg.kernel_size, dilation=cfg.max_ngram_size, hc_mult=hc_mult)
        self.value_proj = nn.Linear(E, hidden_size)
        self.key_projs = nn.ModuleList([nn.Linear(E, hidden_size) for _ in range(hc_mult)])
        self.norm1 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])  # keys
        self.norm2 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])  # queries

    def gates(self, hidden: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """g (B, T, M, 1) = sigmoid(sign(s) sqrt(max(|s|, 1e-6))), s = <RMSNorm(W_K[m] e),
        RMSNorm(h_m)> / sqrt(D)."""
        B, T, M, D = hidden.shape
        w_k = torch.cat([p.weight for p in self.key_projs])  # (M*D, E)
        b_k = torch.cat([p.bias for p in self.key_projs])  # (M*D,)
        key = F.linear(e, w_k, b_k).view(B, T, M, D)  # (B, T, M, D)
        key = F.rms_norm(key, (D,), eps=self.norm1[0].eps) * torch.stack([n.weight for n in self.norm1])
        query = F.rms_norm(hidden, (D,), eps=self.norm2[0].eps) * torch.stack([n.weight for n in self.norm2])
        s = (key * query).sum(dim=-1) / math.sqrt(D)  # (B, T, M)
        s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
        return s.sigmoid().unsqueeze(-1)  # (B, T, M, 1)

    def forward(self, hidden: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        B, T, M, D = hidden.shape
        assert M == self.hc_mult and D == self.hidden_size, (
            f"hidden is {tuple(hidden.shape)}, Engram layer {self.layer_id} expects "
            f"(B, T, {self.hc_mult}, {self.hidden_size})")
        assert e.shape[:2] == (B, T), f"rows {tuple(e.shape)} do not match hidden {tuple(hidden.shape)}"
        value = self.value_proj(e).unsqueeze(2)  # (B, T, 1, D), shared by the branches
        y = self.gates(hidden, e) * value  # (B, T, M, D)
        return y + self.short_conv(y)


def table_params(specs: Sequence[TableSpec]) -> int:
    """Values held in the given tables (rows x dim)."""
    return sum(s.num_rows * s.dim for s in specs)
