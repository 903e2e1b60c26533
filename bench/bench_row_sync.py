"""Where should W data-parallel workers sum their row gradients: among themselves, or on the shard?

Per step, each of W worker processes holds the row gradients of its slice of the batch: the
default model's 8 tables (hash heads), (B/W) x T positions each, d = 32, keys drawn from the
real corpus's hash ids. Two ways to turn them into one update per row, measured side by side
against the same `memstore serve` shards:
  - exchange (what trainer.parallel does): all-gather every worker's keys and gradients over
    gloo, then every worker sends the whole summed update under one id (applied once);
  - on the shard: every worker sends its own partial update (its keys de-duplicated, its
    gradients summed) and nothing else. This is the transfer a shard-side sum would need; the
    holding and summing of parts on the shard (state a crash could lose after acknowledging
    a part) is not built, so this side is a lower bound of that design's cost.
Per way: the median wall time of one step's row sync (every table), over `--steps` steps.
Prints a table, then one JSON line.

Run: python bench/bench_row_sync.py [--workers 2] [--steps 30] [--shards 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from memstore import MemStoreClient  # noqa: E402
from memstore.launch import LocalShards  # noqa: E402
from trainer.data import load_data  # noqa: E402
from trainer.engram import create_tables  # noqa: E402
from trainer.hashing import NgramHashMapping  # noqa: E402
from trainer.parallel import DataParallel  # noqa: E402
from trainer.train import TrainConfig  # noqa: E402


def worker(rank: int, world: int, port: int, addresses: list[str], steps: int, out: dict) -> None:
    torch.set_num_threads(1)
    cfg = TrainConfig()
    data = load_data(cfg.data_config())
    ec = cfg.model_config(data.vocab_size, data.pad_id).engram
    mapping = NgramHashMapping(ec.engram_vocab_size, ec.max_ngram_size, ec.n_head_per_ngram, ec.layer_ids, ec.pad_id,
                               ec.seed, data.tokenizer)
    parallel = DataParallel.init(rank, world, f"127.0.0.1:{port}", run_id="bench")
    client = MemStoreClient(addresses)
    specs = create_tables(client, ec, mapping)
    b = cfg.batch_size // world
    timings = {"exchange": [], "on the shard": []}
    for step in range(steps):
        x = data.batch("train", cfg.batch_size, cfg.seq_len, cfg.seed, step)[0][rank * b:(rank + 1) * b]
        (keys,) = mapping.hash(x).values()  # (b, T, H)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        grads = torch.randn(*keys.shape, ec.head_dim, generator=torch.Generator().manual_seed(step * world + rank))
        for way in timings:
            dist.barrier()
            t0 = time.perf_counter()
            if way == "exchange":
                k_all, g_all = parallel.exchange(keys, grads)
                futures = [client.update_async(s.name, k_all[..., h], g_all[:, :, h], 1e-3, update_id=f"x{step}/{s.name}")
                           for h, s in enumerate(specs)]
            else:
                futures = [client.update_async(s.name, keys[..., h], grads[:, :, h], 1e-3) for h, s in enumerate(specs)]
            for f in futures:
                f.result()
            dist.barrier()  # the step's sync is done when every worker's part is acknowledged
            timings[way].append(time.perf_counter() - t0)
    if rank == 0:
        out.update({way: statistics.median(t[3:]) for way, t in timings.items()})
    client.close()
    parallel.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()
    if args.steps < 5:
        ap.error("--steps must be >= 5 (the first 3 are left out of the medians)")
    load_data(TrainConfig().data_config())  # the tokenizer cache, before the workers need it
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with LocalShards(args.shards) as shards, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(args.workers, port, shards.addresses, args.steps, out), nprocs=args.workers)
        results = dict(out)
    print(f"\nrow-gradient sync of one step, {args.workers} workers, {args.shards} shards (default model: 8 tables, "
          f"{TrainConfig().batch_size} x {TrainConfig().seq_len} tokens); medians of {args.steps - 3} steps")
    print(f"{'way':16} {'ms/step':>8} {'vs exchange':>12}")
    for way, s in results.items():
        print(f"{way:16} {s * 1e3:8.1f} {s / results['exchange']:11.2f}x")
    print(json.dumps({"workers": args.workers, "shards": args.shards, "ms": {k: v * 1e3 for k, v in results.items()}}))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
