"""Tests for trainer.prefetch: rows looked up ahead, patched exactly (sync semantics).

Run from the repository root:
    .venv/bin/python -m pytest tests/test_prefetch.py -q

Training with prefetch at any depth, on the in-process store or on real shard processes, must
give the same losses, dense parameters and table rows as training without it, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memstore import InProcessStore, MemStoreClient
from memstore.launch import LocalShards
from tests.test_train import all_rows, assert_same_state, corpus, dense_state, tiny_config  # noqa: F401
from trainer.prefetch import RowPrefetcher
from trainer.train import _train_loop, build, train

STEPS = 6


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):  # noqa: F811
    """Training without prefetch: (summary, checkpoint dir, table rows)."""
    out = tmp_path_factory.mktemp("ref")
    with InProcessStore() as store:
        summary = train(tiny_config(corpus, steps=STEPS, prefetch_depth=0), store, progress=False, checkpoint_dir=out)
        rows = all_rows(store, store.list_tables())
    assert summary["rows_refreshed"] == 0 and summary["prefetch_depth"] == 0
    return summary, out, rows


def _same_as_reference(reference, summary, ckpt, rows) -> None:
    ref_summary, ref_dir, ref_rows = reference
    assert summary["losses"] == ref_summary["losses"]
    assert summary["evals"] == ref_summary["evals"]
    assert_same_state(dense_state(ckpt)["model"], dense_state(ref_dir)["model"], "model")
    assert_same_state(dense_state(ckpt)["optimizer"], dense_state(ref_dir)["optimizer"], "optimizer")
    assert rows.keys() == ref_rows.keys()
    for name in rows:
        assert torch.equal(rows[name], ref_rows[name]), name


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_in_process_is_bit_identical(corpus, reference, tmp_path, depth):  # noqa: F811
    with InProcessStore() as store:
        summary = train(tiny_config(corpus, steps=STEPS, prefetch_depth=depth), store, progress=False,
                        checkpoint_dir=tmp_path)
        rows = all_rows(store, store.list_tables())
    _same_as_reference(reference, summary, tmp_path, rows)
    assert summary["prefetch_depth"] == depth
    assert 0 < summary["rows_refreshed"] < summary["rows_fetched"]  # the patch ran, on the stale keys only


def test_prefetch_on_shard_processes_is_bit_identical(corpus, reference, tmp_path):  # noqa: F811
    with LocalShards(2) as shards, MemStoreClient(shards.addresses) as client:
        summary = train(tiny_config(corpus, steps=STEPS, prefetch_depth=1), client, progress=False,
                        checkpoint_dir=tmp_path)
        rows = all_rows(client, client.list_tables())
    _same_as_reference(reference, summary, tmp_path, rows)
    assert summary["rows_refreshed"] > 0


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_runs_ahead_of_the_push(corpus, depth):  # noqa: F811
    with InProcessStore() as store:
        run = build(tiny_config(corpus, steps=STEPS, prefetch_depth=depth), store)
        try:
            _train_loop(run, 0, STEPS, progress=False)
            events = list(run.prefetch.events)
        finally:
            run.close()
    at = {e: i for i, e in enumerate(events)}
    for s in range(1, STEPS):
        # step s's lookups started before the push of step s - depth was acknowledged ...
        assert at[("issue", s)] < at[("ack", max(0, s - depth))], events
    assert all(events.count(("issue", s)) == 1 for s in range(STEPS))
    assert not any(("issue", s) in at for s in range(STEPS, STEPS + depth + 1))  # nothing past the end


def test_patch_brings_stale_prefetched_rows_up_to_date(corpus):  # noqa: F811
    """The stale situation built by hand: rows of step 1 prefetched, then an update over step
    0's keys sent with the prefetcher's watched keys and acknowledged with its reply; the
    prefetched rows differ from the store's, the patched rows equal a fresh lookup, and only
    the overlapping keys came back."""
    with InProcessStore() as store:
        run = build(tiny_config(corpus, steps=STEPS, prefetch_depth=0), store)
        try:
            batch = lambda s: run.data.batch("train", 2, 16, 0, s)[0]  # noqa: E731
            pf = RowPrefetcher(run.rows, run.mapping, depth=1, batch_fn=batch)
            pf.ahead(0)  # issues step 1
            (entry,) = pf._queue
            stale = {l: {n: f.result().clone() for n, f in futs.items()} for l, futs in entry.futures.items()}
            h0 = {l: np.asarray(h) for l, h in run.mapping.hash(batch(0)).items()}
            h1 = entry.hashes
            watch = pf.watch()
            gen = torch.Generator().manual_seed(0)
            overlap, fresh = 0, {}
            for l, r in run.rows.items():
                fresh[l] = {}
                for h, name in enumerate(r.tables):
                    keys = h0[l][..., h]
                    assert np.array_equal(watch[l][name], np.unique(h1[l][..., h]))
                    fresh[l][name] = store.update_read(name, keys, torch.randn(*keys.shape, r.cfg.head_dim, generator=gen),
                                                       0.1, watch[l][name])
                    overlap += np.intersect1d(np.unique(keys), np.unique(h1[l][..., h])).size
            pf.acknowledge(0, fresh)
            assert overlap > 0
            hashes, patched = pf.take(1, batch(1))
            changed = False
            for l, r in run.rows.items():
                assert np.array_equal(hashes[l], h1[l])
                for h, name in enumerate(r.tables):
                    current = store.lookup(name, h1[l][..., h], as_tensor=True)
                    changed |= not torch.equal(stale[l][name], current)
                    assert torch.equal(patched[l][name], current), name
            assert changed, "the update did not make the prefetched rows stale"
            assert pf.rows_refreshed == overlap and pf.patched_steps == 1
            pf.close()
        finally:
            run.close()


def test_depth_must_not_be_negative(corpus):  # noqa: F811
    with pytest.raises(ValueError, match="prefetch_depth"):
        tiny_config(corpus, prefetch_depth=-1)


def test_cli_prefetch_flag_sets_the_depth():
    import argparse

    from memstore.cli import train as cli_train

    parser = argparse.ArgumentParser()
    cli_train.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--in-process", "--prefetch", "3"])
    assert cli_train.resolve_config(args).prefetch_depth == 3
    assert cli_train.resolve_config(parser.parse_args(["train", "--in-process"])).prefetch_depth == 1


def test_training_feeds_the_trainer_metrics(corpus):  # noqa: F811
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    with InProcessStore() as store:
        run = build(tiny_config(corpus, steps=STEPS, prefetch_depth=2), store)
        try:
            _train_loop(run, 0, STEPS, progress=False)
            text = generate_latest(run.metrics.registry).decode()
        finally:
            run.close()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["memstore_trainer_steps_total"] == STEPS
    assert samples["memstore_trainer_tokens_total"] == STEPS * 2 * 16  # batch 2 x 16 tokens
    assert samples["memstore_trainer_step_seconds_count"] == STEPS
    assert samples["memstore_trainer_prefetch_depth"] == 2
