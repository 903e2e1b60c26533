"""`memstore exp`: the memory-capacity experiments, trained on real local shard processes.

`memstore exp allocation` sweeps rho, the share of a fixed sparse budget given to routed
experts (the rest goes to Engram table rows; trainer.allocation), at fixed total and
activated parameters. `memstore exp slots` sweeps the table rows of one backbone over decades,
with the store's shard count growing with the rows. Both train every point with the same data,
steps and seeds (trainer.experiments), save each finished point under --out/points/ (a rerun
skips them: an interrupted sweep resumes), print a table and one JSON line, and draw a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

# flag dest -> TrainConfig field, for flags both experiments share
_CONFIG_FLAGS = {
    "corpus": "corpus", "vocab_size": "vocab_size", "cache_dir": "cache_dir", "d_model": "d_model",
    "layers": "n_layers", "heads": "n_heads", "experts": "n_routed_experts", "top_k": "top_k",
    "d_expert": "d_expert", "engram_heads": "n_head_per_ngram", "engram_dim": "n_embed_per_ngram",
    "steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len", "lr": "lr", "eval_batches": "eval_batches",
    "prefetch": "prefetch_depth",
}
DEFAULT_EVAL_BATCHES = 32  # 32 x 8 x 128 held-out tokens per point: less noise than training's 8
ALLOCATION_EXPERTS = 12  # E_0: 10 inactive experts make the budget, so rho moves in 10 % steps


def _floats(text: str) -> list[float]:
    """A sweep's values: one or more finite numbers, none repeated (a point trains once)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected one or more finite numbers, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a value is repeated in {text!r}")
    return values


def _ints(text: str) -> list[int]:
    values = [int(round(x)) for x in _floats(text)]  # 1e6 reads as 1000000
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a value is repeated in {text!r} (once rounded to integers)")
    return values


def _common(p: argparse.ArgumentParser, experts_default: int) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--corpus", metavar="PATH", help="text/JSONL file or folder (default: the Python standard library's source)")
    data.add_argument("--corpus-mb", metavar="MB", type=float, help="read at most this many MB of the corpus (default 8)")
    data.add_argument("--vocab-size", metavar="N", type=int, help="BPE vocabulary size (default 4096)")
    data.add_argument("--cache-dir", metavar="DIR", help="tokenizer and token cache (default ~/.cache/memstore)")

    model = p.add_argument_group("backbone (defaults: TrainConfig in trainer/train.py)")
    model.add_argument("--d-model", metavar="N", type=int, help="hidden size (default 128)")
    model.add_argument("--layers", metavar="N", type=int, help="transformer blocks, all MoE (default 4)")
    model.add_argument("--heads", metavar="N", type=int, help="attention heads (default 4)")
    model.add_argument("--experts", metavar="N", type=int, help=f"routed experts per MoE layer (default {experts_default})")
    model.add_argument("--top-k", metavar="K", type=int, help="routed experts per token (default 2)")
    model.add_argument("--d-expert", metavar="N", type=int, help="hidden size of one expert (default 256)")
    model.add_argument("--engram-heads", metavar="N", type=int, help="hash heads per N-gram order (default 4)")
    model.add_argument("--engram-dim", metavar="N", type=int, help="values per order, split over its heads (default 128)")

    opt = p.add_argument_group("training (the same for every point)")
    opt.add_argument("--steps", metavar="N", type=int, help="optimizer steps per point; warmup is a tenth (default 300)")
    opt.add_argument("--batch-size", metavar="N", type=int, help="sequences per step (default 8)")
    opt.add_argument("--seq-len", metavar="N", type=int, help="tokens per sequence (default 128)")
    opt.add_argument("--lr", metavar="LR", type=float, help="peak AdamW learning rate; the tables get 5x (default 3e-3)")
    opt.add_argument("--eval-batches", metavar="N", type=int, help=f"held-out batches of the final loss (default {DEFAULT_EVAL_BATCHES})")
    opt.add_argument("--seeds", metavar="S", type=_ints, default=[0], help="comma-separated seeds; every point "
                     "trains once per seed (default 0)")
    opt.add_argument("--prefetch", metavar="N", type=int, help="rows of the next N steps looked up ahead (default 1)")

    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", type=Path, help="points, sweep record and plot (default experiments/<name>)")
    out.add_argument("--plot", metavar="PNG", type=Path, help="where the plot goes (default <out>/<name>.png)")
    out.add_argument("--no-plot", action="store_true", help="draw nothing (matplotlib is the optional [exp] extra)")
    out.add_argument("--progress", action="store_true", help="show every point's training progress")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exp", help="memory-capacity experiments: allocation sweep over rho, slot scaling",
                       description="Memory-capacity experiments trained on local shard processes; resumable.")
    kinds = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")

    a = kinds.add_parser("allocation", help="split a fixed sparse budget between routed experts and table rows",
                         description="Sweep rho, the share of P_sparse = P_total - P_active in routed experts; "
                                     "the rest goes to Engram table rows (the paper's section 3.1).")
    sweep = a.add_argument_group("sweep")
    sweep.add_argument("--rhos", metavar="R", type=_floats, default=[1.0, 0.9, 0.8, 0.6, 0.4],
                       help="comma-separated allocation ratios in [0, 1]; 1 = pure MoE (default 1,0.9,0.8,0.6,0.4)")
    sweep.add_argument("--shards", metavar="N", type=int, default=2, help="shard processes per point (default 2)")
    _common(a, ALLOCATION_EXPERTS)

    s = kinds.add_parser("slots", help="sweep table rows over decades on one backbone",
                         description="Sweep the Engram table rows (all heads together) over decades; the shard "
                                     "count grows with the rows, the trainer stays the same.")
    sweep = s.add_argument_group("sweep")
    sweep.add_argument("--rows", metavar="N", type=_ints, default=[10**4, 10**5, 10**6, 10**7],
                       help="comma-separated table rows, all heads together (default 1e4,1e5,1e6,1e7)")
    sweep.add_argument("--rows-per-shard", metavar="N", type=int, default=500_000,
                       help="one shard per this many rows (default 500000)")
    sweep.add_argument("--max-shards", metavar="N", type=int, default=4, help="at most this many shards (default 4)")
    sweep.add_argument("--no-baseline", action="store_true", help="skip the same backbone without Engram")
    _common(s, 4)


def resolve_config(args: argparse.Namespace):
    """The base TrainConfig: the defaults, the experiment's own defaults, then the flags given."""
    from trainer.train import TrainConfig

    base = {"eval_batches": DEFAULT_EVAL_BATCHES}
    if args.experiment == "allocation":
        base["n_routed_experts"] = ALLOCATION_EXPERTS
    given = {field: getattr(args, dest) for dest, field in _CONFIG_FLAGS.items() if getattr(args, dest) is not None}
    if args.corpus_mb is not None:
        given["corpus_max_bytes"] = int(args.corpus_mb * (1 << 20))
    if "steps" in given:  # the default schedule's shape: warm up for a tenth
        given["warmup_steps"] = given["steps"] // 10
    return TrainConfig(**{**base, **given})


def _points(args: argparse.Namespace, cfg):
    from trainer.experiments import allocation_sweep, slot_sweep

    if args.experiment == "allocation":
        if args.shards < 1:
            raise ValueError(f"--shards must be positive, got {args.shards}")
        return allocation_sweep(cfg, args.rhos, args.seeds, args.shards)
    if any(r < 1 for r in args.rows):
        raise ValueError(f"--rows must be positive, got {args.rows}")
    return slot_sweep(cfg, args.rows, args.seeds, args.rows_per_shard, args.max_shards, baseline=not args.no_baseline)


def _m(n: float) -> str:
    return f"{n / 1e6:.3f}"


def allocation_table(results: list[dict]) -> tuple[str, list[dict]]:
    from trainer.experiments import group_by

    groups = sorted(group_by(results, "rho"), key=lambda g: -g["rho"])
    moe = next((g["eval_loss"] for g in groups if g["rho"] == 1.0), None)
    lines = [f"{'rho':>5} {'realised':>8} {'experts':>7} {'table rows':>10} {'P_MoE M':>8} {'P_Engram M':>10} "
             f"{'P_total M':>9} {'P_active M':>10} {'eval loss':>9} {'min..max':>15} {'vs MoE':>7} {'seeds':>5}"]
    rows = []
    for g in groups:
        a, pc = g["first"]["allocation"], g["first"]["params"]
        delta = g["eval_loss"] - moe if moe is not None else None
        lines.append(f"{g['rho']:>5.2f} {a['rho_realised']:>8.3f} {a['n_routed_experts']:>7} {a['table_rows']:>10,} "
                     f"{_m(a['moe_sparse_params']):>8} {_m(a['table_params']):>10} {_m(pc['total']):>9} "
                     f"{_m(pc['activated']):>10} {g['eval_loss']:>9.4f} "
                     f"{g['eval_loss_min']:>7.4f}..{g['eval_loss_max']:<7.4f} "
                     f"{'' if delta is None else f'{delta:+.4f}':>7} {len(g['seeds']):>5}")
        rows.append({"rho": g["rho"], "rho_realised": a["rho_realised"], "n_routed_experts": a["n_routed_experts"],
                     "table_rows": a["table_rows"], "table_params": a["table_params"],
                     "moe_sparse_params": a["moe_sparse_params"], "total_params": pc["total"],
                     "activated_params": pc["activated"], "eval_loss": g["eval_loss"],
                     "eval_loss_min": g["eval_loss_min"], "eval_loss_max": g["eval_loss_max"],
                     "eval_loss_std": g["eval_loss_std"], "vs_moe": delta, "seeds": g["seeds"]})
    return "\n".join(lines), rows


def slots_table(results: list[dict]) -> tuple[str, list[dict]]:
    from trainer.experiments import group_by

    groups = sorted(group_by(results, "table_rows"), key=lambda g: g["table_rows"])
    base = next((g["eval_loss"] for g in groups if g["table_rows"] == 0), None)
    lines = [f"{'table rows':>11} {'table params M':>14} {'shards':>6} {'eval loss':>9} {'min..max':>15} "
             f"{'vs no Engram':>12} {'tok/s':>7} {'seeds':>5}"]
    rows = []
    for g in groups:
        f = g["first"]
        delta = g["eval_loss"] - base if base is not None else None
        lines.append(f"{g['table_rows']:>11,} {_m(f['table_params']):>14} {f['num_shards']:>6} {g['eval_loss']:>9.4f} "
                     f"{g['eval_loss_min']:>7.4f}..{g['eval_loss_max']:<7.4f} "
                     f"{'' if delta is None else f'{delta:+.4f}':>12} {f['tokens_per_s']:>7,.0f} {len(g['seeds']):>5}")
        rows.append({"table_rows": g["table_rows"], "table_params": f["table_params"], "num_shards": f["num_shards"],
                     "eval_loss": g["eval_loss"], "eval_loss_min": g["eval_loss_min"],
                     "eval_loss_max": g["eval_loss_max"], "eval_loss_std": g["eval_loss_std"],
                     "vs_no_engram": delta, "seeds": g["seeds"]})
    return "\n".join(lines), rows


def run(args: argparse.Namespace) -> int:
    from trainer import experiments

    cfg = resolve_config(args)
    points = _points(args, cfg)
    out = args.out or Path("experiments") / args.experiment
    sweep = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
             if k not in ("command", "debug", "progress")}
    for p in points:  # a saved point of another config refuses the rerun before anything is written
        experiments.load_point(out, p)
    experiments.write_sweep_record(out, {"experiment": args.experiment, "base_config": dataclasses.asdict(cfg),
                                         "args": sweep, "points": [p.key for p in points]})
    results = experiments.run_points(points, out, progress=args.progress)

    if args.experiment == "allocation":
        table, rows = allocation_table(results)
        best = min(rows, key=lambda r: r["eval_loss"])
        summary = {"best_rho": best["rho"], "paper_best_rho": [0.75, 0.80]}
    else:
        table, rows = slots_table(results)
        engram = [r for r in rows if r["table_rows"] > 0]
        summary = {"fit": experiments.log_linear_fit([r["table_rows"] for r in engram], [r["eval_loss"] for r in engram])}
    print(table)
    plot = None
    if not args.no_plot:
        draw = experiments.plot_allocation if args.experiment == "allocation" else experiments.plot_slots
        title = (f"{args.experiment}: {cfg.steps} steps x {cfg.batch_size * cfg.seq_len} tokens, "
                 f"seeds {','.join(map(str, args.seeds))}")
        plot = draw(results, args.plot or out / f"{args.experiment}.png", title=title)
        print(f"plot: {plot}")
    print(json.dumps({"experiment": args.experiment, "out": str(out), "plot": str(plot) if plot else None,
                      **summary, "points": rows, "base_config": dataclasses.asdict(cfg)}))
    return 0
