"""`memstore restore`: load a checkpoint into a store on Ray, whatever shard count wrote it."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore", help="load a checkpoint into a store (any shard count)")
    p.add_argument("name", help="the store's name")
    p.add_argument("directory", help="a ckpt-<n> directory, or a root whose LATEST names one")
    p.add_argument("--address", help="Ray cluster (default $RAY_ADDRESS, else the local Ray)")


def run(args: argparse.Namespace) -> int:
    from cluster import store

    from memstore.progress import ByteProgress

    store.ensure_ray(args.address)
    with ByteProgress(f"restore {args.name}") as progress:
        facts = store.restore(args.name, args.directory, progress=progress)
    print(f"restored {facts['tables']} tables from {facts['path']} ({facts['from_shards']} shards) "
          f"into store {args.name!r} in {facts['seconds']:.2f} s")
    return 0
