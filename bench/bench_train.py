"""Trainer-at-scale benchmark: what keeping the Engram tables in memstore costs a training step.

The same model (the default `TrainConfig`: a 4-layer MoE with one Engram layer of 8 tables,
0.4 M rows x 32) trains the same steps, measured side by side in one run:
  - tables in process (InProcessStore), prefetch off and on: the reference step time;
  - tables on 2 `memstore serve` shard processes over loopback gRPC, prefetch off and on;
  - 2 data-parallel workers on Ray (each on half of every batch) over the same 2 shards,
    prefetch off and on (no in-process reference exists for several processes: the figure
    to read is their share of step time waiting for rows, and the exchange's share).
Per configuration: the median step time (the first `--skip` steps dropped), its overhead over
the in-process reference with the same prefetch depth, the share of step time blocked waiting
for rows, and the share blocked on the store's acknowledgement of the row updates. Target:
<= 3 % overhead with prefetch (the paper: 1.9-2.8 % for a 100 B-parameter table in host
memory). Prints a table, then one JSON line.

Run: python bench/bench_train.py [--steps 60] [--skip 10] [--depth 1] [--no-workers]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="steps per configuration (default 60)")
    ap.add_argument("--skip", type=int, default=10, help="first steps left out of the medians (default 10)")
    ap.add_argument("--depth", type=int, default=1, help="prefetch depth of the 'on' runs (default 1)")
    ap.add_argument("--shards", type=int, default=2, help="shard processes (default 2)")
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
    results: dict[str, dict] = {}

    def run(name: str, store, depth: int) -> None:
        summary = train(dataclasses.replace(cfg, prefetch_depth=depth), store, progress=False, data=data)
        results[name] = measure(summary, args.skip)
        print(f"  {name}: {results[name]['step_ms']:.1f} ms/step", flush=True)

    for depth in (0, args.depth):
        with InProcessStore() as store:
            run(f"in-process, prefetch {depth}", store, depth)
    with LocalShards(args.shards) as shards:
        for depth in (0, args.depth):
            with MemStoreClient(shards.addresses) as client:
                run(f"memstore {args.shards} shards, prefetch {depth}", client, depth)
                for spec in client.list_tables():
                    client.drop_table(spec.name)
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
          f"steps {args.skip}..{args.steps - 1}; trainer threads: {args.trainer_threads or 'all'}")
    print(f"{'configuration':44} {'ms/step':>8} {'overhead':>9} {'waiting rows':>13} {'waiting push':>13} {'exchange':>9}")
    for name, r in results.items():
        depth = name.rsplit(" ", 1)[1]
        ref = results.get(f"in-process, prefetch {depth}")
        r["overhead"] = r["step_ms"] / ref["step_ms"] - 1 if ref and not name.startswith("2 workers") else None
        over = f"{r['overhead']:+.1%}" if r["overhead"] is not None else "-"
        ex = f"{r['exchange_share']:.1%}" if "exchange_share" in r else "-"
        print(f"{name:44} {r['step_ms']:8.1f} {over:>9} {r['wait_share']:13.1%} {r['push_wait_share']:13.1%} {ex:>9}")
    on = results[f"memstore {args.shards} shards, prefetch {args.depth}"]
    print(f"target: <= 3 % overhead with prefetch: {on['overhead']:+.1%} "
          f"({'met' if on['overhead'] <= 0.03 else 'MISSED'})")
    print(json.dumps({"trainer_threads": args.trainer_threads, "results": results}))


if __name__ == "__main__":
    main()
