"""`memstore up` / `ls` / `health` / `down` from the command line against a local Ray.

`up` starts a local Ray head when none runs; `down` releases the store and that Ray.
Run: python -m pytest tests/test_cli_up_down.py -q
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np

from cluster import store
from memstore import MemStoreClient


def memstore(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "memstore.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def imported(*args: str) -> set[str]:
    """The modules a `memstore` command imported (python -X importtime), after checking it succeeded."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "memstore.cli.main", *args], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}


def processes_of_the_local_ray() -> list[int]:
    """Every process that names the local Ray's GCS port in a flag (its GCS, raylet, Ray
    Client server, ...; not this test) and every process below them: found more widely than
    stop_local_ray finds them, so a process it misses is caught."""
    port = store._local_ray_address().rsplit(":", 1)[1]
    named = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        if int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a.startswith("--") and (a.endswith(f"={port}") or a.endswith(f":{port}")) for a in argv):
            named.append(int(entry))
    return named + store._descendants(named)


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return f"{pid} (gone)"


def test_up_ls_health_down_round_trip(tmp_path):
    config = tmp_path / "store.toml"
    config.write_text(
        '[[tables]]\nname = "engram.l1"\nnum_rows = 20483\ndim = 64\n'
        'optimizer = { kind = "adam", beta1 = 0.9, beta2 = 0.999 }\n'
    )
    up = memstore("up", "--name", "cli-store", "--shards", "2", "--config", str(config))
    try:
        assert up.returncode == 0, up.stderr
        assert "store 'cli-store' is up: 2 shards, 1 tables" in up.stdout
        addresses = [line.split()[2] for line in up.stdout.splitlines() if line.strip().startswith("shard")]
        data_dir = up.stdout.split("data in ", 1)[1].split()[0]
        assert os.path.isdir(data_dir)
        assert len(addresses) == 2
        # The shards outlived the CLI process that created them.
        with MemStoreClient(addresses) as client:
            assert client.lookup("engram.l1", np.arange(5)).shape == (5, 64)
            assert client.spec("engram.l1").optimizer.beta2 == 0.999
        # The operator's commands start in ~1 s: without torch, which takes ~1 s more to import.
        for command in (("ls",), ("health", "cli-store"), ("status", "cli-store", "--json")):
            assert "torch" not in imported(*command), command
        ls = memstore("ls")
        assert ls.returncode == 0 and "cli-store" in ls.stdout and "2 shards" in ls.stdout
        again = memstore("up", "--name", "cli-store", "--shards", "2")
        assert again.returncode == 0 and "it was up already: joined it" in again.stdout, again.stderr
        other = memstore("up", "--name", "cli-store", "--shards", "2", "--wal-sync", "none")
        assert other.returncode == 64 and "already up with wal sync always, not none" in other.stderr, other.stderr
        ckpt = memstore("checkpoint", "cli-store", str(tmp_path / "ckpts"))
        assert ckpt.returncode == 0 and "checkpoint 1 of store 'cli-store'" in ckpt.stdout, ckpt.stderr
        with MemStoreClient(addresses) as client:
            before = client.lookup("engram.l1", np.arange(20483))
            client.update("engram.l1", np.arange(10), np.ones((10, 64), np.float32), lr=0.1)
        restore = memstore("restore", "cli-store", str(tmp_path / "ckpts"))
        assert restore.returncode == 0 and "restored 1 tables" in restore.stdout, restore.stderr
        with MemStoreClient(addresses) as client:
            np.testing.assert_array_equal(client.lookup("engram.l1", np.arange(20483)), before)
        bad = memstore("restore", "cli-store", str(tmp_path / "nothing-here"))
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert "no complete checkpoint" in bad.stderr
        health = memstore("health", "cli-store")
        assert health.returncode == 0 and "2/2 shards serving" in health.stdout, health.stdout + health.stderr
        missing = memstore("health", "no-such-store")
        assert missing.returncode == 2 and "no store named 'no-such-store'" in missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1
        ray_processes = processes_of_the_local_ray()
        assert len(ray_processes) >= 3, ray_processes  # its GCS, raylet, agents, the shards' workers
    finally:
        down = memstore("down", "cli-store")
    assert down.returncode == 0, down.stderr
    assert "stopped the local Ray" in down.stdout
    still = [p for p in ray_processes if store._running(p)]
    assert not still, f"processes of the stopped Ray still run: {[command_line(p) for p in still]}"
    assert not os.path.exists(data_dir)  # the data dir `up` chose is released too
    after = memstore("health", "cli-store", timeout=60)
    assert after.returncode == 2, after.stdout + after.stderr  # no Ray, no store


def test_bad_config_is_one_clear_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[[tables]]\nname = "x"\nnum_rows = 10\ndim = 4\ncolour = "red"\n')
    r = memstore("up", "--name", "bad", "--shards", "1", "--config", str(config))
    assert r.returncode != 0 and "unknown fields ['colour']" in r.stderr and "Traceback" not in r.stderr
    twice = tmp_path / "twice.toml"
    twice.write_text('[[tables]]\nname = "a"\nnum_rows = 10\ndim = 4\n[[tables]]\nname = "a"\nnum_rows = 20\ndim = 4\n')
    r = memstore("up", "--name", "bad", "--shards", "1", "--config", str(twice))
    assert r.returncode == 64 and "names table(s) ['a'] more than once" in r.stderr, r.stderr
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    r = memstore("up", "--name", "bad", "--shards", "1", "--config", str(binary))
    assert r.returncode == 64 and f"cannot read store config {binary}" in r.stderr, r.stderr


def test_bad_arguments_start_nothing_and_the_last_down_stops_the_ray(tmp_path):
    from cluster.store import _local_ray_answers

    assert not _local_ray_answers(), "a local Ray is already running"
    zero = memstore("up", "--name", "zero", "--shards", "0")
    assert zero.returncode == 64 and "1..4096 shards, got 0" in zero.stderr
    assert not _local_ray_answers(), "a rejected `up` started a local Ray"
    for args, message in ((("health", "x", "--timeout", "-1"), "--timeout must be > 0"),
                          (("status", "x", "--watch", "inf"), "--watch must be > 0 seconds and finite")):
        r = memstore(*args)
        assert r.returncode == 64 and message in r.stderr, r.stderr
    nobody = memstore("health", "x", "--address", "127.0.0.1:1", timeout=60)
    assert nobody.returncode == 2 and "cannot reach Ray at 127.0.0.1:1" in nobody.stderr, nobody.stderr
    # Something that accepts connections but is not Ray: refused at once (ray.init waited minutes).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        other = memstore("health", "x", "--address", f"127.0.0.1:{port}", timeout=60)
        assert other.returncode == 2 and "is not a Ray GCS" in other.stderr, other.stderr
    finally:
        web.kill()
        web.wait()

    first = memstore("up", "--name", "first", "--shards", "1")  # starts the local Ray
    try:
        assert first.returncode == 0, first.stderr
        not_a_dir = tmp_path / "file"
        not_a_dir.write_text("")
        broken = memstore("up", "--name", "broken", "--shards", "1", "--data-dir", str(not_a_dir))
        assert broken.returncode == 64 and len(broken.stderr.strip().splitlines()) == 1, broken.stderr
        assert f"data dir {not_a_dir} is not a directory" in broken.stderr
        assert "broken" not in memstore("ls").stdout, "a failed `up` left a half-made store"
        # A data dir where shard 1 finds another store's log: that shard refuses, the `up` fails,
        # and shard 0's new, empty log is removed with it (a retry would find it "in use").
        from memstore import wal

        taken = tmp_path / "data" / "wal" / "shard-00001-of-00002"
        with wal.WriteAheadLog(wal.wal_path(taken, 0), sync="none") as log:
            log.append(wal.drop_record("t"))
        held = memstore("up", "--name", "held", "--shards", "2", "--data-dir", str(tmp_path / "data"))
        assert held.returncode == 2 and "already holds a write-ahead log" in held.stderr, held.stderr
        assert not (tmp_path / "data" / "wal" / "shard-00000-of-00002").exists()
        assert [r["kind"] for r in wal.replay(wal.wal_path(taken, 0))] == ["drop"], "another store's log is kept"
        second = memstore("up", "--name", "second", "--shards", "1")  # joins it
        assert second.returncode == 0, second.stderr
        down = memstore("down", "first")
        assert down.returncode == 0 and "stopped the local Ray" not in down.stdout
        assert _local_ray_answers(), "`second` still runs on it"
    finally:
        last = memstore("down", "second")
        if memstore("down", "first").returncode == 0:  # the test failed before `down first`
            last = None
    assert last is not None and last.returncode == 0 and "stopped the local Ray" in last.stdout, last
    assert not _local_ray_answers()


def test_an_up_that_fails_on_its_shards_names_why_and_stops_the_ray_it_started(tmp_path):
    from cluster.store import _local_ray_answers

    assert not _local_ray_answers(), "a local Ray is already running"
    config = tmp_path / "huge.toml"
    config.write_text('[[tables]]\nname = "huge"\nnum_rows = 1099511627776\ndim = 1024\n')
    r = memstore("up", "--name", "huge", "--shards", "1", "--config", str(config))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "'huge' needs" in last and "GiB" in last, r.stderr  # ResourceExhausted's own words
    assert not _local_ray_answers(), "a failed `up` left the local Ray it started running"
    bad = memstore("up", "--name", "a/b", "--shards", "1")
    assert bad.returncode == 64 and "store name 'a/b'" in bad.stderr, bad.stderr


def test_config_of_the_wrong_types_is_one_clear_line(tmp_path):
    config = tmp_path / "bad.toml"
    for body, message in (('[[tables]]\nname = "x"\nnum_rows = 10\ndim = 4\noptimizer = "adam"\n',
                           "optimizer must be a table of OptimizerSpec fields"),
                          ("tables = 5\n", "`tables` must be [[tables]] entries")):
        config.write_text(body)
        r = memstore("up", "--name", "bad", "--shards", "1", "--config", str(config))
        assert r.returncode == 64 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_up_on_a_data_dir_left_by_down_resumes_the_store(tmp_path):
    data = str(tmp_path / "data")
    up = memstore("up", "--name", "kept", "--shards", "2", "--data-dir", data)
    assert up.returncode == 0, up.stderr
    assert "resumed" not in up.stdout
    try:
        with MemStoreClient([ln.split()[2] for ln in up.stdout.splitlines() if ln.strip().startswith("shard")]) as c:
            from memstore import TableSpec

            c.create_table(TableSpec("t", num_rows=100, dim=4))
            c.update("t", np.arange(10), np.ones((10, 4), np.float32), lr=0.5)
            written = c.lookup("t", np.arange(100))
    finally:
        down = memstore("down", "kept")
    assert down.returncode == 0 and "stopped the local Ray" in down.stdout, down.stderr
    other = memstore("up", "--name", "kept", "--shards", "3", "--data-dir", data)
    assert other.returncode == 64 and "holds store 'kept' of 2 shards, not 3" in other.stderr, other.stderr
    again = memstore("up", "--name", "kept", "--shards", "2", "--data-dir", data)
    try:
        assert again.returncode == 0, again.stderr
        assert "resumed from its data dir: no checkpoint + 2 logged writes replayed" in again.stdout, again.stdout
        shards = [ln.split()[2] for ln in again.stdout.splitlines() if ln.strip().startswith("shard")]
        with MemStoreClient(shards) as c:
            np.testing.assert_array_equal(c.lookup("t", np.arange(100)), written)
    finally:
        assert memstore("down", "kept").returncode == 0
