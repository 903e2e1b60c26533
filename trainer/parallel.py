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
- Row gradients: an all-gather of each worker's hash ids (B/W, T, H) and row gradients
  (B/W, T, H, d) on a second process group (`rows_group`), driven by the push thread while
  the dense all-reduce runs on the main thread (one group per thread keeps each group's
  collectives in the same order on every worker). The gathered slices, in rank order, are the
  whole batch's, in the order one worker would hold them, so every worker sums the same
  gradients per key the same way (memstore.keys) and obtains the same update, bit for bit.
- Every worker then sends that whole update to the store under one id per step and table
  (`update_id`); the shards apply it once and answer every sender, each reply carrying the
  rows that sender watches for its prefetched steps (trainer.prefetch). Exchanging among
  workers was chosen over summing on the shard because the shard would have to hold partial
  updates until all W arrive (state that a crash could lose after acknowledging a part); the
  price is W copies of the update on the wire to the store (bench/bench_row_sync.py measures
  both ways). A sender whose copy arrives second gets the rows as they are at once, which is
  still right after this update: no worker can send the next step's update to a table
  before every worker has this step's replies, since the next step's exchange needs every
  worker to have finished this one. Every worker must split the update the same way (the
  same ClientConfig.max_request_bytes), so its parts carry the same ids. An id names the run,
  this start of it (rank 0 draws it at init: a resumed run repeats step numbers, and the
  store would drop those steps as duplicates) and the step. A worker pushes its layers in
  order and stops at the first that fails, so no exchange of one layer pairs with another
  worker's exchange of another.
- The routers' balancing biases: their load counts are all-reduced (trainer.model).

Backends: gloo for the rows (CPU tensors); the dense group is gloo on CPU, nccl on GPU.
Relies on torch.distributed only; the launcher that places workers is cluster.train.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DataParallel:
    """This worker's place in a data-parallel run."""

    rank: int
    world: int
    run_id: str  # names the run's updates; the same on every worker
    rows_group: Any = None  # process group of the row-gradient exchange
    attempt: str = ""  # this start of the run (rank 0's, shared at init): a resumed run's ids are new
    exchange_s: float = 0.0  # seconds in the row-gradient all-gathers (push thread)
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

    def exchange(self, keys: np.ndarray, grads: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Every worker's (hash ids (b, T, H), row gradients (b, T, H, d)), concatenated in rank
        order: (W*b, T, H), (W*b, T, H, d)."""
        t0 = time.perf_counter()
        k = torch.from_numpy(np.ascontiguousarray(keys))
        g = grads.contiguous()
        ks = [torch.empty_like(k) for _ in range(self.world)]
        gs = [torch.empty_like(g) for _ in range(self.world)]
        dist.all_gather(ks, k, group=self.rows_group)
        dist.all_gather(gs, g, group=self.rows_group)
        out = torch.cat(ks).numpy(), torch.cat(gs)
        self.exchange_s += time.perf_counter() - t0
        return out

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

    def barrier(self) -> None:
        dist.barrier(group=self.rows_group)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
