"""Where should W data-parallel workers sum their row gradients: among themselves, or on the shard?

Per step, each of W worker processes holds the row gradients of its slice of the batch: the
default model's 8 tables (hash heads), (B/W) x T positions each, d = 32, keys drawn from the
real corpus's hash ids. Three ways to turn them into one update per row, measured side by side
against the same `memstore serve` shards:
  - pieces (what trainer.parallel does): every worker sums its gradients per key, routes the
    sums to the worker of each key's piece (key mod W, all-to-all over gloo) and pushes its
    piece, watching nothing (depth 0): one copy of the update reaches the store;
  - all-gather (what trainer.parallel did before): all-gather every worker's keys and
    gradients, then every worker sends the whole summed update under one id (the store
    applies the first copy): W copies reach the store;
  - on the shard: every worker sends its own partial update (its keys de-duplicated, its
    gradients summed) and nothing else. This is the transfer a shard-side sum would need; the
    holding and summing of parts on the shard (state a crash could lose after acknowledging
    a part) is not built, so this side is a lower bound of that design's cost.
Per way: the median wall time of one step's row sync (every table), over `--steps` steps, and the
bytes the shards received in update requests per step (all workers).
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


def all_gather(parallel: DataParallel, keys: np.ndarray, grads: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """Every worker's (keys (b, T, H), grads (b, T, H, d)), concatenated in rank order."""
    k, g = torch.from_numpy(keys), grads.contiguous()
    ks = [torch.empty_like(k) for _ in range(parallel.world)]
    gs = [torch.empty_like(g) for _ in range(parallel.world)]
    dist.all_gather(ks, k, group=parallel.rows_group)
    dist.all_gather(gs, g, group=parallel.rows_group)
    return torch.cat(ks).numpy(), torch.cat(gs)


def update_bytes_in(client: MemStoreClient) -> int:
    """Bytes the shards have received in UpdateMany requests so far."""
    return sum(m.bytes_in for shard in client.stats() for m in shard.methods if m.method == "UpdateMany")


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
    timings = {"pieces": [], "all-gather": [], "on the shard": []}
    sent = {way: 0 for way in timings}  # bytes into the shards' UpdateMany, all workers (rank 0 reads)
    tables = [s.name for s in specs]
    before = update_bytes_in(client) if rank == 0 else 0
    for step in range(steps):
        x = data.batch("train", cfg.batch_size, cfg.seq_len, cfg.seed, step)[0][rank * b:(rank + 1) * b]
        (keys,) = mapping.hash(x).values()  # (b, T, H)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        grads = torch.randn(*keys.shape, ec.head_dim, generator=torch.Generator().manual_seed(step * world + rank))
        for way in timings:
            dist.barrier()
            t0 = time.perf_counter()
            if way == "pieces":
                parallel.push(client, tables, keys, grads, 1e-3, None, f"p{step}")
            elif way == "all-gather":
                k_all, g_all = all_gather(parallel, keys, grads)
                client.update_many({name: (k_all[..., h], g_all[:, :, h]) for h, name in enumerate(tables)}, 1e-3,
                                   update_ids={name: f"x{step}/{name}" for name in tables})
            else:
                client.update_many({name: (keys[..., h], grads[:, :, h]) for h, name in enumerate(tables)}, 1e-3)
            dist.barrier()  # the step's sync is done when every worker's part is acknowledged
            timings[way].append(time.perf_counter() - t0)
            if rank == 0:
                now = update_bytes_in(client)
                sent[way], before = sent[way] + now - before, now
    if rank == 0:
        out.update({way: (statistics.median(t[3:]), sent[way] / steps) for way, t in timings.items()})
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
    print(f"{'way':16} {'ms/step':>8} {'vs pieces':>10} {'KiB to store/step':>18}")
    base = results["pieces"][0]
    for way, (s, b) in results.items():
        print(f"{way:16} {s * 1e3:8.1f} {s / base:9.2f}x {b / 1024:18.1f}")
    print(json.dumps({"workers": args.workers, "shards": args.shards,
                      "ms": {k: v[0] * 1e3 for k, v in results.items()},
                      "bytes_to_store": {k: v[1] for k, v in results.items()}}))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
