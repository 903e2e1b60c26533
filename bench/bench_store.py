"""Store-core benchmark: lookups against their limits, and on-shard optimizer apply rates.

For 65,536 distinct keys x dim 64 float32 (16 MiB of rows) from a 4,000,000-row table, with 1
and 2 shards, measured side by side in one run:
  - the same gather in process (torch index_select into a buffer: the memory limit);
  - a bare raw-bytes gRPC echo of the same payload (the transport ceiling): S echo server
    processes, the same channel options as memstore, the keys as the request, the rows'
    bytes as the reply — as one message per server and split like memstore's requests;
  - the same echo doing the two copies a store that replies with rows cannot skip: the
    server gathers the requested rows from a table of the same size into the reply, and the
    client copies each reply into one result array (in plain numpy);
  - memstore lookups through MemStoreClient against S `memstore serve` processes on this
    host: rows delivered into the client's shared memory (the default), and rows in gRPC
    replies (ClientConfig(shared_memory=False): the path of a client on another host);
  - each optimizer's on-shard apply rate next to torch.optim.SparseAdam on the same rows.
The calls of all lookup variants are interleaved, round after round, so the shared
machine's noise falls on all of them alike; medians are reported.
Targets: lookups >= 85 % of the raw-bytes ceiling; row-wise Adagrad >= 8 M rows/s; Adam
>= 2.5x SparseAdam. Prints a table, then one JSON line.

Run: python bench/bench_store.py [--rows 4000000] [--keys 65536] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memstore import ClientConfig, MemStoreClient, OptimizerSpec, TableSpec  # noqa: E402
from memstore.launch import LocalShards  # noqa: E402
from memstore.lookups import chunks  # noqa: E402
from memstore.server import CHANNEL_OPTIONS  # noqa: E402

ECHO_METHOD = "/bench.Echo/Echo"


def median_s(fn, reps: int, warmup: int = 20) -> float:
    """Median seconds of fn() over reps calls, after `warmup` calls: a process's heap takes
    a few dozen multi-MiB round trips to reach its high-water mark (page faults until then)."""
    return interleaved({"fn": fn}, reps, warmup)["fn"]


def interleaved(fns: dict, reps: int, warmup: int = 20) -> dict[str, float]:
    """Median seconds of each fn() over `reps` rounds (after `warmup`) that call every fn once, in turn."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


# ---- the transport ceiling: raw bytes through gRPC ----------------------------------------------
def echo_server(row_bytes: int, tuned: bool, table_rows: int) -> None:
    """Replies to a request of n int64 keys with n * row_bytes raw bytes: prebuilt, or, with
    table_rows > 0, the keys' rows gathered from a table of table_rows rows (on huge pages,
    as a shard's) straight into the reply."""
    import grpc

    from memstore import alloc, wire

    alloc.keep_freed_memory()
    replies: dict[int, bytes] = {}
    table = alloc.zeros((table_rows, row_bytes), torch.uint8).numpy()
    table.fill(1)  # every page mapped, as a table's initialised rows are

    def echo(request: bytes, context) -> bytes:
        n = len(request) // 8
        if table_rows:
            reply, view = wire.new_bytes(n * row_bytes)
            np.take(table, np.frombuffer(request, np.int64), axis=0, out=view.reshape(n, row_bytes), mode="clip")
            return reply
        if n not in replies:
            replies[n] = bytes(n * row_bytes)
        return replies[n]

    server = grpc.server(futures.ThreadPoolExecutor(8), options=CHANNEL_OPTIONS if tuned else CHANNEL_OPTIONS[:2])
    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


class EchoServers:
    """S echo server processes (echo_server) and round trips of a payload through them."""

    def __init__(self, num_servers: int, row_bytes: int, tuned: bool, table_rows: int = 0) -> None:
        import grpc

        self.procs = [subprocess.Popen([sys.executable, __file__, "--echo-server", str(row_bytes), str(int(tuned)),
                                        str(table_rows)], stdout=subprocess.PIPE, text=True) for _ in range(num_servers)]
        ports = [int(p.stdout.readline()) for p in self.procs]
        opts = CHANNEL_OPTIONS if tuned else CHANNEL_OPTIONS[:2]
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) for port in ports]
        self.calls = [ch.unary_unary(ECHO_METHOD) for ch in self.channels]
        self.row_bytes, self.gather = row_bytes, table_rows > 0

    def round_trip(self, keys: np.ndarray, chunk_keys: int):
        """A call that sends the keys (each server its share, as a shard's local rows) in
        requests of at most chunk_keys keys, split evenly as memstore splits them, and waits
        for every reply; with gathering servers it also copies the replies into one result
        array."""
        n = len(self.calls)
        per_server = len(keys) // n
        local = keys // n  # random distinct rows of a table of rows / S rows, as a shard's
        requests = []  # (server, first key, the request's keys as bytes)
        for server in range(n):
            lo = server * per_server
            for chunk in chunks(local[lo : lo + per_server], self.row_bytes, chunk_keys * self.row_bytes):
                requests.append((server, lo, chunk.tobytes()))
                lo += len(chunk)

        def call():
            pending = [(lo, self.calls[server].future(r, timeout=60)) for server, lo, r in requests]
            out = np.empty((len(keys), self.row_bytes), np.uint8) if self.gather else None
            for lo, f in pending:
                reply = f.result()
                if out is not None:
                    out[lo : lo + len(reply) // self.row_bytes] = np.frombuffer(reply, np.uint8).reshape(-1, self.row_bytes)

        return call

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        for p in self.procs:
            p.kill()
            p.wait()


def measure_shards(num_shards: int, num_rows: int, keys: np.ndarray, dim: int, reps: int,
                   chunk_keys: int) -> dict[str, float]:
    """Seconds per call of every lookup variant for S shards, interleaved (module doc)."""
    from memstore import alloc

    alloc.keep_freed_memory()  # as MemStoreClient does: replies are not page-faulted in afresh
    row_bytes = dim * 4
    spec = TableSpec("bench", num_rows=num_rows, dim=dim, optimizer=OptimizerSpec("adagrad"))
    servers = [EchoServers(num_shards, row_bytes, tuned=True), EchoServers(num_shards, row_bytes, tuned=False),
               EchoServers(num_shards, row_bytes, tuned=True, table_rows=num_rows // num_shards)]
    try:
        with LocalShards(num_shards) as shards, \
                MemStoreClient(shards.addresses, ClientConfig(timeout_s=600)) as delivered, \
                MemStoreClient(shards.addresses, ClientConfig(timeout_s=600, shared_memory=False)) as replied:
            t0 = time.perf_counter()
            delivered.create_table(spec)
            create_s = time.perf_counter() - t0
            assert np.array_equal(delivered.lookup("bench", keys[:1000]), replied.lookup("bench", keys[:1000]))
            echo, default, floor = servers
            seconds = interleaved({
                "echo_one_message_s": echo.round_trip(keys, len(keys)),
                "echo_split_s": echo.round_trip(keys, chunk_keys),
                "echo_grpc_defaults_s": default.round_trip(keys, len(keys)),
                "echo_gather_copy_s": floor.round_trip(keys, chunk_keys),
                "lookup_delivered_s": lambda: delivered.lookup("bench", keys),
                "lookup_replied_s": lambda: replied.lookup("bench", keys),
            }, reps)
            assert all(s.delivers for s in delivered._shards), "the shards on this host did not deliver"
    finally:
        for s in servers:
            s.close()
    return seconds | {"create_table_s": create_s}


def measure_gather(num_rows: int, keys: np.ndarray, dim: int, reps: int) -> dict[str, float]:
    table = torch.randn(num_rows, dim)
    idx = torch.from_numpy(keys)
    out = torch.empty(len(keys), dim)
    arr = table.numpy()
    return {
        "torch_index_select_s": median_s(lambda: torch.index_select(table, 0, idx, out=out), reps),
        "numpy_take_s": median_s(lambda: np.take(arr, keys, axis=0), reps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4_000_000, help="table rows (default 4,000,000)")
    ap.add_argument("--keys", type=int, default=65_536, help="distinct keys per lookup (default 65,536)")
    ap.add_argument("--dim", type=int, default=64, help="row width (default 64)")
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions; medians are reported (default 30)")
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2], help="shard counts to run (default 1 2)")
    ap.add_argument("--skip-optimizers", action="store_true", help="skip the optimizer apply rates")
    args = ap.parse_args()

    keys = np.random.default_rng(0).choice(args.rows, size=args.keys, replace=False).astype(np.int64)
    row_bytes = args.dim * 4
    payload = args.keys * row_bytes
    chunk_keys = ClientConfig().max_request_bytes // row_bytes
    gbps = lambda s: payload / s / 1e9  # noqa: E731

    gather = measure_gather(args.rows, keys, args.dim, args.reps)
    results: dict = {"config": vars(args) | {"payload_bytes": payload, "chunk_keys": chunk_keys},
                     "gather": {k: {"s": v, "GB/s": gbps(v)} for k, v in gather.items()}, "shards": {}}
    for s in args.shards:
        r = measure_shards(s, args.rows, keys, args.dim, args.reps, chunk_keys)
        ceiling = min(r["echo_one_message_s"], r["echo_split_s"])
        for path in ("delivered", "replied"):
            sec = r[f"lookup_{path}_s"]
            r |= {f"{path}_rows_per_s": args.keys / sec, f"{path}_GB/s": gbps(sec), f"{path}_ratio_to_ceiling": ceiling / sec}
        r |= {"ceiling_GB/s": gbps(ceiling), "replied_ratio_to_gather_copy": r["echo_gather_copy_s"] / r["lookup_replied_s"]}
        results["shards"][s] = r

    print(f"\nlookup of {args.keys:,} distinct keys x {args.dim} float32 ({payload / 2**20:.0f} MiB) "
          f"from {args.rows:,} rows; medians of {args.reps} interleaved rounds")
    print(f"{'what':54} {'ms':>8} {'GB/s':>7} {'vs ceiling':>11}")
    for name, g in results["gather"].items():
        print(f"{'in-process gather, ' + name[:-2]:54} {g['s'] * 1e3:8.2f} {g['GB/s']:7.2f} {'(limit)':>11}")
    for s, r in results["shards"].items():
        ceiling_s = payload / r["ceiling_GB/s"] / 1e9
        rows = [
            (f"{s} shard(s): raw gRPC echo, one message", r["echo_one_message_s"]),
            (f"{s} shard(s): raw gRPC echo, split at {chunk_keys} keys", r["echo_split_s"]),
            (f"{s} shard(s): raw gRPC echo, gRPC default windows", r["echo_grpc_defaults_s"]),
            (f"{s} shard(s): raw gRPC echo + gather + copy", r["echo_gather_copy_s"]),
            (f"{s} shard(s): memstore lookup, rows in replies", r["lookup_replied_s"]),
            (f"{s} shard(s): memstore lookup, rows delivered (same host)", r["lookup_delivered_s"]),
        ]
        for name, sec in rows:
            print(f"{name:54} {sec * 1e3:8.2f} {gbps(sec):7.2f} {ceiling_s / sec:10.0%}")
        for path in ("delivered", "replied"):
            print(f"{'':54} {path}: {r[f'{path}_rows_per_s'] / 1e6:.2f} M rows/s; >= 85 % of ceiling: "
                  f"{'met' if r[f'{path}_ratio_to_ceiling'] >= 0.85 else 'MISSED'}")
        print(f"{'':54} replies: {r['replied_ratio_to_gather_copy']:.0%} of the echo + gather + copy")

    if not args.skip_optimizers:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_optim import measure_optimizers, print_table

        torch.set_num_threads(1)  # as a shard runs them (memstore serve, Ray actors)
        opt = measure_optimizers(num_rows=args.rows, dim=args.dim, batch=args.keys, reps=10)
        print()
        print_table(opt)
        results["optimizers"] = opt
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--echo-server":
        echo_server(int(sys.argv[2]), bool(int(sys.argv[3])), int(sys.argv[4]))
    else:
        main()
