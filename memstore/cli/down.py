"""`memstore down`: take a store down, releasing everything `memstore up` created."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("down", help="take a store down (its shards, its coordinator, and a local Ray it started)")
    p.add_argument("name", help="the store's name")
    p.add_argument("--address", help="Ray cluster (default $RAY_ADDRESS, else the local Ray)")


def run(args: argparse.Namespace) -> int:
    from cluster import store

    store.ensure_ray(args.address)
    started_local_ray = store.shutdown(args.name)
    print(f"store {args.name!r} is down")
    if started_local_ray and not store.list_stores():
        store.stop_local_ray(started_local_ray)
        print("stopped the local Ray that `memstore up` had started")
    return 0
