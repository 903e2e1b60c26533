"""Trainer-at-scale benchmark: what keeping the Engram tables in memstore costs a training step.

The same model (the default `TrainConfig`: a 4-layer MoE with one Engram layer of 8 tables,
0.4 M rows x 32) trains the same steps, measured side by side in one run:
  - tables in process (InProcessStore), prefetch off and on: the reference step time;
  - tables on 2 `memstore serve` shard processes over loopback gRPC, prefetch off and on;
  - 2 data-parallel workers on Ray (each on half of every batch) over the same 2 shards,
    prefetch off and on (no in-process reference exists for several processes: the figure
    to read is their share of step time waiting for rows, and the exchange's share).
The single-process configurations run in `--rounds` rounds, each configuration once per
round, so that the shared machine's drift falls on all of them alike. Per configuration: the
median over rounds of each run's median step time (the first `--skip` steps dropped), its
overhead over the in-process reference with the same prefetch depth and over the faster
in-process run (prefetch brings tables in process nothing but its threads), the share of step
time blocked waiting for rows, and the share blocked on the store's acknowledgement of the
row updates. Target: <= 3 % overhead with prefetch (the paper: 1.9-2.8 % for a 100
B-parameter table in host memory). Prints a table, then one JSON line.

Run: python bench/bench_train.py [--steps 60] [--skip 10] [--depth 1] [--rounds 3] [--no-workers]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memstore import InProcessStore, MemStoreClient  # noqa: E402
from memstore.launch import LocalShards  # noqa: E402
from trainer.data import load_data  # noqa: E402
from trainer.train import TrainConfig, train  # noqa: E402


def measure(summary: dict, skip: int) -> dict:
    steps = summary["step_s"][skip:]
    return {"step_ms": statistics.median(steps) * 1e3, "mean_step_ms": statistics.fmean(steps) * 1e3,
            "wait_share": summary["wait_share"], "push_wait_share": summary["push_wait_share"],
            "tokens_per_s": summary["tokens_per_s"], "eval_loss": summary["eval_loss"],
            **{k: summary[k] for k in ("exchange_share", "dense_reduce_share", "refreshed_share") if k in summary}}


def combine(runs: list[dict]) -> dict:
    """One configuration's figures over its rounds: medians, and each run's step time."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}
    return out | {"round_step_ms": [r["step_ms"] for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="steps per configuration (default 60)")
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of the medians (default 10)")
    ap.add_argument("--depth", type=int, default=1, help="prefetch depth of the 'on' runs (default 1)")
    ap.add_argument("--shards", type=int, default=2, help="shard processes (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the single-process runs (default 3)")
    ap.add_argument("--no-workers", action="store_true", help="skip the 2-worker runs (no Ray)")
    ap.add_argument("--trainer-threads", type=int, default=0,
                    help="torch threads of the single-process trainer (default 0: torch's choice, all cores); "
                         "1 on a 2-core machine leaves a core to the shards, as separate memory nodes would")
    args = ap.parse_args()
    if args.trainer_threads:
        import torch

        torch.set_num_threads(args.trainer_threads)
    if args.steps <= args.skip + 2:
        ap.error(f"--steps must exceed --skip + 2 = {args.skip + 2}")
    cfg = TrainConfig(steps=args.steps, warmup_steps=args.steps // 10, eval_every=args.steps, eval_batches=2)
    data = load_data(cfg.data_config())
    runs: dict[str, list[dict]] = {}

    def run(name: str, store, depth: int) -> None:
        summary = train(dataclasses.replace(cfg, prefetch_depth=depth), store, progress=False, data=data)
        runs.setdefault(name, []).append(measure(summary, args.skip))
        print(f"  round {len(runs[name])}: {name}: {runs[name][-1]['step_ms']:.1f} ms/step", flush=True)

    with LocalShards(args.shards) as shards:
        for _ in range(args.rounds):
            for depth in (0, args.depth):
                with InProcessStore() as store:
                    run(f"in-process, prefetch {depth}", store, depth)
                with MemStoreClient(shards.addresses) as client:
                    run(f"memstore {args.shards} shards, prefetch {depth}", client, depth)
                    for spec in client.list_tables():
                        client.drop_table(spec.name)
        results = {name: combine(r) for name, r in runs.items()}
        if not args.no_workers:
            import ray

            from cluster.train import TrainWorkers

            ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
            try:
                with TrainWorkers(2, cpus_per_worker=1) as pool:
                    for depth in (0, args.depth):
                        name = f"2 workers, memstore {args.shards} shards, prefetch {depth}"
                        summary = pool.run(dataclasses.replace(cfg, prefetch_depth=depth), store_addresses=shards.addresses,
                                           progress=False)
                        results[name] = measure(summary, args.skip)
                        print(f"  {name}: {results[name]['step_ms']:.1f} ms/step", flush=True)
                        with MemStoreClient(shards.addresses) as client:
                            for spec in client.list_tables():
                                client.drop_table(spec.name)
            finally:
                ray.shutdown()

    print(f"\nstep time of the default model ({cfg.batch_size} x {cfg.seq_len} tokens per step), medians of "
          f"steps {args.skip}..{args.steps - 1}, then over {args.rounds} rounds; trainer threads: "
          f"{args.trainer_threads or 'all'}")
    best = min(results[f"in-process, prefetch {d}"]["step_ms"] for d in (0, args.depth))
    print(f"{'configuration':44} {'ms/step':>8} {'overhead':>9} {'vs best':>8} {'waiting rows':>13} "
          f"{'waiting push':>13} {'exchange':>9}  rounds (ms/step)")
    for name, r in results.items():
        depth = name.rsplit(" ", 1)[1]
        ref = results.get(f"in-process, prefetch {depth}")
        single = ref and not name.startswith("2 workers")
        r["overhead"] = r["step_ms"] / ref["step_ms"] - 1 if single else None
        r["overhead_vs_best"] = r["step_ms"] / best - 1 if single else None
        over = f"{r['overhead']:+.1%}" if single else "-"
        vs_best = f"{r['overhead_vs_best']:+.1%}" if single else "-"
        ex = f"{r['exchange_share']:.1%}" if "exchange_share" in r else "-"
        print(f"{name:44} {r['step_ms']:8.1f} {over:>9} {vs_best:>8} {r['wait_share']:13.1%} {r['push_wait_share']:13.1%} "
              f"{ex:>9}  {' '.join(f'{x:.1f}' for x in r.get('round_step_ms', []))}")
    on = results[f"memstore {args.shards} shards, prefetch {args.depth}"]
    worst = max(on["overhead"], on["overhead_vs_best"])
    print(f"target: <= 3 % overhead with prefetch: {on['overhead']:+.1%} vs the same depth, {on['overhead_vs_best']:+.1%} "
          f"vs the faster in-process run ({'met' if worst <= 0.03 else 'MISSED'})")
    print(json.dumps({"trainer_threads": args.trainer_threads, "results": results}))


if __name__ == "__main__":
    main()
