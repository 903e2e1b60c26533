"""The coordinator of a store on Ray: one named, detached actor per store.

`_Coordinator` ("store:NAME" in the "memstore" namespace) owns the layout: table specs, shard
count, shard addresses, an epoch that changes whenever a shard moves or restarts, and the
recovery point (the last checkpoint and the write-ahead-log generation after it). It records
what a recovery needs in the data dir's store.json (cluster/storefile.py) before acting on it,
so Ray can restart it (it reads the file back and finds its shards by name) and `memstore up`
on the same data dir can resume the store after the whole cluster went down. It creates the
shard actors (cluster/actors.py) and runs the cut protocol of memstore.cut for checkpoints
and restores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

import ray

from cluster import storefile
from cluster.actors import NAMESPACE, RESOURCE_SHARE, _ShardActor, shard_actor_name
from memstore.cut import FREEZE_LEASE_S
from memstore.errors import Unavailable

log = logging.getLogger(__name__)

CUT_ATTEMPTS = 3  # a checkpoint's cuts, when shards restart under them
COORDINATOR_LOCK_WAIT_S = 300.0  # for a dying predecessor (NFS I/O can hold one up)
# Deadline of a shard's answer to one step of a cut; a freeze also waits as long for the
# shard's running writes to drain.
CUT_CALL_S = 60.0
RESTORE_FINISH_S = 120.0  # how long a restore whose swap began keeps trying shards that restart
# A shard writing its copy of a checkpoint's cut reports its bytes every 64 MiB
# (memstore.checkpoint.CHUNK_BYTES); one reporting nothing this long has failed the checkpoint.
# Generous: a file's closing fsync, which may flush GBs of page cache to a slow disk, counts.
WRITE_STALL_S = 300.0


def _actor_state(actor) -> str:
    """The GCS's state of one actor. Ray's public state API (ray.util.state) goes through the
    dashboard, which a minimal cluster does not run; the GCS actor table is always there."""
    from ray._private import state

    try:
        return state.actors(actor._actor_id.hex()).get("State", "UNKNOWN")
    except Exception:  # a private API: never let its changes break `memstore status`
        return "UNKNOWN"


def _death_cause(actor) -> str | None:
    """Why a DEAD actor died, in one line (its creation task's exception, e.g. a shard whose
    log could not be replayed, or Ray's word on its process), from the GCS actor table; None
    when the table does not say."""
    from ray._private import state

    try:
        cause = state.actors(actor._actor_id.hex()).get("DeathCause")
        if cause is None:
            return None
        if cause.HasField("creation_task_failure_context"):
            text = cause.creation_task_failure_context.formatted_exception_string
        elif cause.HasField("actor_died_error_context"):
            text = cause.actor_died_error_context.error_message
        else:
            text = str(cause)
    except Exception:  # a private API: never let its changes break `memstore status`
        return None
    return raised_line(text)


# A traceback's last line: "ValueError: ...", "memstore.errors.ResourceExhausted: ...".
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_.]*(?:Error|Exception)\b|(?:[a-z_]\w*\.)+(?P<cls>[A-Z]\w*): )")


def raised_line(text: str) -> str | None:
    """The line of Ray's failure text that names the exception raised at its origin (not
    Ray's own wrappers), without colour codes; else its first line; None for no text."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if ln.strip()]
    raised = [ln for ln in lines if EXCEPTION_LINE.match(ln) and not ln.startswith("ray.exceptions.")]
    return raised[-1] if raised else (lines[0] if lines else None)


class _ShardCut:
    """A shard actor as memstore.cut.take_cut sees a participant (blocking calls, each with a
    deadline: a wedged shard fails the cut, which then thaws the others, instead of holding
    every shard's writes until the freeze's lease lapses)."""

    def __init__(self, actor, index: int, timeout_s: float = CUT_CALL_S, cut: str | None = None) -> None:
        self.actor = actor
        self.index = index
        self.timeout_s = timeout_s
        self.cut = cut or uuid.uuid4().hex  # one id for the cut's freeze and thaw on this shard

    def _get(self, ref, timeout_s: float | None = None, cancel: bool = True):
        timeout_s = timeout_s or self.timeout_s
        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            if cancel:  # a freeze still queued must not reach the shard after the cut gave up
                ray.cancel(ref)
            raise Unavailable(f"shard {self.index} did not answer the cut within {timeout_s:.0f} s") from None

    def freeze(self):
        return self._get(self.actor.cut_freeze.remote(self.timeout_s, self.cut), 2 * self.timeout_s)

    def release(self, groups):
        self._get(self.actor.cut_release.remote(groups))

    def applied(self, groups):
        return self._get(self.actor.cut_applied.remote(groups))

    def unfreeze(self, forget: bool = True):
        # Still wanted once a stopped shard wakes; a freeze of this cut it meets after is void.
        self._get(self.actor.cut_unfreeze.remote(forget, self.cut), cancel=False)


def write_copies(actors: list, staging: str, stall_s: float = WRITE_STALL_S, poll_s: float = 2.0) -> list[dict]:
    """After a checkpoint's cut, with writes flowing: each shard writes its copy under
    staging; their summaries. No deadline on the whole (a large shard takes what its disk
    takes), but one on progress: a shard whose written bytes stand still for stall_s (a hung
    disk, a stopped process) fails the checkpoint, named, instead of hanging it."""
    refs = [a.write_snapshot.remote(staging) for a in actors]
    seen: list = [None] * len(refs)  # each shard's last (done, total), and when it last moved
    moved = [time.monotonic()] * len(refs)
    probes: dict[int, object] = {}  # one question at a time: a stopped shard must not pile them up
    while True:
        ready, late = ray.wait(refs, num_returns=len(refs), timeout=poll_s)
        if not late:
            return ray.get(refs)
        ray.get(ready)  # a shard that failed ends the wait at once
        now = time.monotonic()
        for i in (refs.index(r) for r in late):
            probe = probes.setdefault(i, actors[i].progress.remote())
            if ray.wait([probe], timeout=0)[0]:
                del probes[i]
                with contextlib.suppress(ray.exceptions.RayError):  # a dying shard: its write says why
                    if (got := ray.get(probe)) != seen[i]:
                        seen[i], moved[i] = got, now
            if now - moved[i] > stall_s:
                for r in late:
                    ray.cancel(r)
                at = f" (at {seen[i][0]:,} of {seen[i][1]:,} bytes)" if seen[i] else ""
                raise Unavailable(f"shard {i} wrote nothing of its checkpoint copy for {stall_s:.0f} s{at}")


class _Coordinator:
    """The layout of one store; the only writer of it and of the store's record (storefile)."""

    def __init__(self, store: str, num_shards: int, data_dir: str, wal_sync: str = "always",
                 started_local_ray: str | None = None, owns_data_dir: bool = False) -> None:
        self.store = store
        self.owns_data_dir = owns_data_dir  # chosen by deploy, not the operator: removed at shutdown
        self.num_shards = num_shards
        self.data_dir = data_dir
        self.wal_sync = wal_sync
        self.started_local_ray = started_local_ray
        self.created = time.time()
        self.resource: str | None = None  # the custom resource shard actors ask for
        self.tables: dict[str, dict] = {}  # name -> spec dict; guarded by _lock
        self.shards: list[dict] = []  # shard info by index; guarded by _lock
        self.epoch = 0  # guarded by _lock
        # Where a restarted shard recovers from: a checkpoint (or none) and the first log
        # generation to replay after it; guarded by _lock.
        self.recovery = {"checkpoint": None, "wal_since": 0, "version": 0, "created": None}
        self._generation = 0  # the last cut version handed out (_next_generation)
        # A restore whose swap has begun: its recovery point and tables, until the swap is
        # recorded whole; a recovery that finds it finishes the restore (_finish_restore_on_disk,
        # _after_restart).
        self.restoring: dict | None = None  # guarded by _lock
        self.resumed: dict | None = None  # facts of the resume from the data dir, when it was one
        self._came_up = False  # every shard served once: the data dir holds acknowledged writes
        self._actors = []
        self._lock = threading.Lock()  # guards tables, shards, epoch, recovery, restoring and the record
        self._cut_lock = threading.Lock()  # one checkpoint or restore at a time
        self._started = threading.Event()  # start() has returned or failed: the layout is whole
        from memstore.durable import lock_directory

        Path(data_dir).mkdir(parents=True, exist_ok=True)
        # One coordinator per data dir: another cluster resuming it would rewrite the record under
        # this store. A restarted incarnation waits for its dying predecessor to let go.
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self._lock_fd = lock_directory(Path(data_dir), wait_s=COORDINATOR_LOCK_WAIT_S if restarted else 5.0,
                                       holder="coordinator")
        if not restarted:
            storefile.discard_unborn(data_dir, store, num_shards)
        if restarted or storefile.path(data_dir).exists():
            self._load(restarted)
        if restarted:  # Ray brought this coordinator back; its shards served on meanwhile
            self.epoch += 1
            self._actors = [self._shard(i, find=True) for i in range(num_shards)] if self.shards else []
            self._started.set()
            self._cut_lock.acquire()  # released by _after_restart, once it has set the shards right
            threading.Thread(target=self._after_restart, name="coordinator-restarted", daemon=True).start()
        elif self._came_up:  # resumed: shards recover from the data dir rather than start empty
            self.shards = []  # those of the recorded incarnation are gone; start() places new ones

    # ---- the store's record in its data dir -------------------------------------------------
    def _load(self, restarted: bool) -> None:
        record = storefile.read(self.data_dir) if restarted else storefile.check_resume(
            self.data_dir, self.store, self.num_shards)
        if record is None:
            raise RuntimeError(f"{self.data_dir} holds no store record ({storefile.STORE_FILE}): nothing to resume")
        self.tables = dict(record["tables"])
        self.shards = [dict(s) for s in record["shards"]]
        self.epoch = record["epoch"]
        self.recovery = dict(record["recovery"])
        self.restoring = record.get("restoring")
        self.created = record["created"]
        self.resource = record.get("resource")
        self._came_up = record["came_up"]
        if restarted:  # same cluster: a duty adopted since
            self.started_local_ray = self.started_local_ray or record.get("started_local_ray")
        self._generation = max(record["generation"], storefile.highest_generation(self.data_dir))
        if self.restoring and self.restoring["version"] <= self.recovery["version"]:
            self.restoring = None  # superseded by a later cut
        if self.restoring and not restarted:
            self._finish_restore_on_disk()

    def _persist(self) -> None:
        """Writes the store's record (under _lock). Raises when the disk refuses it: the
        caller's change must not go on as if a recovery would see it."""
        storefile.write(self.data_dir, {
            "store": self.store, "num_shards": self.num_shards, "tables": self.tables, "shards": self.shards,
            "epoch": self.epoch, "recovery": self.recovery, "restoring": self.restoring,
            "generation": self._generation, "came_up": self._came_up, "created": self.created,
            "resource": self.resource, "started_local_ray": self.started_local_ray,
        })

    def _finish_restore_on_disk(self) -> None:
        """Resuming after a restore whose swap began and was never recorded whole: it takes
        effect. A shard that had swapped started log generation V then (what it logged after
        replays on top of the restored rows); one that had not gets an empty log of generation
        V, so it recovers from the restored rows alone: its older logs are what the restore
        replaced."""
        from memstore import checkpoint, wal

        version = self.restoring["version"]
        for i in range(self.num_shards):
            shard_dir = Path(self.data_dir, "wal", checkpoint.shard_dirname(i, self.num_shards))
            if not any(g >= version for g, _ in wal.wal_files(shard_dir)):
                shard_dir.mkdir(parents=True, exist_ok=True)
                wal.WriteAheadLog(wal.wal_path(shard_dir, version), sync="always").close()
        self._restore_recorded()

    def _restore_recorded(self) -> None:
        """The restore under way is whole: it becomes the recovery point (under _lock, or
        before the actor serves)."""
        restoring, self.restoring = self.restoring, None
        self.tables = dict(restoring["tables"])
        self.recovery = {k: restoring[k] for k in ("checkpoint", "wal_since", "version", "created")}
        if restoring.get("request"):  # a restore() that Ray runs again on a restarted coordinator: done
            self.recovery |= {"request": restoring["request"], "result": restoring["result"]}
        self._persist()

    def _persist_shards(self) -> None:
        """Records where shards serve (under _lock): a convenience for a restarted coordinator,
        which asks the shards anyway, so a refused write is logged, not raised."""
        try:
            self._persist()
        except OSError as e:
            log.warning("store %s: cannot record the shard layout in %s: %s", self.store, self.data_dir, e)

    def _after_restart(self) -> None:
        """A restarted coordinator (holding _cut_lock from __init__ on: no cut of its own, nor
        a checkpoint Ray retries on it, comes first) finishes the restore its predecessor was
        swapping in, ends what that one's cut left (prepared copies, frozen gates: writes flow
        again now, not when the freeze lapses), and asks its shards where they serve."""
        from memstore import checkpoint as ckpt

        try:
            own_root = Path(self.data_dir) / "checkpoints"
            if own_root.is_dir():  # what a cut or restore of the predecessor was writing is dead
                with contextlib.suppress(OSError):
                    ckpt.prune_checkpoints(own_root, keep=2, remove_staging=True)
            if self.restoring and not self._finish_restore_live():  # those not swapped refuse calls
                self._hold_unswapped(self.restoring["version"], self.restoring["checkpoint"])
            for a in self._actors:
                with contextlib.suppress(ray.exceptions.RayError):
                    ray.get([a.drop_snapshot.remote(), a.drop_restore.remote()], timeout=60)
                    ray.get(a.cut_unfreeze.remote(False), timeout=60)
        finally:
            self._cut_lock.release()
        with contextlib.suppress(Exception):
            self.refresh()
        with self._lock:
            self._persist_shards()

    def _finish_restore_live(self, deadline_s: float = RESTORE_FINISH_S) -> bool:
        """Swaps the restore under way into every shard (idempotent: those that swapped skip
        it), trying until deadline_s (a shard restarting meanwhile), then records it whole."""
        pending = self.restoring
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                ray.get([a.restore.remote(pending["version"], pending["checkpoint"]) for a in self._actors])
                break
            except ray.exceptions.RayError as e:
                if time.monotonic() > deadline:
                    log.error("store %s: cannot finish the restore of %s: %s", self.store, pending["checkpoint"], e)
                    return False
                time.sleep(1.0)
        with self._lock:
            try:
                self._restore_recorded()
            except OSError as e:  # the record's `restoring` leads any recovery to the same rows
                log.warning("store %s: restore %s done, but not recorded as done: %s", self.store,
                            pending["version"], e)
        return True

    def _shard(self, i: int, *, recover: bool = False, find: bool = False):
        """Shard actor i: created (recover: from the data dir), or with find, the running one
        (a restarted coordinator's), created if none runs. A detached, named shard left by an
        earlier coordinator of this name that was killed without `down` is killed first."""
        name = shard_actor_name(self.store, i)
        options = {"name": name, "namespace": NAMESPACE, "lifetime": "detached", "max_restarts": -1,
                   "max_task_retries": -1, "num_cpus": 0, "scheduling_strategy": "SPREAD", "max_concurrency": 4}
        if self.resource:
            options["resources"] = {self.resource: RESOURCE_SHARE}
        deadline = time.monotonic() + 60
        while True:
            try:
                running = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                running = None
            if running is not None and find:
                return running
            if running is not None:
                ray.kill(running, no_restart=True)
            try:
                return ray.remote(_ShardActor).options(**options).remote(
                    self.store, i, self.num_shards, self.data_dir, self.wal_sync, recover or find)
            except ray.exceptions.ActorAlreadyExistsError:  # the killed one still holds the name
                if time.monotonic() > deadline:
                    raise RuntimeError(f"shard actor {name!r} of an earlier incarnation does not go away") from None
                time.sleep(0.2)

    def start(self, table_specs: list[dict], resource: str | None) -> dict:
        """Creates the shard actors (a resumed store's recover from the data dir), waits until
        every shard serves, returns the layout. Called once (deploy: never retried)."""
        resuming = self._came_up  # an earlier incarnation came up: its writes are in the data dir
        self.resource = resource
        try:
            with self._lock:
                if not resuming:
                    self.tables = {spec["name"]: spec for spec in table_specs}
                self._persist()  # before any shard writes a log here
            self._actors = []
            for i in range(self.num_shards):  # one by one: a failure leaves those made for shutdown()
                self._actors.append(self._shard(i, recover=resuming))
            # Not retried: a shard whose creation failed (a table too large for its host) is
            # dead, and every retry would print its traceback to the operator's terminal.
            infos = ray.get([a.info.options(max_task_retries=0).remote() for a in self._actors])
            with self._lock:
                self.shards = infos
                self.epoch += 1
                self._came_up = True
                self._persist()  # from here on the data dir is the store's: kept, resumed
            if resuming:
                self.resumed = {"checkpoint": self.recovery["checkpoint"], "version": self.recovery["version"],
                                "replayed": sum(i["replayed"] for i in infos)}
                for spec in table_specs:  # the config's tables: new ones created, the rest must match
                    self.create_table(spec)
        finally:
            self._started.set()
        return self.layout()

    def started(self, timeout_s: float = 600.0) -> bool:
        """Waits until start() has run (a second deploy of the name joins the first)."""
        return self._started.wait(timeout_s)

    def layout(self) -> dict:
        with self._lock:
            return {
                "store": self.store,
                "num_shards": self.num_shards,
                "epoch": self.epoch,
                "shards": [dict(s) for s in self.shards],
                "tables": dict(self.tables),
                "created": self.created,
                "started_local_ray": self.started_local_ray,
                "data_dir": self.data_dir,
                "wal_sync": self.wal_sync,
                "recovery": dict(self.recovery),
                "restoring": self.restoring,
                "resumed": self.resumed,
            }

    def adopt_local_ray(self, gcs_address: str) -> None:
        """This store's `down` stops the local Ray `memstore up` started for another store,
        which went down first (the last store down stops it)."""
        with self._lock:
            self.started_local_ray = self.started_local_ray or gcs_address
            self._persist_shards()

    def shard_restarted(self, shard_index: int, info: dict) -> int:
        with self._lock:
            if shard_index < len(self.shards):
                self.shards[shard_index] = info
            self.epoch += 1
            self._persist_shards()
            return self.epoch

    def refresh(self, timeout_s: float = 30.0) -> dict:
        """Asks every shard where it serves now (a restarted one may not have reported yet);
        a shard that does not answer within timeout_s (restarting) keeps its last entry."""
        ready, _ = ray.wait([a.info.remote() for a in self._actors], num_returns=len(self._actors), timeout=timeout_s)
        infos = {}
        for ref in ready:
            try:
                info = ray.get(ref)
                infos[info["shard_index"]] = info
            except ray.exceptions.RayError:
                continue
        with self._lock:
            changed = False
            for i, info in infos.items():
                if i < len(self.shards) and self.shards[i] != info:  # (none while a resume starts them)
                    self.shards[i] = info
                    changed = True
            if changed:
                self.epoch += 1
                self._persist_shards()
        return self.layout()

    def register_table(self, spec: dict) -> None:
        """Records a table created through a client, so restarted shards recreate it."""
        with self._lock:
            self.tables[spec["name"]] = spec
            self._persist()

    def create_table(self, spec: dict) -> None:
        """On every shard, then recorded. Should a shard refuse it, the shards this call made
        it on drop it again (a create with a corrected spec must not meet leftovers)."""
        refs = [a.create_table.remote(spec) for a in self._actors]
        ray.wait(refs, num_returns=len(refs))
        made, refused = [], None
        for i, ref in enumerate(refs):
            try:
                if ray.get(ref):
                    made.append(i)
            except ray.exceptions.RayError as e:
                refused = refused or e
        if refused is None:
            self.register_table(spec)
            return
        if made:
            drop_id = f"{self.store}:undo-create:{uuid.uuid4().hex}"
            try:
                ray.get([self._actors[i].drop_table.remote(spec["name"], drop_id) for i in made], timeout=CUT_CALL_S)
                log.warning("store %s: table %r refused by a shard; dropped again on shards %s, which had made it",
                            self.store, spec["name"], made)
            except ray.exceptions.RayError as e:
                log.warning("store %s: table %r refused by a shard stays on shards %s: %s", self.store,
                            spec["name"], made, e)
        raise refused

    def drop_table(self, name: str) -> None:
        with self._lock:
            self.tables.pop(name, None)
            self._persist()

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint(self, root: str | None = None, deadline_s: float = 30.0) -> dict:
        """One consistent cut of every shard, written as ckpt-<version> under the data dir's
        checkpoints/, where it becomes the recovery point; with `root`, also linked there
        (hard links where the disk allows), so the copy given to the operator may be deleted
        or moved without costing the store its recovery point. Returns its facts. A cut that
        a shard's restart voided is taken again (its version is not reused)."""
        from memstore.cut import CutLost

        with self._cut_lock:
            for attempt in range(1, CUT_ATTEMPTS):
                try:
                    return self._checkpoint(root, deadline_s) | {"attempts": attempt}
                except CutLost as e:
                    log.warning("store %s: checkpoint attempt %d void (%s); taking the cut again", self.store,
                                attempt, e)
            return self._checkpoint(root, deadline_s) | {"attempts": CUT_ATTEMPTS}

    def _checkpoint(self, root: str | None, deadline_s: float) -> dict:
        """checkpoint()'s one attempt (under _cut_lock: no other cut writes meanwhile, so any
        staging left in the own checkpoints/ is a dead attempt's, a coordinator's killed mid-write)."""
        from memstore import checkpoint as ckpt
        from memstore.cut import take_cut

        if self.restoring and not self._finish_restore_live():  # a cut now would hold a half-restored store
            raise RuntimeError(f"a restore of {self.restoring['checkpoint']} is half done and its shards do not "
                               "take it: restore again, or see the shards' state in `memstore status`")
        if root is not None:  # a root that cannot hold it fails before the cut, changing nothing
            Path(root).mkdir(parents=True, exist_ok=True)
        own_root = Path(self.data_dir) / "checkpoints"
        if own_root.is_dir():
            ckpt.prune_checkpoints(own_root, keep=2, remove_staging=True)
        roots = [own_root] + ([Path(root)] if root is not None else [])
        existing = [v for r in roots if r.is_dir() for v, _ in ckpt._numbered_checkpoints(r)]
        version = self._next_generation(*existing)
        t0 = time.monotonic()
        staging = None
        try:
            nbytes, completed, abandoned = take_cut(
                [_ShardCut(a, i) for i, a in enumerate(self._actors)],
                # Past the freeze's lease the shards' gates lapse and the cut is void anyway.
                lambda: sum(self._all([a.cut_snapshot.remote(version) for a in self._actors], FREEZE_LEASE_S)),
                deadline_s=deadline_s,
            )
            frozen_s = time.monotonic() - t0
            staging = ckpt.begin_checkpoint(ckpt.checkpoint_dir(own_root, version))
            summaries = write_copies(self._actors, str(staging))
            final = ckpt.commit_checkpoint(staging, summaries, {"name": self.store, "version": version})
        except BaseException:
            with contextlib.suppress(ray.exceptions.RayError):  # never in place of the error itself
                ray.get([a.drop_snapshot.remote() for a in self._actors], timeout=60)
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        with self._lock:
            self.recovery = {"checkpoint": str(final), "wal_since": version, "version": version,
                             "created": time.time()}
            self.restoring = None  # one left half-done is superseded: this cut holds what the store serves
            self._persist()  # the logs before it go only once the record points past them
        self._prune_logs(version)
        ckpt.prune_checkpoints(own_root, keep=2)
        given = final if root is None else ckpt.link_checkpoint(final, ckpt.checkpoint_dir(root, version),
                                                                set_latest=True)
        return {"path": str(given), "version": version, "bytes": nbytes, "frozen_s": frozen_s,
                "seconds": time.monotonic() - t0, "completed_in_cut": len(completed), "abandoned": len(abandoned)}

    def restore(self, directory: str, request: str | None = None) -> dict:
        """Replaces every shard's tables with a checkpoint's (of any shard count), atomically
        for clients (writes wait while it loads), and makes it the recovery point: a copy
        of it in the data dir (link_checkpoint), so the one given may go away.

        request: the caller's id of this restore. Ray runs a call again on a coordinator it
        restarted; a restore whose swap the restarted one finished (_after_restart) must
        not run again, over the writes acknowledged since: it returns what it returned."""
        from memstore import checkpoint as ckpt
        from memstore.cut import take_cut

        path = directory if os.path.exists(os.path.join(directory, ckpt.MANIFEST)) else ckpt.latest_checkpoint(directory)
        if path is None:
            from memstore.checkpoint import CheckpointError

            raise CheckpointError(f"no complete checkpoint in {directory}", directory)
        manifest = ckpt.read_manifest(path)
        if manifest.get("kind") == ckpt.SHARD_KIND and len(manifest["shards"]) < manifest["store"]["num_shards"]:
            held = ", ".join(str(m["shard_index"]) for m in manifest["shards"])
            raise ckpt.CheckpointError(f"{path} is a checkpoint of shard {held} of {manifest['store']['num_shards']} "
                                       "alone (a standalone shard's base): a store restores from a checkpoint of "
                                       "every shard", path)
        with self._cut_lock:
            with self._lock:
                if request and self.recovery.get("request") == request:  # done by a predecessor
                    return dict(self.recovery["result"]) | {"seconds": 0.0, "repeated": True}
            own_root = Path(self.data_dir) / "checkpoints"
            version = self._next_generation(*(v for v, _ in ckpt._numbered_checkpoints(own_root)))
            t0 = time.monotonic()
            # The recovery point must outlive the directory given (pruned, deleted, another
            # store's): the store keeps its own copy, hard-linked where the disk allows.
            pinned = ckpt.link_checkpoint(path, ckpt.checkpoint_dir(own_root, version))
            result = {"path": str(path), "tables": len(manifest["tables"]),
                      "from_shards": manifest["store"]["num_shards"]}
            pending = {"checkpoint": str(pinned), "wal_since": version, "version": version,
                       "created": manifest["store"].get("created", time.time()), "tables": dict(manifest["tables"]),
                       "request": request, "result": result}
            begun = swapped = False

            def swap() -> None:  # while every shard is frozen
                nonlocal begun, swapped
                with self._lock:  # recorded before any shard swaps: a recovery from here on finishes it
                    self.restoring = pending
                    try:
                        self._persist()
                    except BaseException:
                        self.restoring = None
                        raise
                begun = True
                # Before writes flow (all still frozen): from here a shard restarting loads the restore.
                if not self._finish_restore_live():
                    held = self._hold_unswapped(version, str(path))
                    raise RuntimeError(f"shards did not take the restore within {RESTORE_FINISH_S:.0f} s; "
                                       f"shards {held} refuse lookups and writes until they do")
                swapped = True

            try:
                ray.get([a.prepare_restore.remote(str(path)) for a in self._actors])  # loads outside the cut
                take_cut([_ShardCut(a, i) for i, a in enumerate(self._actors)], swap)
            except BaseException as e:
                for a in self._actors:  # no shard keeps a prepared copy of every table
                    with contextlib.suppress(ray.exceptions.RayError):
                        ray.get(a.drop_restore.remote(), timeout=30)
                if not begun:
                    shutil.rmtree(pinned, ignore_errors=True)
                    raise
                if not swapped:
                    raise RuntimeError(f"the restore of {path} reached only some shards ({e}); the store's record "
                                       "finishes it at the next recovery, a checkpoint, or a restore again") from e
                # Every shard swapped and the restore is recorded; only a thaw failed (that
                # shard's freeze lapses after its lease): done, not to be restored again.
                log.warning("store %s: restore %s done, but a shard did not thaw: %s", self.store, version, e)
            self._prune_logs(version)
            return result | {"seconds": time.monotonic() - t0}

    def _hold_unswapped(self, version: int, path: str) -> list[int]:
        """After a restore's swap failed part-way (inside its cut): the shards that did not
        swap refuse lookups and writes until they do (a write to rows that are going would be
        lost). Returns their indices; a shard that cannot be told is down, and loads the
        restore when it comes back."""
        refs = [a.hold_restore.remote(version, path) for a in self._actors]  # all at once: the cut's lease runs
        ray.wait(refs, num_returns=len(refs), timeout=CUT_CALL_S)
        held = []
        for i, ref in enumerate(refs):
            try:
                if ray.get(ref, timeout=0):
                    held.append(i)
            except ray.exceptions.RayError:  # not answered in time, or down
                held.append(i)
        return held

    def _prune_logs(self, before: int) -> None:
        """The shards' logs older than generation `before`, once recovery points past them;
        a shard that cannot prune now keeps them (logged): they cost disk, not correctness."""
        for i, a in enumerate(self._actors):
            try:
                ray.get(a.prune_log.remote(before), timeout=CUT_CALL_S)
            except ray.exceptions.RayError as e:  # a timeout too
                log.warning("store %s: shard %d kept its logs before generation %d: %s", self.store, i, before, e)

    @staticmethod
    def _all(refs: list, timeout_s: float) -> list:
        """ray.get of one call per shard, within timeout_s; Unavailable naming the shards
        that did not answer."""
        ready, late = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if late:
            for ref in late:
                ray.cancel(ref)
            raise Unavailable(f"shards {[refs.index(r) for r in late]} did not answer within {timeout_s:.0f} s")
        return ray.get(refs)

    def _next_generation(self, *taken: int) -> int:
        """The version of a new cut (checkpoint or restore): above every one handed out, and so
        a log generation no shard has used. A cut that failed after some shards rotated their
        logs leaves its generation's files behind, with writes the next cut must not replay on
        top of its own copy."""
        self._generation = max(self._generation, self.recovery["version"], *taken) + 1
        return self._generation

    def log_bytes(self, timeout_s: float = 5.0) -> list[int | None]:
        """Each shard's write-ahead log bytes since the recovery point (None: no answer)."""
        with self._lock:
            since = self.recovery["wal_since"]
        refs = [a.log_bytes.remote(since) for a in self._actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref) if ref in ready else None)
            except ray.exceptions.RayError:
                out.append(None)
        return out

    def shard_states(self) -> list[str]:
        """Ray's state of each shard actor: ALIVE, RESTARTING (its process died and Ray is
        bringing it back: until its log is replayed), DEAD, PENDING_CREATION, or UNKNOWN."""
        return [_actor_state(a) for a in self._actors]

    def death_causes(self) -> list[str | None]:
        """For each DEAD shard actor, why it died (one line); None for the others."""
        return [_death_cause(a) if _actor_state(a) == "DEAD" else None for a in self._actors]

    def progress(self) -> tuple[int, int]:
        """(done, total) bytes over all shards of the checkpoint write or restore under way."""
        ready, _ = ray.wait([a.progress.remote() for a in self._actors], num_returns=len(self._actors), timeout=2)
        pairs = [ray.get(r) for r in ready]
        return sum(d for d, _ in pairs), sum(t for _, t in pairs)

    def actors(self) -> list:
        return list(self._actors)

    def shutdown(self) -> None:
        """Stops every shard server gracefully, then kills the shard actors."""
        try:
            ray.get([a.stop.options(max_task_retries=0).remote() for a in self._actors], timeout=30)
        except ray.exceptions.RayError:
            pass
        for a in self._actors:
            ray.kill(a, no_restart=True)
        self._actors = []
        if self.owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        elif not self._came_up:
            # A new store's `up` that failed: the dir the user gave is left as found, less
            # the record and the logs that never got a record.
            from memstore import wal
            from memstore.durable import LOCK_FILE

            storefile.remove(self.data_dir)
            (Path(self.data_dir) / LOCK_FILE).unlink(missing_ok=True)
            for shard_dir in Path(self.data_dir, "wal").glob("shard-*-of-*"):
                for _, path in wal.wal_files(shard_dir):
                    if path.stat().st_size <= len(wal.MAGIC):
                        path.unlink(missing_ok=True)
                if not wal.wal_files(shard_dir):
                    (shard_dir / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    shard_dir.rmdir()  # only if empty
