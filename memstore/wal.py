"""Write-ahead log of a shard's acknowledged writes, replayed on top of its last checkpoint.

This module writes it: the records (one msgpack map each: kind, table, update_id, optional
version / group / parts, and the write's fields) and the WriteAheadLog that appends and
syncs them and rotates to a new generation. The file format, reading it back, the
generations and replay are memstore.walfile's; its public names are re-exported here.

How the engine uses it: append the write's record (with the version it will produce), apply
it, then acknowledge — all under the table's ids lock, so a retry reported as a duplicate is
only ever acknowledged after its first attempt is durable.
Replay and its order: memstore.walfile.

Sync modes: "always" — every append writes and fdatasyncs before it returns (appends serialise
on the disk); "group" — every append writes, then waits for an fdatasync that started after its
write: one waiting thread (the leader) syncs for all, after waiting up to group_window_s for
appenders still encoding; "none" — written to the page cache only: survives a killed process,
not a machine crash. An append whose write fails (a full disk) is cut back off the file and
raises WalError: that write is not applied, and later appends go on once there is room. After
a failed fdatasync (or a failed cut) the log refuses every further append (WalError): what
reached the disk is no longer known.

Relies on msgpack, numpy and torch only; no Ray, no gRPC.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from pathlib import Path

import msgpack
import numpy as np
import torch

from memstore.spec import DTYPES, TableSpec
# The file's format, reading, generations and replay, under the names callers know (wal.replay_dir, ...).
from memstore.walfile import (  # noqa: F401
    _FRAME, MAGIC, REPLAY_WINDOW, ReplayStats, WalError, fsync_dir, log_bytes, prune_wal, replay, replay_dir,
    replay_into, valid_length, wal_files, wal_path,
)

log = logging.getLogger("memstore.wal")

SYNC_MODES = ("always", "group", "none")


# ---- records -----------------------------------------------------------------------------------
def _bytes_of(a: np.ndarray | torch.Tensor) -> memoryview:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().contiguous()
        a = a.view(torch.int16).numpy() if a.dtype == torch.bfloat16 else a.numpy()
    return memoryview(np.ascontiguousarray(a)).cast("B")


def update_record(
    table: str, keys: np.ndarray, grads: torch.Tensor, lr: float, update_id: str = "", version: int | None = None,
    group: str = "", parts: int = 0,
) -> dict:
    """The record of `ShardEngine.update(table, keys, grads, lr, update_id, group, parts)`; views, no copies."""
    return _rows_record("update", table, keys, grads, update_id, version, group, parts, lr=float(lr))


def assign_record(
    table: str,
    keys: np.ndarray,
    values: torch.Tensor,
    keep_state: bool,
    update_id: str = "",
    version: int | None = None,
    group: str = "",
    parts: int = 0,
) -> dict:
    """The record of `ShardEngine.assign(table, keys, values, keep_state, update_id, group, parts)`."""
    return _rows_record("assign", table, keys, values, update_id, version, group, parts, keep_state=bool(keep_state))


def _rows_record(kind: str, table: str, keys, values: torch.Tensor, update_id: str, version: int | None,
                 group: str = "", parts: int = 0, **extra) -> dict:
    rec = {
        "kind": kind, "table": table, "update_id": update_id, **extra,
        "dtype": _dtype_name(values.dtype), "dim": int(values.shape[1]),
        "keys": _bytes_of(np.asarray(keys, dtype="<i8")), "values": _bytes_of(values),
    }  # fmt: skip
    if version is not None:
        rec["version"] = int(version)
    if group:
        rec["group"], rec["parts"] = group, int(parts)
    return rec


def create_record(spec: TableSpec) -> dict:
    return {"kind": "create", "table": spec.name, "spec": spec.to_dict()}


def drop_record(table: str, drop_id: str = "") -> dict:
    return {"kind": "drop", "table": table} | ({"drop_id": drop_id} if drop_id else {})


def cut_record() -> dict:
    """Marks a completed cut: the write gate forgot the call groups it had counted, and so
    does replay (the groups after the last mark are those the other shards still count)."""
    return {"kind": "cut", "table": ""}


def encode_frame(record: dict) -> tuple[bytes, bytes]:
    """(frame header, payload) of one record."""
    payload = msgpack.packb(record)
    return _FRAME.pack(len(payload), zlib.crc32(payload)), payload


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


# ---- the log -----------------------------------------------------------------------------------
class WriteAheadLog:
    """Appends records to one file, durable per `sync` before `append` returns. Thread-safe."""

    def __init__(self, path: Path | str, sync: str = "always", group_window_s: float = 0.002) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        self.sync = sync
        self.group_window_s = group_window_s
        # Guards every field below, and the order of writes to the file. Two conditions on it,
        # so an appender's write wakes only the waiting leader, not every waiting follower.
        self._lock = threading.Lock()
        self._durable = threading.Condition(self._lock)  # notified when records became durable
        self._arrived = threading.Condition(self._lock)  # notified when an arriving appender wrote
        self._fd = -1
        self._path = Path(path)
        self._written = 0  # records written to the file (a sequence number, across rotations)
        self._synced = 0  # records known to be on disk
        self._syncing = False  # a group leader is in fdatasync, without the lock
        self._arriving = 0  # appenders encoding their record, about to write
        self._error: BaseException | None = None  # the I/O error that stopped the log
        self._cut_note = ""  # what became of the records after the last durable byte, once it did
        self.appends = 0  # records appended (guarded by _lock)
        self.syncs = 0  # fdatasyncs run (guarded by _lock); appends / syncs = the group size
        self._fd = _open_for_append(self._path)
        # File offsets: the end of the last record written, and of the last one made durable
        # (a failed fdatasync cuts the file back to it: no record nobody was told is durable
        # may replay at a restart; appenders after it all fail).
        self._end = self._durable_end = os.lseek(self._fd, 0, os.SEEK_END)

    @property
    def path(self) -> Path:
        return self._path

    def append(self, record: dict) -> None:
        """Writes `record`; returns once it is durable per the sync mode."""
        with self._lock:
            self._check_usable()
            self._arriving += 1
        try:
            head, payload = encode_frame(record)  # outside the lock: appenders encode in parallel
        except BaseException:
            with self._lock:
                self._arriving -= 1
                self._arrived.notify()
            raise
        with self._lock:
            self._arriving -= 1
            self._arrived.notify()  # a leader may be waiting for this appender to write
            self._check_usable()
            self._write(head, payload)
            self._written += 1
            self.appends += 1
            seq = self._written
            if self.sync == "always":
                self._sync_locked(seq)
            elif self.sync == "group":
                self._wait_durable(seq)

    def _wait_durable(self, seq: int) -> None:
        """Group commit, with the lock held: lead an fdatasync or wait for the leader's."""
        while self._synced < seq:
            if self._error is not None:
                raise WalError(f"write-ahead log {self._path} failed: {self._error}{self._cut_note}")
            if self._syncing:
                self._durable.wait()
                continue
            self._syncing = True
            deadline = time.monotonic() + self.group_window_s
            while self._arriving and (left := deadline - time.monotonic()) > 0:
                self._arrived.wait(left)  # let appenders still encoding join this sync
            target, fd, end = self._written, self._fd, self._end
            self.syncs += 1
            self._lock.release()
            try:
                os.fdatasync(fd)
                err = None
            except OSError as e:
                err = e
            finally:
                self._lock.acquire()
                self._syncing = False
                self._durable.notify_all()
            if err is not None:
                self._error = err
                self._cut_back()
            else:
                self._synced = max(self._synced, target)
                self._durable_end = max(self._durable_end, end)

    def _sync_locked(self, seq: int) -> None:
        """fdatasync with the lock held (always mode, flush, rotate): records <= seq are durable."""
        self.syncs += 1
        end = self._end
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            self._error = e
            self._cut_back()
            self._durable.notify_all()
            raise WalError(f"fdatasync of {self._path} failed: {e}{self._cut_note}") from e
        self._synced = max(self._synced, seq)
        self._durable_end = max(self._durable_end, end)
        self._durable.notify_all()  # group appenders waiting for a leader's sync: this one counts

    def _cut_back(self) -> None:
        """After a failed fdatasync, the lock held: cuts the file back to the end of its last
        durable record, so the records after it, whose appends all fail, do not replay at a
        restart (as refused writes applied after all)."""
        try:
            os.ftruncate(self._fd, self._durable_end)
            os.fdatasync(self._fd)  # the new length, at least, on disk
        except OSError as e:
            self._cut_note = (f"; the records after byte {self._durable_end}, none of them acknowledged, may still "
                              f"replay at a restart (cutting them off failed: {e})")
            return
        self._end = self._durable_end
        self._cut_note = f"; the records after byte {self._durable_end}, none of them acknowledged, were cut off"

    def _write(self, head: bytes, payload: bytes) -> None:
        """Writes one frame, or none: a failed write (a full disk) is cut off again and fails
        this append only; the log fails for good only when that cut fails too."""
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            _writev_all(self._fd, [head, payload])
        except OSError as e:
            try:  # leave no partial frame for later appends to follow
                os.ftruncate(self._fd, start)
            except OSError:
                self._error = e
            raise WalError(f"write to {self._path} failed: {e}") from e
        self._end = start + len(head) + len(payload)
        if self.sync == "none":  # acknowledged once written (it survives a killed process): never cut off
            self._durable_end = self._end

    def fail(self, error: BaseException) -> None:
        """Stops the log for good (every later append refused, health NOT_SERVING) for an
        error of its host's: a write that failed to apply after its record was logged, which
        a restart's replay applies (and a retry under its update id then finds applied)."""
        with self._lock:
            if self._error is None:
                self._error = error
            self._durable.notify_all()

    @property
    def failed(self) -> BaseException | None:
        """The I/O error that stopped the log for good (a failed fdatasync), if any. Read
        without the lock (one attribute): health checks must not wait on a stuck fdatasync."""
        return self._error

    def _check_usable(self) -> None:
        if self._error is not None:
            raise WalError(f"write-ahead log {self._path} failed earlier: {self._error}{self._cut_note}")
        if self._fd < 0:
            raise WalError(f"write-ahead log {self._path} is closed")

    def flush(self) -> None:
        """Makes every record appended so far durable (whatever the sync mode)."""
        with self._lock:
            self._check_usable()
            while self._syncing:
                self._durable.wait()
            self._sync_locked(self._written)

    def rotate(self, path: Path | str) -> None:
        """Makes the current file durable, closes it and continues in `path` (a new generation:
        a file holding records is refused, since replay from its checkpoint would apply them)."""
        path = Path(path)
        existed = path.exists()
        if existed and path.stat().st_size > len(MAGIC):
            raise WalError(f"{path} already holds records: a log generation is never continued after a rotation")
        with self._lock:
            self._check_usable()
            while self._syncing:
                self._durable.wait()
            self._sync_locked(self._written)
            try:
                fd = _open_for_append(path)
            except BaseException as e:
                self._forget_new_file(path, existed, e)
                raise
            os.close(self._fd)
            self._fd, self._path = fd, Path(path)
            self._end = self._durable_end = os.lseek(fd, 0, os.SEEK_END)

    def _forget_new_file(self, path: Path, existed: bool, error: BaseException) -> None:
        """After a rotation failed opening `path` (a full disk, a failed directory fsync),
        with writes to go on in the current file: removes the file it made. A newer file
        tells replay that this one was closed whole (replay_dir's `newest`), so a torn last
        record here, from a crash, would stop recovery. Unremovable, the log stops instead."""
        if existed:
            return
        try:
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
        except OSError as cleanup:
            self._error = WalError(f"rotating to {path} failed ({error}) and the file it made could not be removed "
                                   f"({cleanup}): writes stop here, the log so far is whole")
            self._durable.notify_all()

    def close(self) -> None:
        with self._lock:
            while self._syncing:
                self._durable.wait()
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                try:
                    if self._error is None:
                        os.fdatasync(fd)
                        self._synced = self._written
                finally:
                    os.close(fd)
                    self._durable.notify_all()

    def __enter__(self) -> "WriteAheadLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_for_append(path: Path) -> int:
    """Opens `path` for appending: a new file gets the magic (made durable with its directory
    entry); an existing one is truncated to its last whole frame."""
    make_dirs(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size < len(MAGIC):  # new, or torn while its magic was written
            os.ftruncate(fd, 0)
            _writev_all(fd, [MAGIC])
            os.fsync(fd)
            fsync_dir(path.parent)
        else:
            good = valid_length(path)
            if good < size:
                log.warning("%s: dropping a torn tail of %d bytes at offset %d", path, size - good, good)
                os.ftruncate(fd, good)
                os.fsync(fd)
        os.lseek(fd, 0, os.SEEK_END)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _writev_all(fd: int, bufs: list) -> None:
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def make_dirs(path: Path | str) -> None:
    """mkdir -p whose new entries survive a machine crash: each directory it creates is made
    durable in its parent (a log fsynced inside a directory whose own entry never reached
    the disk is lost with it)."""
    path = Path(path)
    created = []
    at = path
    while not at.exists():
        created.append(at)
        at = at.parent
    path.mkdir(parents=True, exist_ok=True)
    for directory in created:
        fsync_dir(directory.parent)
