"""Data-parallel training: W workers that together equal one worker on the whole batch.

Every step's batch (trainer.data, a pure function of (seed, step)) is cut into W equal slices
along the batch dimension; worker r trains on slice r. In sync mode the workers must end every
step with exactly the state one worker would reach on the whole batch, up to float
reassociation. What crosses between workers, per step:

- Dense gradients: one all-reduce (sum) of every parameter's gradient, flattened into one
  buffer, after each worker backpropagated loss / W (so the sum is the gradient of the mean
  loss over the whole batch). A parameter no token reached on any worker (an idle expert)
  keeps grad None, as it would on one worker, so AdamW leaves it alone; the buffer carries a
  presence flag per parameter for that, and the step's loss.
- Row gradients: each worker pushes one piece of the step's summed update, so one copy of
  it crosses the wire to the store however many workers there are. Key k's piece is k mod W
  (`piece_of`); worker p pushes piece p. Per Engram layer, on a second process group
  (`rows_group`, driven by the push thread while the dense all-reduce runs on the main
  thread; one group per thread keeps each group's collectives in the same order on every
  worker), `DataParallel.push`:
  1. sums this worker's gradients per distinct key and head (b*T positions -> its distinct
     keys, memstore.keys as the client sums repeats);
  2. routes each sum to the worker of its key's piece (all-to-all), with this worker's
     watched keys (the keys of its prefetched steps, trainer.prefetch) alongside;
  3. sends its piece: per table, the sums it received, concatenated in rank order, which
     the client sums per key (memstore.keys) — so every key's gradient is the sum of the
     workers' sums in rank order, whichever worker pushes it — under the id
     `update_id(step)/table/p<rank>`, watching the union of every worker's watched keys
     of the piece. The shards apply each piece once;
  4. routes the changed watched rows of the reply back to the workers that watch them
     (all-to-all), so every worker acknowledges every piece of the update with exactly
     the rows of its own prefetched keys that the update changed.
  The exchange among workers was chosen over summing on the shard because the shard would
  have to hold partial updates until all W arrive (state that a crash could lose after
  acknowledging a part); bench/bench_row_sync.py measures the ways side by side. Step 4
  ends only when every piece has been applied, so no worker sends the next step's update
  to a table before the whole of this step's update is in. An id names the run, this start
  of it (rank 0 draws it at init: a resumed run repeats step numbers, and the store would
  drop those steps as duplicates), the step and the piece. A worker pushes its layers in order and stops at the first that
  fails, so no exchange of one layer pairs with another worker's exchange of another; a
  failed piece leaves the step's other pieces applied, and the run ends with the error
  (a resume restarts from a checkpoint's cut, where no piece of the step is applied).
- The routers' balancing biases: their load counts are all-reduced (trainer.model).

Backends: gloo for the rows (CPU tensors); the dense group is gloo on CPU, nccl on GPU.
Relies on torch.distributed, memstore.keys and the row source's update_many; the launcher
that places workers is cluster.train.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from memstore import keys as keyplan
from memstore.partition import shard_of

_NO_KEYS = np.empty(0, dtype=np.int64)
# How long the other workers wait for rank 0's store restore (on resume) or checkpoint (at
# the end): minutes for a store of many GB, past the groups' 300 s. A rank 0 that fails ends
# the run sooner: cluster.train ends every worker once one has failed.
STORE_WAIT_S = 4 * 3600.0


def piece_of(keys: np.ndarray, world: int) -> np.ndarray:
    """The worker that pushes each key's summed gradient: key mod W, the store's own
    placement rule (memstore.partition), so with W == S shards worker p sends to shard p only."""
    return shard_of(keys, world)


@dataclass
class DataParallel:
    """This worker's place in a data-parallel run."""

    rank: int
    world: int
    run_id: str  # names the run's updates; the same on every worker
    rows_group: Any = None  # process group of the row-gradient exchange
    attempt: str = ""  # this start of the run (rank 0's, shared at init): a resumed run's ids are new
    exchange_s: float = 0.0  # seconds routing row gradients and fresh rows among workers (push thread)
    reduce_s: float = 0.0  # seconds in the dense all-reduces (main thread)

    @classmethod
    def init(cls, rank: int, world: int, master: str, run_id: str, *, backend: str = "gloo",
             timeout_s: float = 300.0) -> "DataParallel":
        """Joins the run's process groups; master is "host:port" of rank 0's rendezvous."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        dist.init_process_group(backend, init_method=f"tcp://{master}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        try:
            rows_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
            # A store remembers update ids: a run resumed under the same run_id must not send
            # the ids of the steps it repeats, or the shards drop those updates as duplicates.
            attempt = [uuid.uuid4().hex[:12] if rank == 0 else None]
            dist.broadcast_object_list(attempt, src=0, group=rows_group)
        except BaseException:
            dist.destroy_process_group()
            raise
        return cls(rank, world, run_id, rows_group, attempt=attempt[0])

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This worker's slice of a whole batch (B, ...) -> (B / W, ...)."""
        b = batch.shape[0] // self.world
        assert b * self.world == batch.shape[0], f"batch of {batch.shape[0]} does not split over {self.world} workers"
        return batch[self.rank * b:(self.rank + 1) * b]

    def push(self, store: Any, tables: Sequence[str], keys: np.ndarray, grads: torch.Tensor, lr: float,
             watch: Mapping[str, np.ndarray] | None, update_id: str) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
        """One Engram layer's share of a step's row update (module doc, steps 1-4): this
        worker's hash ids (b, T, H) and row gradients (b, T, H, d) of the heads `tables`;
        watch: {table: sorted distinct keys} of its prefetched steps. Every worker calls it
        with the same tables in the same order. Returns {table: (sorted keys, rows)} for the
        tables in `watch`: the rows among its keys that this step's update changed, as the
        store holds them right after applying it."""
        t0 = time.perf_counter()
        H, d = len(tables), grads.shape[-1]
        k = np.ascontiguousarray(keys, dtype=np.int64).reshape(-1, H)  # (N, H)
        g = grads.reshape(-1, H, d)  # (N, H, d)
        sums_keys, sums = [], []
        for h, name in enumerate(tables):  # the client's own de-duplication and sum, per head
            plan = keyplan.plan_keys(k[:, h], store.spec(name), 1, group=False)
            sums_keys.append(plan.unique)
            sums.append(plan.to_unique_order(g[:, h]))
        watch = watch or {}
        watched = [np.asarray(watch.get(name, _NO_KEYS), dtype=np.int64) for name in tables]
        # Sums of head h go out as section h, watched keys of head h as section H + h.
        got_keys, got_sums, sources = self._route(sums_keys + watched, torch.cat(sums), H)
        mine = {}  # table -> (keys, sums) of this worker's piece, rank order
        mine_watched = []  # per head: (watched keys, the worker that watches each)
        for h, name in enumerate(tables):
            if len(got_keys[h]):
                mine[name] = (got_keys[h], got_sums[h])
            mine_watched.append((got_keys[H + h], sources[H + h]))
        look = {name: np.unique(mine_watched[h][0]) for h, name in enumerate(tables)
                if name in mine and len(mine_watched[h][0])}
        self.exchange_s += time.perf_counter() - t0
        fresh = store.update_many(mine, lr, watch=look,
                                  update_ids={name: f"{update_id}/{name}/p{self.rank}" for name in mine}) if mine else {}
        t0 = time.perf_counter()
        back_keys, back_rows, back_to = [], [], []  # per head: the changed watched rows and who watches them
        dtype = store.spec(tables[0]).wire_torch_dtype
        for h, name in enumerate(tables):
            want, who = mine_watched[h]
            fk, rows = fresh.get(name, (_NO_KEYS, torch.empty(0, d, dtype=dtype)))
            at = np.minimum(np.searchsorted(fk, want), max(len(fk) - 1, 0))
            hit = np.flatnonzero(fk[at] == want) if len(fk) else np.empty(0, dtype=np.int64)
            back_keys.append(want[hit])
            back_rows.append(rows[torch.from_numpy(at[hit])])
            back_to.append(who[hit])
        got_keys, got_rows, _ = self._route(back_keys, torch.cat(back_rows), H, dest=back_to)
        out = {}
        for h, name in enumerate(tables):
            if name in watch:
                order = np.argsort(got_keys[h], kind="stable")  # the pieces' keys are disjoint
                out[name] = got_keys[h][order], got_rows[h][torch.from_numpy(order)]
        self.exchange_s += time.perf_counter() - t0
        return out

    def _route(self, keys: list[np.ndarray], values: torch.Tensor, valued: int,
               dest: list[np.ndarray] | None = None) -> tuple[list, list, list]:
        """Sends every key of section i (keys[i]) to the worker dest[i] (default: its piece)
        and, for the first `valued` sections, its row of `values` (those sections' rows,
        concatenated in section order) along with it: three all-to-alls (counts, keys,
        values). Returns, per section, the keys received (in rank order, each worker's in
        the order it sent them), their values (valued sections only) and the worker each
        came from."""
        W, n = self.world, len(keys)
        flat = np.concatenate(keys)
        section = np.repeat(np.arange(n), [len(a) for a in keys])
        to = piece_of(flat, W) if dest is None else np.concatenate(dest).astype(np.int64, copy=False)
        label = to * n + section
        order = np.argsort(label, kind="stable")  # by worker, then section; positions kept in order
        counts = torch.from_numpy(np.bincount(label, minlength=W * n).reshape(W, n))
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=self.rows_group)  # row r: what worker r sends here
        got = got.numpy()
        n_valued = sum(len(a) for a in keys[:valued])
        value_order = order[order < n_valued]  # valued keys come first in `flat`
        recv_keys = np.empty(int(got.sum()), dtype=np.int64)
        dist.all_to_all_single(torch.from_numpy(recv_keys), torch.from_numpy(flat[order]),
                               got.sum(1).tolist(), counts.sum(1).tolist(), group=self.rows_group)
        recv_values = values.new_empty((int(got[:, :valued].sum()), *values.shape[1:]))
        dist.all_to_all_single(recv_values, values[torch.from_numpy(value_order)].contiguous(),
                               got[:, :valued].sum(1).tolist(), counts[:, :valued].sum(1).tolist(),
                               group=self.rows_group)
        recv_section = np.repeat(np.tile(np.arange(n), W), got.reshape(-1))
        recv_source = np.repeat(np.repeat(np.arange(W), n), got.reshape(-1))
        by_section = np.argsort(recv_section, kind="stable")  # by section, then worker
        bounds = np.concatenate([[0], np.cumsum(np.bincount(recv_section, minlength=n))])
        value_section = recv_section[recv_section < valued]
        by_value = torch.from_numpy(np.argsort(value_section, kind="stable"))
        value_bounds = bounds[:valued + 1]
        out_keys = [recv_keys[by_section[bounds[i]:bounds[i + 1]]] for i in range(n)]
        out_sources = [recv_source[by_section[bounds[i]:bounds[i + 1]]] for i in range(n)]
        out_values = [recv_values[by_value[value_bounds[i]:value_bounds[i + 1]]] for i in range(valued)]
        return out_keys, out_values, out_sources

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter], loss: float) -> float:
        """Sums the gradients of `params` over the workers (None where no worker had one) and
        returns the mean of the workers' losses; one collective."""
        t0 = time.perf_counter()
        params = list(params)
        device = params[0].device
        present = torch.tensor([p.grad is not None for p in params] + [0.0], dtype=torch.float32, device=device)
        present[-1] = loss
        flat = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=device)
                for p in params]
        buf = torch.cat([present, *flat])  # (P + 1 + sum of numels,)
        dist.all_reduce(buf)
        head = buf[:len(params) + 1].cpu()  # the flags and the loss in one device-to-host copy
        at = len(params) + 1
        for i, p in enumerate(params):
            n = p.numel()
            if head[i] > 0:
                p.grad = buf[at:at + n].view_as(p).to(p.dtype)
            at += n
        self.reduce_s += time.perf_counter() - t0
        return float(head[len(params)]) / self.world

    # mean() and barrier() use rows_group from the main thread: only between steps (evals,
    # checkpoints), when train_step has waited for every push, so no exchange is in flight.
    def mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, group=self.rows_group)
        return float(t) / self.world

    def update_id(self, step: int) -> str:
        """Step `step`'s update id, the same on every worker of this attempt and new in every
        attempt (a resume repeats step numbers)."""
        return f"{self.run_id}/{self.attempt}/s{step}"

    def barrier(self, timeout_s: float | None = None) -> None:
        """Waits for every worker: up to the groups' timeout, or timeout_s (STORE_WAIT_S for
        rank 0's store restore or checkpoint, which may take minutes)."""
        dist.barrier(group=self.rows_group, timeout=None if timeout_s is None else timedelta(seconds=timeout_s))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
