"""Tests for trainer.data, trainer.train and `memstore train`.

Run from the repository root:
    .venv/bin/python -m pytest tests/test_train.py -q

A tiny corpus is written to a temporary folder (nothing is downloaded) and the model is tiny.
Training on the in-process store is the reference: training on real shard processes must give
the same losses, dense parameters and table rows, and resuming a checkpoint in a fresh process
and store must continue the same trajectory, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from memstore import InProcessStore, MemStoreClient
from memstore.launch import LocalShards
from trainer.data import DataConfig, load_data, read_documents, stdlib_files, tokenizer_digest
from trainer.train import TrainConfig, lr_at, train

WORDS = "the cat sat on a mat while dog ran far away and then slept under old tree by river".split()
REPO = Path(__file__).resolve().parents[1]


def write_corpus(folder: Path, docs: int = 30, words: int = 300) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(docs):
        text = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), words))
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}.\n{text}\n")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus folder, cache dir) shared by the module; the cache warms up on first use."""
    root = tmp_path_factory.mktemp("train")
    return write_corpus(root / "corpus"), root / "cache"


def tiny_config(corpus: tuple[Path, Path], **kw) -> TrainConfig:
    folder, cache = corpus
    base = dict(corpus=str(folder), vocab_size=300, cache_dir=str(cache), d_model=32, n_layers=2, n_heads=2,
                seq_len=16, n_routed_experts=4, top_k=2, d_expert=32, engram_layer_ids=[1], n_head_per_ngram=2,
                n_embed_per_ngram=32, engram_vocab_size=[1000, 1000], steps=6, warmup_steps=2, batch_size=2,
                eval_every=3, eval_batches=2)
    base.update(kw)
    return TrainConfig(**base)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.double() - b.double()).abs()
    return f"max diff {d.max().item():.3g}, mean {d.mean().item():.3g}"


def assert_same_state(a: dict, b: dict, what: str) -> None:
    """Every tensor of two (nested) state dicts equal, bit for bit."""
    assert a.keys() == b.keys(), f"{what}: keys differ"
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            assert_same_state(x, y, f"{what}.{k}")
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{what}.{k}: {max_diff(x, y)}"
        elif isinstance(x, list) and x and isinstance(x[0], dict):
            for i, (u, v) in enumerate(zip(x, y)):
                assert_same_state(u, v, f"{what}.{k}[{i}]")
        else:
            assert x == y, f"{what}.{k}: {x} != {y}"


def all_rows(store, specs) -> dict[str, torch.Tensor]:
    return {s.name: torch.as_tensor(store.lookup(s.name, np.arange(s.num_rows))) for s in specs}


def dense_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "dense.pt", weights_only=True)


# ---------------------------------------------------------------------------- data


def test_tokenizer_and_tokens_are_cached(tmp_path):
    cfg = DataConfig(corpus=str(write_corpus(tmp_path / "corpus", docs=5)), vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))
    first = load_data(cfg)
    second = load_data(cfg)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert tokenizer_digest(first.tokenizer) == tokenizer_digest(second.tokenizer)
    assert np.array_equal(first.tokens, second.tokens) and first.split_at == second.split_at
    assert (first.pad_id, first.eos_id) == (0, 1)
    assert not load_data(dataclasses.replace(cfg, vocab_size=290)).cache_hit  # another vocabulary
    (tmp_path / "corpus" / "doc00.txt").write_text("changed")  # a changed file is another corpus
    assert not load_data(cfg).cache_hit


def test_batches_are_a_pure_function_of_seed_and_step(corpus):
    data = load_data(DataConfig(corpus=str(corpus[0]), vocab_size=300, cache_dir=str(corpus[1])))
    stream = data.batches("train", 4, 16, seed=3, start_step=0)
    first = [next(stream) for _ in range(5)]
    resumed = data.batches("train", 4, 16, seed=3, start_step=2)
    for step in (2, 3, 4):
        x, y = next(resumed)
        assert torch.equal(x, first[step][0]) and torch.equal(y, first[step][1])
    x, y = first[0]
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    assert not torch.equal(first[0][0], first[1][0])
    assert not torch.equal(data.batch("train", 4, 16, seed=4, step=0)[0], x)


def test_heldout_split_is_disjoint_from_train(corpus):
    data = load_data(DataConfig(corpus=str(corpus[0]), vocab_size=300, cache_dir=str(corpus[1])))
    assert data.split_at in set(data.doc_starts.tolist()), "the split cuts a document"
    train, heldout = data.split("train"), data.split("heldout")
    assert len(train) + len(heldout) == len(data.tokens)
    assert 0.03 < len(heldout) / len(data.tokens) < 0.15
    text = data.tokenizer.decode(heldout.tolist())
    assert "Document 29." in text and "Document 0." not in text  # whole last documents
    x, _ = data.batch("heldout", 64, 16, seed=0, step=0)
    windows = np.lib.stride_tricks.sliding_window_view(heldout.astype(np.int64), 16)
    assert all((windows == row.numpy()).all(axis=1).any() for row in x)


def test_corpus_readers(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "b.md").write_text("three")
    docs, used = read_documents([tmp_path / "a.jsonl", tmp_path / "b.md"], max_bytes=100)
    assert docs == ["one", "two", "three"] and len(used) == 2
    assert read_documents([tmp_path / "a.jsonl", tmp_path / "b.md"], max_bytes=5)[0] == ["one", "tw"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_documents([tmp_path / "bad.jsonl"], 100)
    files = stdlib_files()
    assert files and all("site-packages" not in f.parts for f in files) and files == sorted(files)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0) and lr_at(cfg, 100) == pytest.approx(0.1)


# ---------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """6 steps on the in-process store: (summary, checkpoint dir, table rows)."""
    cfg = tiny_config(corpus)
    out = tmp_path_factory.mktemp("reference")
    with InProcessStore() as store:
        summary = train(cfg, store, progress=False, checkpoint_dir=out)
        rows = all_rows(store, store.list_tables())
    return summary, out, rows


@pytest.mark.parametrize("num_shards", [1, 3])
def test_shard_processes_train_like_the_in_process_store(corpus, reference, tmp_path, num_shards):
    ref_summary, ref_dir, ref_rows = reference
    with LocalShards(num_shards) as shards, MemStoreClient(shards.addresses) as client:
        summary = train(tiny_config(corpus), client, progress=False, checkpoint_dir=tmp_path)
        rows = all_rows(client, client.list_tables())
    # Bit-identical: the same engine applies the same float32 gradients on every shard layout.
    assert summary["losses"] == ref_summary["losses"]
    assert summary["evals"] == ref_summary["evals"]
    assert_same_state(dense_state(tmp_path)["model"], dense_state(ref_dir)["model"], "model")
    assert_same_state(rows, ref_rows, "rows")
    assert summary["store_checkpoint"] == "rows"  # a remote store without Ray: rows only


def test_16_bit_tables_with_stochastic_rounding_train_alike_on_shards_and_in_process(corpus, tmp_path):
    """table_dtype and table_stochastic_rounding reach the store's tables; their rounding
    noise depends on keys only, so 2 shard processes train bit for bit as one process."""
    cfg = tiny_config(corpus, table_dtype="bfloat16", table_stochastic_rounding=True)
    with InProcessStore() as store:
        ref = train(cfg, store, progress=False, checkpoint_dir=tmp_path / "in-process")
        specs = store.list_tables()
        ref_rows = all_rows(store, specs)
    assert specs and all(s.dtype == "bfloat16" and s.optimizer.stochastic_rounding for s in specs)
    with LocalShards(2) as shards, MemStoreClient(shards.addresses) as client:
        got = train(cfg, client, progress=False, checkpoint_dir=tmp_path / "sharded")
        rows = all_rows(client, client.list_tables())
    assert got["losses"] == ref["losses"]
    assert_same_state(rows, ref_rows, "rows")
    with pytest.raises(ValueError, match="16-bit tables"):
        tiny_config(corpus, table_stochastic_rounding=True)


def test_resume_in_a_fresh_process_continues_the_same_trajectory(corpus, tmp_path):
    cfg = tiny_config(corpus, steps=8, eval_every=4)
    with InProcessStore() as store:
        full = train(cfg, store, progress=False, checkpoint_dir=tmp_path / "full")
    with InProcessStore() as store:
        half = train(cfg, store, progress=False, until_step=4, checkpoint_dir=tmp_path / "half")
    assert half["losses"] == full["losses"][:4]
    proc = subprocess.run([sys.executable, "-m", "memstore.cli.main", "train", "--in-process", "--quiet",
                           "--resume", str(tmp_path / "half"), "--out", str(tmp_path / "resumed")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())["engram"]
    assert resumed["losses"] == full["losses"][4:]
    assert [list(e) for e in resumed["evals"]] == [list(e) for e in full["evals"][1:]]
    a, b = dense_state(tmp_path / "resumed"), dense_state(tmp_path / "full")
    assert a["step"] == b["step"] == 8
    assert_same_state(a["model"], b["model"], "model")  # includes the routers' balancing biases
    assert_same_state(a["optimizer"], b["optimizer"], "optimizer")
    for path in sorted((tmp_path / "full" / "store").glob("*.pt")):  # rows, Adam state, versions
        assert_same_state(torch.load(tmp_path / "resumed" / "store" / path.name, weights_only=True),
                          torch.load(path, weights_only=True), path.stem)


def test_resume_refuses_an_incomplete_checkpoint(corpus, tmp_path):
    with InProcessStore() as store, pytest.raises(ValueError, match="not a complete checkpoint"):
        train(tiny_config(corpus), store, progress=False, resume=tmp_path)


def test_a_failed_save_over_a_checkpoint_leaves_it_whole(corpus, reference, tmp_path):
    """A run resumed from its own --out saves over the checkpoint it came from: a failure
    while saving (the store's cut refused) must leave that one resumable, unchanged."""
    from trainer.train import build, read_checkpoint, save_checkpoint

    _, ref_dir, _ = reference
    shutil.copytree(ref_dir, tmp_path / "run")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()}

    def refused(directory):
        directory.mkdir(parents=True)
        (directory / "half.pt").write_bytes(b"x")
        raise OSError(28, "No space left on device")

    with InProcessStore() as store:
        run = build(tiny_config(corpus), store)
        try:
            with pytest.raises(OSError, match="No space"):
                save_checkpoint(tmp_path / "run", run.model, run.opt, 3, tiny_config(corpus), refused, data=run.data)
        finally:
            run.close()
    after = {p.relative_to(tmp_path): p.read_bytes() for p in sorted((tmp_path / "run").rglob("*"))
             if p.is_file() and ".new" not in p.name and "store.new" not in p.parts}
    assert after == before
    assert read_checkpoint(tmp_path / "run")[1]["step"] == 6


def test_cli_trains_in_process_and_prints_the_eval_loss(corpus, tmp_path):
    folder, cache = corpus
    proc = subprocess.run(
        [sys.executable, "-m", "memstore.cli.main", "train", "--in-process", "--steps", "5", "--corpus", str(folder),
         "--vocab-size", "300", "--cache-dir", str(cache), "--batch-size", "2", "--seq-len", "16", "--d-model", "32",
         "--layers", "2", "--heads", "2", "--d-expert", "32", "--engram-rows", "1000", "--compare-baseline",
         "--out", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "eval loss" in proc.stdout and "without Engram" in proc.stdout, proc.stdout
    assert (tmp_path / "run" / "checkpoint.json").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["engram"]["step"] == 5 and summary["baseline"]["engram"] is False


def test_cli_rejects_bad_flags_with_the_usage_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memstore.cli.main", "train", "--in-process", "--steps", "0",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 64 and "steps must be positive" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "memstore.cli.main", "train", "--in-process", "--stochastic-rounding",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 64 and "16-bit tables" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
class TestCuda:
    """The same training code on CUDA: rows staged in pinned memory, copied non-blocking on a
    side stream that the Engram layer waits for."""

    def test_rows_reach_the_gpu_as_a_leaf(self, corpus):
        from trainer.train import build

        with InProcessStore() as store:
            run = build(tiny_config(corpus, device="cuda"), store)
            x, _ = run.data.batch("train", 2, 16, seed=0, step=0)
            hashes = run.mapping.hash(x)
            (layer, rows), = run.rows.items()
            e = rows.fetch(hashes[layer])
            assert e.is_cuda and e.is_leaf and e.requires_grad
            assert rows._copy_stream is not None and rows._copy_stream != torch.cuda.current_stream()
            rows.wait_ready()  # the compute stream now waits for the side stream's copy
            torch.cuda.synchronize()
            want = torch.cat([store.lookup(n, hashes[layer][..., h], as_tensor=True) for h, n in enumerate(rows.tables)], -1)
            assert torch.equal(e.detach().cpu(), want)
            rows.discard()

    def test_cuda_training_follows_the_cpu_trajectory(self, corpus):
        with InProcessStore() as cpu_store, InProcessStore() as gpu_store:
            cpu = train(tiny_config(corpus, device="cpu"), cpu_store, progress=False)
            gpu = train(tiny_config(corpus, device="cuda"), gpu_store, progress=False)
        # Different kernels sum in other orders: equal up to float reassociation, not bits.
        for a, b in zip(cpu["losses"], gpu["losses"]):
            assert abs(a - b) < 1e-3 * max(1.0, abs(a)), (cpu["losses"], gpu["losses"])
