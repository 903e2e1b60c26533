"""Where a key lives, and what its row starts as.

Partitioning: shard i of S holds the keys k with `k % S == i`, at local row `k // S`. Engram
hash ids are uniform modulo a prime, so modulo placement balances rows and load, and a
shard's local rows keep the global key order.

Initial values are a pure function of (table seed, key, column): a counter-based generator
(SplitMix64 over the counter `key * dim + column`, keyed by the seed) gives the same row
whichever shard builds it, so a table built with 1 or 5 shards holds identical rows.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from memstore import cgroup
from memstore.spec import InitSpec
from memstore.threads import serial_torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# Values generated per chunk when building rows: bounds the temporaries to ~64 MiB.
_CHUNK_VALUES = 1 << 20


def shard_of(keys: np.ndarray, num_shards: int) -> np.ndarray:
    """Shard index of each key (keys are non-negative int64)."""
    if num_shards & (num_shards - 1) == 0:  # a power of two: a mask, ~6x faster than %
        return keys & (num_shards - 1)
    return keys % num_shards


def place_keys(keys: np.ndarray, num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard_of(keys), each key's local row in its shard): one pass for both."""
    if num_shards & (num_shards - 1) == 0:
        return keys & (num_shards - 1), keys >> (num_shards.bit_length() - 1)
    local, shard = np.divmod(keys, num_shards)
    return shard, local


def local_rows(num_rows: int, shard_index: int, num_shards: int) -> int:
    """How many of a table's rows shard `shard_index` of `num_shards` holds."""
    return (num_rows - shard_index + num_shards - 1) // num_shards


def splitmix64(counter: np.ndarray) -> np.ndarray:
    """SplitMix64's output function over uint64 counters (wrapping arithmetic)."""
    z = counter * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _uniform01(seed: int, counter: np.ndarray, stream: int) -> np.ndarray:
    """Uniform doubles in (0, 1) from 53 random bits of (seed, stream, counter)."""
    key = splitmix64(np.array([seed * 2 + stream], dtype=np.uint64))[0]
    bits = splitmix64(counter ^ key)
    bits >>= np.uint64(11)
    out = bits.astype(np.float64)
    out += 0.5
    out *= 1.0 / (1 << 53)
    return out


def initial_values(init: InitSpec, seed: int, keys: np.ndarray, dim: int) -> np.ndarray:
    """float64 [len(keys), dim]: the initial rows of the given global keys. The same bits
    as ever: recovery re-creates a table from its spec and replays its log over these rows."""
    counter = (keys.astype(np.uint64)[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)).ravel()
    if init.kind == "zeros":
        return np.zeros((len(keys), dim))
    if init.kind == "uniform":
        u = _uniform01(seed, counter, 0)
        u *= 2.0
        u -= 1.0
        u *= init.bound
        return u.reshape(len(keys), dim)
    # Box-Muller over two independent streams of the same counter: sqrt(-2 ln u1) cos(2 pi u2),
    # evaluated in place, each step the same operation on the same operands as written out.
    u1, u2 = _uniform01(seed, counter, 0), _uniform01(seed, counter, 1)
    np.log(u1, out=u1)
    u1 *= -2.0
    np.sqrt(u1, out=u1)
    u2 *= 2.0 * np.pi
    np.cos(u2, out=u2)
    u1 *= u2
    u1 *= init.std
    return u1.reshape(len(keys), dim)


def fill_initial_rows(
    rows: torch.Tensor, init: InitSpec, seed: int, shard_index: int, num_shards: int
) -> None:
    """Writes the initial values of this shard's rows into `rows` [local_rows, dim], in chunks
    spread over init_threads threads (numpy lets go of the GIL in its loops; every value is a
    function of its key alone, so the order the chunks are done in does not matter)."""
    n, dim = rows.shape
    if init.kind == "zeros":
        rows.zero_()
        return
    step = _chunk_rows(dim)

    def fill(start: int) -> None:
        local = np.arange(start, min(n, start + step), dtype=np.int64)
        keys = local * num_shards + shard_index
        rows[start : start + len(local)] = torch.from_numpy(initial_values(init, seed, keys, dim))

    starts = range(0, n, step)
    threads = init_threads(n, dim)
    if threads == 1:
        for start in starts:  # a few chunks, not a loop over rows
            fill(start)
        return
    # Each thread's torch copies without an OpenMP team of its own (16 threads x 16 cores).
    with ThreadPoolExecutor(threads, thread_name_prefix="memstore-init", initializer=serial_torch) as pool:
        list(pool.map(fill, starts))  # re-raises a chunk's error


# Threads that build a new table's initial rows: the cores this process may use (within its
# cgroup's CPU quota), up to 16. A table made while the shard serves shares them with it.
INIT_THREADS = min(16, cgroup.usable_cores())
# Bytes of temporaries a thread holds while it builds a chunk (float64 values, uint64
# counters and their intermediates: 40 MiB for 2^20 values, measured), per value.
_SCRATCH_BYTES_PER_VALUE = 48


def _chunk_rows(dim: int) -> int:
    return max(1, _CHUNK_VALUES // dim)


def init_threads(num_rows: int, dim: int) -> int:
    """Threads fill_initial_rows uses for num_rows x dim: one per chunk, up to INIT_THREADS."""
    return max(1, min(INIT_THREADS, -(-num_rows // _chunk_rows(dim))))


def init_scratch_bytes(num_rows: int, dim: int, init: InitSpec) -> int:
    """Memory fill_initial_rows holds besides the rows while it builds them."""
    if init.kind == "zeros" or num_rows == 0:
        return 0
    return init_threads(num_rows, dim) * min(num_rows, _chunk_rows(dim)) * dim * _SCRATCH_BYTES_PER_VALUE
