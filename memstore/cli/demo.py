"""`memstore demo`: a local store end to end, checked against the in-process reference.

Starts S local shard processes, creates an Engram-sized table, runs Zipfian lookups and
Adam updates through the client and the same stream through an `InProcessStore`, verifies
that both hold identical rows, prints throughput, and stops everything it started.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a local store end to end against the in-process reference")
    p.add_argument("--shards", type=int, default=2, help="local shard processes (default 2)")
    p.add_argument("--rows", type=int, default=262_147, help="table rows (default 262147, a prime)")
    p.add_argument("--dim", type=int, default=64, help="row width (default 64)")
    p.add_argument("--batch", type=int, default=16_384, help="keys per step, with repeats (default 16384)")
    p.add_argument("--steps", type=int, default=50, help="lookup + update steps (default 50)")


def run(args: argparse.Namespace) -> int:
    from memstore import InProcessStore, MemStoreClient, TableSpec
    from memstore.launch import LocalShards

    if args.shards < 1 or args.rows < 1 or args.dim < 1 or args.batch < 1 or args.steps < 1:
        raise ValueError("--shards, --rows, --dim, --batch and --steps must be positive")
    spec = TableSpec("demo.engram", num_rows=args.rows, dim=args.dim, seed=1)
    rng = np.random.default_rng(0)
    print(f"starting {args.shards} local shards ...", flush=True)
    with LocalShards(args.shards) as shards, MemStoreClient(shards.addresses) as client, InProcessStore() as ref:
        print("shards serving on " + ", ".join(shards.addresses), flush=True)
        for store in (client, ref):
            store.create_table(spec)
        remote_s = 0.0
        unique = 0
        for step in range(args.steps):
            keys = np.minimum(rng.zipf(1.2, args.batch), args.rows) * 7919 % args.rows  # Zipfian, scattered
            grads = rng.standard_normal((args.batch, args.dim), dtype=np.float32)
            t0 = time.perf_counter()
            rows = client.lookup(spec.name, keys)
            unique += client.update(spec.name, keys, grads, lr=1e-3)
            remote_s += time.perf_counter() - t0
            if not np.array_equal(rows, ref.lookup(spec.name, keys)):
                raise RuntimeError(f"step {step}: the store and the reference disagree")
            ref.update(spec.name, keys, grads, lr=1e-3)
            if (step + 1) % 10 == 0:
                print(f"step {step + 1}/{args.steps}: {unique / remote_s:,.0f} distinct rows/s (lookup + update)", flush=True)
        same = np.array_equal(client.lookup(spec.name, np.arange(args.rows)), ref.lookup(spec.name, np.arange(args.rows)))
    if not same:
        raise RuntimeError("the store's final rows differ from the in-process reference")
    print(f"ok: {args.steps} steps, {args.rows:,} rows x {args.dim} on {args.shards} shards identical to the in-process reference")
    return 0
