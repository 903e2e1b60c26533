"""Tests for `memstore exp` and trainer.experiments: tiny sweeps end to end, and resuming.

Run from the repository root:
    .venv/bin/python -m pytest tests/test_exp.py -q

Every Engram point trains on real `memstore serve` processes (LocalShards); the model and
corpus are tiny (a few steps of 2 x 16 tokens), so the whole module takes well under a minute.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from memstore.cli import main as cli
from trainer import experiments
from trainer.experiments import allocation_sweep, group_by, log_linear_fit, run_points
from trainer.train import TrainConfig

WORDS = "the cat sat on a mat while dog ran far away and then slept under old tree by river".split()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("exp")
    folder = root / "corpus"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(WORDS[j] for j in rng.integers(0, len(WORDS), 300)) + "\n")
    return folder, root / "cache"


def tiny_flags(corpus) -> list[str]:
    folder, cache = corpus
    return ["--corpus", str(folder), "--vocab-size", "300", "--cache-dir", str(cache), "--d-model", "32",
            "--layers", "2", "--heads", "2", "--d-expert", "32", "--engram-heads", "2", "--engram-dim", "32",
            "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "2"]


def tiny_config(corpus, **kw) -> TrainConfig:
    folder, cache = corpus
    base = dict(corpus=str(folder), vocab_size=300, cache_dir=str(cache), d_model=32, n_layers=2, n_heads=2,
                n_routed_experts=4, d_expert=32, n_head_per_ngram=2, n_embed_per_ngram=32, steps=4, warmup_steps=0,
                batch_size=2, seq_len=16, eval_batches=2)
    return TrainConfig(**{**base, **kw})


def test_two_point_allocation_sweep_end_to_end(corpus, tmp_path, capsys):
    out = tmp_path / "alloc"
    rc = cli.main(["exp", "allocation", "--rhos", "1,0.5", "--experts", "4", "--shards", "2", "--out", str(out),
                   *tiny_flags(corpus)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    doc = json.loads(lines[-1])
    assert [p["rho"] for p in doc["points"]] == [1.0, 0.5]
    moe, mixed = doc["points"]
    # rho = 1: all 4 experts, no tables; rho = 0.5: one of the two inactive experts became rows
    assert (moe["n_routed_experts"], moe["table_rows"]) == (4, 0)
    assert mixed["n_routed_experts"] == 3 and mixed["table_rows"] > 0
    expert = 3 * 32 * 32 * 2  # one routed expert's values over both MoE layers
    assert abs(mixed["table_params"] - expert) <= expert / 2
    assert all(np.isfinite(p["eval_loss"]) and p["eval_loss"] > 0 for p in doc["points"])
    assert mixed["vs_moe"] == pytest.approx(mixed["eval_loss"] - moe["eval_loss"])
    saved = json.loads((out / "points" / "rho-0.5000-seed-0.json").read_text())
    assert saved["num_shards"] == 2 and saved["config"]["n_routed_experts"] == 3
    assert saved["allocation"]["table_rows"] == mixed["table_rows"]
    assert saved["config"]["engram_vocab_size"] == [saved["allocation"]["engram_vocab_size"]] * 2
    assert len(saved["losses"]) == 4 and saved["params"]["tables"] == mixed["table_params"]
    assert json.loads((out / "sweep.json").read_text())["points"] == ["rho-1.0000-seed-0", "rho-0.5000-seed-0"]
    assert Path(doc["plot"]).read_bytes()[:8] == PNG_MAGIC

    # a rerun trains nothing: both points are read back
    assert cli.main(["exp", "allocation", "--rhos", "1,0.5", "--experts", "4", "--out", str(out), "--no-plot",
                     *tiny_flags(corpus)]) == 0
    again = capsys.readouterr().out
    assert "2 of 2 points already" in again and json.loads(again.strip().splitlines()[-1])["points"] == doc["points"]
    # the same folder with another config is refused, not mixed, and its record stays
    record = (out / "sweep.json").read_text()
    assert cli.main(["exp", "allocation", "--rhos", "1,0.5", "--experts", "4", "--out", str(out), "--no-plot",
                     *tiny_flags(corpus), "--lr", "1e-3"]) == cli.ExitStatus.USAGE
    assert "another config (differs in lr" in capsys.readouterr().err
    assert (out / "sweep.json").read_text() == record


def test_interrupted_sweep_resumes_where_it_stopped(corpus, tmp_path, monkeypatch):
    points = allocation_sweep(tiny_config(corpus), [1.0, 0.5], [0], num_shards=1)
    real, calls = experiments._train_on_store, []

    def interrupted(point, data, progress):
        calls.append(point.key)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second point
        return real(point, data, progress)

    monkeypatch.setattr(experiments, "_train_on_store", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_points(points, tmp_path, note=lambda s: None)
    saved = sorted(p.name for p in (tmp_path / "points").iterdir())
    assert saved == ["rho-1.0000-seed-0.json"]  # the finished point, and no half-written file
    first = json.loads((tmp_path / "points" / saved[0]).read_text())

    calls.clear()
    monkeypatch.setattr(experiments, "_train_on_store", lambda p, d, g: (calls.append(p.key), real(p, d, g))[1])
    results = run_points(points, tmp_path, note=lambda s: None)
    assert calls == ["rho-0.5000-seed-0"]  # only the unfinished point trained
    assert results[0] == first and results[1]["allocation"]["rho"] == 0.5
    calls.clear()
    assert run_points(points, tmp_path, note=lambda s: None) == results and calls == []


def test_slot_sweep_grows_shards_and_fits_a_line(corpus, tmp_path, capsys):
    out = tmp_path / "slots"
    rc = cli.main(["exp", "slots", "--rows", "100,1000", "--rows-per-shard", "500", "--no-baseline", "--out", str(out),
                   *tiny_flags(corpus)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    doc = json.loads(lines[-1])
    assert [p["num_shards"] for p in doc["points"]] == [1, 2]  # 100 rows on one shard, 1,000 on two
    assert [abs(p["table_rows"] - t) <= 0.1 * t for p, t in zip(doc["points"], (100, 1000))] == [True, True]
    small, large = doc["points"]
    decades = np.log10(large["table_rows"] / small["table_rows"])
    # two points: the fit is the line through them
    assert doc["fit"]["per_decade"] == pytest.approx((large["eval_loss"] - small["eval_loss"]) / decades)
    assert Path(doc["plot"]).read_bytes()[:8] == PNG_MAGIC


def test_summaries():
    fit = log_linear_fit([1e4, 1e5, 1e6], [5.0, 4.9, 4.8])
    assert fit["per_decade"] == pytest.approx(-0.1) and fit["r2"] == pytest.approx(1.0)
    rows = [{"rho": 1.0, "seed": 0, "eval_loss": 5.0}, {"rho": 1.0, "seed": 1, "eval_loss": 5.2},
            {"rho": 0.8, "seed": 0, "eval_loss": 4.9}]
    g = group_by(rows, "rho")
    assert [x["rho"] for x in g] == [1.0, 0.8]
    assert g[0]["eval_loss"] == pytest.approx(5.1) and g[0]["eval_loss_std"] == pytest.approx(0.1414, abs=1e-4)
    assert (g[0]["eval_loss_min"], g[0]["eval_loss_max"], g[1]["eval_loss_std"]) == (5.0, 5.2, None)


def test_a_field_added_later_matches_only_at_its_default():
    cfg = TrainConfig(steps=10, warmup_steps=1)
    saved = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert experiments._config_changes(saved, cfg) == []
    older = {k: v for k, v in saved.items() if k != "prefetch_depth"}  # a run from before the field existed
    assert experiments._config_changes(older, cfg) == []  # it ran with the default, as cfg asks
    assert experiments._config_changes(older, dataclasses.replace(cfg, prefetch_depth=3)) == ["prefetch_depth"]
    assert experiments._config_changes({**saved, "lr": 1.0}, cfg) == ["lr"]
    assert experiments._config_changes({**saved, "retired_field": 1}, cfg) == ["retired_field"]
