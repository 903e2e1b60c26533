"""How many of a step's Engram keys are distinct: measured on a real corpus, cached.

The client sends each distinct key of a lookup once (memstore.keys), so the rows a step
moves are the distinct hash ids among its tokens, per table. N-grams are Zipfian, so the
distinct share falls as the batch grows. This module measures it on a corpus with the real
pipeline, `trainer.data` (the corpus and its BPE, cached) and `trainer.hashing`
(`NgramHashMapping` with the planned table sizes, so hash collisions merge keys as they
would in the store):

- for each sample size N of a ladder (tokens), `samples` batches of N / seq_len windows of
  seq_len tokens at random positions of the training split, hashed for one Engram layer;
  per head, the distinct ids / N; averaged over the heads of an order and the samples;
- per order, the distinct count is piecewise linear in log-log between the measured sizes
  (Heaps' law, distinct(N) ~ K * N**beta, with a local beta), extended past either end of the
  ladder with the slope of its nearest segment, and capped at N and at the table's rows.

The estimate is cached as JSON under cache_dir/plan/, keyed by the corpus's cache entry and
every setting above. One Engram layer stands for all: the layers differ only in their hash
multipliers. The estimate is that of this corpus and tokenizer; with the default one (Python
source, a 4096-token BPE) it is not the paper's (web text, a 128k tokenizer), and it says so.

Relies on numpy, trainer.data and trainer.hashing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trainer.data import DataConfig, TokenData, load_data
from trainer.hashing import NgramHashMapping

_FORMAT = 1  # bump when the cached estimate changes meaning


@dataclass(frozen=True)
class DedupConfig:
    """What the estimate depends on (besides the corpus)."""

    max_ngram_size: int = 3
    n_head_per_ngram: int = 8
    rows_per_head: int = 2_262_400
    seq_len: int = 4096
    sizes: tuple[int, ...] = (4096, 16384, 65536, 262144)  # tokens per sample
    samples: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.sizes) < 2 or any(s < self.seq_len or s % self.seq_len for s in self.sizes):
            raise ValueError(f"need >= 2 sample sizes, each a multiple of seq_len={self.seq_len}, got {self.sizes}")
        if list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"sample sizes must increase, got {self.sizes}")
        if self.samples < 1:
            raise ValueError(f"samples must be positive, got {self.samples}")


@dataclass
class DedupEstimate:
    """Measured distinct shares per order; `unique_fraction` reads them at any size."""

    cfg: DedupConfig
    corpus: str  # the data cache entry it was measured on
    corpus_tokens: int
    sizes: list[int]
    distinct_share: dict[int, list[float]]  # order n -> share at each size
    table_rows: dict[int, int] = field(default_factory=dict)  # order n -> smallest table of that order
    cache_hit: bool = False

    def beta(self, n: int) -> float:
        """Heaps' exponent of order n over the ladder's last segment (the one extrapolated)."""
        x = np.log(self.sizes[-2:])
        y = np.log(np.asarray(self.distinct_share[n][-2:]) * self.sizes[-2:])
        return float((y[1] - y[0]) / (x[1] - x[0]))

    def unique_fraction(self, n: int, tokens: int) -> float:
        """Distinct share of an order-n head's keys among `tokens` tokens (at least 1)."""
        if tokens < 1:
            raise ValueError(f"a distinct share needs at least one token, got {tokens}")
        x = np.log(np.asarray(self.sizes, dtype=np.float64))
        y = np.log(np.asarray(self.distinct_share[n]) * np.asarray(self.sizes))  # log distinct
        t = np.log(max(1, tokens))
        i = int(np.clip(np.searchsorted(x, t) - 1, 0, len(x) - 2))  # segment: nearest one outside the ladder
        slope = (y[i + 1] - y[i]) / (x[i + 1] - x[i])
        distinct = float(np.exp(y[i] + slope * (t - x[i])))
        distinct = min(distinct, float(tokens), float(self.table_rows.get(n, tokens)))
        return distinct / tokens

    def extrapolation(self, tokens: int) -> float:
        """How far past the measured ladder `tokens` lies (1.0 = inside)."""
        return max(1.0, tokens / self.sizes[-1])

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "config": asdict(self.cfg), "corpus": self.corpus,
                "corpus_tokens": self.corpus_tokens, "sizes": self.sizes,
                "distinct_share": {str(n): v for n, v in self.distinct_share.items()},
                "table_rows": {str(n): v for n, v in self.table_rows.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "DedupEstimate":
        cfg = d["config"]
        return cls(cfg=DedupConfig(**{**cfg, "sizes": tuple(cfg["sizes"])}), corpus=d["corpus"],
                   corpus_tokens=d["corpus_tokens"], sizes=list(d["sizes"]),
                   distinct_share={int(n): v for n, v in d["distinct_share"].items()},
                   table_rows={int(n): v for n, v in d["table_rows"].items()}, cache_hit=True)


def measure(data: TokenData, cfg: DedupConfig) -> DedupEstimate:
    """Hashes samples of the training split and counts distinct ids per head."""
    tokens = data.split("train")
    if len(tokens) < cfg.seq_len + 1:
        raise ValueError(f"the corpus's training split has {len(tokens)} tokens, fewer than seq_len {cfg.seq_len}")
    mapping = NgramHashMapping([cfg.rows_per_head] * (cfg.max_ngram_size - 1), cfg.max_ngram_size,
                               cfg.n_head_per_ngram, [0], data.pad_id, cfg.seed, data.tokenizer)
    rng = np.random.default_rng(cfg.seed)
    orders = range(2, cfg.max_ngram_size + 1)
    share = {n: [] for n in orders}
    for size in cfg.sizes:
        per_order = {n: [] for n in orders}
        for _ in range(cfg.samples):
            starts = rng.integers(0, len(tokens) - cfg.seq_len, size=size // cfg.seq_len)  # (B,)
            x = tokens[starts[:, None] + np.arange(cfg.seq_len)].astype(np.int64)  # (B, T)
            ids = mapping.hash(x)[0].reshape(-1, cfg.max_ngram_size - 1, cfg.n_head_per_ngram)  # (B*T, orders, heads)
            # distinct ids per (order, head): sort each column, count value changes
            cols = np.sort(ids.reshape(len(ids), -1), axis=0)  # (B*T, orders*heads)
            distinct = 1 + (np.diff(cols, axis=0) != 0).sum(axis=0)  # (orders*heads,)
            for i, n in enumerate(orders):
                per_order[n].append(distinct.reshape(-1, cfg.n_head_per_ngram)[i].mean() / size)
        for n in orders:
            share[n].append(float(np.mean(per_order[n])))
    est = DedupEstimate(cfg=cfg, corpus=str(data.directory), corpus_tokens=int(len(tokens)), sizes=list(cfg.sizes),
                        distinct_share=share,
                        table_rows={n: min(p) for n, p in zip(orders, mapping.vocab_size_across_layers[0])})
    return est


def _cache_path(cache_dir: str, data: TokenData, cfg: DedupConfig) -> Path:
    key = json.dumps({"format": _FORMAT, "corpus": data.directory.name, "config": asdict(cfg)}, sort_keys=True)
    return Path(cache_dir).expanduser() / "plan" / f"dedup-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def estimate(cfg: DedupConfig, data_cfg: DataConfig | None = None, data: TokenData | None = None) -> DedupEstimate:
    """The cached estimate for the corpus of data_cfg (default: the default corpus), measured
    and cached on first use."""
    data_cfg = data_cfg or DataConfig()
    data = data if data is not None else load_data(data_cfg)
    path = _cache_path(data_cfg.cache_dir, data, cfg)
    if path.exists():
        return DedupEstimate.from_dict(json.loads(path.read_text()))
    est = measure(data, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(est.to_dict(), f, indent=1)
    os.replace(tmp, path)
    return est
