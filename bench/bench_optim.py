"""Sparse optimizer step speed: memstore.optim against torch.optim.SparseAdam on the same rows.

Run: python -m bench.bench_optim [--num-rows 4000000 --dim 64 --batch 65536 --reps 10]

Each optimizer updates `batch` unique random rows of a `num_rows` x `dim` float32 table, a
fresh row set per repetition; the figure is the median over `reps` steps. The rows come in
ascending order, as memstore's client sends a shard its keys (memstore.keys.plan_keys; all
but a one-shard store's updates of distinct keys, which keep the batch's order). The same
steps in random order are timed beside them ("random" column: ascending rows are written
1.2-1.3x faster, and Adam sorts random ones itself). SparseAdam coalesces (sorts) its
gradient whatever the order, so DESIGN's fixed figure for it stands for both.
torch runs one intra-op thread, as in a shard (--threads), SparseAdam too.
Tables sit in the memory a shard gives them (memstore.alloc.zeros: huge pages where the OS
allows), SparseAdam's parameter too; optimizer state is each optimizer's own.
Targets (DESIGN.md section 4, 2-core CPU): row-wise Adagrad >= 8 M rows/s; Adam >= 2.5x
faster than torch.optim.SparseAdam. Prints a table, then one JSON document as its last line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

if __package__ in (None, ""):  # lets `python bench/bench_optim.py` find memstore in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memstore import alloc  # noqa: E402
from memstore.optim import make_optimizer  # noqa: E402
from memstore.spec import OptimizerSpec  # noqa: E402

LR = 1e-3
# torch.optim.SparseAdam on these rows as DESIGN.md section 4 measured it. SparseAdam's own
# median swings several-fold between runs on a shared 2-core VM (50 to 400 ms seen), so the
# Adam target is also checked against this fixed figure.
DESIGN_SPARSE_ADAM_MS = 48.0
# name -> (spec, dtype of the rows, target as (kind, value)): "speedup" over SparseAdam or "mrows_s".
CASES: dict[str, tuple[OptimizerSpec, torch.dtype, tuple[str, float] | None]] = {
    "adam": (OptimizerSpec("adam"), torch.float32, ("speedup", 2.5)),
    "adam_wd": (OptimizerSpec("adam", weight_decay=0.01), torch.float32, ("speedup", 2.5)),
    "adam_bf16": (OptimizerSpec("adam"), torch.bfloat16, None),
    "adam_bf16_sr": (OptimizerSpec("adam", stochastic_rounding=True), torch.bfloat16, None),  # next to adam_bf16
    "adam_f16_sr": (OptimizerSpec("adam", stochastic_rounding=True), torch.float16, None),
    "adagrad": (OptimizerSpec("adagrad"), torch.float32, ("mrows_s", 8.0)),
    "sgd": (OptimizerSpec("sgd"), torch.float32, None),
    "sgd_momentum": (OptimizerSpec("sgd", momentum=0.9), torch.float32, None),
}


def _median_ms(step: Callable[[int], None], reps: int, tensors: Callable[[], list[torch.Tensor]]) -> float:
    step(reps)  # warm-up on its own row set; SparseAdam allocates its state here
    # Read every page of the table and state first: in a VM, memory untouched for a while
    # can cost a host page fault per row on the next random access (seconds per step).
    for t in tensors():
        t.sum()
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        step(r)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _torch_sparse_adam_ms(num_rows, dim, idx_sets, grads, reps) -> float:
    # The table in the memory a shard gives it (huge pages); SparseAdam allocates its own state.
    param = torch.nn.Parameter(alloc.zeros((num_rows, dim), torch.float32).copy_(torch.randn(num_rows, dim)))
    opt = torch.optim.SparseAdam([param], lr=LR)
    sparse = [torch.sparse_coo_tensor(i.unsqueeze(0), grads, (num_rows, dim), check_invariants=False) for i in idx_sets]

    def step(r: int) -> None:
        param.grad = sparse[r]
        opt.step()

    def tensors() -> list[torch.Tensor]:  # the table and, once it exists, SparseAdam's state
        return [param.detach(), *(t for t in opt.state[param].values() if isinstance(t, torch.Tensor))]

    return _median_ms(step, reps, tensors)


def _memstore_ms(spec, dtype, num_rows, dim, idx_sets, grads, reps) -> float:
    optimizer = make_optimizer(spec)
    rows = alloc.zeros((num_rows, dim), dtype).copy_(torch.randn(num_rows, dim))  # as a shard holds them
    state = optimizer.init_state(num_rows, dim)
    return _median_ms(lambda r: optimizer.step(rows, state, idx_sets[r], grads, LR), reps,
                      lambda: [rows, *state.values()])


def measure_optimizers(num_rows: int = 4_000_000, dim: int = 64, batch: int = 65_536, reps: int = 10) -> dict:
    """Median ms per step of each optimizer and of torch.optim.SparseAdam on the same rows,
    in ascending order (the figures the targets judge) and in random order."""
    gen = torch.Generator().manual_seed(0)
    random_sets = [torch.randperm(num_rows, generator=gen)[:batch] for _ in range(reps + 1)]
    ascending_sets = [idx.sort().values for idx in random_sets]
    grads = torch.randn(batch, dim, generator=gen)

    def both(measure: Callable[[list[torch.Tensor]], float]) -> tuple[float, float]:
        ms = measure(ascending_sets)
        gc.collect()
        random_ms = measure(random_sets)
        gc.collect()
        return ms, random_ms

    ref_ms, ref_random_ms = both(lambda sets: _torch_sparse_adam_ms(num_rows, dim, sets, grads, reps))
    results = {"torch_sparse_adam": {"ms": ref_ms, "mrows_s": batch / ref_ms / 1e3, "speedup": 1.0,
                                     "random_order_ms": ref_random_ms}}
    for name, (spec, dtype, target) in CASES.items():
        ms, random_ms = both(lambda sets: _memstore_ms(spec, dtype, num_rows, dim, sets, grads, reps))
        res = {"ms": ms, "mrows_s": batch / ms / 1e3, "speedup": ref_ms / ms, "dtype": str(dtype).removeprefix("torch."),
               "random_order_ms": random_ms}
        if target is not None:
            kind, value = target
            res["target"] = {kind: value}
            res["meets_target"] = res[kind] >= value
            if kind == "speedup":
                res["speedup_vs_design_sparse_adam"] = DESIGN_SPARSE_ADAM_MS / ms
                res["meets_target_vs_design"] = DESIGN_SPARSE_ADAM_MS / ms >= value
        results[name] = res
    config = {"num_rows": num_rows, "dim": dim, "batch": batch, "reps": reps, "lr": LR,
              "design_sparse_adam_ms": DESIGN_SPARSE_ADAM_MS,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    return {"config": config, "results": results}


def print_table(report: dict) -> None:
    print(f"{'optimizer':<18} {'rows':>8} {'ms/step':>8} {'M rows/s':>9} {'x SparseAdam':>13} {'random':>7}  target")
    for name, r in report["results"].items():
        target = ""
        if "target" in r:
            (kind, value), = r["target"].items()
            want = f">= {value:g}x SparseAdam" if kind == "speedup" else f">= {value:g} M rows/s"
            target = f"{want}: {'met' if r['meets_target'] else 'MISSED'}"
            if "speedup_vs_design_sparse_adam" in r:
                design = report["config"]["design_sparse_adam_ms"]
                target += (f"; {r['speedup_vs_design_sparse_adam']:.2f}x DESIGN's {design:g} ms: "
                           f"{'met' if r['meets_target_vs_design'] else 'MISSED'}")
        print(f"{name:<18} {r.get('dtype', 'float32'):>8} {r['ms']:8.2f} {r['mrows_s']:9.2f} {r['speedup']:13.2f} "
              f"{r['random_order_ms']:7.2f}  {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape = parser.add_argument_group("workload")
    shape.add_argument("--num-rows", type=int, default=4_000_000, help="rows in the table")
    shape.add_argument("--dim", type=int, default=64, help="values per row")
    shape.add_argument("--batch", type=int, default=65_536, help="unique rows per step")
    shape.add_argument("--reps", type=int, default=10, help="timed steps per optimizer (median reported)")
    shape.add_argument("--threads", type=int, default=1,
                       help="torch intra-op threads (default 1, as a shard runs: memstore serve, Ray actors); "
                            "0 keeps torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = measure_optimizers(args.num_rows, args.dim, args.batch, args.reps)
    print_table(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
