"""Consistent, crash-safe, memory-mappable checkpoints of a store's shards.

A checkpoint (one cut of every shard) is a directory, named by the caller, e.g. `ckpt-<version>`:

    root/
      LATEST                        the name of the newest complete checkpoint (one line)
      ckpt-12/
        MANIFEST.msgpack            written last: store meta, table specs, per shard its files + crc32
        shard-00000-of-00002/
          shard.msgpack             shard index/count; per table spec, version, tensors (file, dtype,
                                    shape, crc32) and the remembered update ids; the remembered drop ids
          <table>.rows.npy          [local_rows, dim]; bfloat16 stored as its int16 bit pattern
          <table>.state.<name>.npy  each optimizer state tensor ([local_rows, dim] or [local_rows])
        shard-00001-of-00002/ ...

Every tensor file is a plain .npy that `np.load(path, mmap_mode="r")` opens; its real dtype is
in shard.msgpack. `<table>` is the table name percent-quoted for file names.

The copy of a shard's tables (`ShardFreeze`, `snapshot_shard`) lives in memstore.snapshot.
The cut (what a coordinator does; `save_checkpoint` does all of it for engines in one process):
 1. every shard takes `ShardFreeze(engine).acquire()`; once all hold it, the cut exists;
 2. every shard takes `snapshot_shard(engine, freeze=f)` (an in-memory copy), rotates its WAL
    (memstore.wal) and releases the freeze — updates wait only for the copy, not for disk;
 3. `staging = begin_checkpoint(checkpoint_dir(root, version))` once; every shard
    `write_shard(snapshot, staging)` (no lock held) and sends back the small summary it returns;
 4. `commit_checkpoint(staging, summaries, store_meta)` writes MANIFEST, renames the staging
    directory into place and points LATEST at it.

Crash safety: files are written under `<name>.tmp-<uuid>/`, each fsynced, then the directories;
the rename to `<name>` is the commit, then LATEST is replaced (tmp + fsync + rename). A crash at
any point leaves LATEST naming a complete checkpoint (or absent); staging leftovers are ignored
and removed by `prune_checkpoints(..., remove_staging=True)`.

A checkpoint of one shard alone (a standalone shard's base, memstore.durable) has the same
layout with that shard's directory only; `commit_shard_checkpoint` seals it, with MANIFEST
kind "memstore-shard-checkpoint", and `load_shard` reads it back into that shard.

Resharding: `load_shard(dir, i, S)` builds shard i of any S from a checkpoint of S_old shards:
key k lives in old shard k % S_old at k // S_old and moves to local row k // S. For one old shard
those keys form an arithmetic progression of step lcm(S, S_old), so each (table, tensor, old
shard) is one strided numpy copy out of the memory map. A resharded table's version is the
largest version among the old shards that fed it (versions never go backwards for a reader of
any one of them), and it remembers the newest update ids of each of those shards.

Relies on numpy, torch and msgpack only; no Ray, no gRPC.
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import time
import uuid
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import quote

import msgpack
import numpy as np
import torch

from memstore.engine import ShardEngine
from memstore.errors import InvalidArgument, MemStoreError
from memstore.partition import local_rows
from memstore.spec import TableSpec
from memstore.table import REMEMBERED_UPDATE_IDS, ShardTable
from memstore.snapshot import ShardFreeze, ShardSnapshot, snapshot_shard
from memstore.wal import fsync_dir, make_dirs

log = logging.getLogger("memstore.checkpoint")

FORMAT_VERSION = 1
STORE_KIND = "memstore-checkpoint"  # a cut of every shard of a store
SHARD_KIND = "memstore-shard-checkpoint"  # one shard alone (commit_shard_checkpoint)
MANIFEST = "MANIFEST.msgpack"
SHARD_MANIFEST = "shard.msgpack"
LATEST = "LATEST"
_STAGING = ".tmp-"
_DELETED = "deleted-"  # after _STAGING: a checkpoint being deleted (prune_checkpoints)
# Bytes per write / checksum / copy step: large enough for full disk speed, small enough for
# smooth progress and a bounded page-cache footprint while copying out of a memory map.
CHUNK_BYTES = 64 << 20
# How a tensor of each torch dtype is stored (numpy lacks bfloat16: its int16 bits).
_STORED = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<i2", torch.int64: "<i8", torch.int32: "<i4"}
_DTYPE_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int64: "int64",
               torch.int32: "int32"}

Progress = Callable[[int, int], None]  # (done_bytes, total_bytes)


class CheckpointError(MemStoreError):
    """A checkpoint is missing, incomplete or corrupt, or cannot be written; `path` names the file."""

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


# ---- writing ---------------------------------------------------------------------------------
def checkpoint_dir(root: Path | str, version: int) -> Path:
    """The conventional name of checkpoint `version` under `root`."""
    return Path(root) / f"ckpt-{int(version)}"


def shard_dirname(shard_index: int, num_shards: int) -> str:
    return f"shard-{shard_index:05d}-of-{num_shards:05d}"


def begin_checkpoint(directory: Path | str) -> Path:
    """Creates and returns the staging directory `<directory>.tmp-<uuid>` beside `directory`."""
    final = Path(directory)
    if final.exists():
        raise CheckpointError(f"checkpoint {final} already exists", final)
    make_dirs(final.parent)  # its entry in its parent durable too (a standalone shard's base/ holds its recovery point)
    staging = final.with_name(f"{final.name}{_STAGING}{uuid.uuid4().hex}")
    staging.mkdir()
    return staging


def write_shard(snapshot: ShardSnapshot, staging: Path | str, *, progress: Progress | None = None) -> dict:
    """Writes one shard's files under `staging` (from `begin_checkpoint`), fsynced; holds no lock.

    Returns the shard's summary for `commit_checkpoint` (small: no update ids, no data).
    """
    shard_dir = Path(staging) / shard_dirname(snapshot.shard_index, snapshot.num_shards)
    shard_dir.mkdir()
    done, total = 0, snapshot.nbytes

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    tables, files = [], {}
    for index, t in enumerate(snapshot.tables):
        stem = _file_stem(t.spec.name, index)
        tensors = {}
        for key, tensor in (("rows", t.rows), *t.state.items()):
            fname = f"{stem}.rows.npy" if key == "rows" else f"{stem}.state.{key}.npy"
            crc, nbytes = _write_npy(shard_dir / fname, tensor, advance)
            tensors[key] = {
                "file": fname,
                "dtype": _DTYPE_NAME[tensor.dtype],
                "stored_dtype": _STORED[tensor.dtype],
                "shape": list(tensor.shape),
                "crc32": crc,
                "bytes": nbytes,
            }
            files[fname] = {"crc32": crc, "bytes": nbytes}
        tables.append({
            "name": t.spec.name,
            "spec": t.spec.to_dict(),
            "version": t.version,
            "local_rows": int(t.rows.shape[0]),
            "state_names": list(t.state),
            "tensors": tensors,
            "update_ids": [[i, v, d] for i, v, d in t.update_ids],  # d: write digest, null if unknown
        })
    meta = {
        "format": FORMAT_VERSION,
        "shard_index": snapshot.shard_index,
        "num_shards": snapshot.num_shards,
        "taken_at": snapshot.taken_at,
        "tables": tables,
        "drop_ids": [[i, d] for i, d in snapshot.drop_ids],  # a retried drop's answer (memstore.engine)
    }
    blob = msgpack.packb(meta)
    _write_file(shard_dir / SHARD_MANIFEST, blob)
    fsync_dir(shard_dir)
    return {
        "shard_index": snapshot.shard_index,
        "num_shards": snapshot.num_shards,
        "dir": shard_dir.name,
        "manifest": {"file": SHARD_MANIFEST, "crc32": zlib.crc32(blob), "bytes": len(blob)},
        "files": files,
        "tables": {t["name"]: {"spec": t["spec"], "version": t["version"]} for t in tables},
    }


def commit_checkpoint(
    staging: Path | str, shard_manifests: list[dict], store_meta: dict | None = None, *, set_latest: bool = True
) -> Path:
    """Seals a checkpoint: checks the shard summaries form one whole cut, writes MANIFEST,
    renames the staging directory to its final name and (set_latest) points LATEST at it.

    store_meta: msgpack-able facts about the store, kept as MANIFEST's "store" (conventionally
    name, num_shards, version = the cut's id, created; num_shards and created are filled in).
    LATEST moves only forward: a commit whose meta "version" is below LATEST's keeps LATEST.
    Returns the final directory.
    """
    staging = Path(staging)
    if _STAGING not in staging.name:
        raise CheckpointError(f"{staging} is not a staging directory from begin_checkpoint", staging)
    final = staging.with_name(staging.name.split(_STAGING)[0])
    shards = sorted(shard_manifests, key=lambda m: m["shard_index"])
    num_shards = len(shards)
    if [m["shard_index"] for m in shards] != list(range(num_shards)) or any(
        m["num_shards"] != num_shards for m in shards
    ):
        got = [(m["shard_index"], m["num_shards"]) for m in shards]
        raise CheckpointError(f"shard summaries {got} are not shards 0..{num_shards - 1} of {num_shards}", staging)
    specs = shards[0]["tables"] if shards else {}
    for m in shards[1:]:
        if {n: t["spec"] for n, t in m["tables"].items()} != {n: t["spec"] for n, t in specs.items()}:
            raise CheckpointError(f"shard {m['shard_index']} holds other tables or specs than shard 0", staging)
    meta = dict(store_meta or {})
    if meta.setdefault("num_shards", num_shards) != num_shards:
        raise CheckpointError(f"store meta says {meta['num_shards']} shards, {num_shards} were written", staging)
    return _seal(staging, final, STORE_KIND, meta, specs, shards, set_latest)


def commit_shard_checkpoint(staging: Path | str, summary: dict, store_meta: dict | None = None) -> Path:
    """Seals a checkpoint of one shard alone (a standalone shard's base, memstore.durable):
    as commit_checkpoint, with the one summary of shard i of S. `load_shard` reads it back
    into shard i of S only; a store restores from whole checkpoints only."""
    staging = Path(staging)
    if _STAGING not in staging.name:
        raise CheckpointError(f"{staging} is not a staging directory from begin_checkpoint", staging)
    final = staging.with_name(staging.name.split(_STAGING)[0])
    meta = dict(store_meta or {})
    if meta.setdefault("num_shards", summary["num_shards"]) != summary["num_shards"]:
        raise CheckpointError(f"store meta says {meta['num_shards']} shards, the shard is one of "
                              f"{summary['num_shards']}", staging)
    return _seal(staging, final, SHARD_KIND, meta, summary["tables"], [summary], True)


def _seal(staging: Path, final: Path, kind: str, meta: dict, specs: dict, shards: list[dict],
          set_latest: bool) -> Path:
    """Writes MANIFEST, renames `staging` to `final` (the commit) and moves LATEST."""
    meta.setdefault("created", time.time())
    manifest = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "store": meta,
        "tables": {name: t["spec"] for name, t in sorted(specs.items())},
        "shards": shards,
    }
    manifest["crc32"] = zlib.crc32(msgpack.packb(manifest))  # of the rest, packed as read_manifest repacks it
    _write_file(staging / MANIFEST, msgpack.packb(manifest))
    fsync_dir(staging)
    if final.exists():
        raise CheckpointError(f"checkpoint {final} already exists", final)
    os.rename(staging, final)
    try:
        fsync_dir(final.parent)
        if set_latest:
            _advance_latest(final, meta.get("version"))
    except OSError as e:  # the checkpoint is whole: say so, rather than report it as not written
        raise CheckpointError(f"checkpoint {final} is written whole, but committing it failed after its rename "
                              f"({e}): LATEST may still name the one before", final) from e
    return final


def save_checkpoint(
    engines: Iterable[ShardEngine],
    directory: Path | str,
    store_meta: dict | None = None,
    *,
    progress: Progress | None = None,
) -> Path:
    """The whole protocol for shards in this process: one cut across all `engines` (every
    freeze held at once, for the copy only), then write, commit and move LATEST."""
    engines = sorted(engines, key=lambda e: e.shard_index)
    with ExitStack() as stack:
        freezes = [stack.enter_context(ShardFreeze(e)) for e in engines]
        snapshots = [snapshot_shard(e, freeze=f) for e, f in zip(engines, freezes)]
    staging = begin_checkpoint(directory)
    total, before = sum(s.nbytes for s in snapshots), 0

    def shard_progress(done: int, _shard_total: int) -> None:  # one count over all shards
        if progress is not None:
            progress(before + done, total)

    try:
        summaries = []
        for s in snapshots:
            summaries.append(write_shard(s, staging, progress=shard_progress))
            before += s.nbytes
        return commit_checkpoint(staging, summaries, store_meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def link_checkpoint(source: Path | str, directory: Path | str, *, set_latest: bool = False) -> Path:
    """A copy of the complete checkpoint `source` at `directory`, committed by rename, its files
    hard-linked where the filesystem allows (a checkpoint's files are never written again, so
    the copy costs no disk and outlives the original's deletion). LATEST is left alone unless
    set_latest (then it moves forward to the copy, as commit_checkpoint's does)."""
    source = Path(source)
    read_manifest(source)  # complete, of a known format
    staging = begin_checkpoint(directory)
    try:
        shutil.copytree(source, staging, copy_function=_link_or_copy, dirs_exist_ok=True)
        for d in [p for p in staging.rglob("*") if p.is_dir()] + [staging]:
            fsync_dir(d)
        final = staging.with_name(staging.name.split(_STAGING)[0])
        os.rename(staging, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if set_latest:
        _advance_latest(final, read_manifest(final).get("store", {}).get("version"))
    return final


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())


# ---- finding -----------------------------------------------------------------------------------
def latest_checkpoint(root: Path | str) -> Path | None:
    """The checkpoint LATEST names under `root`; without a usable LATEST, the complete
    `ckpt-<n>` of highest n; None when there is no complete checkpoint."""
    root = Path(root)
    try:
        name = (root / LATEST).read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        name = ""
    if name and "/" not in name and name not in (".", "..") and (root / name / MANIFEST).is_file():
        return root / name
    complete = [(v, p) for v, p in _numbered_checkpoints(root) if (p / MANIFEST).is_file()]
    return max(complete)[1] if complete else None


def read_manifest(directory: Path | str) -> dict:
    """A checkpoint's MANIFEST as a dict; CheckpointError when missing or unreadable."""
    path = Path(directory) / MANIFEST
    try:
        manifest = msgpack.unpackb(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {directory} is not a complete checkpoint", path) from None
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as e:
        raise CheckpointError(f"{path} is corrupt: {e}", path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint format {manifest.get('format')!r}", path)
    # Checkpoints written before MANIFEST carried its own crc32 have none to check.
    if "crc32" in manifest and zlib.crc32(msgpack.packb({k: v for k, v in manifest.items() if k != "crc32"})) \
            != manifest["crc32"]:
        raise CheckpointError(f"{path} is corrupt: its crc32 does not match its contents", path)
    return manifest


def prune_checkpoints(root: Path | str, keep: int = 2, *, remove_staging: bool = False) -> list[Path]:
    """Deletes all but the newest `keep` complete `ckpt-<n>` directories (never LATEST's) and,
    with remove_staging, every staging leftover (only when no checkpoint is being written)."""
    root = Path(root)
    latest = latest_checkpoint(root)
    complete = [p for _, p in sorted(_numbered_checkpoints(root)) if (p / MANIFEST).is_file()]
    doomed = [p for p in complete[: max(0, len(complete) - keep)] if p != latest]
    # Deletions a crash interrupted (renamed aside below) go whatever is being written.
    doomed += [p for p in root.glob(f"*{_STAGING}{_DELETED}*") if p.is_dir()]
    if remove_staging:
        doomed += [p for p in root.glob(f"*{_STAGING}*") if p.is_dir() and p not in doomed]
    for p in doomed:
        # Renamed aside first: a crash mid-delete (MANIFEST may go first) leaves a leftover the
        # next prune removes, not a ckpt-<n> without MANIFEST that nothing would remove.
        aside = p if _STAGING in p.name else p.with_name(f"{p.name}{_STAGING}{_DELETED}{uuid.uuid4().hex}")
        try:
            os.rename(p, aside)
        except FileNotFoundError:
            continue
        except OSError:  # cannot rename (permissions, a mount point): delete in place
            aside = p
        shutil.rmtree(aside, ignore_errors=True)
    return doomed


# ---- loading -----------------------------------------------------------------------------------
def load_shard(
    directory: Path | str,
    shard_index: int,
    num_shards: int,
    *,
    engine: ShardEngine | None = None,
    verify: bool = True,
    progress: Progress | None = None,
) -> ShardEngine:
    """Shard `shard_index` of `num_shards` restored from a checkpoint of any shard count.

    Restores rows, optimizer state, versions and remembered update and drop ids. Into `engine` when given
    (it must be that shard; the checkpoint's tables replace same-named ones, before it serves),
    else into a new ShardEngine. verify checks every file read against its crc32 first and
    raises CheckpointError naming the bad file.
    """
    directory = Path(directory)
    engine = engine if engine is not None else ShardEngine(shard_index, num_shards)
    if (engine.shard_index, engine.num_shards) != (shard_index, num_shards):
        have = f"{engine.shard_index} of {engine.num_shards}"
        raise InvalidArgument(f"engine is shard {have}, not {shard_index} of {num_shards}")
    manifest = read_manifest(directory)
    old_s = int(manifest["store"]["num_shards"])
    g = math.gcd(old_s, num_shards)
    # Keys k = shard_index + num_shards*t meet every old shard s with s = shard_index (mod g).
    sources = [s for s in range(old_s) if (s - shard_index) % g == 0]
    held = dict(enumerate(manifest["shards"]))
    if manifest.get("kind") == SHARD_KIND:
        held = {m["shard_index"]: m for m in manifest["shards"]}
        if missing := [s for s in sources if s not in held]:
            raise CheckpointError(f"{directory} is a checkpoint of shard(s) {sorted(held)} of {old_s} alone; "
                                  f"shard {shard_index} of {num_shards} needs shard(s) {missing} too", directory)
    metas = {s: _read_shard_manifest(directory, held[s], s) for s in sources}
    plans = [_plan_table(spec, shard_index, num_shards, old_s, metas) for spec in manifest["tables"].values()]
    total = sum(p.dst_bytes + (p.src_bytes if verify else 0) for p in plans)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    for plan in plans:
        table = ShardTable(plan.spec, shard_index, num_shards, initialise=False)
        _fill_table(directory, plan, table, verify, advance)
        engine.install_table(table)
    for _, meta in metas.values():  # a drop's id is the same on every shard: any source's will do
        engine.remember_drops(meta.get("drop_ids", ()))
    return engine


@dataclass
class _TablePlan:
    """Where one table of the new shard comes from: per old shard, its entry in shard.msgpack."""

    spec: TableSpec
    entries: dict[int, dict]  # old shard -> table entry of its shard.msgpack
    dirs: dict[int, str]  # old shard -> its directory name
    old_shards: int
    dst_bytes: int
    src_bytes: int


def _plan_table(spec_dict: dict, shard_index: int, num_shards: int, old_s: int, metas: dict) -> _TablePlan:
    spec = TableSpec.from_dict(spec_dict)
    entries, dirs = {}, {}
    for s, (dirname, meta) in metas.items():
        entry = next((t for t in meta["tables"] if t["name"] == spec.name), None)
        if entry is None or entry["spec"] != spec_dict:
            raise CheckpointError(f"{dirname}/{SHARD_MANIFEST} lacks table {spec.name!r} or holds another spec")
        entries[s], dirs[s] = entry, dirname
    n = local_rows(spec.num_rows, shard_index, num_shards)
    tensors = next(iter(entries.values()))["tensors"].values()
    dst = sum(n * math.prod(t["shape"][1:]) * np.dtype(t["stored_dtype"]).itemsize for t in tensors)
    src = sum(t["bytes"] for e in entries.values() for t in e["tensors"].values())
    return _TablePlan(spec, entries, dirs, old_s, dst, src)


def _fill_table(directory: Path, plan: _TablePlan, table: ShardTable, verify: bool, advance) -> None:
    """Copies every tensor of `table` out of the old shards' memory-mapped files."""
    spec, S, i, old_s = plan.spec, table.num_shards, table.shard_index, plan.old_shards
    L = math.lcm(S, old_s)
    t = np.arange(old_s // math.gcd(S, old_s), dtype=np.int64)
    first_key = dict(zip(((i + S * t) % old_s).tolist(), (i + S * t).tolist()))  # old shard -> first key
    targets = {"rows": table.rows, **table.state}
    for s, entry in plan.entries.items():
        if set(entry["tensors"]) != set(targets):
            where = f"{plan.dirs[s]}/{SHARD_MANIFEST}"
            have = sorted(entry["tensors"])
            need = sorted(targets)
            raise CheckpointError(f"{where}: table {spec.name!r} has tensors {have}, its optimizer needs {need}")
        k0 = first_key[s]
        count = 0 if k0 >= spec.num_rows else (spec.num_rows - 1 - k0) // L + 1
        j0, sj = (k0 - i) // S, L // S  # new local rows: j0, j0 + sj, ...
        o0, so = k0 // old_s, L // old_s  # old local rows: o0, o0 + so, ...
        for key, dst in targets.items():
            meta = entry["tensors"][key]
            want = (local_rows(spec.num_rows, s, old_s), *dst.shape[1:])
            src = _open_tensor(directory / plan.dirs[s] / meta["file"], meta, want, _STORED[dst.dtype], verify, advance)
            dst_np = _np_view(dst)
            row_bytes = dst_np[:1].nbytes
            per_chunk = max(1, CHUNK_BYTES // max(1, row_bytes))
            for a in range(0, count, per_chunk):
                b = min(count, a + per_chunk)  # keys a..b-1 of the progression
                dst_np[j0 + a * sj : j0 + (b - 1) * sj + 1 : sj] = src[o0 + a * so : o0 + (b - 1) * so + 1 : so]
                advance((b - a) * row_bytes)
            del src  # unmaps
    table.version = max(e["version"] for e in plan.entries.values())
    ids = _merge_update_ids([e["update_ids"] for e in plan.entries.values()], same_layout=old_s == S)
    table.applied_ids.update(ids)


def _merge_update_ids(sources: list[list], same_layout: bool) -> list[tuple[str, tuple[int, int | None]]]:
    """(id, (version, digest)) of one old shard's ids as they were; several: the newest of
    each, oldest first overall, at most REMEMBERED_UPDATE_IDS (ids are tagged with their
    shard, so they never collide). Into another shard count the digests are dropped: an
    old part's id now names keys spread over other shards, so a retry of it is known by its
    id alone, as before digests. Checkpoints before digests list [id, version]."""
    sources = [[(e[0], (e[1], e[2] if same_layout and len(e) > 2 else None)) for e in src] for src in sources]
    if len(sources) == 1:
        return sources[0]
    quota = -(-REMEMBERED_UPDATE_IDS // len(sources))
    kept = [src[-quota:] for src in sources]
    ages = np.concatenate([np.arange(len(k) - 1, -1, -1) for k in kept]) if kept else np.empty(0)
    flat = [pair for k in kept for pair in k]
    order = np.argsort(-ages, kind="stable")  # oldest first, so later writes evict them first
    return [(flat[j][0], flat[j][1]) for j in order.tolist()]


def _open_tensor(path: Path, meta: dict, want_shape: tuple, stored: str, verify: bool, advance) -> np.ndarray:
    """One old shard's file of one tensor, checked against its manifest entry and memory-mapped."""
    if tuple(meta["shape"]) != want_shape or meta["stored_dtype"] != stored:
        have = f"{meta['stored_dtype']} {tuple(meta['shape'])}"
        raise CheckpointError(f"{path}: manifest says {have}, the table needs {stored} {want_shape}", path)
    if verify:
        _verify_file(path, meta["crc32"], meta["bytes"], advance)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing", path) from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not a readable .npy file: {e}", path) from None
    if arr.shape != want_shape or arr.dtype != np.dtype(stored):
        raise CheckpointError(f"{path} holds {arr.dtype} {arr.shape}, its manifest says {stored} {want_shape}", path)
    return arr


def _read_shard_manifest(directory: Path, summary: dict, shard: int) -> tuple[str, dict]:
    path = directory / summary["dir"] / summary["manifest"]["file"]
    if summary["shard_index"] != shard:
        where = directory / MANIFEST
        raise CheckpointError(f"{where} lists shard {summary['shard_index']} in place {shard}", where)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing", path) from None
    got, want = zlib.crc32(blob), summary["manifest"]["crc32"]
    if got != want:
        raise CheckpointError(f"checksum mismatch in {path}: crc32 {got:08x}, MANIFEST says {want:08x}", path)
    return summary["dir"], msgpack.unpackb(blob)


def _verify_file(path: Path, crc: int, nbytes: int, advance) -> None:
    got, size = 0, 0
    buf = bytearray(min(CHUNK_BYTES, max(nbytes, 1)))
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                got = zlib.crc32(view[:n], got)
                size += n
                advance(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing", path) from None
    if size != nbytes or got != crc:
        have, want = f"{size} bytes with crc32 {got:08x}", f"{nbytes} bytes with {crc:08x}"
        raise CheckpointError(f"checksum mismatch in {path}: {have}, manifest says {want}", path)


# ---- files -------------------------------------------------------------------------------------
def _np_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's memory in its stored dtype (bfloat16 as int16)."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _file_stem(name: str, index: int) -> str:
    """A table's file name stem: its name, %-quoted; for a long one (or . and ..),
    "%table-<index>", which no quoted name can be: quote() writes "%" only before two hex
    digits, and "t" is not one."""
    stem = quote(name, safe="")
    return stem if len(stem) <= 200 and stem not in (".", "..") else f"%table-{index:05d}"


def _write_npy(path: Path, tensor: torch.Tensor, advance) -> tuple[int, int]:
    """Writes `tensor` as a .npy file, chunk by chunk, fsynced; returns (crc32, bytes)."""
    arr = _np_view(tensor.contiguous())
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    data = memoryview(arr.reshape(-1).view(np.uint8))
    crc = zlib.crc32(head.getvalue())
    with open(path, "xb", buffering=0) as f:
        f.write(head.getvalue())
        for lo in range(0, len(data), CHUNK_BYTES):
            chunk = data[lo : lo + CHUNK_BYTES]
            crc = zlib.crc32(chunk, crc)
            _write_all(f, chunk)
            advance(len(chunk))
        os.fsync(f.fileno())
    return crc, len(head.getvalue()) + len(data)


def _write_all(f, data: memoryview) -> None:
    while len(data):
        data = data[f.write(data) :]


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb", buffering=0) as f:
        _write_all(f, memoryview(data))
        os.fsync(f.fileno())


def _advance_latest(final: Path, version) -> None:
    """Points LATEST at `final` (tmp + fsync + rename + fsync), unless it names a newer one."""
    root = final.parent
    current = latest_checkpoint(root)
    if current is not None and current != final and version is not None:
        try:
            current_version = read_manifest(current)["store"].get("version")
        except CheckpointError:
            current_version = None
        if isinstance(current_version, int) and current_version > version:
            log.warning("LATEST stays at %s (version %s): %s is older", current, current_version, final)
            return
    tmp = root / f"{LATEST}{_STAGING}{uuid.uuid4().hex}"
    try:
        _write_file(tmp, f"{final.name}\n".encode())
        os.rename(tmp, root / LATEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(root)


def _numbered_checkpoints(root: Path) -> list[tuple[int, Path]]:
    out = []
    for p in root.glob("ckpt-*") if root.is_dir() else ():
        suffix = p.name[len("ckpt-") :]
        if suffix.isdigit() and p.is_dir():
            out.append((int(suffix), p))
    return out
