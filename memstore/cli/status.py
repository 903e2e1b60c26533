"""`memstore status`: one row per shard and a summary line for the store.

Exit codes, as `memstore health`'s: 0 every shard serving, 1 degraded (a shard not serving
or not answering, a shard's write-ahead log failed, a restore not finished), 2 store not
found or Ray unreachable. With --watch it runs until interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from memstore.cli.health import DEGRADED


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="shards of a store: state, rows, memory, load, latency, last checkpoint "
                                      "(exit 0 serving, 1 degraded, 2 not found)")
    p.add_argument("name", help="the store's name")
    p.add_argument("--address", help="Ray cluster (default $RAY_ADDRESS, else the local Ray)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh in place every SECONDS")


def _mib(n) -> str:
    return f"{n / 2**20:,.1f}" if n is not None else "-"


def _gib(n) -> str:
    return f"{n / 2**30:,.2f}" if n is not None else "-"


def _rate(r) -> str:
    return f"{r:.1f}" if r is not None else "-"


def render(doc: dict) -> str:
    # "free GiB": what a new table could take on the shard's host (its cgroup's limit counted).
    lines = [f"{'shard':>5}  {'address':<22} {'state':<12} {'tables':>6} {'rows':>12} {'held MiB':>9} "
             f"{'RSS MiB':>8} {'shm MiB':>8} {'free GiB':>8} {'lookup/s':>9} {'update/s':>9} {'lookup p50/p99 ms':>18} "
             f"{'log MiB':>8}"]
    for s in doc["shards"]:
        lat = s.get("latency_ms", {})
        lat = lat.get("LookupMany") or lat.get("Lookup")  # a trainer's lookups are LookupMany
        p = f"{lat['p50']:.1f}/{lat['p99']:.1f}" if lat else "-"
        # A shard that did not answer has no figures: "-", not a 0 that reads as an empty shard.
        rows, lk, up = (f"{s['rows']:,}" if "rows" in s else "-", _rate(s.get("lookups_per_s")),
                        _rate(s.get("updates_per_s")))
        lines.append(f"{s['shard_index']:>5}  {s['address']:<22} {s['state']:<12} {s.get('tables', '-'):>6} "
                     f"{rows:>12} {_mib(s.get('bytes_held')):>9} {_mib(s.get('rss_bytes')):>8} "
                     f"{_mib(s.get('mapped_segment_bytes')):>8} {_gib(s.get('available_bytes')):>8} {lk:>9} {up:>9} "
                     f"{p:>18} {_mib(s['log_bytes']):>8}")
    if missing := [s["shard_index"] for s in doc["shards"] if "rows" not in s]:
        lines.append(f"shards {missing} did not answer: the totals below leave them out")
    for s in doc["shards"]:  # what an operator must act on, under the table
        if s["state"] == "DEAD":
            lines.append(f"shard {s['shard_index']}: dead for good, Ray will not restart it: "
                         f"{s.get('cause') or 'no cause on record (see its Ray worker log)'}")
        if (log := s.get("log")) and log["failed"]:
            lines.append(f"shard {s['shard_index']}: its write-ahead log failed ({log['failed']}): it refuses every "
                         "write until it restarts")
    if pending := doc.get("restoring"):
        lines.append(f"a restore of {pending['path']} (version {pending['version']}) is not finished: the shards "
                     "it has not reached refuse lookups and writes until it is (`memstore restore` again finishes "
                     "or replaces it)")
    sm, ck = doc["summary"], doc["last_checkpoint"]
    age = f"{ck['age_s']:.0f} s ago" if ck["age_s"] is not None else "none yet"
    lines.append(f"store {doc['store']!r}: {sm['serving']}/{doc['num_shards']} serving, {len(doc['tables'])} tables, "
                 f"{sm['rows']:,} rows, {_mib(sm['bytes_held'])} MiB held, {sm['lookups_per_s']:.1f} lookups/s, "
                 f"{sm['updates_per_s']:.1f} updates/s; checkpoint {ck['version']} ({age}), "
                 f"{_mib(sm['log_bytes'])} MiB of log since; epoch {doc['epoch']}")
    return "\n".join(lines)


def degraded(doc: dict) -> bool:
    """Whether an operator must act: a shard not serving, a failed log, a restore half done."""
    return (doc["summary"]["serving"] < doc["num_shards"] or doc.get("restoring") is not None
            or any((s.get("log") or {}).get("failed") for s in doc["shards"]))


def run(args: argparse.Namespace) -> int:
    from cluster import store

    if args.watch is not None and not 0 < args.watch < math.inf:
        raise ValueError(f"--watch must be > 0 seconds and finite, got {args.watch}")
    store.ensure_ray(args.address)
    while True:
        doc = store.status(args.name)
        text = json.dumps(doc) if args.json else render(doc)
        if args.watch and sys.stdout.isatty():
            sys.stdout.write("\033[H\033[J")  # redraw in place
        print(text, flush=True)
        if not args.watch:
            return DEGRADED if degraded(doc) else 0
        time.sleep(args.watch)
