"""A store's own record of itself in its data dir: DATA_DIR/store.json.

The coordinator keeps its layout in memory, and writes it here whenever it changes what a
recovery needs: table specs, shard count, the recovery point (the last checkpoint and the
first log generation after it) and the last cut version handed out. From this file and the
shards' write-ahead logs a store comes back whole after its coordinator restarts (Ray restarts
it; its shards keep serving meanwhile) or after the whole Ray cluster went down
(`memstore up` on the same data dir resumes it). Written atomically (tmp + fsync + rename +
fsync of the directory); JSON so an operator can read it.

Invariant the coordinator keeps: a shard's logs before a generation are pruned only once this
file names a recovery point at or past that generation.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from memstore.errors import InvalidArgument

log = logging.getLogger(__name__)

STORE_FILE = "store.json"
FORMAT = 1


def path(data_dir: str | Path) -> Path:
    return Path(data_dir) / STORE_FILE


def read(data_dir: str | Path) -> dict | None:
    """The store recorded in data_dir, or None when there is none; InvalidArgument when the
    file is there but unreadable (a damaged file is the operator's to judge, never ignored)."""
    p = path(data_dir)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise InvalidArgument(f"data dir {data_dir} is not a directory") from None
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"cannot read the store record {p}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InvalidArgument(f"{p} is not a memstore store record of format {FORMAT}")
    return doc


def write(data_dir: str | Path, state: dict) -> None:
    """Replaces data_dir's store record with `state` (plus the format), durably."""
    directory = Path(data_dir)  # not created here: a record written after `down` removed the dir is refused
    tmp = directory / f"{STORE_FILE}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "x") as f:
            json.dump({"format": FORMAT, **state}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, directory / STORE_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    from memstore import wal  # here, not above: the CLI's store commands run without torch

    wal.fsync_dir(directory)


def remove(data_dir: str | Path) -> None:
    path(data_dir).unlink(missing_ok=True)


def check_resume(data_dir: str | Path, name: str, num_shards: int) -> dict | None:
    """The record a deploy of store `name` with num_shards shards on data_dir resumes from
    (None: a new store); InvalidArgument when the dir holds another store or another count."""
    doc = read(data_dir)
    if doc is None:
        return None
    if doc.get("store") != name:
        raise InvalidArgument(f"{data_dir} holds store {doc.get('store')!r}, not {name!r}: bring that one up "
                              "(--name), or use a fresh --data-dir")
    if doc.get("num_shards") != num_shards:
        raise InvalidArgument(f"{data_dir} holds store {name!r} of {doc.get('num_shards')} shards, not "
                              f"{num_shards}: bring it up with --shards {doc.get('num_shards')} (a checkpoint "
                              "restores into any shard count)")
    return doc


def discard_unborn(data_dir: str, store: str, num_shards: int) -> None:
    """A store whose first `up` never finished (its record says it never came up: no shard
    served, so nothing in it was acknowledged) is brought up anew: its record and its shards'
    generation-0 logs go (a store that came up has its logs kept whatever happens)."""
    try:
        record = read(data_dir)
    except Exception:  # an unreadable record is the operator's to judge: _load reports it
        return
    if record is None or record.get("came_up") is not False or (record.get("store"), record.get("num_shards")) != (
            store, num_shards):
        return
    from memstore import wal

    log.warning("%s holds a store whose first up never finished: bringing it up anew", data_dir)
    for shard_dir in Path(data_dir, "wal").glob(f"shard-*-of-{num_shards:05d}"):
        for g, path in wal.wal_files(shard_dir):
            if g == 0:
                path.unlink(missing_ok=True)
    remove(data_dir)


def highest_generation(data_dir: str) -> int:
    """The highest cut version the data dir shows: of a log file or of a checkpoint. A cut
    that failed after some shards rotated left its generation's files; none may be reused."""
    from memstore import checkpoint, wal

    found = [g for d in Path(data_dir, "wal").glob("shard-*-of-*") for g, _ in wal.wal_files(d)]
    found += [v for v, _ in checkpoint._numbered_checkpoints(Path(data_dir, "checkpoints"))]
    return max(found, default=0)
