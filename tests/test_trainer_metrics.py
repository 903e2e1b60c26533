"""The trainer's Prometheus metrics: figures of known steps, served over HTTP and parsed with
prometheus-client's own parser.

Run: python -m pytest tests/test_trainer_metrics.py -q
"""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trainer.metrics import TrainerMetrics


def scrape(port: int) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_steps_are_served_and_parse():
    metrics = TrainerMetrics(worker=3)
    port = metrics.serve(0, "127.0.0.1")
    try:
        steps = [(0.5, 0.01), (0.25, 0.0), (1.0, 0.2)]  # (step seconds, row wait seconds)
        for seconds, wait in steps:
            metrics.step(seconds, tokens=2_048, row_wait_s=wait, push_wait_s=0.001, prefetch_depth=2)
        got = scrape(port)
    finally:
        metrics.close()
    w = (("worker", "3"),)
    assert got[("memstore_trainer_steps_total", w)] == 3
    assert got[("memstore_trainer_tokens_total", w)] == 3 * 2_048
    assert got[("memstore_trainer_step_seconds_count", w)] == 3
    assert got[("memstore_trainer_step_seconds_sum", w)] == pytest.approx(1.75)
    assert got[("memstore_trainer_step_seconds_bucket", (("le", "0.5"), ("worker", "3")))] == 2
    assert got[("memstore_trainer_row_wait_seconds_sum", w)] == pytest.approx(0.21)
    assert got[("memstore_trainer_row_wait_seconds_bucket", (("le", "0.01"), ("worker", "3")))] == 2
    assert got[("memstore_trainer_push_wait_seconds_count", w)] == 3
    assert got[("memstore_trainer_tokens_per_second", w)] == 2_048 / 1.0  # the last step's
    assert got[("memstore_trainer_prefetch_depth", w)] == 2


def test_two_workers_in_one_process_keep_apart_and_bad_figures_are_refused():
    a, b = TrainerMetrics(0), TrainerMetrics(1)
    a.step(0.1, tokens=10)
    assert a.registry.get_sample_value("memstore_trainer_steps_total", {"worker": "0"}) == 1
    assert b.registry.get_sample_value("memstore_trainer_steps_total", {"worker": "1"}) == 0
    with pytest.raises(ValueError, match="must be >= 0"):
        a.step(-1.0, tokens=10)
