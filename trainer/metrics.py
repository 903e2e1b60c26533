"""Prometheus metrics of one training worker: step time, time waiting for rows, prefetch depth,
tokens/s.

`TrainerMetrics` keeps its own `CollectorRegistry` (never prometheus-client's global one, so
two workers or a test in one process do not clash) and serves it over HTTP only when asked
(`serve(port)`). The training loop calls `step(...)` once per step with figures it measures
already; nothing here times anything itself, so it adds no work to a step but a few counter
increments. Relies on prometheus-client and memstore.metrics (the HTTP endpoint).

    metrics = TrainerMetrics(worker=rank)
    metrics.serve(9300)                      # optional; 0 picks a free port, returned
    for step ...:
        t0 = time.perf_counter()
        loss, wait = train_step(run, step, x, y)
        metrics.step(time.perf_counter() - t0, tokens=batch_size * seq_len, row_wait_s=wait,
                     prefetch_depth=cfg.prefetch_depth)
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from memstore.metrics import MetricsEndpoint

# Step times run from tens of ms (small models on GPU) to seconds (CPU).
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Waits for rows are ideally ~0 (prefetch hides the lookups); buckets start well below a step.
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class TrainerMetrics(MetricsEndpoint):
    """The metrics of one worker, labelled with its rank (`worker`)."""

    what = "trainer metrics"

    def __init__(self, worker: int | str = 0) -> None:
        super().__init__()
        r, labels = self.registry, ["worker"]
        self.steps = Counter("memstore_trainer_steps", "optimizer steps taken", labels, registry=r).labels(worker)
        self.tokens = Counter("memstore_trainer_tokens", "tokens trained on by this worker", labels,
                              registry=r).labels(worker)
        self.step_seconds = Histogram("memstore_trainer_step_seconds", "wall time of one step", labels,
                                      buckets=STEP_BUCKETS, registry=r).labels(worker)
        self.row_wait = Histogram("memstore_trainer_row_wait_seconds",
                                  "time a step was blocked waiting for its Engram rows", labels,
                                  buckets=WAIT_BUCKETS, registry=r).labels(worker)
        self.push_wait = Histogram("memstore_trainer_push_wait_seconds",
                                   "time a step was blocked waiting for the store to acknowledge its row updates",
                                   labels, buckets=WAIT_BUCKETS, registry=r).labels(worker)
        self.tokens_per_s = Gauge("memstore_trainer_tokens_per_second",
                                  "tokens of the last step over its wall time (rate() of the tokens counter "
                                  "averages over a window)", labels, registry=r).labels(worker)
        self.prefetch_depth = Gauge("memstore_trainer_prefetch_depth",
                                    "steps whose rows are looked up ahead of the step that computes", labels,
                                    registry=r).labels(worker)

    def step(self, seconds: float, tokens: int, row_wait_s: float = 0.0, push_wait_s: float | None = None,
             prefetch_depth: int | None = None) -> None:
        """Records one finished step: its wall time, the tokens it trained on, the time it was
        blocked on rows (and on the update acknowledgement, if measured), the prefetch depth."""
        if seconds < 0 or tokens < 0 or row_wait_s < 0:
            raise ValueError(f"step figures must be >= 0, got seconds={seconds}, tokens={tokens}, "
                             f"row_wait_s={row_wait_s}")
        self.steps.inc()
        self.tokens.inc(tokens)
        self.step_seconds.observe(seconds)
        self.row_wait.observe(row_wait_s)
        if push_wait_s is not None:
            self.push_wait.observe(push_wait_s)
        if seconds > 0:
            self.tokens_per_s.set(tokens / seconds)
        if prefetch_depth is not None:
            self.prefetch_depth.set(prefetch_depth)

