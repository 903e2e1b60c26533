"""Memory-capacity experiments on the store: the allocation sweep over rho and the slot sweep.

A sweep is a list of points, each a full `TrainConfig` plus the number of shards its tables
live on. `run_points` trains every point on its own fresh store of real shard processes
(`memstore.launch.LocalShards`, one `memstore serve` per shard, torn down after the point),
with the corpus loaded once and shared; the no-Engram points need no store. Every finished
point is written to `<out>/points/<key>.json` (atomically: a temporary file renamed), holding
the resolved config next to the result; a rerun skips the points whose file is there and
refuses a file whose config differs from the one asked for (a TrainConfig field added since
counts as equal while it is at its default), so an interrupted sweep resumes where it stopped
and a changed sweep never mixes with an old one.

- `allocation_sweep`: trainer.allocation's points (fixed P_total and P_active; rho decides how
  many routed experts and how many table rows), several seeds each.
- `slot_sweep`: one backbone, table rows over decades; the shard count grows with the rows.
- `plot_allocation`, `plot_slots`: PNGs (matplotlib, the optional `[exp]` extra, imported
  only here and only when a plot is drawn).

Relies on trainer.{allocation,data,model,train}, memstore's client and launcher; no Ray.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from trainer.allocation import AllocationConfig, allocation_points, slot_point
from trainer.data import TokenData, load_data
from trainer.train import TrainConfig, train

log = logging.getLogger("trainer.experiments")
FORMAT = 1  # bump when a point file changes meaning


@dataclass
class Point:
    """One training run of a sweep."""

    key: str  # file name under points/, unique in the sweep
    cfg: TrainConfig
    num_shards: int  # 0: no store (a model without Engram)
    meta: dict = field(default_factory=dict)  # the sweep's own facts (rho, rows, accounting)


# ---------------------------------------------------------------------------- the sweeps


def allocation_sweep(base: TrainConfig, rhos: Sequence[float], seeds: Sequence[int], num_shards: int) -> list[Point]:
    """Points of the allocation experiment: base is the rho = 1 model (its n_routed_experts is
    E_0); every point keeps its dense layers, top_k and shared experts."""
    alloc = AllocationConfig.from_train_config(base)
    points = []
    for seed in seeds:  # seed-major: an interrupted sweep has whole curves
        for ap in allocation_points(alloc, rhos):
            cfg = dataclasses.replace(base, seed=seed, n_routed_experts=ap.n_routed_experts, engram=ap.engram)
            if ap.engram:
                cfg = dataclasses.replace(cfg, engram_vocab_size=[ap.engram_vocab_size] * (base.max_ngram_size - 1))
            points.append(Point(f"rho-{ap.rho:.4f}-seed-{seed}", cfg, num_shards if ap.engram else 0,
                                {"rho": ap.rho, "seed": seed, "allocation": ap.to_dict()}))
    return points


def slot_sweep(base: TrainConfig, rows: Sequence[int], seeds: Sequence[int], rows_per_shard: int,
               max_shards: int, baseline: bool = True) -> list[Point]:
    """Points of the slot experiment: the backbone of `base`, tables of about `rows` rows in
    all (rounded to primes), on ceil(rows / rows_per_shard) shards (at most max_shards); with
    `baseline`, the same backbone without Engram (rows 0) too."""
    alloc = AllocationConfig.from_train_config(base)
    points = []
    sizes = [slot_point(alloc, int(r), rows_per_shard, max_shards) for r in rows]
    for seed in seeds:
        if baseline:
            points.append(Point(f"rows-0-seed-{seed}", dataclasses.replace(base, seed=seed, engram=False), 0,
                                {"target_rows": 0, "table_rows": 0, "table_params": 0, "seed": seed}))
        for sp in sizes:
            cfg = dataclasses.replace(base, seed=seed, engram=True,
                                      engram_vocab_size=[sp.engram_vocab_size] * (base.max_ngram_size - 1))
            points.append(Point(f"rows-{sp.target_rows}-seed-{seed}", cfg, sp.num_shards,
                                {"target_rows": sp.target_rows, "table_rows": sp.table_rows,
                                 "table_params": sp.table_params, "seed": seed}))
    return points


# ---------------------------------------------------------------------------- running


def param_counts(cfg: TrainConfig, data: TokenData, table_params: int) -> dict:
    """The built model's counts (trainer.model.count_params) with the tables' exact size."""
    import torch

    from trainer.model import Model, count_params

    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = Model(cfg.model_config(data.vocab_size, data.pad_id))
    c = count_params(model)
    router = sum(m.router.weight.numel() for m in model.moe_layers.values())
    return {"trainer_total": c.total, "trainer_activated": c.activated, "routed_experts": c.routed_experts,
            "engram_dense": c.engram_dense, "router": router, "tables": table_params,
            "total": c.total + table_params, "activated": c.activated + c.tables_activated}


def _write_json(path: Path, doc: dict) -> None:
    """Atomically: a reader (or a rerun after a crash) sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_point(out: Path, point: Point) -> dict | None:
    """The saved result of `point`, None when not run yet; ValueError when it was run with
    another config."""
    path = out / "points" / f"{point.key}.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path} has format {doc.get('format')}, this version writes {FORMAT}; give a new --out")
    changed = _config_changes(doc["config"], point.cfg)
    if changed:
        raise ValueError(f"{path} was run with another config (differs in {', '.join(changed)}); "
                         f"give a new --out or remove that file")
    return doc


def _config_changes(saved: dict, cfg: TrainConfig) -> list[str]:
    """Fields in which a saved config differs from cfg. A field the saved config lacks was
    added to TrainConfig after the run, which therefore ran with its default: it differs only
    when cfg sets it to something else."""
    want = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as it reads back from JSON
    default = json.loads(json.dumps(dataclasses.asdict(TrainConfig())))
    changed = [k for k in saved if k not in want or saved[k] != want[k]]
    changed += [k for k in want if k not in saved and want[k] != default[k]]
    return sorted(changed)


def _train_on_store(point: Point, data: TokenData, progress: bool) -> dict:
    if point.num_shards == 0:
        return train(point.cfg, None, progress=progress, data=data)
    from memstore import MemStoreClient
    from memstore.launch import LocalShards

    with LocalShards(point.num_shards) as shards, MemStoreClient(shards.addresses) as client:
        return train(point.cfg, client, progress=progress, data=data)


def run_points(points: Sequence[Point], out: Path, *, progress: bool = False, data: TokenData | None = None,
               note: Callable[[str], None] = print) -> list[dict]:
    """Trains every point not yet saved under out/points/, in order; returns all results."""
    out = Path(out)
    keys = [p.key for p in points]
    assert len(set(keys)) == len(keys), f"point keys must be unique, got {keys}"
    results = [None] * len(points)
    todo = []
    for i, p in enumerate(points):
        results[i] = load_point(out, p)  # checks every saved point before anything trains
        if results[i] is None:
            todo.append(i)
    if len(todo) < len(points):
        note(f"{len(points) - len(todo)} of {len(points)} points already in {out / 'points'}: skipped")
    if todo and data is None:
        data = load_data(points[todo[0]].cfg.data_config())
    for n, i in enumerate(todo, 1):
        p = points[i]
        note(f"[{n}/{len(todo)}] {p.key}: {p.cfg.n_routed_experts} routed experts, "
             f"{p.meta.get('allocation', p.meta)['table_rows']:,} table rows, "
             f"{p.num_shards or 'no'} shard{'s' if p.num_shards != 1 else ''}, {p.cfg.steps} steps")
        planned = p.meta.get("allocation", p.meta)  # table_rows, table_params
        t0 = time.perf_counter()
        summary = _train_on_store(p, data, progress)
        if summary["table_rows"] != planned["table_rows"]:  # trainer.allocation's primes are the mapping's
            raise AssertionError(f"{p.key}: the store holds {summary['table_rows']:,} rows, "
                                 f"the sweep planned {planned['table_rows']:,}")
        doc = {"format": FORMAT, "key": p.key, "config": dataclasses.asdict(p.cfg), "num_shards": p.num_shards,
               **p.meta, "params": param_counts(p.cfg, data, planned["table_params"]),
               "eval_loss": summary["eval_loss"], "train_loss": summary["train_loss"], "evals": summary["evals"],
               "losses": summary["losses"], "tokens_per_s": summary["tokens_per_s"],
               "wait_share": summary["wait_share"],
               "wall_s": time.perf_counter() - t0, "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_json(out / "points" / f"{p.key}.json", doc)
        results[i] = doc = json.loads(json.dumps(doc))  # as a rerun reads it back (tuples become lists)
        note(f"    eval loss {doc['eval_loss']:.4f}  ({doc['wall_s']:.0f} s)")
    return results


def write_sweep_record(out: Path, doc: dict) -> None:
    """The resolved sweep (what was asked, with every default filled in), beside the points."""
    _write_json(Path(out) / "sweep.json", doc)


# ---------------------------------------------------------------------------- summaries


def group_by(results: Sequence[dict], key: str) -> list[dict]:
    """Per value of `key` (in first-seen order): mean, min, max and std of eval loss over seeds."""
    groups: dict[Any, list[dict]] = {}
    for r in results:
        groups.setdefault(r[key], []).append(r)
    rows = []
    for value, rs in groups.items():
        losses = np.array([r["eval_loss"] for r in rs])
        rows.append({key: value, "seeds": [r["seed"] for r in rs], "eval_loss": float(losses.mean()),
                     "eval_loss_min": float(losses.min()), "eval_loss_max": float(losses.max()),
                     "eval_loss_std": float(losses.std(ddof=1)) if len(rs) > 1 else None, "first": rs[0]})
    return rows


def log_linear_fit(rows: Sequence[float], losses: Sequence[float]) -> dict | None:
    """Least squares loss = a + b * log10(rows): b is the change of loss per decade of rows."""
    if len(rows) < 2:
        return None
    x = np.log10(np.asarray(rows, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    ss = float(((y - y.mean()) ** 2).sum())
    return {"intercept": float(a), "per_decade": float(b), "r2": 1.0 - float((resid ** 2).sum()) / ss if ss else None}


# ---------------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'memstore[exp]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def paired_deltas(results: Sequence[dict], key: str, reference: Any) -> dict[Any, list[float]]:
    """Per value of `key`: eval loss minus that of the `reference` value with the same seed
    (the same init seed, data order and held-out batches), for every seed that has both."""
    ref = {r["seed"]: r["eval_loss"] for r in results if r[key] == reference}
    out: dict[Any, list[float]] = {}
    for r in results:
        if r["seed"] in ref:
            out.setdefault(r[key], []).append(r["eval_loss"] - ref[r["seed"]])
    return out


def plot_allocation(results: Sequence[dict], path: Path, title: str = "") -> Path:
    """Left: eval loss against rho (% of the sparse budget in routed experts), every seed a
    dot, the mean a line. Right (when rho = 1 was run): each seed's loss minus its own pure-MoE
    loss, which takes out what differs between seeds. The paper's optimum (75-80 %) shaded."""
    plt = _pyplot()
    groups = sorted(group_by(results, "rho"), key=lambda g: g["rho"])
    deltas = paired_deltas(results, "rho", 1.0)
    fig, axes = plt.subplots(1, 2 if len(deltas) > 1 else 1, figsize=(12.0 if len(deltas) > 1 else 6.4, 4.2),
                             dpi=110, squeeze=False)
    realised = {g["rho"]: 100 * g["first"]["allocation"]["rho_realised"] for g in groups}
    ax = axes[0][0]
    ax.axvspan(75, 80, color="tab:green", alpha=0.12, label="paper's optimum (ρ 75–80 %)")
    for r in results:
        ax.plot(realised[r["rho"]], r["eval_loss"], "o", color="tab:blue", alpha=0.35, ms=4)
    x = [realised[g["rho"]] for g in groups]
    y = [g["eval_loss"] for g in groups]
    ax.plot(x, y, "-o", color="tab:blue", label="held-out loss (mean over seeds)")
    best = int(np.argmin(y))
    ax.plot(x[best], y[best], "*", color="tab:red", ms=12, label=f"lowest: ρ = {x[best]:.0f} %")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title or "Sparsity allocation", fontsize=10)
    if len(deltas) > 1:
        ax2 = axes[0][1]
        ax2.axvspan(75, 80, color="tab:green", alpha=0.12)
        ax2.axhline(0.0, color="tab:gray", lw=0.8)
        rhos = sorted(deltas)
        for rho in rhos:
            ax2.plot([realised[rho]] * len(deltas[rho]), deltas[rho], "o", color="tab:purple", alpha=0.35, ms=4)
        ax2.plot([realised[r] for r in rhos], [float(np.mean(deltas[r])) for r in rhos], "-o", color="tab:purple",
                 label="mean over seeds")
        ax2.set_ylabel("loss − pure-MoE loss of the same seed (nats)")
        ax2.set_title("paired with the pure MoE (ρ = 100 %)", fontsize=10)
    for a in axes[0]:
        a.set_xlabel("ρ: share of the sparse budget in routed experts (%)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return _save(fig, path)


def plot_slots(results: Sequence[dict], path: Path, title: str = "") -> Path:
    """Left: eval loss against table rows on a log axis, with the log-linear fit and the
    no-Engram baseline (rows 0) as a dashed line. Right (with the baseline and several seeds):
    each seed's loss minus its own no-Engram loss."""
    plt = _pyplot()
    engram = [r for r in results if r["table_rows"] > 0]
    base = [r["eval_loss"] for r in results if r["table_rows"] == 0]
    groups = sorted(group_by(engram, "table_rows"), key=lambda g: g["table_rows"])
    deltas = {k: v for k, v in paired_deltas(results, "table_rows", 0).items() if k > 0}
    paired = bool(deltas) and len({r["seed"] for r in results}) > 1
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(12.0 if paired else 6.4, 4.2), dpi=110, squeeze=False)
    ax = axes[0][0]
    for r in engram:
        ax.plot(r["table_rows"], r["eval_loss"], "o", color="tab:blue", alpha=0.35, ms=4)
    x = [g["table_rows"] for g in groups]
    y = [g["eval_loss"] for g in groups]
    ax.plot(x, y, "-o", color="tab:blue", label="with Engram (mean over seeds)")
    _draw_fit(ax, x, y)
    if base:
        ax.axhline(float(np.mean(base)), ls="--", color="tab:orange", label="no Engram (same backbone)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title or "Slot scaling", fontsize=10)
    if paired:
        ax2 = axes[0][1]
        ax2.axhline(0.0, ls="--", color="tab:orange", label="no Engram (same seed)")
        rows = sorted(deltas)
        for k in rows:
            ax2.plot([k] * len(deltas[k]), deltas[k], "o", color="tab:purple", alpha=0.35, ms=4)
        means = [float(np.mean(deltas[k])) for k in rows]
        ax2.plot(rows, means, "-o", color="tab:purple", label="mean over seeds")
        _draw_fit(ax2, rows, means)
        ax2.set_ylabel("loss − no-Engram loss of the same seed (nats)")
        ax2.set_title("paired with the same backbone without Engram", fontsize=10)
    for a in axes[0]:
        a.set_xscale("log")
        a.set_xlabel("Engram table rows (all heads)")
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    return _save(fig, path)


def _draw_fit(ax, x: Sequence[float], y: Sequence[float]) -> None:
    fit = log_linear_fit(x, y)
    if fit is not None:
        xs = np.logspace(math.log10(min(x)), math.log10(max(x)), 50)
        ax.plot(xs, fit["intercept"] + fit["per_decade"] * np.log10(xs), ":", color="tab:gray",
                label=f"log-linear fit: {fit['per_decade']:+.3f} nats per decade")


def _save(fig, path) -> Path:
    """Writes a finished figure as a PNG (making its folder) and frees it."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
