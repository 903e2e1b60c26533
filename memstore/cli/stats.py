"""`memstore stats`: load telemetry per table (per Engram hash head), combined over the shards.

Per table: lookup requests and rows read, distinct rows read and their share of the table
(occupancy), the share of reads that go to the hottest 1 % of rows (skew), updates. The
shards are found through the store's layout on Ray (NAME), or given directly (`--shards`),
which needs no Ray. Figures are exact: see memstore.telemetry.combine.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="per-table load telemetry: reads, occupancy, skew (hottest 1 %% share), updates")
    p.add_argument("name", nargs="?", help="the store's name on Ray (or give --shards)")
    where = p.add_argument_group("where the shards are")
    where.add_argument("--address", help="Ray cluster (default $RAY_ADDRESS, else the local Ray)")
    where.add_argument("--shards", metavar="HOST:PORT,...",
                       help="the shards' addresses, in any order, instead of a store on Ray")
    what = p.add_argument_group("what to show")
    what.add_argument("--table", action="append", default=[], metavar="T",
                      help="only this table (repeatable; default every table); also lists its hottest keys")
    what.add_argument("--json", action="store_true", help="print one JSON document")
    what.add_argument("--timeout", type=float, default=10.0, help="deadline per shard in seconds (default 10)")


def collect(addresses: list[str], tables: list[str], timeout_s: float) -> list[dict]:
    """Asks every shard at once and combines its snapshots per table."""
    from memstore.errors import InvalidArgument, TableNotFound
    from memstore.status import table_telemetry
    from memstore.telemetry import combine

    tables = list(dict.fromkeys(tables))  # a table named twice is still counted once

    def ask(address: str):
        try:
            return table_telemetry(address, tables, timeout_s)
        except TableNotFound:  # the shard lacks a named table: its snapshots of those it has
            if not tables:
                raise
            index, count, snapshots = table_telemetry(address, [], timeout_s)
            return index, count, [s for s in snapshots if s.table in tables]

    with ThreadPoolExecutor(max_workers=min(len(addresses), 32)) as pool:
        replies = list(pool.map(ask, addresses))
    num_shards = {s for _, s, _ in replies}
    indices = sorted(i for i, _, _ in replies)
    if len(num_shards) != 1 or indices != list(range(next(iter(num_shards)))):
        found = ", ".join(f"{i} of {s}" for i, s, _ in replies)
        raise InvalidArgument(f"the addresses are not every shard of one store exactly once (shards {found})")
    by_table = defaultdict(list)
    for _, _, snapshots in replies:
        for snap in snapshots:
            by_table[snap.table].append(snap)
    nowhere = [t for t in tables if t not in by_table]
    if nowhere:
        raise TableNotFound(f"table {nowhere[0]!r} does not exist on any of the {len(addresses)} shards")
    return [combine(parts) for _, parts in sorted(by_table.items())]


def render(tables: list[dict], hot_keys: bool) -> str:
    lines = [f"{'table':<24} {'rows':>12} {'lookups':>9} {'rows read':>12} {'touched':>11} {'occupancy':>9} "
             f"{'hot 1% share':>12} {'updates':>9} {'rows updated':>12}"]
    for t in tables:
        lines.append(f"{t['table']:<24} {t['num_rows']:>12,} {t['lookups']:>9,} {t['lookup_keys']:>12,} "
                     f"{t['rows_touched']:>11,} {t['occupancy']:>9.2%} {t['skew']:>12.2%} {t['updates']:>9,} "
                     f"{t['update_keys']:>12,}")
        if hot_keys and t["hot_keys"]:
            lines.append("  hottest keys (reads): " + ", ".join(f"{k} ({c:,})" for k, c in t["hot_keys"]))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if (args.name is None) == (args.shards is None):
        raise ValueError("give a store NAME or --shards HOST:PORT,... (not both)")
    if not 0 < args.timeout < math.inf:
        raise ValueError(f"--timeout must be > 0 seconds and finite, got {args.timeout}")
    if args.shards is not None:
        addresses = [a.strip() for a in args.shards.split(",") if a.strip()]
        if not addresses:
            raise ValueError("--shards names no address")
    else:
        from cluster import store

        store.ensure_ray(args.address)
        addresses = [s["address"] for s in store.refresh_layout(args.name, args.timeout)["shards"]]
    tables = collect(addresses, args.table, args.timeout)
    # A table some shards lack (a create that failed part-way, a shard still replaying its log)
    # is reported from the shards that have it, and the store counts as degraded.
    partial = [t for t in tables if t["shards"] != len(addresses)]
    if args.json:
        print(json.dumps({"store": args.name, "num_shards": len(addresses), "tables": tables}))
    else:
        print(render(tables, hot_keys=bool(args.table)))
        where = f"store {args.name!r}" if args.name else "shards " + ",".join(addresses)
        print(f"{where}: {len(tables)} tables over {len(addresses)} shards; counts since each shard started")
        for t in partial:
            print(f"table {t['table']!r} is on {t['shards']} of {len(addresses)} shards only: its figures cover those")
    return 1 if partial else 0
