"""memstore: a distributed, sharded memory store for Engram tables.

Shards hold table rows and their optimizer state and serve batched lookups and sparse
updates over gRPC; `MemStoreClient` routes, de-duplicates and retries; `InProcessStore` is
the same interface in one process, the reference the sharded store is tested against.
"""

import os
import sys

# OpenMP threads that spin while idle turn a shard's gRPC handler threads and a client's
# background threads into a CPU fight: a 3,000-row update took 587 ms with libgomp's default
# wait policy and 12 ms with PASSIVE on 2 cores (bench notes in README). It only takes effect
# when memstore is imported before torch; set OMP_WAIT_POLICY yourself to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if sys.byteorder != "little":  # rows and keys travel and are stored little-endian
    raise ImportError("memstore needs a little-endian machine")

from memstore.client import ClientConfig, MemStoreClient  # noqa: E402
from memstore.errors import (  # noqa: E402
    ClientClosed,
    DeadlineExceeded,
    InvalidArgument,
    MemStoreError,
    ResourceExhausted,
    SegmentUnreachable,
    TableChanged,
    TableExists,
    TableNotFound,
    Unavailable,
    WrongShard,
)
from memstore.local import InProcessStore  # noqa: E402
from memstore.spec import InitSpec, OptimizerSpec, TableSpec  # noqa: E402

__all__ = [
    "ClientClosed",
    "ClientConfig",
    "DeadlineExceeded",
    "InProcessStore",
    "InitSpec",
    "InvalidArgument",
    "MemStoreClient",
    "MemStoreError",
    "OptimizerSpec",
    "ResourceExhausted",
    "SegmentUnreachable",
    "TableChanged",
    "TableExists",
    "TableNotFound",
    "TableSpec",
    "Unavailable",
    "WrongShard",
]
