"""`memstore train`: train the MoE + Engram language model with its tables in a store.

With no flags: starts a local Ray (unless one runs), brings up a 2-shard store on it, trains
the default `TrainConfig` (the standard library's source as corpus, a 4096-token BPE trained
and cached on first use), prints the eval loss, saves a checkpoint under runs/<timestamp>/ and
takes down everything it started. --store trains on an existing store (tables named after the
run, left in place); --in-process keeps the tables in this process (no Ray, no shards).
--resume continues a checkpoint: its config, overridden by the flags given. --workers W trains
with W data-parallel workers on Ray (cluster.train), each on its slice of every batch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

# flag dest -> TrainConfig field; flags default to None so that "given" is visible on --resume
_CONFIG_FLAGS = {
    "steps": "steps", "batch_size": "batch_size", "seq_len": "seq_len", "lr": "lr", "eval_every": "eval_every",
    "seed": "seed", "device": "device", "corpus": "corpus", "vocab_size": "vocab_size", "cache_dir": "cache_dir",
    "d_model": "d_model", "layers": "n_layers", "heads": "n_heads", "experts": "n_routed_experts",
    "d_expert": "d_expert", "prefetch": "prefetch_depth", "metrics_port": "metrics_port",
    "table_dtype": "table_dtype", "stochastic_rounding": "table_stochastic_rounding",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the MoE + Engram model with its tables in a store",
                       description="Train the MoE + Engram language model; by default on a new 2-shard store "
                                   "on a local Ray, which it takes down at the end.")
    store = p.add_argument_group("store (default: a new local store on Ray, taken down at the end)")
    where = store.add_mutually_exclusive_group()
    where.add_argument("--in-process", action="store_true", help="keep the tables in this process: no Ray, no shards")
    where.add_argument("--store", metavar="NAME", help="train on this existing store on Ray (left running)")
    store.add_argument("--address", help="Ray cluster (default $RAY_ADDRESS, else the local Ray, started if none runs)")
    store.add_argument("--shards", metavar="N", type=int, default=2, help="shards of the store this command brings up (default 2)")

    workers = p.add_argument_group("data-parallel workers (on Ray)")
    workers.add_argument("--workers", metavar="W", type=int, default=1,
                         help="trainer workers, one Ray actor each, each on 1/W of every batch; together they "
                              "train exactly what one worker trains on the whole batch (default 1: this process)")
    workers.add_argument("--cpus-per-worker", metavar="N", type=float, default=1,
                         help="CPUs Ray reserves for each worker (default 1)")

    data = p.add_argument_group("data")
    data.add_argument("--corpus", metavar="PATH", help="a text or JSONL file, or a folder of .txt/.md/.py/.jsonl "
                                       "(default: the Python standard library's source)")
    data.add_argument("--corpus-mb", metavar="MB", type=float, help="read at most this many MB of the corpus (default 8)")
    data.add_argument("--vocab-size", metavar="N", type=int, help="BPE vocabulary size (default 4096)")
    data.add_argument("--cache-dir", metavar="DIR", help="where tokenizers and token arrays are cached (default ~/.cache/memstore)")

    model = p.add_argument_group("model (defaults: TrainConfig in trainer/train.py)")
    model.add_argument("--d-model", metavar="N", type=int, help="hidden size (default 128)")
    model.add_argument("--layers", metavar="N", type=int, help="transformer blocks (default 4)")
    model.add_argument("--heads", metavar="N", type=int, help="attention heads (default 4)")
    model.add_argument("--experts", metavar="N", type=int, help="routed experts per MoE layer (default 4)")
    model.add_argument("--d-expert", metavar="N", type=int, help="hidden size of one expert (default 256)")
    model.add_argument("--engram-rows", metavar="N", type=int, help="rows per Engram hash head, each N-gram order (default 50000)")
    model.add_argument("--table-dtype", choices=("float32", "bfloat16", "float16"),
                       help="how the store holds the Engram rows, and sends them and their gradients (default float32)")
    model.add_argument("--stochastic-rounding", action="store_true", default=None,
                       help="16-bit tables: round each update up or down at random (unbiased) instead of to nearest")

    opt = p.add_argument_group("training")
    opt.add_argument("--steps", metavar="N", type=int, help="optimizer steps, the schedule's length; warmup is a tenth of it (default 300)")
    opt.add_argument("--batch-size", metavar="N", type=int, help="sequences per step (default 8)")
    opt.add_argument("--seq-len", metavar="N", type=int, help="tokens per sequence (default 128)")
    opt.add_argument("--lr", metavar="LR", type=float, help="peak AdamW learning rate; the tables get 5x (default 3e-3)")
    opt.add_argument("--eval-every", metavar="N", type=int, help="steps between held-out evaluations (default 100)")
    opt.add_argument("--seed", metavar="N", type=int, help="seed of the init, the data order and the hashing (default 0)")
    opt.add_argument("--prefetch", metavar="N", type=int, help="look up the rows of the next N steps while a step "
                     "computes (exact: the updates refresh the rows they change); 0 = off (default 1)")
    opt.add_argument("--device", help="cpu, cuda, cuda:N or auto: CUDA when available (default auto)")
    opt.add_argument("--compare-baseline", action="store_true",
                     help="also train the same model without Engram on the same data and compare eval losses")

    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", type=Path, help="checkpoint and summary directory (default runs/<timestamp>)")
    out.add_argument("--resume", type=Path, metavar="DIR", help="continue the checkpoint in DIR (its config, "
                                                                "overridden by the flags given)")
    out.add_argument("--quiet", action="store_true", help="no progress lines")
    out.add_argument("--metrics-port", metavar="P", type=int, help="serve the run's Prometheus metrics (step time, "
                     "row wait, prefetch depth, tokens/s) on port P, worker r on P + r; 0 = a free port")


def resolve_config(args: argparse.Namespace):
    """The run's TrainConfig: the checkpoint's (with --resume) or the defaults, then the flags given."""
    from trainer.train import TrainConfig, read_checkpoint

    base = read_checkpoint(args.resume)[0] if args.resume else TrainConfig()
    given = {field: getattr(args, dest) for dest, field in _CONFIG_FLAGS.items() if getattr(args, dest) is not None}
    if args.corpus_mb is not None:
        given["corpus_max_bytes"] = int(args.corpus_mb * (1 << 20))
    if args.engram_rows is not None:
        given["engram_vocab_size"] = [args.engram_rows] * (base.max_ngram_size - 1)
    if "steps" in given and not args.resume:  # the default schedule's shape: warm up for a tenth
        given["warmup_steps"] = given["steps"] // 10
    return dataclasses.replace(base, **given)


@contextlib.contextmanager
def open_store(args: argparse.Namespace) -> Iterator[tuple[object, str | None]]:
    """(row source, its name on Ray or None); takes down what it brought up."""
    if args.in_process:
        from memstore import InProcessStore

        with InProcessStore() as store:
            yield store, None
        return
    from cluster import store as cluster_store
    from memstore import MemStoreClient

    owned, started = args.store is None, None
    name = args.store or f"train-{os.getpid()}"
    # The store lives for this command only: its write-ahead log goes to a folder removed after.
    data_dir = tempfile.mkdtemp(prefix=f"memstore-{name}-") if owned else None
    try:
        started = cluster_store.ensure_ray(args.address, start_local=owned)
        if owned:
            print(f"bringing up store {name!r} ({args.shards} shards) on Ray ...", flush=True)
            cluster_store.deploy(name, args.shards, [], data_dir=data_dir, started_local_ray=started)
        with MemStoreClient.connect(name, address=args.address) as client:
            yield client, name
    finally:
        if owned:
            with contextlib.suppress(Exception):  # it may not have come up
                cluster_store.shutdown(name)
            if started and not cluster_store.list_stores():
                cluster_store.stop_local_ray(started)
                print("stopped the local Ray this command started", flush=True)
            shutil.rmtree(data_dir, ignore_errors=True)


def _train_workers(args: argparse.Namespace, cfg, name: str, out: Path) -> dict:
    """The run on args.workers data-parallel Ray actors (one GPU each where the config uses CUDA)."""
    import ray

    from cluster.train import train_workers

    cpus = ray.cluster_resources().get("CPU", 0)
    if args.workers * args.cpus_per_worker > cpus:
        raise ValueError(f"{args.workers} workers x {args.cpus_per_worker:g} CPUs do not fit the Ray cluster's "
                         f"{cpus:g} CPUs: lower --cpus-per-worker")
    have_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = 1 if cfg.device.startswith("cuda") or (cfg.device == "auto" and have_gpus >= args.workers) else 0
    if gpus * args.workers > have_gpus:
        raise ValueError(f"--device {cfg.device} gives each of {args.workers} workers a GPU; the Ray cluster has "
                         f"{have_gpus:g}")
    print(f"training with {args.workers} data-parallel workers on Ray ...", flush=True)
    return train_workers(cfg, args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=gpus,
                         store_name=name, address=args.address, progress=not args.quiet, checkpoint_dir=out,
                         resume=args.resume)


def run(args: argparse.Namespace) -> int:
    from trainer.data import load_data
    from trainer.train import train

    wall0 = time.perf_counter()
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1 and args.in_process:
        raise ValueError("data-parallel workers need a store they can share: drop --in-process")
    if not args.cpus_per_worker >= 0:
        raise ValueError(f"--cpus-per-worker must be >= 0, got {args.cpus_per_worker}")
    cfg = resolve_config(args)
    if cfg.batch_size % args.workers:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {args.workers} workers")
    if args.store and not args.resume and not cfg.table_prefix:
        cfg = dataclasses.replace(cfg, table_prefix=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.")
    out = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():  # found before training, not when the checkpoint is written
        raise ValueError(f"--out {out} is not a directory")
    data = load_data(cfg.data_config())
    print(f"data: {len(data.tokens):,} tokens from {data.num_files} files, vocabulary {data.vocab_size} "
          f"({'cached' if data.cache_hit else 'trained'}: {data.directory})", flush=True)
    with open_store(args) as (store, name):
        if args.workers > 1:
            summary = _train_workers(args, cfg, name, out)
        else:
            summary = train(cfg, store, progress=not args.quiet, data=data, resume=args.resume,
                            checkpoint_dir=out, store_name=name)
    baseline = None
    if args.compare_baseline:
        print("baseline: the same model without Engram", flush=True)
        baseline = train(dataclasses.replace(cfg, engram=False), None, progress=not args.quiet, data=data)
    summary["total_wall_s"] = time.perf_counter() - wall0
    out.mkdir(parents=True, exist_ok=True)  # rank 0 may have written the checkpoint on another node
    (out / "summary.json").write_text(json.dumps({"engram": summary, "baseline": baseline}, indent=2) + "\n")

    print(f"eval loss {summary['eval_loss']:.4f} after {summary['step']} steps "
          f"({summary['tokens_per_s']:,.0f} tok/s, {summary['wait_share']:.0%} of step time waiting for rows)"
          if summary["steps"] else f"eval loss {summary['eval_loss']:.4f} at step {summary['step']}")
    if baseline is not None:
        print(f"  with Engram {summary['eval_loss']:.4f}   without Engram {baseline['eval_loss']:.4f}   "
              f"difference {summary['eval_loss'] - baseline['eval_loss']:+.4f}")
    print(f"checkpoint: {out} ({summary['store_checkpoint']} store checkpoint); "
          f"{summary['total_wall_s']:.0f} s in all")
    return 0
