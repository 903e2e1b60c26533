"""`memstore train --workers 2`: data-parallel workers on a local Ray over a store on Ray.

Run from the repository root:
    .venv/bin/python -m pytest tests/test_cli_workers.py -q

The command starts its own local Ray (no other Ray may run on this machine meanwhile: it
would join that one) and takes it down at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.test_train import REPO, corpus  # noqa: F401


def test_cli_trains_with_two_workers_on_a_store_on_ray(corpus, tmp_path):  # noqa: F811
    folder, cache = corpus
    # --out relative to the caller's directory (the workers' is Ray's): resolved before they get it.
    proc = subprocess.run(
        [sys.executable, "-m", "memstore.cli.main", "train", "--workers", "2", "--steps", "4", "--corpus", str(folder),
         "--vocab-size", "300", "--cache-dir", str(cache), "--batch-size", "4", "--seq-len", "16", "--d-model", "32",
         "--layers", "2", "--heads", "2", "--d-expert", "32", "--engram-rows", "1000", "--eval-every", "2",
         "--out", "run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "2 data-parallel workers" in proc.stdout and "eval loss" in proc.stdout, proc.stdout
    assert "step 2: eval loss" in proc.stdout, "rank 0's eval lines reach the terminal"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["engram"]
    assert summary["workers"] == 2 and len(summary["worker_wait_shares"]) == 2 and summary["step"] == 4
    assert summary["store_checkpoint"] == "ray" and summary["rows_refreshed"] > 0
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert meta["step"] == 4 and meta["store"]["kind"] == "ray"
    # Resumed with tables of another size, the store's cut (sized for the saved hashing) is refused.
    proc = subprocess.run(
        [sys.executable, "-m", "memstore.cli.main", "train", "--workers", "2", "--resume", "run", "--steps", "6",
         "--engram-rows", "900", "--corpus", str(folder), "--cache-dir", str(cache), "--out", "resumed"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "has spec" in proc.stderr and "num_rows" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "resumed" / "checkpoint.json").exists()


def test_cli_refuses_workers_in_process():
    proc = subprocess.run([sys.executable, "-m", "memstore.cli.main", "train", "--in-process", "--workers", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 64 and "drop --in-process" in proc.stderr and "Traceback" not in proc.stderr
