"""Data-parallel training on Ray: W trainer workers, one Ray actor each, over one store.

`TrainWorkers(W)` places W worker actors (each `cpus_per_worker` CPUs and `gpus_per_worker`
GPUs) and keeps them for several runs; `run(cfg, ...)` has every worker join one
torch.distributed run (rank 0's node hosts the rendezvous), connect to the store (by name on
this Ray cluster, or by shard addresses), and call `trainer.train.train` with its
`DataParallel` place (trainer.parallel). It returns rank 0's summary, with every worker's share
of step time spent waiting for rows. `train_workers(...)` does both for one run.

While a run goes, rank 0 reports its progress line and its eval lines; `run` prints them
(one updating line on a terminal, as a single-process run does).

Relies on Ray, torch.distributed (gloo; nccl for the dense gradients on GPUs) and the trainer.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import uuid
from typing import Any

import ray

from cluster.store import NAMESPACE


class _ProgressSink:
    """A terminal-like stream for trainer.train's progress inside a worker: keeps the latest
    progress line and the lines that stay (evals) for the driver to fetch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards line and notes
        self.line = ""  # the unfinished line: the latest progress text
        self.notes: list[str] = []

    def isatty(self) -> bool:
        return True  # one updating line: every step's text, not a line per tenth of the run

    def write(self, text: str) -> None:
        with self._lock:
            if text.startswith("\r\033[K"):  # a redraw starts the line afresh
                self.line = ""
            self.line += text.replace("\r\033[K", "")
            *done, self.line = self.line.split("\n")
            self.notes.extend(d.strip() for d in done if d.strip())

    def flush(self) -> None:
        pass

    def take(self) -> tuple[str, list[str]]:
        with self._lock:
            notes, self.notes = self.notes, []
            return self.line, notes


class _TrainWorker:
    """One data-parallel worker (a Ray actor; private, placed by TrainWorkers)."""

    def __init__(self, rank: int, world: int, threads: int) -> None:
        import torch

        self.rank, self.world = rank, world
        torch.set_num_threads(max(1, threads))
        self.sink = _ProgressSink()

    def rendezvous(self) -> str:
        """host:port on this node for the process group's TCP store (rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def run(self, cfg: dict, store: dict, master: str, run_id: str, options: dict) -> dict:
        from memstore import MemStoreClient
        from trainer.data import load_data
        from trainer.parallel import DataParallel
        from trainer.train import TrainConfig, resolve_device, train

        config = TrainConfig.from_dict(cfg)
        self.sink = _ProgressSink()
        backend = "nccl" if resolve_device(config.device).type == "cuda" else "gloo"
        parallel = client = None
        try:
            # Even one worker goes through the process groups, the exchange and the update ids.
            parallel = DataParallel.init(self.rank, self.world, master, run_id, backend=backend)
            client = (MemStoreClient.connect(store["name"], address=store.get("address")) if store.get("name")
                      else MemStoreClient(store["addresses"]))
            data = load_data(config.data_config())
            return train(config, client, data=data, parallel=parallel, store_name=store.get("name"),
                         progress=self.rank == 0, progress_stream=self.sink, **options)
        finally:
            if client is not None:
                client.close()
            if parallel is not None:
                parallel.close()

    def progress(self) -> tuple[str, list[str]]:
        return self.sink.take()


class TrainWorkers:
    """W worker actors on the connected Ray cluster, reusable across runs; close() ends them."""

    def __init__(self, workers: int, *, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
                 threads_per_worker: int | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        threads = threads_per_worker or max(1, int(cpus_per_worker) or (os.cpu_count() or 1) // workers)
        cls = ray.remote(_TrainWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_concurrency=2,
                                               namespace=NAMESPACE)
        self.actors = [cls.remote(r, workers, threads) for r in range(workers)]

    @property
    def world(self) -> int:
        return len(self.actors)

    def run(self, cfg: Any, *, store_name: str | None = None, store_addresses: list[str] | None = None,
            address: str | None = None, progress: bool = True, poll_s: float = 0.5, **options) -> dict:
        """Trains cfg (a TrainConfig) on every worker; options go to trainer.train.train
        (checkpoint_dir, resume, until_step). Returns rank 0's summary plus
        `worker_wait_shares`."""
        import dataclasses

        if not self.actors:
            raise RuntimeError("this pool of trainer workers is closed (a run failed or close() was called)")
        if (store_name is None) == (store_addresses is None):
            raise ValueError("give the store by name or by shard addresses, not both or neither")
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} does not split over {self.world} workers")
        store = {"name": store_name, "address": address} if store_name else {"addresses": list(store_addresses)}
        # Absolute: a worker's working directory is Ray's, not the caller's.
        options = {k: (os.path.abspath(v) if v is not None and k in ("checkpoint_dir", "resume") else v)
                   for k, v in options.items()}
        master = ray.get(self.actors[0].rendezvous.remote())
        run_id = uuid.uuid4().hex[:12]  # names this run's updates on the store
        cfg_dict = dataclasses.asdict(cfg)
        refs = [a.run.remote(cfg_dict, store, master, run_id, options) for a in self.actors]
        pending = list(refs)
        tty = progress and sys.stdout.isatty()
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=poll_s)
            try:
                ray.get(done)
            except Exception:
                # The others would wait in a collective until its timeout: end them all (the
                # pool is spent) and report this worker's failure.
                self.close()
                raise
            if progress:
                self._show(tty)
        summaries = ray.get(refs)
        if progress:
            self._show(tty, final=True)
        head = dict(summaries[0])
        head["worker_wait_shares"] = [s["wait_share"] for s in summaries]
        return head

    def _show(self, tty: bool, final: bool = False) -> None:
        line, notes = ray.get(self.actors[0].progress.remote())
        for note in notes:
            print(f"\r\033[K{note}" if tty else note, flush=True)
        if tty and line:
            sys.stdout.write(f"\r\033[K{line}" + ("\n" if final else ""))
            sys.stdout.flush()

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    def __enter__(self) -> "TrainWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train_workers(cfg: Any, workers: int, *, cpus_per_worker: float = 1, gpus_per_worker: float = 0, **run_options) -> dict:
    """One data-parallel run of `workers` workers (see TrainWorkers.run for run_options)."""
    with TrainWorkers(workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker) as pool:
        return pool.run(cfg, **run_options)
