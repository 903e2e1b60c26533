"""`memstore serve`: run one shard as a standalone gRPC server (no Ray needed)."""

from __future__ import annotations

import argparse
import logging
import re
import signal
from fractions import Fraction
import socket
import threading


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one shard of a store as a standalone gRPC server")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    net.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default 0)")
    net.add_argument("--metrics-port", type=int, metavar="PORT",
                     help="serve Prometheus metrics over HTTP on this port of --host; 0 picks a free one "
                          "(default: no metrics endpoint)")
    shard = p.add_argument_group("placement")
    shard.add_argument("--shard-index", type=int, default=0, help="this shard's index i in [0, S) (default 0)")
    shard.add_argument("--num-shards", type=int, default=1, help="number of shards S of the store (default 1)")
    durability = p.add_argument_group("durability")
    durability.add_argument("--data-dir", metavar="DIR",
                            help="keep every acknowledged write under DIR/shard-<i>-of-<S>/: a write-ahead log, "
                                 "compacted into a checkpoint of the shard as it grows; on start, load that and "
                                 "replay the log since, so a killed or crashed shard comes back with every "
                                 "acknowledged write (default: none, the rows live in memory only)")
    durability.add_argument("--wal-sync", choices=("always", "group", "none"),
                            help="with --data-dir: fsync per write (default), shared fsyncs, or page cache only")
    durability.add_argument("--compact-log-bytes", type=_size, default=None, metavar="BYTES",
                            help="with --data-dir: compact once the log since the last compaction holds this "
                                 "much, e.g. 512M or 4G; 0 never (restarts then replay the whole log). Writes "
                                 "wait while the tables are copied in memory, and the copy needs that much "
                                 "memory (default auto: the size of the shard's rows and optimizer state, "
                                 "at least 64M)")
    tune = p.add_argument_group("tuning")
    tune.add_argument("--workers", type=int, default=8, help="gRPC handler threads (default 8)")
    tune.add_argument("--torch-threads", type=int, default=1,
                      help="torch intra-op threads for optimizer steps (default 1, as Ray gives a shard actor); "
                           "0 keeps torch's default, one per core. A shard's parallelism is its concurrent "
                           "requests: more threads speed up one large update on idle cores and slow every "
                           "update on busy ones (8 small updates: 2.4 vs 6-8 ms per request on 2 shared cores)")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.num_shards <= 4096:
        raise ValueError(f"--num-shards must be in 1..4096, got {args.num_shards}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.metrics_port is not None and not 0 <= args.metrics_port < 65536:
        raise ValueError(f"--metrics-port must be in 0..65535, got {args.metrics_port}")
    if not args.data_dir and (args.wal_sync or args.compact_log_bytes is not None):
        raise ValueError("--wal-sync and --compact-log-bytes apply to a shard with --data-dir only")
    if args.port:
        _check_bindable(args.host, args.port)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.torch_threads < 0:
        raise ValueError(f"--torch-threads must be >= 0, got {args.torch_threads}")
    from memstore.engine import ShardEngine  # after the flags' checks: a bad flag fails in a fraction
    from memstore.server import ShardServer, settle_shard_process  # of a second, without torch

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    engine = ShardEngine(args.shard_index, args.num_shards)
    durable = _recover(engine, args) if args.data_dir else None
    server = ShardServer(engine, args.host, args.port, max_workers=args.workers, metrics_port=args.metrics_port).start()
    if server.metrics_address:  # before the serving line, which launchers wait for
        print(f"memstore shard {args.shard_index}/{args.num_shards} metrics on http://{server.metrics_address}/metrics",
              flush=True)
    settle_shard_process()
    # Tests and launchers read this line to learn the bound port.
    print(f"memstore shard {args.shard_index}/{args.num_shards} serving on {server.address}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logging.getLogger("memstore.server").info("stopping shard %d", args.shard_index)
    server.stop()
    if durable is not None:
        durable.close()
    return 0


def _recover(engine, args: argparse.Namespace):
    """Recovers the shard from its data dir under --data-dir (memstore.durable), which
    journals its writes from now on; returns the DurableShard."""
    from pathlib import Path

    from memstore import checkpoint, wal
    from memstore.durable import DurableShard

    directory = Path(args.data_dir) / checkpoint.shard_dirname(args.shard_index, args.num_shards)
    wal.make_dirs(directory)
    others = sorted(p.name for p in directory.parent.glob("shard-*-of-*")
                    if not p.name.endswith(f"-of-{args.num_shards:05d}") and any(p.iterdir()))
    if others and not any(directory.iterdir()):
        raise ValueError(f"{args.data_dir} holds the data of another shard count ({', '.join(others)}), "
                         f"none of shard {args.shard_index} of {args.num_shards}")
    durable = DurableShard(engine, directory, sync=args.wal_sync or "always", compact_bytes=args.compact_log_bytes)
    durable.recover()
    return durable


def _size(text: str) -> int | None:
    """A whole number of bytes, with an optional K, M or G (powers of 1024, "KiB" and "KB" too),
    or "auto" (None)."""
    if text.strip().lower() == "auto":
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(?:([kmg])(?:i?b)?|b)?\s*", text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G, 0 or auto)")
    value = Fraction(m.group(1)) * {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)]
    if value.denominator != 1:
        raise argparse.ArgumentTypeError(f"not a whole number of bytes: {text!r}")
    return int(value)


def _check_bindable(host: str, port: int) -> None:
    """Fails with one clear line before gRPC's own multi-line bind error would."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
