"""Stochastic rounding of updated rows into bfloat16 / float16 storage.

Round-to-nearest drops every update smaller than half a unit in the last place (ulp) of a
row's value: a bfloat16 row holds 8 significant bits, so Adam at lr 1e-4 leaves most values
of rows near 1 where they were, however many steps it takes. Stochastic rounding rounds a
float32 result x, lying between the neighbours lo < x < hi of the storage dtype, up with
probability (x - lo) / (hi - lo) and down otherwise: unbiased, so small updates accumulate
on average (TorchRec / fbgemm's fused optimizers round fp16 and bf16 weights this way).

The noise is a pure function of (table seed, key, column, the row's update count), the
last kept in the optimizer state ("rounds"), so a table updated alike holds the same bits
with 1 or 5 shards, on any thread count, and after a restore. Per element the noise costs a
few int64 operations on the chunk the optimizer already holds in cache.

bfloat16 keeps a float32's top 16 bits: adding 16 noise bits u to the low 16 and clearing
them rounds the magnitude up exactly when u >= 2^16 - (its dropped bits), that is with
probability (dropped bits) / 2^16. float16 drops 13 bits of a normal float32 value the same
way; below float16's smallest normal value (2^-14), where its step is a fixed 2^-24, the
magnitude in steps rounds up when its fraction and u / 2^16 add to 1 or more (biased by at
most 2^-16 of a step: 16 noise bits against up to 23 of fraction).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from memstore.partition import splitmix64
from memstore.spec import DTYPE_LARGEST

ROUNDS = "rounds"  # the optimizer state that counts each row's updates (int32, wraps)
_STREAM = np.uint64(0x726F756E64696E67)  # keys the noise apart from the initial values' streams
# Odd, below 2^31: each a bijection of 32-bit words whose upper bits mix all of the input;
# two rounds, with a shift between, leave no correlation between a row's columns to measure
# (one round left pairs correlated by up to 0.08).
_MULT = (0x7FEB352D, 0x2C1B3C6D)
_HALF_MIN_NORMAL = 2.0 ** -14
_HALF_STEP_BELOW = 2.0 ** 24  # 1 / float16's step below its smallest normal value
LARGEST = {torch.bfloat16: DTYPE_LARGEST["bfloat16"], torch.float16: DTYPE_LARGEST["float16"]}  # by torch dtype


def row_words(seed: int, keys: torch.Tensor, rounds: torch.Tensor) -> torch.Tensor:
    """int64 [n]: a 32-bit word per row (in the low bits) for this update, from the table's
    seed, the rows' global keys and their update counts after this update."""
    table = splitmix64(np.array([seed], dtype=np.uint64) ^ _STREAM)
    per_key = splitmix64(keys.numpy().astype(np.uint64) ^ table)
    word = splitmix64(per_key + rounds.numpy().astype(np.uint32).astype(np.uint64))
    return torch.from_numpy((word & np.uint64(0xFFFFFFFF)).astype(np.int64))


@functools.cache
def _column_words(dim: int, device: torch.device) -> torch.Tensor:
    """int64 [dim]: a fixed 32-bit word per column (read-only: shared by every call)."""
    words = splitmix64(np.arange(dim, dtype=np.uint64) + _STREAM) & np.uint64(0xFFFFFFFF)
    return torch.from_numpy(words.astype(np.int64)).to(device)


def noise(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 [k, dim] uniform in [0, 2^16): element (r, c) from words[r] and column c.
    Products of a word below 2^32 and a multiplier below 2^31 stay within int64; their bits
    below 32 are those of the 32-bit product, which a uniform word makes uniform."""
    x = (words.unsqueeze(1) ^ _column_words(dim, words.device)).mul_(_MULT[0])
    x = x.bitwise_xor_(x >> 15).bitwise_and_(0xFFFFFFFF).mul_(_MULT[1])
    return x.bitwise_right_shift_(16).bitwise_and_(0xFFFF).to(torch.int32)


def round_to(values: torch.Tensor, u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 `values` [k, dim] rounded stochastically to `dtype` (bfloat16 or float16) by
    the noise `u` (noise()). Values are finite; one beyond the dtype's largest finite value
    is held at it (rounding up would make it Inf)."""
    top = LARGEST[dtype]
    x = values.clamp(-top, top)
    bits = x.view(torch.int32)
    if dtype == torch.bfloat16:
        return bits.add(u).bitwise_and_(-(1 << 16)).view(torch.float32).to(dtype)
    out = bits.add(u.bitwise_right_shift(3)).bitwise_and_(-(1 << 13)).view(torch.float32)
    tiny = x.abs() < _HALF_MIN_NORMAL  # few, in rows of any useful scale: redone apart
    if bool(tiny.any()):
        xs = x[tiny]
        # In steps of 2^-24 the magnitude is below 2^10: its whole steps, and a fraction
        # that adds to u / 2^16 exactly in float32 (at most 24 significant bits).
        steps = xs.abs().mul_(_HALF_STEP_BELOW)
        whole = steps.floor()
        up = steps.sub_(whole).add_(u[tiny].to(torch.float32).mul_(1.0 / 65536)).ge_(1.0)
        out[tiny] = whole.add_(up).mul_(1.0 / _HALF_STEP_BELOW).copysign_(xs)
    return out.to(dtype)
