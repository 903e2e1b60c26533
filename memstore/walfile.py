"""The write-ahead log's file: its format, reading it back, its generations in a data dir,
and replaying its records into an engine. memstore.wal writes it (and re-exports the names
here that callers use, as wal.replay_dir and so on).

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
and nothing is truncated, rather than drop the acknowledged records that follow. (With
"group" or "none" a machine crash may leave several frames unwritten and write back a later
one before an earlier one; that too stops recovery, for the operator to decide.)

Generations: one file per checkpoint, `wal-<checkpoint version>.log` (`wal_path`). A shard
rotates to the next file while its checkpoint freeze is held (memstore.checkpoint), so every
write acknowledged after the cut is in that file or a later one. Recovery from checkpoint V
replays every file of generation >= V in order (`replay_dir`): a checkpoint that failed to
commit leaves its records split across two files, and both are replayed. Once checkpoint V is
committed, `prune_wal(dir, V)` deletes the older files. A generation is never reused: every
cut, failed or not, gets a version above all handed out before (cluster/actors), and
`rotate` refuses a file that holds records.

Replay: `replay_into` re-applies records in each table's version order (concurrent writes
can reach the log in another order than they were applied) and only the keys of the
engine's shard, so the logs of a checkpoint's old layout replay into a resharded engine:
rows are updated independently, so old shards' logs may be replayed one after the other.
Writes straddling a cut, in the checkpoint and in the next file too, are skipped by their
remembered update ids, so give every logged write an id.

Relies on msgpack, numpy and torch only; no Ray, no gRPC.
"""

from __future__ import annotations

import heapq
import logging
import mmap
import os
import struct
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

if TYPE_CHECKING:  # replay applies records through the engine; only its type is needed here
    from memstore.engine import ShardEngine

log = logging.getLogger("memstore.wal")

# Records are viewed in place (read-only bytes); the engine never writes to gradients or
# assigned rows it is given (it copies what it keeps), so torch's warning says nothing here.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


MAGIC = b"MSWAL001"
_FRAME = struct.Struct("<II")  # payload length, crc32 of the payload


class WalError(MemStoreError):
    """The log cannot be written (after an I/O error, or closed) or is not a memstore WAL."""


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


# ---- generations -------------------------------------------------------------------------------
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


def fsync_dir(path: Path) -> None:
    """Makes a directory's entries (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- replaying into an engine --------------------------------------------------------------------
# Records held back by replay_into to restore each table's version order; concurrent writes
# reach the log at most a few handler threads out of order.
REPLAY_WINDOW = 64


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
