"""Write-ahead log append speed per sync mode, against the raw disk on the same records.

Run: python bench/bench_wal.py [--dir DIR --keys 4096,128 --dim 64 --seconds 3 --max-records 3000]

A record is one update: `keys` int64 keys and `keys x dim` float32 gradients. The first block is
the typical update (4,096 x 64: 1 MiB of gradients), the second a small one (128 keys, 32 KiB),
where the fdatasync rather than the bytes sets the pace and group commit shows. Each case
appends for `seconds` (at most `max-records` records) to a fresh file in DIR (default: a
temporary directory) and reports appends/s, MB/s, per-append latency (median, p99) and records
per fdatasync. References: the raw disk doing the same bytes with os.write + fdatasync per
record (what "always" can reach) or os.write alone (what "none" can reach), the better of a run
before and one after the log's cases; group commit with 8 threads is held against "always" with
8 threads. Prints a table, then one JSON document as its last line.
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

if __package__ in (None, ""):  # lets `python bench/bench_wal.py` find memstore in a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memstore import wal  # noqa: E402


def make_record(keys: int, dim: int) -> dict:
    rng = np.random.default_rng(0)
    k = rng.choice(1 << 24, keys, replace=False).astype(np.int64)
    g = torch.from_numpy(rng.standard_normal((keys, dim)).astype(np.float32))
    return wal.update_record("engram.l1.h0", k, g, 1e-3, "client:1:0:0", version=1)


def run_case(append, threads: int, seconds: float, max_records: int) -> dict:
    """Appends from `threads` threads until time or records run out; returns the figures."""
    per_thread = max(1, max_records // threads)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def worker(t: int) -> None:
        lat = latencies[t]
        barrier.wait()
        end = time.perf_counter() + seconds
        while len(lat) < per_thread and time.perf_counter() < end:
            t0 = time.perf_counter()
            append()
            lat.append(time.perf_counter() - t0)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    flat = sorted(x for lat in latencies for x in lat)
    return {
        "records": len(flat),
        "records_s": len(flat) / wall,
        "median_ms": statistics.median(flat) * 1e3,
        "p99_ms": flat[min(len(flat) - 1, int(0.99 * len(flat)))] * 1e3,
    }


def raw_case(path: Path, frame: bytes, sync: bool, args) -> dict:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    lock = threading.Lock()

    def append() -> None:
        with lock:
            os.write(fd, frame)
            if sync:
                os.fdatasync(fd)

    try:
        out = run_case(append, 1, args.seconds, args.max_records)
    finally:
        os.close(fd)
        path.unlink()
    out["records_per_sync"] = 1.0 if sync else None
    return out


def wal_case(path: Path, record: dict, sync: str, threads: int, args) -> dict:
    log = wal.WriteAheadLog(path, sync=sync, group_window_s=args.group_window_s)
    try:
        out = run_case(lambda: log.append(record), threads, args.seconds, args.max_records)
        out["records_per_sync"] = log.appends / log.syncs if log.syncs else None
    finally:
        log.close()
        path.unlink()
    return out


def measure(keys: int, args, work: Path) -> dict:
    """Every case for records of `keys` keys; returns {case: (figures, reference name, reference figures)}."""
    record = make_record(keys, args.dim)
    head, payload = wal.encode_frame(record)
    frame = head + payload
    n = args.threads
    raw_case(work / "warm-up", frame, False, argparse.Namespace(seconds=0.5, max_records=300))
    raws = [(raw_case(work / "raw-sync", frame, True, args), raw_case(work / "raw-write", frame, False, args))]
    always_n = wal_case(work / "an.log", record, "always", n, args)
    cases = {
        "always x1": wal_case(work / "a1.log", record, "always", 1, args),
        f"always x{n}": always_n,
        "group x1": wal_case(work / "g1.log", record, "group", 1, args),
        f"group x{n}": wal_case(work / "gn.log", record, "group", n, args),
        "none x1": wal_case(work / "n1.log", record, "none", 1, args),
    }
    # The raw disk again after the log's cases; the better run is the reference (a VM's disk
    # drifts by tens of percent between runs, and a limit should not be understated).
    raws.append((raw_case(work / "raw-sync", frame, True, args), raw_case(work / "raw-write", frame, False, args)))
    raw_sync = max((r[0] for r in raws), key=lambda f: f["records_s"])
    raw_write = max((r[1] for r in raws), key=lambda f: f["records_s"])
    refs = {"always": ("raw fdatasync", raw_sync), "none": ("raw write", raw_write)}
    return {
        "frame_bytes": len(frame),
        "raw_fdatasync": raw_sync,
        "raw_write": raw_write,
        "cases": {
            name: (fig, *(refs["none"] if name.startswith("none") else
                          (f"always x{n}", always_n) if name == f"group x{n}" else refs["always"]))
            for name, fig in cases.items()
        },  # fmt: skip
    }


def report(keys: int, dim: int, m: dict) -> dict:
    """Prints one block of the table; returns its JSON part."""
    mb = m["frame_bytes"] / 1e6
    raw_sync, raw_write = m["raw_fdatasync"], m["raw_write"]
    print(f"\nrecord: {keys:,} keys x {dim} float32 = {m['frame_bytes']:,} bytes framed")
    print(f"raw disk, same bytes: write+fdatasync {raw_sync['records_s']:,.0f}/s ({raw_sync['median_ms']:.2f} ms), "
          f"write only {raw_write['records_s']:,.0f}/s ({raw_write['median_ms']:.2f} ms)")  # fmt: skip
    cols = (f"{'case':<12}{'appends/s':>11}{'MB/s':>9}{'median ms':>11}{'p99 ms':>9}{'rec/sync':>10}   "
            f"{'reference':<16}{'ref/s':>9}{'ratio':>8}")  # fmt: skip
    print(cols)
    print("-" * len(cols))
    out = {"keys": keys, "dim": dim, "frame_bytes": m["frame_bytes"], "raw_fdatasync": raw_sync,
           "raw_write": raw_write, "cases": {}}  # fmt: skip
    for name, (fig, ref_name, ref) in m["cases"].items():
        ratio = fig["records_s"] / ref["records_s"]
        rps = f"{fig['records_per_sync']:.1f}" if fig["records_per_sync"] else "-"
        print(f"{name:<12}{fig['records_s']:>11,.0f}{fig['records_s'] * mb:>9,.0f}{fig['median_ms']:>11.2f}"
              f"{fig['p99_ms']:>9.2f}{rps:>10}   {ref_name:<16}{ref['records_s']:>9,.0f}{ratio:>7.2f}x")  # fmt: skip
        out["cases"][name] = {**fig, "mb_s": fig["records_s"] * mb, "reference": ref_name, "ratio": ratio}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("record")
    g.add_argument("--keys", default="4096,128",
                   help="keys per update record, comma-separated: one table block each")  # fmt: skip
    g.add_argument("--dim", type=int, default=64, help="float32 gradient values per key")
    g = p.add_argument_group("run")
    g.add_argument("--dir", default="", help="directory on the disk to measure (default: a temporary one)")
    g.add_argument("--seconds", type=float, default=3.0, help="seconds per case")
    g.add_argument("--max-records", type=int, default=3000, help="most records per case (bounds disk use)")
    g.add_argument("--threads", type=int, default=8, help="appending threads of the multi-threaded cases")
    g.add_argument("--group-window-s", type=float, default=0.002, help="WriteAheadLog group_window_s")
    args = p.parse_args()

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_wal-"))
    work = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    sizes = [int(k) for k in args.keys.split(",")]
    try:
        measured = [(k, measure(k, args, work)) for k in sizes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print(f"disk: {base} ({os.cpu_count()} CPUs; {args.seconds:g} s or {args.max_records} records per case)")
    blocks = [report(k, args.dim, m) for k, m in measured]
    print(json.dumps({"threads": args.threads, "group_window_s": args.group_window_s, "blocks": blocks}))


if __name__ == "__main__":
    main()
