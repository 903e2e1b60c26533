"""`memstore up`: bring a store up on Ray (joining a cluster, or starting a local one)."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="bring a store up on Ray; returns once every shard serves")
    p.add_argument("--name", required=True, help="the store's name, unique on the Ray cluster")
    p.add_argument("--shards", type=int, required=True, help="number of shards")
    p.add_argument("--config", type=Path, help="TOML file of [[tables]] using TableSpec field names")
    p.add_argument("--address", help="Ray cluster to join (default $RAY_ADDRESS, else a local Ray, started if none runs)")
    durability = p.add_argument_group("durability")
    durability.add_argument("--data-dir", help="write-ahead logs and checkpoints; shared storage for shards to recover "
                                               "on other nodes; one that holds this store resumes it (default $MEMSTORE_DATA_DIR/NAME-<id>, else under /tmp)")
    durability.add_argument("--wal-sync", choices=("always", "group", "none"),
                            help="log durability: fsync per write (default), shared fsyncs, or page cache only; "
                                 "for a store that is up, it must be the store's")


def load_config(path: Path) -> list:
    from memstore.errors import InvalidArgument
    from memstore.spec import TableSpec

    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgument(f"cannot read store config {path}: {e}") from None
    unknown = set(doc) - {"tables"}
    if unknown:
        raise InvalidArgument(f"store config {path} has unknown sections {sorted(unknown)}; expected [[tables]]")
    tables = doc.get("tables", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise InvalidArgument(f"store config {path}: `tables` must be [[tables]] entries, got {tables!r}")
    try:
        specs = [TableSpec.from_dict(t) for t in tables]
    except InvalidArgument as e:
        raise InvalidArgument(f"store config {path}: {e}") from None
    names = [s.name for s in specs]
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise InvalidArgument(f"store config {path} names table(s) {repeated} more than once")
    return specs


def run(args: argparse.Namespace) -> int:
    from cluster import store

    specs = load_config(args.config) if args.config else []
    # Before a local Ray is started for nothing.
    store.check_deploy(args.shards, specs, args.wal_sync or "always", name=args.name, data_dir=args.data_dir)
    started = store.ensure_ray(args.address, start_local=True)
    try:
        layout = store.deploy(args.name, args.shards, specs, data_dir=args.data_dir, wal_sync=args.wal_sync,
                              started_local_ray=started)
    except BaseException:
        if started and not store.list_stores():  # the Ray started for this store serves nothing
            store.stop_local_ray(started)
        raise
    print(f"store {args.name!r} is up: {layout['num_shards']} shards, {len(layout['tables'])} tables, "
          f"epoch {layout['epoch']}, data in {layout['data_dir']}")
    if layout.get("joined"):
        print("  it was up already: joined it")
    elif layout.get("resumed"):
        resumed = layout["resumed"]
        base = f"checkpoint {resumed['version']}" if resumed["checkpoint"] else "no checkpoint"
        print(f"  resumed from its data dir: {base} + {resumed['replayed']} logged writes replayed")
    for s in layout["shards"]:
        print(f"  shard {s['shard_index']:>3}  {s['address']:<22} node {s['node_id'][:12]}")
    return 0
