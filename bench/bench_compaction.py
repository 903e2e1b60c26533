"""A standalone shard's restart with and without log compaction (memstore.durable).

Run: python bench/bench_compaction.py [--dir DIR --rows 500000 --dim 64 --keys 4096 --updates 0]

One shard holds an Adam table of `rows` x `dim` float32 (rows plus two moments). It takes
`updates` updates of `keys` distinct keys (default: enough for a log as large as the table and
its state, the size at which "auto" compacts), logged to DIR (default: a temporary directory).
Measured in one run, on the same files:
  - a restart that replays the whole log (what a shard without compaction does);
  - the compaction: its time, and how long writes were held (the in-memory copy);
  - update latency while `compactions` run back to back against none running (median, p99);
  - a restart from the base the compaction wrote (and the short log since).
Both restarts end in the same rows, which is checked. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # lets `python bench/bench_compaction.py` find memstore in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memstore.durable import DurableShard  # noqa: E402
from memstore.engine import ShardEngine  # noqa: E402
from memstore.spec import OptimizerSpec, TableSpec  # noqa: E402


def restart(directory: Path, into: Path) -> tuple[float, DurableShard]:
    """A restart on a copy of `directory` as it is now (its shard keeps serving the original)."""
    shutil.rmtree(into, ignore_errors=True)
    shutil.copytree(directory, into)
    t0 = time.perf_counter()
    durable = DurableShard(ShardEngine(0, 1), into, sync="none", compact_bytes=0)
    durable.recover()
    return time.perf_counter() - t0, durable


def update_latencies(engine: ShardEngine, spec: TableSpec, args, n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        keys = rng.choice(spec.num_rows, args.keys, replace=False)
        grads = torch.from_numpy(rng.standard_normal((args.keys, spec.dim), dtype=np.float32))
        t0 = time.perf_counter()
        engine.update(spec.name, keys, grads, 1e-3, f"lat-{seed}-{i}")
        out.append(time.perf_counter() - t0)
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="", help="directory on the disk to measure (default: a temporary one)")
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--keys", type=int, default=4096, help="distinct keys per update")
    p.add_argument("--updates", type=int, default=0, help="updates in the log (default: a log the size of the state)")
    p.add_argument("--latency-updates", type=int, default=200, help="updates timed without compaction")
    p.add_argument("--compactions", type=int, default=3, help="compactions run back to back, updates timed meanwhile")
    args = p.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="memstore-compaction-"))
    directory = work / "shard"
    shutil.rmtree(directory, ignore_errors=True)
    spec = TableSpec("t", num_rows=args.rows, dim=args.dim, optimizer=OptimizerSpec("adam"))
    try:
        durable = DurableShard(ShardEngine(0, 1), directory, sync="none", compact_bytes=0)
        durable.recover()
        engine = durable.engine
        engine.create_table(spec)
        state_bytes = sum(t.row_bytes + t.state_bytes for t in engine.tables())
        updates = args.updates or -(-state_bytes // (args.keys * (args.dim * 4 + 8)))
        t0 = time.perf_counter()
        update_latencies(engine, spec, args, updates, seed=0)
        fill_s = time.perf_counter() - t0
        log_bytes = durable.log_bytes()

        replay_s, replayed = restart(directory, work / "restart")
        rows_equal = torch.equal(replayed.engine.table("t").rows, engine.table("t").rows)
        replayed.close()

        quiet = update_latencies(engine, spec, args, args.latency_updates, seed=1)
        stop, compactions, held = threading.Event(), [], []

        def compact_loop() -> None:
            while not stop.is_set():
                durable.compact()
                compactions.append(durable.last_compaction["seconds"])
                held.append(durable.last_compaction["held_s"])

        loop = threading.Thread(target=compact_loop)
        loop.start()
        busy, seed = [], 2
        while len(compactions) < args.compactions:  # updates all through them
            busy += update_latencies(engine, spec, args, 5, seed=seed)
            seed += 1
        stop.set()
        loop.join()
        base_s, based = restart(directory, work / "restart")
        rows_equal = bool(rows_equal and torch.equal(based.engine.table("t").rows, engine.table("t").rows))
        based.close()
        durable.close()
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    mib = 2**20
    print(f"table: {args.rows:,} x {args.dim} float32, Adam: {state_bytes / mib:,.0f} MiB of rows and moments")
    print(f"log: {updates:,} updates of {args.keys:,} keys, {log_bytes / mib:,.0f} MiB, written in {fill_s:.1f} s")
    print(f"{'restart replaying the whole log':45s} {replay_s:8.2f} s")
    print(f"{'restart from the base and the log since':45s} {base_s:8.2f} s   ({replay_s / base_s:.1f}x faster)")
    print(f"{'compaction (median of ' + str(len(compactions)) + ')':45s} {statistics.median(compactions):8.2f} s")
    print(f"{'  writes held for the copy (median, max)':45s} {statistics.median(held) * 1e3:8.0f} ms "
          f"{max(held) * 1e3:6.0f} ms")
    for name, xs in (("no compaction", quiet), ("compacting", busy)):
        print(f"{'update latency, ' + name + ' (p50, p99, max)':45s} {pct(xs, 50):8.1f} ms {pct(xs, 99):6.1f} ms "
              f"{max(xs) * 1e3:6.1f} ms   ({len(xs)} updates)")
    print(f"restarts end in the same rows: {rows_equal}")
    print(json.dumps({
        "config": vars(args) | {"updates": updates}, "state_bytes": state_bytes, "log_bytes": log_bytes,
        "replay_restart_s": replay_s, "base_restart_s": base_s, "compaction_s": compactions, "held_s": held,
        "update_ms": {name: {"p50": pct(xs, 50), "p99": pct(xs, 99), "max": max(xs) * 1e3, "n": len(xs)}
                      for name, xs in (("quiet", quiet), ("compacting", busy))},
        "rows_equal": rows_equal,
    }))
    if not rows_equal:
        sys.exit(1)


if __name__ == "__main__":
    main()
