"""The shard actor of a store on Ray, and the names both of a store's actors go by.

`_ShardActor` places and restarts a shard: it runs the store-core `ShardServer` on its node's
address, journals every write to a write-ahead log before acknowledging it, and when Ray
restarts it (its process died), reloads the recovery checkpoint and replays its log before
serving again, so no acknowledged update is lost. It then registers its new address, which
bumps the epoch so clients re-resolve. The data directory must be reachable from every
memory node (shared storage) for a shard to come back on another node. Shard actors are
named ("shard:NAME/i") and detached, so that they serve on while their coordinator
(cluster/coordinator.py) restarts.
"""

from __future__ import annotations

import collections
import math
import os
import threading
from pathlib import Path

import ray

NAMESPACE = "memstore"
RESOURCE = "memstore"  # custom resource that marks the nodes reserved for shards
# Each shard takes this share of a node's `memstore` resource: placement marks the node,
# it does not limit how many shards a node holds. Ray counts resources in steps of 0.0001;
# at 0.0002 one node offering `memstore: 1` takes 5,000 shards, above the 4,096 a store may
# have (at 0.001 a store of more than 1,000 shards on one node never finished coming up).
RESOURCE_SHARE = 0.0002


def coordinator_name(store: str) -> str:
    return f"store:{store}"


def shard_actor_name(store: str, shard_index: int) -> str:
    return f"shard:{store}/{shard_index}"


class _ShardActor:
    """Runs shard `shard_index` of `num_shards` of store `store` on this node."""

    def __init__(self, store: str, shard_index: int, num_shards: int, data_dir: str, wal_sync: str,
                 recover: bool = False) -> None:
        from memstore import checkpoint, wal
        from memstore.durable import lock_directory
        from memstore.engine import ShardEngine
        from memstore.server import settle_shard_process
        from memstore.spec import TableSpec

        self.store = store
        self.shard_index = shard_index
        # Restarted by Ray, or created to resume a store from its data dir: either way it
        # loads the recovery point and replays its log.
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed or recover
        coordinator = ray.get_actor(coordinator_name(store), namespace=NAMESPACE)
        layout = ray.get(coordinator.layout.remote())
        self.wal_dir = Path(data_dir) / "wal" / checkpoint.shard_dirname(shard_index, num_shards)
        recovery = layout["recovery"]
        pending = layout.get("restoring")
        swapped = pending is not None and any(g >= pending["version"] for g, _ in wal.wal_files(self.wal_dir))
        if self.restarted and swapped:
            recovery = pending  # it had swapped in a restore not yet recorded whole: its log goes on from there
        if self.restarted and not any(g >= recovery["wal_since"] for g, _ in wal.wal_files(self.wal_dir)):
            # Serving fresh rows here would lose every acknowledged write without a word.
            raise RuntimeError(f"shard {shard_index} of store {store!r} restarted on {ray.util.get_node_ip_address()}, "
                               f"where its write-ahead log is not ({self.wal_dir} holds no log from generation "
                               f"{recovery['wal_since']}): for a shard to recover on another node the data dir "
                               "must be shared storage, the same files on every node")
        if not self.restarted and wal.wal_files(self.wal_dir):
            raise RuntimeError(f"{self.wal_dir} already holds a write-ahead log: another store's data "
                               "dir? Bring a new store up on a fresh --data-dir (or restore a checkpoint)")
        wal.make_dirs(self.wal_dir)
        # One process per log: a shard of an earlier incarnation of the store may still be dying.
        self._lock_fd = lock_directory(self.wal_dir, wait_s=30)
        if self.restarted and pending and not swapped:
            # A restore whose swap began (recorded before any shard swapped) and had not reached
            # this shard: it takes the restore now, rather than serve rows that are going (a
            # write to them would be lost at the swap). An empty log of the restore's
            # generation marks it swapped, as memstore.durable's recovery expects.
            wal.WriteAheadLog(wal.wal_path(self.wal_dir, pending["version"]), sync="always").close()
            recovery = pending

        self.engine = ShardEngine(shard_index, num_shards)
        if recovery["checkpoint"]:
            checkpoint.load_shard(recovery["checkpoint"], shard_index, num_shards, engine=self.engine)
        for spec in layout["tables"].values():  # created since the checkpoint: fresh, then the log
            if spec["name"] not in {t.spec.name for t in self.engine.tables()}:
                self.engine.create_table(TableSpec.from_dict(spec))
        self.replayed = wal.replay_into(self.engine, wal.replay_dir(self.wal_dir, since=recovery["wal_since"]))
        generations = [g for g, _ in wal.wal_files(self.wal_dir) if g >= recovery["wal_since"]]
        self.generation = max(generations, default=recovery["wal_since"])
        self.wal = wal.WriteAheadLog(wal.wal_path(self.wal_dir, self.generation), sync=wal_sync)
        self.engine.journal = self.wal.append
        self.engine.journal_failed = self.wal.fail
        self.engine.log_state = self._log_state
        self._snapshot = None  # taken at a cut, written after it
        self._restore = None  # a checkpoint's tables loaded for a restore, swapped in at its cut
        self._progress = (0, 0)  # (done, total) bytes of the checkpoint write or restore under way
        self._restoring = threading.Lock()  # one restore swap at a time (a finishing one may race the first)
        # Orders a cut's freeze and thaw here (the actor runs calls on several threads), and
        # guards _ended_cuts: the cuts already thawed, whose freeze arriving late (a shard
        # that was stopped while the cut gave up on it) must not freeze it again.
        self._cut_lock = threading.Lock()
        self._ended_cuts: collections.deque[str] = collections.deque(maxlen=64)

        self.server = _serve_in_port_range(self.engine, ray.util.get_node_ip_address())
        settle_shard_process()
        self.address = self.server.address
        self.node_id = ray.get_runtime_context().get_node_id()
        self.pid = os.getpid()
        if self.restarted:
            # Tell the coordinator where this incarnation serves; don't wait on it: it can
            # always ask us (refresh).
            coordinator.shard_restarted.remote(shard_index, self.info())

    def info(self) -> dict:
        return {"shard_index": self.shard_index, "address": self.address, "node_id": self.node_id, "pid": self.pid,
                "replayed": self.replayed.applied if self.restarted else 0,
                "metrics_address": self.server.metrics_address}

    def log_bytes(self, since: int) -> int:
        """Bytes of write-ahead log from generation `since` on (what a restart would replay)."""
        from memstore import wal

        return wal.log_bytes(self.wal_dir, since)

    def _log_state(self) -> dict:
        """memstore.v1.LogState's fields: for the shard's Stats, health and metrics."""
        failed = self.wal.failed
        return {"bytes": self.log_bytes(0), "failed": f"{type(failed).__name__}: {failed}" if failed else ""}

    def create_table(self, spec: dict) -> bool:
        """Whether this call made the table (False: it was there with this spec)."""
        from memstore.spec import TableSpec

        return self.engine.ensure_table(TableSpec.from_dict(spec))[1]

    def drop_table(self, name: str, drop_id: str) -> bool:
        return self.engine.drop_table(name, drop_id)

    # ---- the cut protocol (memstore.cut), driven by the coordinator ---------------------------
    def cut_freeze(self, drain_s: float = 60.0, cut: str = "") -> dict:
        with self._cut_lock:
            if cut and cut in self._ended_cuts:
                return {}  # that cut is over: nobody waits for this answer
            return self.engine.gate.freeze(timeout_s=drain_s)

    def cut_release(self, groups: list[str]) -> None:
        self.engine.gate.release(groups)

    def cut_applied(self, groups: list[str]) -> dict:
        return self.engine.gate.applied(groups)

    def cut_unfreeze(self, forget: bool = True, cut: str = "") -> None:
        from memstore import wal

        with self._cut_lock:
            if cut:
                self._ended_cuts.append(cut)
            try:
                if forget:  # before any later write reaches the log: replay forgets the groups here too
                    self.wal.append(wal.cut_record())
            finally:
                self.engine.gate.unfreeze(forget)

    def cut_snapshot(self, generation: int) -> int:
        """While frozen: copy the tables and start the log's next generation, both under one
        ShardFreeze, so every write is in the copy and the old log or in neither (and in the
        new log). Returns the copy's bytes."""
        from memstore import snapshot, wal
        from memstore.cut import CutLost

        if not self.engine.gate.frozen:  # Ray retried the call on a new incarnation of this shard
            raise CutLost(f"shard {self.shard_index} restarted during the cut")
        with snapshot.ShardFreeze(self.engine) as freeze:
            self._snapshot = snapshot.snapshot_shard(self.engine, freeze=freeze)
            self.wal.rotate(wal.wal_path(self.wal_dir, generation))
        self.generation = generation
        return self._snapshot.nbytes

    def drop_snapshot(self) -> None:
        self._snapshot = None

    def write_snapshot(self, staging: str) -> dict:
        """After the cut: write the copy under the checkpoint's staging directory."""
        from memstore import checkpoint
        from memstore.cut import CutLost

        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None:  # as above: the copy died with the shard's old process
            raise CutLost(f"shard {self.shard_index} restarted between the cut and writing its copy")
        return checkpoint.write_shard(snapshot, staging, progress=self._track)

    def _track(self, done: int, total: int) -> None:
        self._progress = (done, total)

    def progress(self) -> tuple[int, int]:
        return self._progress

    def prune_log(self, before: int) -> int:
        from memstore import wal

        return len(wal.prune_wal(self.wal_dir, before))

    def prepare_restore(self, directory: str) -> int:
        """Loads this shard's part of a checkpoint (any shard count) beside the live tables,
        before the cut, so writes wait only for the swap. Returns bytes loaded."""
        from memstore import checkpoint
        from memstore.engine import ShardEngine

        prepared = checkpoint.load_shard(directory, self.shard_index, self.engine.num_shards,
                                         engine=ShardEngine(self.shard_index, self.engine.num_shards),
                                         progress=self._track)
        with self._restoring:
            self._restore = prepared
        return sum(t.row_bytes + t.state_bytes for t in prepared.tables())

    def restore(self, generation: int, directory: str) -> int:
        """Swaps in the prepared tables (dropping the others) and starts a new log generation
        (the coordinator prunes older ones once recovery points past them), while frozen: in
        the restore's cut, or else frozen for the swap alone. Without a prepared copy (a
        coordinator finishing a restore begun earlier) it loads the checkpoint now."""
        from memstore import checkpoint, snapshot, wal
        from memstore.engine import ShardEngine

        with self._restoring:
            if self.generation >= generation:  # swapped already: a restarted coordinator finishing the restore
                self._restore = None
                return 0
            if self._restore is None:
                self._restore = checkpoint.load_shard(directory, self.shard_index, self.engine.num_shards,
                                                      engine=ShardEngine(self.shard_index, self.engine.num_shards))
            # Outside a cut (a coordinator finishing a restore begun earlier), frozen only for the swap.
            own_freeze = not self.engine.gate.frozen
            if own_freeze:
                self.engine.gate.freeze(lease_s=math.inf)
            try:
                fresh, self._restore = self._restore, None
                with snapshot.ShardFreeze(self.engine):
                    self.engine.replace_tables(fresh.tables())  # no log records: the log restarts below
                    self.wal.rotate(wal.wal_path(self.wal_dir, generation))
                self.generation = generation
                self.engine.gate.end_hold()
            finally:
                if own_freeze:
                    self.engine.gate.unfreeze(forget=False)
            return len(fresh.tables())

    def hold_restore(self, generation: int, directory: str) -> bool:
        """After a restore's swap failed somewhere: a shard that has not swapped refuses
        lookups and writes (UNAVAILABLE) until it does, rather than serve rows that are going
        (writes to them would be lost at the swap). Returns whether it holds."""
        with self._restoring:
            if self.generation >= generation:
                return False
            self.engine.gate.hold(f"shard {self.shard_index}: a restore of {directory} began and has not reached "
                                  "this shard, whose rows it replaces: `memstore restore` again finishes it")
            return True

    def drop_restore(self) -> None:
        """After a failed restore: let go of the prepared tables."""
        with self._restoring:
            self._restore = None

    def stop(self, grace_s: float = 2.0) -> None:
        self.server.stop(grace_s)
        self.wal.close()
        if self._lock_fd >= 0:
            fd, self._lock_fd = self._lock_fd, -1
            os.close(fd)  # and with it the flock


# Ports a shard may bind when MEMSTORE_PORT_BASE is set (deployments that publish a range).
PORT_RANGE = 64


def _serve_in_port_range(engine, host: str):
    """Starts the shard's server on a free port: any, or the first free one of
    MEMSTORE_PORT_BASE .. +PORT_RANGE (so several stores can share a node's published range),
    and its Prometheus metrics likewise from MEMSTORE_METRICS_PORT_BASE; the layout announces both."""
    from memstore.server import ShardServer

    server = _first_free(os.environ.get("MEMSTORE_PORT_BASE"), host, lambda port: ShardServer(engine, host, port))
    try:
        _first_free(os.environ.get("MEMSTORE_METRICS_PORT_BASE"), host, server.serve_metrics)
    except OSError:
        server.server.stop(None)  # release the gRPC port it bound
        raise
    return server.start()


def _first_free(base: str | None, host: str, bind):
    """bind(port) on any free port when base is unset, else on the first of base .. +PORT_RANGE
    that it binds without an OSError."""
    if not base:
        return bind(0)
    for port in range(int(base), int(base) + PORT_RANGE):
        try:
            return bind(port)
        except OSError:
            continue
    raise OSError(f"no free port in {base}..{int(base) + PORT_RANGE - 1} on {host}")
