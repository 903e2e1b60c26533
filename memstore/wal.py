"""Write-ahead log of a shard's acknowledged writes, replayed on top of its last checkpoint.

File: the 8-byte magic `MSWAL001`, then one frame per record:
`uint32 LE length ‖ uint32 LE crc32(payload) ‖ payload`, the payload one msgpack map:

    kind        "update" | "assign" | "create" | "drop" | "cut"
    table       table name
    update_id   the write's id ("" for none: such a record is applied again on every replay)
    version     optional: the table version the write produced on the shard that logged it
    group       optional, with parts: the client call the write is a part of (memstore.cut)
    cut:        nothing more: a completed cut, after which the write gate forgot its groups
    update:     lr (float), dtype (of values), dim, keys (int64 LE bytes), values (bytes)
    assign:     keep_state (bool), dtype, dim, keys, values
    create:     spec (TableSpec.to_dict());  drop: optional drop_id (DropTable's, for its retries)

A crash mid-write leaves a torn last frame: its length runs past the end of the file or its
crc32 does not match. `replay` stops there and ignores the rest; opening the log again for
writing truncates the file to its last whole frame, so new records never follow garbage. A
bad frame with a whole frame anywhere after it (found by its payload's leading key, since
the bad frame's own length may be what is damaged) is damage, not a torn write (with sync
"always" only the last frame can be unwritten): replay raises WalError naming the offset,
and nothing is truncated, rather than drop the acknowledged records that follow. (With "group" or "none"
a machine crash may leave several frames unwritten and write back a later one before an
earlier one; that too stops recovery, for the operator to decide.)

Generations: one file per checkpoint, `wal-<checkpoint version>.log` (`wal_path`). A shard
rotates to the next file while its checkpoint freeze is held (memstore.checkpoint), so every
write acknowledged after the cut is in that file or a later one. Recovery from checkpoint V
replays every file of generation >= V in order (`replay_dir`): a checkpoint that failed to
commit leaves its records split across two files, and both are replayed. Once checkpoint V is
committed, `prune_wal(dir, V)` deletes the older files. A generation is never reused: every
cut, failed or not, gets a version above all handed out before (cluster/actors), and
`rotate` refuses a file that holds records.

How the engine uses it: append the write's record (with the version it will produce), apply
it, then acknowledge — all under the table's ids lock, so a retry reported as a duplicate is
only ever acknowledged after its first attempt is durable. Writes straddling the cut, in the checkpoint and in the
next file too, are skipped on replay by their remembered update ids, so give every logged write
an id. `replay_into` re-applies records in each table's version order (concurrent writes can
reach the log in another order than they were applied) and only the keys of the engine's
shard, so the logs of a checkpoint's old layout replay into a resharded engine: rows are
updated independently, so old shards' logs may be replayed one after the other.

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

import heapq
import logging
import mmap
import os
import struct
import threading
import time
import warnings
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import msgpack
import numpy as np
import torch

from memstore.errors import MemStoreError
from memstore.spec import DTYPE_BYTES, DTYPES, TableSpec

if TYPE_CHECKING:  # the engine logs through this module; only replay needs its type
    from memstore.engine import ShardEngine

log = logging.getLogger("memstore.wal")

MAGIC = b"MSWAL001"
_FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
SYNC_MODES = ("always", "group", "none")
# Records held back by replay_into to restore each table's version order; concurrent writes
# reach the log at most a few handler threads out of order.
REPLAY_WINDOW = 64

# Records are viewed in place (read-only bytes); the engine never writes to gradients or
# assigned rows it is given (it copies what it keeps), so torch's warning says nothing here.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class WalError(MemStoreError):
    """The log cannot be written (after an I/O error, or closed) or is not a memstore WAL."""


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


def fsync_dir(path: Path) -> None:
    """Makes a directory's entries (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- reading -----------------------------------------------------------------------------------
def _frames(path: Path | str, newest: bool = True) -> Iterator[tuple[int, dict]]:
    """(end offset, record) of every whole frame, up to the first torn or corrupt one.
    newest=False: a log a newer generation follows, made durable whole before that one
    began (WriteAheadLog.rotate): a bad last record is damage there, not a torn write."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
        if len(magic) < len(MAGIC):
            return  # created, torn before its magic was whole: holds nothing
        if magic != MAGIC:
            raise WalError(f"{path} is not a memstore write-ahead log (magic {magic!r})")
        offset, size = len(MAGIC), os.fstat(f.fileno()).st_size
        while True:
            frame = _read_frame(f, offset, size)
            if frame is None:
                break
            offset, record = frame
            yield offset, record
        rest = size - offset
        if rest:
            if _whole_frame_after(f, offset, size) is not None:
                raise WalError(
                    f"{path}: the record at offset {offset} is damaged and whole records follow it: "
                    f"not a torn last write, so recovery stops rather than drop what follows. "
                    f"To give up the {rest} bytes from that record on, truncate the file to {offset} "
                    f"bytes (`truncate -s {offset} {path}`); or bring the store up on a fresh data dir and "
                    f"restore a checkpoint")
            if not newest:
                raise WalError(
                    f"{path}: its last record, at offset {offset}, is damaged, and a newer log generation "
                    f"follows it: a log is made durable whole before the next begins, so this is not a torn "
                    f"write, and recovery stops rather than drop an acknowledged record. To give it up, "
                    f"truncate the file to {offset} bytes (`truncate -s {offset} {path}`); or bring the store "
                    f"up on a fresh data dir and restore a checkpoint")
            log.warning("%s: ignoring %d bytes after offset %d (a torn last record)", path, rest, offset)


# Every record's payload is a msgpack map whose first key is "kind" (the record builders
# above): a whole frame's payload starts with a fixmap byte and these bytes.
_KIND_KEY = msgpack.packb("kind")


def _whole_frame_after(f, offset: int, size: int) -> int | None:
    """The offset of a whole frame after the bad one at `offset`, or None. Not only where
    the bad frame's length points: that length may be what is damaged. Frames are found by
    their payload's leading "kind" key, each candidate checked whole (crc32 and msgpack), so
    a torn tail of any size costs one scan of it."""
    with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as data:
        hit = data.find(_KIND_KEY, offset + 1)
        while hit != -1:
            start = hit - 1 - _FRAME.size  # the frame header, then the map's first byte
            if start > offset and 0x80 <= data[hit - 1] <= 0x8F and _read_frame(f, start, size) is not None:
                return start
            hit = data.find(_KIND_KEY, hit + 1)
    return None


def _read_frame(f, offset: int, size: int) -> tuple[int, dict] | None:
    """(end offset, record) of the whole frame at `offset` of open log `f` (of `size`
    bytes), or None where there is none: cut short, a crc32 mismatch, or not msgpack."""
    f.seek(offset)
    head = f.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    length, crc = _FRAME.unpack(head)
    if offset + _FRAME.size + length > size:  # runs past the end: torn (or a bad length)
        return None
    payload = f.read(length)
    if len(payload) != length or zlib.crc32(payload) != crc:
        return None
    try:
        record = msgpack.unpackb(payload)
    except (ValueError, TypeError, msgpack.exceptions.UnpackException):
        return None
    return offset + _FRAME.size + length, record


def replay(path: Path | str, newest: bool = True) -> Iterator[dict]:
    """The records of one log file in order; a torn or corrupt tail ends it (only in the
    newest generation: see _frames). A whole frame whose record is not one this version
    writes (a writer's bug, a newer format) is WalError naming the file and offset."""
    for offset, record in _frames(path, newest):
        why = _malformed(record)
        if why:
            raise WalError(f"{path}: the record ending at offset {offset} is not a record this memstore "
                           f"writes ({why}); recovery stops here, nothing is deleted")
        yield record


_FIELDS = {"update": {"lr": (int, float)}, "assign": {"keep_state": (bool,)}, "create": {"spec": (dict,)},
           "drop": {}, "cut": {}}
_ROWS = {"keys": (bytes,), "values": (bytes,), "dim": (int,), "dtype": (str,)}
_OPTIONAL = {"version": (int,), "update_id": (str,), "group": (str,), "parts": (int,), "drop_id": (str,)}


def _malformed(record) -> str:
    """Why `record` is not a well-formed record, or ""."""
    if not isinstance(record, dict):
        return f"a {type(record).__name__}"
    if record.get("kind") not in _FIELDS:
        return f"kind {record.get('kind')!r}"
    kind = record["kind"]
    need = {"table": (str,)} | _FIELDS[kind] | (_ROWS if kind in ("update", "assign") else {})
    wrong = sorted(name for name, types in need.items() if not isinstance(record.get(name), types))
    wrong += sorted(name for name, types in _OPTIONAL.items() if name in record and not isinstance(record[name], types))
    if wrong:
        return f"{kind} record with missing or mistyped {wrong}"
    if kind in ("update", "assign"):
        if record["dtype"] not in DTYPE_BYTES or record["dim"] < 1 or len(record["keys"]) % 8:
            return f"{kind} of dtype {record['dtype']!r}, dim {record['dim']}, {len(record['keys'])} key bytes"
        want = len(record["keys"]) // 8 * record["dim"] * DTYPE_BYTES[record["dtype"]]
        if len(record["values"]) != want:
            return f"{kind} of {len(record['keys']) // 8} keys x dim {record['dim']} with {len(record['values'])} value bytes, not {want}"
    return ""


def valid_length(path: Path | str) -> int:
    """Bytes of `path` up to the end of its last whole frame."""
    end = len(MAGIC)
    for end, _ in _frames(path):
        pass
    return end


def wal_path(directory: Path | str, generation: int) -> Path:
    """The log of generation `generation` (the checkpoint version it continues) in `directory`."""
    return Path(directory) / f"wal-{int(generation)}.log"


def wal_files(directory: Path | str) -> list[tuple[int, Path]]:
    """(generation, path) of every log in `directory`, oldest first."""
    out = []
    for p in Path(directory).glob("wal-*.log"):
        gen = p.name[len("wal-") : -len(".log")]
        if gen.isdigit():
            out.append((int(gen), p))
    return sorted(out)


def replay_dir(directory: Path | str, since: int = 0) -> Iterator[dict]:
    """The records of every log of generation >= `since`, in generation order."""
    files = wal_files(directory)
    for i, (gen, path) in enumerate(files):
        if gen >= since:
            yield from replay(path, newest=i == len(files) - 1)


def log_bytes(directory: Path | str, since: int = 0) -> int:
    """Bytes of records in the logs of generation >= `since` (what a restart replays; their
    headers not counted); logs deleted meanwhile count 0."""
    total = 0
    for gen, path in wal_files(directory):
        try:
            total += max(0, path.stat().st_size - len(MAGIC)) if gen >= since else 0
        except FileNotFoundError:  # pruned meanwhile
            pass
    return total


def prune_wal(directory: Path | str, before: int) -> list[Path]:
    """Deletes the logs of generations < `before` (after checkpoint `before` is committed)."""
    doomed = [p for gen, p in wal_files(directory) if gen < before]
    for p in doomed:
        p.unlink(missing_ok=True)
    if doomed:
        fsync_dir(Path(directory))
    return doomed


# ---- replaying into an engine --------------------------------------------------------------------
@dataclass
class ReplayStats:
    applied: int = 0  # records applied (to at least one key of this shard)
    duplicates: int = 0  # records whose update id the table remembered (already applied)
    skipped: int = 0  # records with no key on this shard
    late: int = 0  # records that arrived after a higher version of their table was applied
    tables: int = 0  # create and drop records


def replay_into(engine: "ShardEngine", records: Iterable[dict], *, window: int = REPLAY_WINDOW) -> ReplayStats:
    """Re-applies `records` through `ShardEngine.update/assign` with their update ids, so a
    record whose id the table remembers (e.g. it is in the checkpoint) is not applied again.

    Records carrying a version are applied in each table's version order, held back up to
    `window` records; only the keys the engine's shard owns are applied.
    """
    stats = ReplayStats()
    pending: dict[str, list] = {}  # table -> heap of (version, arrival, record)
    arrivals: deque[str] = deque()  # the table of every held record, oldest first
    last: dict[str, int] = {}  # table -> highest version applied
    order = 0

    def emit(rec: dict) -> None:
        v = rec.get("version")
        if v is not None:
            if v < last.get(rec["table"], v):
                stats.late += 1
            last[rec["table"]] = max(v, last.get(rec["table"], v))
        _apply(engine, rec, stats)

    def flush(table: str) -> None:
        nonlocal arrivals
        heap = pending.pop(table, [])
        while heap:
            emit(heapq.heappop(heap)[2])
        arrivals = deque(t for t in arrivals if t != table)

    for rec in records:
        table, version = rec["table"], rec.get("version")
        if rec["kind"] == "cut":  # every write held back came before it
            for held in list(pending):
                flush(held)
            emit(rec)
            continue
        if rec["kind"] in ("create", "drop") or version is None:
            flush(table)
            if rec["kind"] in ("create", "drop"):
                last.pop(table, None)  # a re-created table counts its versions from 0 again
            emit(rec)
            continue
        heapq.heappush(pending.setdefault(table, []), (version, order, rec))
        order += 1
        arrivals.append(table)
        if len(arrivals) > window:
            oldest = arrivals.popleft()
            emit(heapq.heappop(pending[oldest])[2])
    for table in list(pending):
        flush(table)
    return stats


def _apply(engine: "ShardEngine", rec: dict, stats: ReplayStats) -> None:
    kind, name = rec["kind"], rec["table"]
    if kind == "cut":
        engine.gate.forget()
        return
    if kind == "create":
        spec = TableSpec.from_dict(rec["spec"])
        existing = next((t for t in engine.tables() if t.spec.name == name), None)
        if existing is not None and existing.spec != spec:
            # Recovery creates the layout's tables first, with their latest spec; a table
            # dropped and created again since the checkpoint is rebuilt from the log's history.
            if existing.version:
                raise WalError(f"the log creates table {name!r} with {spec}, but it exists with {existing.spec} "
                               f"and {existing.version} writes: the log does not continue this checkpoint")
            engine.drop_table(name)
        engine.create_table(spec)
        stats.tables += 1
        return
    if kind == "drop":
        engine.drop_table(name, rec.get("drop_id", ""))  # its id remembered again: a retry drops nothing
        stats.tables += 1
        return
    if kind not in ("update", "assign"):
        raise WalError(f"unknown record kind {kind!r} for table {name!r}")
    if name not in {t.spec.name for t in engine.tables()}:  # dropped later in the log, or lost
        log.warning("replay skips a %s of table %r, which does not exist", kind, name)
        stats.skipped += 1
        return
    keys = np.frombuffer(rec["keys"], dtype="<i8").copy()  # small; the engine wants writable keys
    dim, n = rec["dim"], len(keys)
    values = torch.frombuffer(rec["values"], dtype=DTYPES[rec["dtype"]]).view(n, dim) if n * dim else (
        torch.empty(n, dim, dtype=DTYPES[rec["dtype"]])
    )
    if engine.num_shards > 1:
        mine = keys % engine.num_shards == engine.shard_index
        if not mine.all():
            if not mine.any():
                stats.skipped += 1
                return
            keys, values = keys[mine], values[torch.from_numpy(mine)]
    # Through the write gate with the call's group, so the gate counts its part as applied.
    group, parts = rec.get("group", ""), rec.get("parts", 0)
    if kind == "update":
        _, dup, _ = engine.update(name, keys, values, rec["lr"], rec.get("update_id", ""), group, parts)
    else:
        _, dup = engine.assign(name, keys, values, rec["keep_state"], rec.get("update_id", ""), group, parts)
    if dup:
        stats.duplicates += 1
    else:
        stats.applied += 1
