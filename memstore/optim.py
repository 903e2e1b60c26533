"""Sparse optimizers a shard applies to the rows of one update, and to those rows only.

A shard keeps each table's rows in one contiguous [num_rows, dim] tensor (float32, bfloat16
or float16) and the optimizer's state beside it in float32 tensors made by `init_state`.
`step` reads the touched rows and their state, computes in float32 and writes both back in
place; every other row and its state stay bit-identical (the lazy semantics of
torch.optim.SparseAdam and of TorchRec's fused row-wise optimizers).

- "sgd": torch.optim.SGD per row (momentum buffer, no dampening, no nesterov).
- "adagrad": TorchRec / fbgemm ROWWISE_ADAGRAD, one accumulator per row.
- "adam": torch.optim.Adam's formula with per-row moments and a per-row step count, so a
  row's update depends only on its own history.
weight_decay is decoupled (AdamW's p *= 1 - lr * wd) and touches only the updated rows.
With stochastic_rounding, 16-bit rows are written by memstore.rounding, and the state holds
each row's update count ("rounds") that its noise depends on. 16-bit rows saturate at
their largest value (float16 +-65,504) rather than overflow to Inf.

Relies on plain torch only, on whatever device the rows live. The caller holds the table's
lock and guarantees that `idx` is unique and in range and that `grads` is already summed per
key. Speed on CPU comes from three habits, measured on 65,536 rows of a 4 M-row table (see
bench/bench_optim.py): the batch is processed in chunks whose temporaries stay in cache
(whole-batch 16 MiB temporaries made Adam 2x slower); rows are written with
index_add_ (alpha 1: other alphas take a 6x slower path) whenever the stored value is the
float32 sum of the old row and the update; and optimizers that scatter [k, dim] state as
well as rows sort the indices first (ascending scatters are faster; sorting pays only when
there is more than one to make). [k, dim] state and rows are scattered by numpy's put
(put_rows), which moves a row as one block where index_copy_ iterates per row: a training
step's small updates are mostly that fixed cost. Where torch runs one intra-op thread, as in
a shard, a large update's chunks run side by side on a small thread pool instead.
"""

from __future__ import annotations

import threading
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from memstore import alloc, cgroup, rounding
from memstore.keys import as_numpy
from memstore.spec import OptimizerSpec, check_learning_rate

ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Values per float32 temporary on CPU: 1 MiB, so a chunk's few temporaries stay in cache.
CPU_CHUNK_ELEMENTS = 1 << 18


class SparseOptimizer:
    """Updates the rows `idx` of a table and their state; subclasses give the update.

    A subclass sets `state_names` and implements `_delta`, which returns the float32 values
    to add to a chunk of (weight-decayed) rows and updates that chunk's state.
    """

    state_names: tuple[str, ...] = ()
    sorts_rows = False  # sort idx first: worth it when [k, dim] state is scattered too

    def __init__(self, spec: OptimizerSpec):
        spec.validate()
        self.spec = spec

    def init_state(self, num_rows: int, dim: int) -> dict[str, torch.Tensor]:
        """Zeroed state for a table of num_rows x dim, on the CPU (move it with the rows)."""
        state = self._own_state(num_rows, dim)
        if self.spec.stochastic_rounding:
            state[rounding.ROUNDS] = alloc.zeros((num_rows,), torch.int32)
        return state

    def _own_state(self, num_rows: int, dim: int) -> dict[str, torch.Tensor]:
        """The optimizer's own state (state_names): float32 [num_rows, dim] each, unless a
        subclass says otherwise."""
        return {name: alloc.zeros((num_rows, dim), torch.float32) for name in self.state_names}

    def state_row_bytes(self, dim: int) -> int:
        """Bytes of state init_state keeps per row (without allocating it)."""
        return sum(t.numel() * t.element_size() for t in self.init_state(1, dim).values())

    def step(
        self,
        rows: torch.Tensor,
        state: dict[str, torch.Tensor],
        idx: torch.Tensor,
        grads: torch.Tensor,
        lr: float,
        *,
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """Applies one update to rows[idx] and their state, in place. With stochastic
        rounding, the noise of local row r comes from the table's `seed` and r's global key
        r * num_shards + shard_index, `shard` being (shard_index, num_shards)."""
        names = self.state_names + ((rounding.ROUNDS,) if self.spec.stochastic_rounding else ())
        _check_step_args(rows, state, names, idx, grads)
        lr = check_learning_rate(lr, self.spec)
        n = idx.numel()
        if n == 0:
            return
        if self.sorts_rows:
            idx, grads = _sorted_by_row(idx, grads)
        per_row = self._per_row(state, idx, lr)
        words = self._rounding_words(rows, state, idx, seed, shard)
        decay = 1.0 - lr * self.spec.weight_decay
        chunk = _chunk_rows(rows)

        def apply(lo: int) -> None:  # chunks touch disjoint rows (idx is unique): any order gives the same bits
            ix = idx[lo : lo + chunk]
            delta = self._delta(state, ix, grads[lo : lo + chunk], lr, [t[lo : lo + chunk] for t in per_row])
            _write_rows(rows, ix, delta, decay, None if words is None else words[lo : lo + chunk])

        starts = range(0, n, chunk)
        pool = _chunk_pool() if len(starts) > 1 and rows.device.type == "cpu" else None
        if pool is None:
            for lo in starts:
                apply(lo)
        else:  # every chunk ends before a failure is raised: none may write after the table's lock is let go
            running = [pool.submit(apply, lo) for lo in starts]
            futures.wait(running)
            for done in running:
                done.result()

    def _rounding_words(self, rows, state, idx, seed: int, shard: tuple[int, int]) -> torch.Tensor | None:
        """Counts this update in each row's rounds; their noise words (rounding.row_words),
        or None when rows are rounded to nearest (no stochastic_rounding, or float32 rows)."""
        if not self.spec.stochastic_rounding:
            return None
        rounds = state[rounding.ROUNDS].index_select(0, idx).add_(1)
        put_rows(state[rounding.ROUNDS], idx, rounds)
        if rows.dtype == torch.float32:
            return None
        keys = idx * shard[1] + shard[0]
        return rounding.row_words(seed, keys.cpu(), rounds.cpu()).to(rows.device)

    def _per_row(self, state: dict[str, torch.Tensor], idx: torch.Tensor, lr: float) -> list[torch.Tensor]:
        """Per-row [n] quantities computed once for the whole (sorted) batch."""
        return []

    def _delta(
        self,
        state: dict[str, torch.Tensor],
        ix: torch.Tensor,
        g: torch.Tensor,
        lr: float,
        per_row: list[torch.Tensor],
    ) -> torch.Tensor:
        raise NotImplementedError


class SparseSGD(SparseOptimizer):
    """p -= lr * buf with buf = momentum * buf + g (torch.optim.SGD, dampening 0)."""

    def __init__(self, spec: OptimizerSpec):
        super().__init__(spec)
        # No state at all without momentum, as torch.optim.SGD keeps none.
        self.state_names = ("momentum_buffer",) if spec.momentum != 0.0 else ()
        self.sorts_rows = bool(self.state_names)

    def _delta(self, state, ix, g, lr, per_row):
        if not self.state_names:
            return g * -lr
        buf = state["momentum_buffer"].index_select(0, ix)  # (k, dim)
        buf.mul_(self.spec.momentum).add_(g)
        put_rows(state["momentum_buffer"], ix, buf)
        return buf.mul_(-lr)


class SparseRowWiseAdagrad(SparseOptimizer):
    """fbgemm ROWWISE_ADAGRAD: acc += mean(g**2); p -= lr * g / (sqrt(acc) + eps)."""

    state_names = ("momentum1",)  # fbgemm's name for the per-row accumulator

    def _own_state(self, num_rows: int, dim: int) -> dict[str, torch.Tensor]:
        return {"momentum1": alloc.zeros((num_rows,), torch.float32)}

    def _delta(self, state, ix, g, lr, per_row):
        acc = state["momentum1"].index_select(0, ix)  # (k,)
        squares = g.square()
        if len(ix) == 1:  # a lone output: torch splits its sum over threads (bits vary with their count)
            squares = squares.expand(2, -1)  # two: each summed whole on one thread, as with one thread
        acc.add_(squares.mean(1)[: len(ix)])
        put_rows(state["momentum1"], ix, acc)
        scale = acc.sqrt_().add_(self.spec.eps).reciprocal_().mul_(-lr)  # -lr / (sqrt(acc) + eps)
        return g * scale.unsqueeze(1)


class SparseAdam(SparseOptimizer):
    """torch.optim.Adam (AdamW with weight decay) with a per-row step count."""

    state_names = ("exp_avg", "exp_avg_sq", "step")
    sorts_rows = True

    def _own_state(self, num_rows: int, dim: int) -> dict[str, torch.Tensor]:
        state = super()._own_state(num_rows, dim)
        state["step"] = alloc.zeros((num_rows,), torch.int64)
        return state

    def _per_row(self, state, idx, lr):
        step = state["step"].index_select(0, idx).add_(1)  # (n,)
        put_rows(state["step"], idx, step)
        # Bias corrections in float64, then rounded once, as torch Adam's Python floats are.
        step = step.to(torch.float64)
        neg_step_size = (-lr / (1.0 - torch.pow(self.spec.beta1, step))).to(torch.float32)
        bias_correction2_sqrt = torch.sqrt(1.0 - torch.pow(self.spec.beta2, step)).to(torch.float32)
        return [neg_step_size, bias_correction2_sqrt]

    def _delta(self, state, ix, g, lr, per_row):
        neg_step_size, bias_correction2_sqrt = (t.unsqueeze(1) for t in per_row)  # (k, 1)
        m = state["exp_avg"].index_select(0, ix)  # (k, dim)
        v = state["exp_avg_sq"].index_select(0, ix)
        m.lerp_(g, 1.0 - self.spec.beta1)
        v.mul_(self.spec.beta2).addcmul_(g, g, value=1.0 - self.spec.beta2)
        put_rows(state["exp_avg"], ix, m)
        put_rows(state["exp_avg_sq"], ix, v)
        # The moments are stored; reuse their buffers. Same operation order as torch Adam's
        # addcdiv_(m, denom, value=-step_size), which computes (-step_size * m) / denom.
        denom = v.sqrt_().div_(bias_correction2_sqrt).add_(self.spec.eps)
        return m.mul_(neg_step_size).div_(denom)


OPTIMIZERS: dict[str, type[SparseOptimizer]] = {
    "sgd": SparseSGD,
    "adagrad": SparseRowWiseAdagrad,
    "adam": SparseAdam,
}


def make_optimizer(spec: OptimizerSpec) -> SparseOptimizer:
    """The optimizer for spec.kind; raises InvalidArgument for a bad spec."""
    spec.validate()
    return OPTIMIZERS[spec.kind](spec)


def _check_step_args(rows, state, state_names, idx, grads) -> None:
    assert rows.dim() == 2 and rows.is_contiguous(), f"rows must be a contiguous 2-D tensor, got {tuple(rows.shape)}"
    assert rows.dtype in ROW_DTYPES, f"rows dtype {rows.dtype} is not one of {ROW_DTYPES}"
    assert set(state) == set(state_names), f"state has {sorted(state)}, expected {sorted(state_names)}"
    assert idx.dim() == 1 and idx.dtype == torch.int64, f"idx must be int64 [n], got {idx.dtype} {tuple(idx.shape)}"
    assert grads.dtype == torch.float32 and tuple(grads.shape) == (idx.numel(), rows.shape[1]), (
        f"grads must be float32 {(idx.numel(), rows.shape[1])}, got {grads.dtype} {tuple(grads.shape)}"
    )
    assert idx.device == rows.device == grads.device, (
        f"rows, idx and grads must share a device: {rows.device}, {idx.device}, {grads.device}"
    )


def _sorted_by_row(idx: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """idx ascending, grads permuted alike, so that scatters walk memory in order."""
    if idx.device.type == "cpu" and bool((idx[1:] >= idx[:-1]).all()):
        return idx, grads  # already sorted, as np.unique's keys are; the check costs ~1 %
    idx, order = torch.sort(idx)
    return idx, grads.index_select(0, order)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()  # guards _pool's creation


def _chunk_pool() -> ThreadPoolExecutor | None:
    """Threads that apply a large update's chunks side by side, where torch runs one intra-op
    thread (shard processes: memstore serve, Ray actors): coarse parallelism that does not
    stall when the machine is busy, as OpenMP's per-op teams do. None when torch has threads
    of its own or there is one core."""
    global _pool
    if torch.get_num_threads() != 1 or _cores() < 2:
        return None
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_cores(), thread_name_prefix="memstore-optim")
        return _pool


def _cores() -> int:
    """Cores this process may run on: its affinity, within its cgroup's CPU quota (read once)."""
    return cgroup.usable_cores()


def _chunk_rows(rows: torch.Tensor) -> int:
    """Rows per chunk: cache-sized on CPU, the whole batch on an accelerator."""
    if rows.device.type != "cpu":
        return 1 << 62
    return max(1, CPU_CHUNK_ELEMENTS // rows.shape[1])


def _write_rows(rows: torch.Tensor, ix: torch.Tensor, delta: torch.Tensor, decay: float,
                words: torch.Tensor | None = None) -> None:
    """rows[ix] = rows[ix] * decay + delta, computed in float32 and rounded once: to nearest,
    or with `words` (rounding.row_words of ix) stochastically."""
    if rows.dtype == torch.float32 and decay == 1.0:
        rows.index_add_(0, ix, delta)  # same float32 sum, without gathering the rows first
        return
    p = rows.index_select(0, ix).to(torch.float32)  # (k, dim)
    if decay != 1.0:
        p.mul_(decay)
    p.add_(delta)
    if words is not None:
        put_rows(rows, ix, rounding.round_to(p, rounding.noise(words, rows.shape[1]), rows.dtype))
        return
    if rows.dtype in rounding.LARGEST:  # 16-bit rows saturate at their largest value (float16's
        top = rounding.LARGEST[rows.dtype]  # 65,504) where rounding would give Inf
        p.clamp_(-top, top)
    put_rows(rows, ix, p.to(rows.dtype))


def put_rows(t: torch.Tensor, ix: torch.Tensor, values: torch.Tensor) -> None:
    """t[ix] = values along dim 0, for distinct ix. On CPU through numpy's put, which moves
    each row as one block (and releases the GIL) where index_copy_ runs an iterator per row:
    a training step's 1,500 rows x 32 of one table took 6.6 us instead of 37 us (measured).
    Gathers stay index_select: numpy's take is no faster for a step's rows, and it holds the
    GIL, so chunks on the thread pool would take turns."""
    if t.device.type != "cpu" or t.dim() == 1:  # one value a row: torch's index kernel is as quick
        t.index_copy_(0, ix, values)
        return
    dst, src = as_numpy(t), as_numpy(values.contiguous())
    row = np.dtype((np.void, dst.itemsize * dst[0].size))  # whole rows as single items
    np.put(dst.view(row).reshape(-1), ix.numpy(), src.view(row).reshape(-1))
