"""Starts shards as local `memstore serve` processes: for tests, demos and benchmarks on one
machine without Ray (the Ray actors in cluster/ place the same server on a cluster)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

SERVING = re.compile(r"serving on (\S+)")
METRICS = re.compile(r"metrics on http://(\S+)/metrics")


def start_shard(index: int, num_shards: int, port: int = 0, host: str = "127.0.0.1",
                extra_args: tuple[str, ...] = ()) -> subprocess.Popen:
    """Starts shard `index` of `num_shards` (extra_args: more `memstore serve` flags); its log
    goes to the file named by `proc.log_path`."""
    cmd = [sys.executable, "-m", "memstore.cli.main", "serve", "--host", host, "--port", str(port),
           "--shard-index", str(index), "--num-shards", str(num_shards), *extra_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # stdout carries only the "serving on" line; logs go to a file so a full pipe never blocks.
    log = tempfile.NamedTemporaryFile("w", prefix=f"memstore-shard{index}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    proc.log_path = log.name
    log.close()
    return proc


def wait_serving(proc: subprocess.Popen, timeout_s: float = 60.0) -> str:
    """Reads the server's output until it announces its address; returns host:port. The
    metrics endpoint's host:port, if it announced one, is left in `proc.metrics_address`."""
    deadline = time.monotonic() + timeout_s
    proc.metrics_address = None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"shard exited with code {proc.wait()}; see {proc.log_path}")
        metrics = METRICS.search(line)
        if metrics:
            proc.metrics_address = metrics.group(1)
        m = SERVING.search(line)
        if m:
            return m.group(1)
    raise RuntimeError(f"shard did not start within {timeout_s} s; see {proc.log_path}")


class LocalShards:
    """S `memstore serve` processes on free ports of 127.0.0.1; a context manager.
    metrics=True gives each a Prometheus endpoint on a free port (`metrics_addresses`)."""

    def __init__(self, num_shards: int, metrics: bool = False) -> None:
        self.num_shards = num_shards
        extra = ("--metrics-port", "0") if metrics else ()
        self.procs = [start_shard(i, num_shards, extra_args=extra) for i in range(num_shards)]
        try:
            self.addresses = [wait_serving(p) for p in self.procs]
            self.metrics_addresses = [p.metrics_address for p in self.procs]
        except BaseException:
            self.stop()
            raise

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (the server drains), then SIGKILL after grace_s."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()

    def __enter__(self) -> "LocalShards":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
