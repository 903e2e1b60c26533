"""`memstore ls`: the stores running on a Ray cluster."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list the stores on a Ray cluster")
    p.add_argument("--address", help="Ray cluster (default $RAY_ADDRESS, else the local Ray)")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    from cluster import store

    store.ensure_ray(args.address)
    stores = store.list_stores()
    if args.json:
        print(json.dumps(stores))
        return 0
    if not stores:
        print("no stores")
    for s in stores:
        if "unreachable" in s:
            print(f"{s['store']:<24} UNREACHABLE: {s['unreachable']}")
            continue
        print(f"{s['store']:<24} {s['num_shards']:>4} shards  {len(s['tables']):>3} tables  epoch {s['epoch']}")
    return 1 if any("unreachable" in s for s in stores) else 0
