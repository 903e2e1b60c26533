"""A standalone shard's data dir: a base checkpoint of its tables and the write-ahead log since.

`memstore serve --data-dir DIR` keeps shard i of S in DIR/shard-<i>-of-<S>/:

    wal-<g>.log       the log (memstore.wal): every write, durable before it is acknowledged
    base/
      LATEST          names the newest complete base
      ckpt-<g>/       a checkpoint of this shard alone (memstore.checkpoint, kind
                      "memstore-shard-checkpoint"): the tables as they were when log g began

Recovery loads the base LATEST names, if any, and replays the logs of generation >= its g.

Compaction keeps that replay short. Once the logs since the base hold `compact_bytes` or more,
the shard holds its writes back (the write gate, memstore.cut), copies its tables in memory,
starts log generation g' (above every generation used before) and lets writes flow again:
writes wait for the copy only. Then it writes the copy as base g', commits it, and deletes
the older base and the logs before g'. A crash at any point loses no acknowledged write:
until base g' is committed, base g and the logs since it (g' among them) hold every write;
after that, base g' and the logs from g'. A failed compaction (say, a full disk) leaves the
old base and every log in place and is tried again later, with a growing pause.

A compaction starts only with room on the disk for its base and some log besides (a base
that filled the disk would fail writes), and not on a log that has failed. It needs memory
for a copy of the shard's tables while it runs, as a store's checkpoint on Ray does.
One process serves a data dir: it holds an flock on its LOCK file. Threads: one watches the
log's size and compacts.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import shutil
import threading
import time
from pathlib import Path

from memstore import checkpoint, wal
from memstore.engine import ShardEngine
from memstore.errors import MemStoreError
from memstore.snapshot import ShardFreeze, snapshot_shard

log = logging.getLogger("memstore.durable")

BASE_DIR = "base"
LOCK_FILE = "LOCK"  # held (flock) by the one process serving the directory
# The least log that "auto" compacts: below it a replay takes about as long as loading a base.
MIN_COMPACT_BYTES = 64 << 20
WATCH_S = 0.5  # how often the log's size is looked at
RETRY_S = (10.0, 600.0)  # the pause after a failed compaction: first, and at most (doubling)
# Free disk a compaction wants beyond its base's size (the log keeps growing while it writes).
ROOM_BYTES, ROOM_FRACTION = 64 << 20, 0.1


class NoRoom(MemStoreError):
    """Too little free disk for a compaction's base: it is not started (nothing changes)."""


class DurableShard:
    """Shard `engine`'s data dir `directory` (module doc): `recover()` once before serving,
    then writes are journaled and the log is compacted in the background until `close()`.

    compact_bytes: compact once the logs since the base hold this many bytes; None ("auto"):
    the shard's rows and optimizer state, at least MIN_COMPACT_BYTES; 0: never."""

    def __init__(self, engine: ShardEngine, directory: Path | str, *, sync: str = "always",
                 compact_bytes: int | None = None) -> None:
        if compact_bytes is not None and compact_bytes < 0:
            raise ValueError(f"compact_bytes must be >= 0 or None (auto), got {compact_bytes}")
        self.engine = engine
        self.directory = Path(directory)
        self.base_root = self.directory / BASE_DIR
        self.sync = sync
        self.compact_bytes = compact_bytes
        self.since = 0  # the base's generation: the first log a restart replays
        self.generation = 0  # the log generation being written
        self.log: wal.WriteAheadLog | None = None
        self.compactions = 0
        self.last_compaction: dict = {}  # seconds, held_s (writes waiting), bytes, ended (unix) of the last one
        self.compaction_error = ""  # why the last attempt failed; "" when it succeeded
        self._lock = threading.Lock()  # one compaction at a time
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock_fd = -1  # the directory's LOCK file, flocked while this shard serves it

    def recover(self) -> wal.ReplayStats:
        """Loads the base into the engine, replays the logs since, journals to the newest log
        from now on and starts the compaction watcher. Takes the directory's lock first (one
        process per data dir), and removes what an interrupted compaction left once the base
        has loaded: other bases, staging directories, logs older than the base."""
        assert self.log is None, "recover() runs once"
        wal.make_dirs(self.directory)
        self._lock_fd = lock_directory(self.directory)
        try:
            return self._recover()
        except BaseException:
            os.close(self._lock_fd)  # and with it the flock: the directory is free again
            self._lock_fd = -1
            raise

    def _recover(self) -> wal.ReplayStats:
        """recover(), with the directory's lock held."""
        base = self._find_base()
        if base is not None:
            self.since = int(checkpoint.read_manifest(base)["store"]["version"])
            if base.name != checkpoint.checkpoint_dir(base.parent, self.since).name:  # it decides which logs go
                raise checkpoint.CheckpointError(f"{base} names itself version {self.since}: a base is named after "
                                                 "its version, so it is damaged or not this shard's; recovery stops "
                                                 "and deletes no log", base)
            checkpoint.load_shard(base, self.engine.shard_index, self.engine.num_shards, engine=self.engine)
        for p in self.base_root.iterdir() if self.base_root.is_dir() else ():
            if p == base or p.name == checkpoint.LATEST:
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        wal.prune_wal(self.directory, self.since)
        stats = wal.replay_into(self.engine, wal.replay_dir(self.directory, since=self.since))
        self.generation = max((g for g, _ in wal.wal_files(self.directory)), default=self.since)
        self.log = wal.WriteAheadLog(wal.wal_path(self.directory, self.generation), sync=self.sync)
        self.engine.journal = self.log.append
        self.engine.journal_failed = self.log.fail
        self.engine.log_state = self.state
        log.info("shard %d: recovered from %s and %d writes (%d tables created or dropped) of the log since",
                 self.engine.shard_index, base or "no base", stats.applied, stats.tables)
        if self.compact_bytes != 0:
            self._watcher = threading.Thread(target=self._watch, name="memstore-compaction", daemon=True)
            self._watcher.start()
        return stats

    def _find_base(self) -> Path | None:
        """The base LATEST names; None when there is none and the logs start at generation 0.
        Raises, deleting nothing, when a base must be there and is not: LATEST names an
        incomplete one, or the oldest log begins after generation 0 (a base replaced those)."""
        latest = self.base_root / checkpoint.LATEST
        name = latest.read_text().strip() if latest.is_file() else ""
        if name:
            base = self.base_root / name
            if not (base / checkpoint.MANIFEST).is_file():
                raise checkpoint.CheckpointError(f"{latest} names {name}, which is not a complete base: the "
                                                 f"shard cannot recover its tables from {self.directory}", base)
            return base
        logs = wal.wal_files(self.directory)
        if logs and logs[0][0] > 0:
            raise checkpoint.CheckpointError(f"{self.directory}'s oldest log is generation {logs[0][0]} but there is "
                                             f"no base ({latest} is missing): the writes before it are gone",
                                             self.directory)
        return None

    def log_bytes(self) -> int:
        """Bytes of records a restart would replay now (the logs' headers not counted)."""
        return wal.log_bytes(self.directory, self.since)

    def threshold(self) -> int:
        if self.compact_bytes is not None:
            return self.compact_bytes
        tables = self.engine.tables()
        return max(MIN_COMPACT_BYTES, sum(t.row_bytes + t.state_bytes for t in tables))

    def state(self) -> dict:
        """memstore.v1.LogState's fields: for the shard's Stats, health and metrics."""
        failed, last = self.log.failed if self.log is not None else None, self.last_compaction
        return {"bytes": self.log_bytes(), "failed": f"{type(failed).__name__}: {failed}" if failed else "",
                "compactions": self.compactions,
                "last_compaction_age_s": max(1e-3, time.time() - last["ended"]) if last else 0.0,
                "last_compaction_s": last.get("seconds", 0.0), "last_held_s": last.get("held_s", 0.0),
                "compaction_error": self.compaction_error}

    def compact(self) -> Path:
        """Writes a base of the tables as they are now and deletes what it replaces; returns
        the base's directory. On failure, raises, and the previous base and every log stay."""
        with self._lock:
            try:
                base = self._compact()
            except Exception as e:
                self.compaction_error = f"{type(e).__name__}: {e}"
                raise
            self.compaction_error = ""
            return base

    def _compact(self) -> Path:
        """compact(), under its lock."""
        if (error := self.log.failed) is not None:
            raise wal.WalError(f"the log {self.log.path} failed ({error}): nothing to compact until a restart")
        self._check_room(sum(t.row_bytes + t.state_bytes for t in self.engine.tables()))
        t0 = time.monotonic()
        generation = self.generation + 1
        # No write runs from here, table creates and drops included, and no lease: a
        # lapsed freeze would let a create into the old log, which this deletes.
        self.engine.gate.freeze(lease_s=math.inf)
        try:
            with ShardFreeze(self.engine) as freeze:
                copy = snapshot_shard(self.engine, freeze=freeze)
                self.log.rotate(wal.wal_path(self.directory, generation))
            self.generation = generation
        finally:
            self.engine.gate.unfreeze(forget=False)  # groups matter to a store's cuts only
        held_s = time.monotonic() - t0
        staging = checkpoint.begin_checkpoint(checkpoint.checkpoint_dir(self.base_root, generation))
        try:
            summary = checkpoint.write_shard(copy, staging)
            base = checkpoint.commit_shard_checkpoint(staging, summary, {"version": generation})
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.since = generation
        removed = checkpoint.prune_checkpoints(self.base_root, keep=1)
        logs = wal.prune_wal(self.directory, generation)
        self.compactions += 1
        self.last_compaction = {"seconds": time.monotonic() - t0, "held_s": held_s, "bytes": copy.nbytes,
                                "ended": time.time()}
        log.info("shard %d: compacted its log into base %d (%.1f MiB) in %.2f s, writes held %.0f ms; "
                 "removed %d older bases and %d logs", self.engine.shard_index, generation,
                 copy.nbytes / 2**20, time.monotonic() - t0, held_s * 1e3, len(removed), len(logs))
        return base

    def _check_room(self, nbytes: int) -> None:
        """Raises NoRoom unless the disk has room for a base of `nbytes` and some log besides:
        a base that fills the disk would fail log appends, i.e. writes."""
        need = nbytes + ROOM_BYTES + int(ROOM_FRACTION * nbytes)
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise NoRoom(f"a base of {nbytes / 2**20:,.0f} MiB needs {need / 2**20:,.0f} MiB free "
                         f"on {self.directory}, {free / 2**20:,.0f} MiB are: not compacting (the log keeps "
                         "every write meanwhile)")

    def _watch(self) -> None:
        pause = 0.0
        while not self._stop.wait(WATCH_S + pause):
            try:
                if self.log.failed is None and self.log_bytes() >= self.threshold():
                    self.compact()
                pause = 0.0
            except Exception as e:  # keep serving on the log; the old base and logs still hold all
                pause = min(RETRY_S[1], max(RETRY_S[0], 2 * pause))
                expected = isinstance(e, (OSError, MemStoreError))  # a full disk, a bad file: no traceback
                log.warning("shard %d: compacting the log failed (%s: %s); trying again in %.0f s",
                            self.engine.shard_index, type(e).__name__, e, pause, exc_info=not expected)

    def close(self) -> None:
        """Stops the watcher (after a compaction under way) and closes the log."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        with self._lock:
            if self.log is not None:
                self.log.close()
            if self._lock_fd >= 0:
                fd, self._lock_fd = self._lock_fd, -1
                os.close(fd)  # and with it the flock


def lock_directory(directory: Path, wait_s: float = 0.0, holder: str = "shard process") -> int:
    """Takes the flock on directory/LOCK (one process serves a data dir) and writes this
    pid there; returns its fd, whose closing frees the directory. A directory held by another
    process raises, after waiting up to wait_s for it to let go (a process being killed)."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    pid = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                    raise RuntimeError(f"{directory} is in use by another process (pid {pid}): one {holder} "
                                       "per data dir") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:
        os.close(fd)
        raise
    return fd
