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
import os
import uuid
from pathlib import Path

from memstore.errors import InvalidArgument
from memstore.wal import fsync_dir

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
    fsync_dir(directory)


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
