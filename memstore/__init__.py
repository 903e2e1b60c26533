"""memstore: a distributed, sharded memory store for Engram tables.

Shards hold table rows and their optimizer state and serve batched lookups and sparse
updates over gRPC; `MemStoreClient` routes, de-duplicates and retries; `InProcessStore` is
the same interface in one process, the reference the sharded store is tested against.
"""

import importlib
import os
import sys

# OpenMP threads that spin while idle turn a shard's gRPC handler threads and a client's
# background threads into a CPU fight: a 3,000-row update took 587 ms with libgomp's default
# wait policy and 12 ms with PASSIVE on 2 cores (bench notes in README). It only takes effect
# when memstore is imported before torch; set OMP_WAIT_POLICY yourself to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if sys.byteorder != "little":  # rows and keys travel and are stored little-endian
    raise ImportError("memstore needs a little-endian machine")

# The public names, each imported from its module on first use: a process that needs only
# some (the CLI's commands that talk to a store: ls, health, status, up, down) starts without
# torch, in ~1 s instead of ~3 s.
_HOMES = {
    "ClientConfig": "memstore.client", "MemStoreClient": "memstore.client", "InProcessStore": "memstore.local",
    "InitSpec": "memstore.spec", "OptimizerSpec": "memstore.spec", "TableSpec": "memstore.spec",
    **{name: "memstore.errors" for name in (
        "ClientClosed", "DeadlineExceeded", "InvalidArgument", "MemStoreError", "ResourceExhausted",
        "SegmentUnreachable", "TableChanged", "TableExists", "TableNotFound", "Unavailable", "WrongShard")},
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'memstore' has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(_HOMES[name]), name)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
