"""Key batches as a client prepares them: de-duplicated, grouped by shard, gradients summed.

Shared by the remote client and the in-process store so both treat duplicates identically:
a batch's rows are looked up once per distinct key, and the gradients of a key's repeats are
summed (torch `index_add_`, measured 20x+ faster than `np.add.at`) into one row per key.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from memstore.errors import InvalidArgument
from memstore.partition import shard_of
from memstore.spec import FLOAT32_MAX, TableSpec, as_key_array


@dataclass
class KeyPlan:
    """A batch of N keys resolved to U distinct keys grouped by shard.

    unique: int64 [U] the distinct keys, grouped by shard and ascending within each shard
      (distinct keys keep the batch's order in a plan that is not grouped, and in a
      one-shard plan of values: plan_keys);
    bounds: int64 [S + 1] shard s owns unique[bounds[s]:bounds[s+1]], or None (not grouped);
    position: int64 [N] for each key of the batch (flattened), its index in `unique`; None
      when the batch's keys are already distinct (then U == N), and instead
    slot: int64 [U] for each distinct key, its index in the batch; None when that is 0..N-1.
    """

    unique: np.ndarray
    bounds: np.ndarray | None  # None: not grouped by shard (plan_keys(group=False))
    position: torch.Tensor | None = None
    slot: torch.Tensor | None = None
    batch: np.ndarray | None = None  # the batch's keys, when slot is set

    @property
    def num_keys(self) -> int:
        return len(self.position) if self.position is not None else len(self.unique)

    def shard_keys(self, shard: int) -> np.ndarray:
        return self.unique[self.bounds[shard] : self.bounds[shard + 1]]

    def to_unique_order(self, values: torch.Tensor) -> torch.Tensor:
        """[U, dim] from the batch's [N, dim] values; repeated keys' values are summed (in
        float32, the gradient rule) — callers that forbid repeats check first."""
        if self.position is not None:
            out = torch.zeros(len(self.unique), values.shape[1], dtype=torch.float32)
            return out.index_add_(0, self.position, values.float())
        return values if self.slot is None else values.index_select(0, self.slot)

    @property
    def buffer_keys(self) -> np.ndarray:
        """The key of each buffer row (see buffer_rows)."""
        return self.batch if self.slot is not None else self.unique

    @property
    def buffer_rows(self) -> int:
        """Rows of the buffer the distinct keys' rows are assembled in: the batch's own rows
        (distinct keys go straight to their place) or the distinct rows (then expanded)."""
        return len(self.unique) if self.position is not None else self.num_keys

    def assembler(self, dim: int, dtype: torch.dtype, buffer: torch.Tensor | None = None) -> "RowAssembler":
        return RowAssembler(self, dim, dtype, buffer)


class RowAssembler:
    """Builds a batch's rows [N, dim] in key order from rows of `unique` arriving in pieces.

    Distinct keys: each piece is scattered straight into the output (one copy per row).
    Repeated keys: pieces fill the distinct rows, then one gather expands them to the batch.
    Copies go through numpy, which runs on the calling thread: torch's intra-op threads
    spinning against gRPC's receive threads made 16 MiB lookups ~1.5x slower on 2 cores.
    """

    def __init__(self, plan: KeyPlan, dim: int, dtype: torch.dtype, buffer: torch.Tensor | None = None) -> None:
        """buffer: [plan.buffer_rows, dim] to assemble in (a client's shared-memory lease,
        which shards on the client's host write into directly: row r gets buffer_keys[r]); a
        new one if None."""
        self.plan = plan
        self.buffer = torch.empty(plan.buffer_rows, dim, dtype=dtype) if buffer is None else buffer
        assert self.buffer.shape == (plan.buffer_rows, dim), f"buffer {tuple(self.buffer.shape)} for {plan.buffer_rows} rows"
        self._np = as_numpy(self.buffer)  # (n, dim) view of the same memory
        self._slot = plan.slot.numpy() if plan.slot is not None else None
        # Scatters move whole rows as single void items: numpy's fancy assignment then copies
        # one item per row instead of iterating over its dim values. Two shards' replies of
        # 32,768 rows of 256 bytes each: 1.6-2.0 ms, against 3.6 ms as float rows and 2.4-3.4
        # ms through np.put (measured).
        self._row = np.dtype((np.void, dim * self.buffer.element_size()))

    def put(self, start: int, rows: torch.Tensor) -> None:
        """Rows of unique[start : start + len(rows)]."""
        src = as_numpy(rows)
        if self.plan.position is None and self._slot is not None:
            whole = np.ascontiguousarray(src).view(self._row).reshape(-1)
            self._np.view(self._row).reshape(-1)[self._slot[start : start + len(src)]] = whole
        else:
            self._np[start : start + len(src)] = src

    def result(self) -> torch.Tensor:
        if self.plan.position is None:
            return self.buffer
        return torch.from_numpy(np.take(self._np, self.plan.position.numpy(), axis=0)).view(self.buffer.dtype)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a tensor's memory; 16-bit floats as int16 (numpy lacks bfloat16)."""
    return t.numpy() if t.dtype == torch.float32 else t.view(torch.int16).numpy()


def plan_keys(flat_keys: np.ndarray, spec: TableSpec, num_shards: int, group: bool = True,
              values: bool = False) -> KeyPlan:
    """Validates keys against the table and groups their distinct values by shard, each
    shard's ascending (or, with group=False, leaves distinct keys in batch order: shards
    that read the keys from a client's segment pick their own). values: the call sends a
    value per key (an update, an assign); with one shard, a distinct batch then keeps its
    own order, since putting its values in order (a gather of them all, 16 MiB for 65,536
    keys of dim 64) costs more than the ascending writes save. Several shards' values are
    gathered into shard order anyway.

    numpy, not torch, for the sorts: torch's parallel sort slowed 200x when the cores were
    busy (OpenMP threads spinning against the trainer's); numpy's runs on the calling thread.
    """
    check_key_range(flat_keys, spec)
    flat_keys = flat_keys.astype(np.int64, copy=False)  # key * n below must not wrap in a narrower type
    # One sort tells distinct batches apart, gives the distinct keys and each batch key's
    # place among them, and the order a shard's keys are sent in: ascending. A shard writes
    # ascending rows faster (a 65,536-row update of a 4 M-row table: row-wise Adagrad
    # 1.2-1.3x, Adam 1.25x and no sort of its own; measured) and gathers them faster.
    ordered, ascending = _sort_with_order(flat_keys, spec.num_rows)
    first = np.empty(len(ordered), dtype=bool)  # the first of its run of equal keys
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    if first.all():  # distinct
        if not group:  # shards pick their own keys in batch order
            return KeyPlan(flat_keys, None)
        if num_shards == 1:
            if ascending is None or values:  # in order already, or not worth it
                return KeyPlan(flat_keys, _one_group(len(flat_keys)))
            return KeyPlan(ordered, _one_group(len(flat_keys)), slot=torch.from_numpy(ascending), batch=flat_keys)
        order, bounds = _group_by_shard(ordered, num_shards)  # ascending within each shard
        if ascending is not None:
            order = ascending[order]
        return KeyPlan(flat_keys[order], bounds, slot=torch.from_numpy(order), batch=flat_keys)
    # Repeats: np.unique's work from the sort already made (3.6 ms for 65,536 keys with
    # repeats, against 9.2 ms for a sort and np.unique(return_inverse=True); measured).
    one = num_shards == 1 or not group
    unique = ordered[first]
    inverse = torch.empty(len(flat_keys), dtype=torch.int64)
    inverse.numpy()[ascending] = np.cumsum(first) - 1  # batch key i is unique[inverse[i]]
    if one:
        return KeyPlan(unique, _one_group(len(unique)) if group else None, position=inverse)
    order, bounds = _group_by_shard(unique, num_shards)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return KeyPlan(unique[order], bounds, position=torch.from_numpy(rank)[inverse])


def _sort_with_order(keys: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(keys sorted, the permutation that sorts them), the permutation None where the keys
    ascend already. Sorted as key * n + position where that fits in int64 (keys were checked
    to lie in [0, num_rows)): 0.2 ms more than a plain sort of 65,536 keys, where argsort
    takes 0.7 ms more (measured)."""
    n = len(keys)
    if n < 2 or bool((keys[1:] > keys[:-1]).all()):
        return keys, None
    if num_rows <= (2**63 - 1) // n:
        return tuple(np.divmod(np.sort(keys * n + np.arange(n, dtype=np.int64)), n))
    order = np.argsort(keys)
    return keys[order], order


def _one_group(n: int) -> np.ndarray:
    return np.array([0, n], dtype=np.int64)


def _group_by_shard(keys: np.ndarray, num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, bounds): keys[order] grouped by shard, in their given order within a shard."""
    shard = shard_of(keys, num_shards)
    # numpy's stable sort of 16-bit values is a radix sort: 0.16 ms instead of 0.65 ms for
    # 65,536 keys (measured), and it keeps the keys' order within a shard all the same.
    order = np.argsort(shard.astype(np.uint16) if num_shards <= 1 << 16 else shard, kind="stable")
    # A pass per shard counts a few shards' keys faster than bincount (9 vs 125 us for 2).
    counts = [np.count_nonzero(shard == s) for s in range(num_shards)] if num_shards <= 8 \
        else np.bincount(shard, minlength=num_shards)
    bounds = np.zeros(num_shards + 1, dtype=np.int64)
    np.cumsum(counts, out=bounds[1:])
    return order, bounds


def check_key_range(flat_keys: np.ndarray, spec: TableSpec) -> None:
    """Rejects a batch holding a key outside the table, naming the first (two reductions
    when all are in range, a third of the cost of a mask)."""
    if len(flat_keys) and (flat_keys.min() < 0 or flat_keys.max() >= spec.num_rows):
        first = int(flat_keys[np.flatnonzero((flat_keys < 0) | (flat_keys >= spec.num_rows))[0]])
        raise InvalidArgument(f"key {first} is out of range [0, {spec.num_rows}) for table {spec.name!r}")


def as_value_tensor(values, key_shape: tuple[int, ...], spec: TableSpec, what: str) -> torch.Tensor:
    """Gradients or rows for keys of shape key_shape as a float tensor [n, dim]: of shape
    key_shape + (dim,), or already flattened to (n, dim); checks shape and finiteness."""
    if isinstance(values, torch.Tensor):
        t = values
    else:
        arr = np.asarray(values)
        if not arr.dtype.isnative or any(stride < 0 for stride in arr.strides):  # torch takes neither
            arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
        t = torch.from_numpy(arr)
    if not t.is_floating_point():
        raise InvalidArgument(f"{what}s for table {spec.name!r} must be floating point, got {t.dtype}")
    t = t.detach().cpu()
    n = int(np.prod(key_shape, dtype=np.int64))
    if tuple(t.shape) not in (tuple(key_shape) + (spec.dim,), (n, spec.dim)):
        raise InvalidArgument(
            f"{what}s for table {spec.name!r} must have shape keys.shape + ({spec.dim},) "
            f"= {tuple(key_shape) + (spec.dim,)} (or flattened, {(n, spec.dim)}), got {tuple(t.shape)}"
        )
    t = t.reshape(n, spec.dim)
    row = first_non_finite_row(t)
    if row is not None:
        raise InvalidArgument(f"{what} #{row} for table {spec.name!r} holds NaN or Inf")
    return t


def to_wire(plan: KeyPlan, values: torch.Tensor, dtype: torch.dtype, spec: TableSpec, what: str) -> torch.Tensor:
    """values [N, dim] (from as_value_tensor) as a call sends them: [U, dim] in the plan's
    order, repeats summed, cast to `dtype`. Summing or narrowing can overflow finite values
    to Inf (two 3e38 gradients of one key; 1e5 for a float16 table): that is rejected here,
    before anything is sent, since the shards would reject only their own part of it."""
    rows = plan.to_unique_order(values)  # float32 where repeats were summed
    out = rows.to(dtype)
    row = first_row_not_finite_as(rows, dtype, out, checked=plan.position is None)
    if row is not None:
        summed = "summed over its repeats and " if plan.position is not None else ""
        raise InvalidArgument(f"the {what} of key {int(plan.unique[row])} for table {spec.name!r} is "
                              f"not finite once {summed}cast to {str(dtype).removeprefix('torch.')}")
    return out


def first_row_not_finite_as(values: torch.Tensor, dtype: torch.dtype, cast: torch.Tensor | None = None,
                            checked: bool = True) -> int | None:
    """The first row of values [n, dim] that is not finite once cast to `dtype` (`cast`,
    if the caller has it already), or None; checked: `values` are known finite, so only a
    cast to a narrower dtype can overflow. Two reductions of the values (0.5 ms for 65,536 x
    64 float32) instead of a finiteness scan of the cast ones (2 ms for bfloat16); NaN fails
    the comparison too."""
    limit = torch.finfo(dtype).max
    if not values.numel() or (checked and torch.finfo(values.dtype).max <= limit):
        return None
    arr = (values.float() if values.dtype == torch.bfloat16 else values).numpy()  # numpy lacks bfloat16
    if -limit <= arr.min() and arr.max() <= limit:
        return None
    return first_non_finite_row(values.to(dtype) if cast is None else cast)  # Inf (or NaN) where it rounded away


# The largest gradient value an update takes: its square (Adam's and Adagrad's second
# moments) stays finite in float32, where the optimizers compute (2^63 squared is 8.5e37).
MAX_GRADIENT = 2.0 ** 63


def check_gradient_scale(grads: torch.Tensor, lr: float, keys: np.ndarray, table: str) -> None:
    """Rejects finite gradients [n, dim] (row i of key keys[i]) that would still make a row or
    its optimizer state Inf: a value beyond MAX_GRADIENT, or beyond sqrt(FLOAT32_MAX / dim) / 2
    (row-wise Adagrad's mean of a row's squares sums them in float32 first), or one whose
    product with lr (SGD's step) overflows float32. One min/max pass when all are within
    (0.3 ms for 65,536 x 64)."""
    if not grads.numel():
        return
    # Half the bound: float32's rounding of the squares and of their sum must not tip it over.
    limit = min(MAX_GRADIENT, 0.5 * math.sqrt(FLOAT32_MAX / grads.shape[-1]))
    limit = min(limit, FLOAT32_MAX / lr) if lr > 0 else limit
    lo, hi = torch.aminmax(grads)
    if max(-float(lo), float(hi)) <= limit:
        return
    row = int(torch.nonzero((grads.float().abs() > limit).any(dim=1))[0, 0])
    peak = float(grads[row].float().abs().max())
    raise InvalidArgument(f"the gradient of key {int(keys[row])} for table {table!r} reaches {peak:.3g}, beyond "
                          f"{limit:.3g}: its square summed over the row, or its product with the learning rate {lr:g}, "
                          "overflows float32")


# Exponent bits of the 16-bit floats (numpy lacks bfloat16): all set means Inf or NaN.
_EXPONENT_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def first_non_finite_row(t: torch.Tensor) -> int | None:
    """The first row of t [n, dim] holding NaN or Inf, or None. On CPU through numpy:
    4.7 us for 1,500 x 32 float32 values, where torch.isfinite(t).all() took 106 us (it
    runs several kernels and temporaries; measured)."""
    if t.device.type != "cpu" or t.dim() != 2:
        bad = ~torch.isfinite(t.reshape(len(t), -1)).all(dim=1)
        return int(torch.nonzero(bad)[0, 0]) if bool(bad.any()) else None
    if t.dtype in _EXPONENT_BITS:
        mask = _EXPONENT_BITS[t.dtype]
        bad_values = (t.view(torch.int16).numpy() & mask) == mask
    else:
        finite = np.isfinite(t.numpy())
        if finite.all():
            return None
        bad_values = ~finite
    bad = np.flatnonzero(bad_values.any(axis=1))
    return int(bad[0]) if len(bad) else None


def check_no_duplicates(plan: KeyPlan, spec: TableSpec, what: str) -> None:
    """Rejects a batch with a repeated key, where repeats have no agreed meaning (assign)."""
    if plan.position is not None:
        counts = np.bincount(plan.position.numpy(), minlength=len(plan.unique))
        key = int(plan.unique[np.flatnonzero(counts > 1)[0]])
        raise InvalidArgument(f"key {key} appears more than once in one {what} to table {spec.name!r}")


def prepare_many(updates: Mapping[str, tuple[Any, Any]], watch: Mapping[str, Any] | None,
                 update_ids: Mapping[str, str] | None, prepare: Callable) -> dict[str, Any]:
    """The tables' updates of one multi-table call, each checked and prepared before any is
    sent or applied: {table: prepare(table, keys, grads, update id or None, distinct watched
    keys or None)}. Watching a table that the call does not update is bad input."""
    watch, update_ids = watch or {}, update_ids or {}
    unknown = sorted(set(watch) - set(updates))
    if unknown:
        raise InvalidArgument(f"watched tables {unknown} have no update in this call")
    return {name: prepare(name, keys, grads, update_ids.get(name),
                          np.unique(as_key_array(watch[name])) if name in watch else None)
            for name, (keys, grads) in updates.items()}


def owned(x: Any) -> Any:
    """A copy of an *_async call's input, taken on the caller's thread: the call reads it on
    another thread later, and the caller may already be filling the same buffer again."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, np.ndarray):
        return x.copy()
    return copy.deepcopy(x)  # lists and other sequences; rare on hot paths


def owned_many(updates: Mapping[str, tuple[Any, Any]], watch: Mapping[str, Any] | None,
               update_ids: Mapping[str, str] | None) -> tuple[dict, dict | None, dict | None]:
    """`owned` copies of update_many's inputs, for update_many_async."""
    return ({t: (owned(k), owned(g)) for t, (k, g) in updates.items()},
            None if watch is None else {t: owned(k) for t, k in watch.items()},
            None if update_ids is None else dict(update_ids))
