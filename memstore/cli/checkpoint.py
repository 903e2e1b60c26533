"""`memstore checkpoint`: one consistent cut of a store on Ray, written to disk."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="take one consistent checkpoint of every shard (rows and optimizer state)")
    p.add_argument("name", help="the store's name")
    p.add_argument("directory", nargs="?", help="root to write ckpt-<version> under (default: the store's data dir)")
    p.add_argument("--address", help="Ray cluster (default $RAY_ADDRESS, else the local Ray)")


def run(args: argparse.Namespace) -> int:
    from cluster import store

    from memstore.progress import ByteProgress

    store.ensure_ray(args.address)
    with ByteProgress(f"checkpoint {args.name}") as progress:
        facts = store.checkpoint(args.name, args.directory, progress=progress)
    print(f"checkpoint {facts['version']} of store {args.name!r}: {facts['path']}")
    print(f"  {facts['bytes'] / 2**20:,.1f} MiB; writes held for {facts['frozen_s'] * 1e3:.0f} ms; "
          f"{facts['seconds']:.2f} s in all; {facts['completed_in_cut']} calls completed inside the cut")
    if facts.get("attempts", 1) > 1:
        print(f"  taken in {facts['attempts']} cuts: a shard restarted under the earlier ones")
    return 0
