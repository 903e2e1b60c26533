"""`memstore plan`: how much store a model's Engram tables need, and what a step moves.

Starts from a preset (the paper's Engram-27B or Engram-40B, `trainer.capacity.PRESETS`),
overridden by the flags given; prints table and optimizer bytes, the nodes and shards that
hold them, the rows and bytes a step moves after de-duplication and whether prefetch hides
the transfer, then one JSON line. The de-duplication rate is measured on a real corpus
(`trainer.dedup`: the default corpus unless --corpus, cached after the first run) unless
--unique-fraction gives it.
"""

from __future__ import annotations

import argparse
import json

PRESET_NAMES = ("engram-27b", "engram-40b")  # trainer.capacity.PRESETS, named here so parsing imports nothing
# flag dest -> PlanConfig field
_PLAN_FLAGS = {
    "engram_layers": "engram_layers", "max_ngram": "max_ngram_size", "heads_per_ngram": "n_head_per_ngram",
    "rows_per_head": "rows_per_head", "d_mem": "d_mem", "dtype": "dtype", "wire_dtype": "wire_dtype",
    "optimizer": "optimizer", "momentum": "momentum", "stochastic_rounding": "stochastic_rounding",
    "tokens_per_step": "tokens_per_step", "workers": "workers",
    "step_time": "step_time_s", "prefetch": "prefetch_depth", "refresh_fraction": "refresh_fraction",
    "node_memory_gib": "node_memory_gib",
    "usable_fraction": "usable_fraction", "max_shard_gib": "max_shard_gib", "bandwidth_gbps": "bandwidth_gbps",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="capacity plan: table and optimizer bytes, shards, nodes, bytes per step",
                       description="Plan a store for a model's Engram tables: memory, shards and nodes, and the "
                                   "rows and bytes one training step moves after de-duplication.")
    p.add_argument("--preset", choices=PRESET_NAMES, default="engram-27b",
                   help="start from this model (default engram-27b); the flags below override it")

    t = p.add_argument_group("tables (default: the preset's)")
    t.add_argument("--engram-layers", metavar="N", type=int, help="blocks with Engram (preset: 2)")
    t.add_argument("--max-ngram", metavar="N", type=int, help="largest N-gram order; orders 2..N (preset: 3)")
    t.add_argument("--heads-per-ngram", metavar="N", type=int, help="hash heads (tables) per order and layer (preset: 8)")
    t.add_argument("--rows-per-head", metavar="N", type=int, help="rows of one hash head, before rounding up to a "
                   "prime (preset: 2,262,400 for 27B, 7,226,562 for 40B)")
    t.add_argument("--d-mem", metavar="N", type=int, help="a position's concatenated rows per layer, all orders "
                   "and heads (preset: 1280, i.e. 80 values per row)")
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="storage dtype on the shards (preset: float32)")
    t.add_argument("--wire-dtype", choices=["float32", "bfloat16", "float16"], help="rows and gradients on the wire (default: --dtype)")
    t.add_argument("--optimizer", choices=["adam", "adagrad", "sgd"], help="the tables' sparse optimizer (preset: adam)")
    t.add_argument("--momentum", metavar="M", type=float, help="sgd momentum; non-zero keeps a buffer per value (default 0)")
    t.add_argument("--stochastic-rounding", action="store_true", default=None,
                   help="16-bit tables rounded stochastically: 4 bytes a row of update count besides")
    t.add_argument("--no-primes", action="store_true", help="every head has exactly --rows-per-head rows "
                   "(default: the next unused prime above it, as the hashing does)")

    w = p.add_argument_group("workload (the preset's are assumptions; the paper gives tokens per step only)")
    w.add_argument("--tokens-per-step", metavar="N", type=int, help="tokens of one optimizer step, all workers "
                   "(preset: 1280 x 4096 = 5,242,880)")
    w.add_argument("--workers", metavar="N", type=int, help="data-parallel trainer processes; each de-duplicates "
                   "its own keys (preset: 64)")
    w.add_argument("--step-time", metavar="S", type=float, help="seconds per optimizer step (preset: 12)")
    w.add_argument("--prefetch", metavar="D", type=int, help="steps looked up ahead (preset: 1; 0 = off)")
    w.add_argument("--refresh-fraction", metavar="F", type=float,
                   help="share of a worker's looked-up rows that come back refreshed from update replies "
                        "(default 0.1; measured 0.068 at depth 1, 0.115 at depth 2 on the default model)")

    m = p.add_argument_group("machines")
    m.add_argument("--node-memory-gib", metavar="GIB", type=float, help="memory of one store node (default 512)")
    m.add_argument("--usable-fraction", metavar="F", type=float, help="share of a node's memory for rows and "
                   "optimizer state (default 0.8)")
    m.add_argument("--max-shard-gib", metavar="GIB", type=float, help="largest shard (default 64)")
    m.add_argument("--bandwidth-gbps", metavar="GBPS", type=float, help="every node's NIC, each direction, "
                   "Gbit/s (default 100)")

    d = p.add_argument_group("de-duplication (measured on a corpus with trainer.data + trainer.hashing, cached)")
    d.add_argument("--unique-fraction", metavar="F", type=float, nargs="+",
                   help="distinct share of a head's keys per order 2..N, instead of measuring a corpus")
    d.add_argument("--corpus", metavar="PATH", help="corpus to measure (default: the Python standard library's source)")
    d.add_argument("--corpus-mb", metavar="MB", type=float, default=8.0, help="read at most this many MB of it (default 8)")
    d.add_argument("--vocab-size", metavar="N", type=int, default=4096, help="BPE vocabulary of the corpus (default 4096)")
    d.add_argument("--cache-dir", metavar="DIR", default="~/.cache/memstore",
                   help="where the corpus, tokenizer and estimate are cached (default ~/.cache/memstore)")
    d.add_argument("--seq-len", metavar="N", type=int, default=4096, help="length of the sampled windows (default 4096)")


def resolve(args: argparse.Namespace):
    from trainer.capacity import preset

    given = {field: getattr(args, dest) for dest, field in _PLAN_FLAGS.items() if getattr(args, dest) is not None}
    if args.no_primes:
        given["exact_primes"] = False
    name = args.preset if not given else f"{args.preset}+flags"
    return preset(args.preset, name=name, **given)


def unique_fractions(args: argparse.Namespace, cfg) -> tuple[list[float], list[float] | None, dict]:
    """Per order: the given shares, or the corpus estimates at tokens_per_worker (lookups) and
    tokens_per_step (the push; None when given by hand: the planner's bound); and where they
    came from."""
    if args.unique_fraction is not None:
        return list(args.unique_fraction), None, {"source": "--unique-fraction"}
    from trainer.data import DataConfig
    from trainer.dedup import DedupConfig, estimate

    dedup_cfg = DedupConfig(max_ngram_size=cfg.max_ngram_size, n_head_per_ngram=cfg.n_head_per_ngram,
                            rows_per_head=cfg.rows_per_head, seq_len=args.seq_len,
                            sizes=tuple(args.seq_len * k for k in (1, 4, 16, 64)))
    data_cfg = DataConfig(corpus=args.corpus, max_bytes=int(args.corpus_mb * (1 << 20)), vocab_size=args.vocab_size,
                          cache_dir=args.cache_dir)
    est = estimate(dedup_cfg, data_cfg)
    t = cfg.tokens_per_worker
    fractions = [est.unique_fraction(n, t) for n in range(2, cfg.max_ngram_size + 1)]
    step = [est.unique_fraction(n, cfg.tokens_per_step) for n in range(2, cfg.max_ngram_size + 1)]
    return fractions, step, {"source": "corpus", "corpus": est.corpus, "corpus_tokens": est.corpus_tokens,
                       "cached": est.cache_hit, "sizes": est.sizes,
                       "distinct_share": {str(n): v for n, v in est.distinct_share.items()},
                       "beta": {str(n): est.beta(n) for n in est.distinct_share},
                       "extrapolation": est.extrapolation(t)}


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render(p, source: dict) -> str:
    from trainer.capacity import PAPER_TABLE_PARAMS

    c = p.cfg
    base = c.name.split("+")[0]
    ref = PAPER_TABLE_PARAMS.get(base) if c.name == base else None
    ref_text = f"   (paper: {ref / 1e9:.1f} B; ratio {p.table_params / ref:.3f})" if ref else ""
    usable = c.node_memory_gib * 2**30 * c.usable_fraction
    lines = [
        f"plan {c.name}",
        f"  tables      {c.num_tables} ({c.engram_layers} layers x {c.max_ngram_size - 1} orders x "
        f"{c.n_head_per_ngram} heads), {p.rows:,} rows x {c.head_dim} {c.dtype}"
        f"{' (primes)' if c.exact_primes else ''}",
        f"  params      {p.table_params / 1e9:.2f} B{ref_text}",
        f"  memory      rows {_gib(p.table_bytes)} + {c.optimizer} state {_gib(p.optimizer_bytes)} "
        f"({p.optimizer_bytes / p.table_bytes:.2f}x the rows) + read counters {_gib(p.counter_bytes)} "
        f"= {_gib(p.held_bytes)}",
        f"  placement   {p.nodes} node(s) of {c.node_memory_gib:g} GiB, {c.usable_fraction:.0%} usable: "
        f"{p.held_bytes / (p.nodes * usable):.0%} of it used; {p.shards} shard(s) of "
        f"{_gib(p.bytes_per_shard)} (limit {c.max_shard_gib:g} GiB)",
        f"  per step    {c.tokens_per_step:,} tokens over {c.workers} workers ({c.tokens_per_worker:,} each)",
        f"  keys        {p.keys_per_step:,} -> {p.rows_per_step:,} rows after de-duplication "
        f"(de-dup rate {p.dedup_rate:.1%}; distinct share "
        + ", ".join(f"{n}-grams {u:.1%}" for n, u in zip(range(2, c.max_ngram_size + 1), p.unique_fraction)) + ")",
        f"  wire        per worker: lookup {_mib(p.lookup_out_bytes)} out, {_mib(p.lookup_in_bytes)} in; "
        f"push {_mib(p.update_out_bytes)} out (its 1/{c.workers} piece of the step's update); all workers "
        f"{_gib(p.wire_bytes_per_step)} per step; among workers {_mib(p.exchange_bytes)} each way per worker "
        f"(gradient sums, watched keys, {c.refresh_fraction:.0%} of looked-up rows refreshed)",
        f"  time        lookups {p.lookup_s:.3f} s of the {c.prefetch_depth} x {c.step_time_s:g} s prefetch "
        f"has ({p.lookup_s / max(c.prefetch_depth * c.step_time_s, 1e-12):.1%}); row sync {p.sync_s:.3f} s "
        f"(exchange {p.exchange_s:.3f} s + push {p.push_s:.3f} s, {p.sync_s / c.step_time_s:.1%} of a step); busiest link {p.link_utilisation:.1%} busy "
        f"at {c.bandwidth_gbps:g} Gbit/s",
        f"  verdict     prefetch {'hides' if p.prefetch_hides_lookups else 'does NOT hide'} the lookups; "
        f"the row sync stays on the step's critical path in sync mode (+{p.sync_s:.3f} s a step)",
    ]
    if source["source"] == "corpus":
        shares = "; ".join(f"{n}-grams " + " ".join(f"{v:.3f}" for v in vs) for n, vs in source["distinct_share"].items())
        lines.append(f"  de-dup from {source['corpus_tokens']:,} tokens of {source['corpus']} "
                     f"({'cached' if source['cached'] else 'measured now'}): distinct share at "
                     f"{'/'.join(f'{s:,}' for s in source['sizes'])} tokens: {shares}"
                     + (f"; extrapolated {source['extrapolation']:.1f}x past the largest sample"
                        if source["extrapolation"] > 1 else ""))
        lines.append("  caveat      the corpus is not the paper's (web text, a 128k tokenizer): its N-gram "
                     "statistics set the de-dup rate")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from trainer.capacity import plan

    cfg = resolve(args)
    fractions, step, source = unique_fractions(args, cfg)
    p = plan(cfg, fractions, step)
    print(render(p, source))
    print(json.dumps({"plan": p.to_dict(), "dedup": source}))
    return 0
