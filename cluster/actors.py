"""The private Ray actors of a store: one coordinator, one actor per shard.

`_Coordinator` is a named, detached actor ("store:NAME" in the "memstore" namespace) that
owns the layout: table specs, shard count, shard addresses and an epoch that changes
whenever a shard moves or restarts. It creates the shard actors itself, so they belong to
it and outlive the driver that ran `memstore up`.

`_ShardActor` only places and restarts a shard: it runs the store-core `ShardServer` on its
node's address and reports where it serves. Ray restarts it when its process dies; the new
process registers its new address, which bumps the epoch so clients re-resolve.
"""

from __future__ import annotations

import os
import threading
import time

import ray

NAMESPACE = "memstore"
RESOURCE = "memstore"  # custom resource that marks the nodes reserved for shards
# Each shard takes this share of a node's `memstore` resource: placement marks the node,
# it does not limit how many shards a node holds.
RESOURCE_SHARE = 0.001


def coordinator_name(store: str) -> str:
    return f"store:{store}"


class _ShardActor:
    """Runs shard `shard_index` of `num_shards` of store `store` on this node."""

    def __init__(self, store: str, shard_index: int, num_shards: int, table_specs: list[dict]) -> None:
        from memstore.engine import ShardEngine
        from memstore.server import ShardServer
        from memstore.spec import TableSpec

        self.store = store
        self.shard_index = shard_index
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        coordinator = ray.get_actor(coordinator_name(store), namespace=NAMESPACE)
        if self.restarted:  # Ray re-runs __init__ with the first arguments; the tables may have changed
            table_specs = list(ray.get(coordinator.layout.remote())["tables"].values())
        self.engine = ShardEngine(shard_index, num_shards)
        for spec in table_specs:
            self.engine.create_table(TableSpec.from_dict(spec))
        host = ray.util.get_node_ip_address()
        base = os.environ.get("MEMSTORE_PORT_BASE")
        port = int(base) + shard_index if base else 0
        self.server = ShardServer(self.engine, host, port).start()
        self.address = self.server.address
        self.node_id = ray.get_runtime_context().get_node_id()
        self.pid = os.getpid()
        if self.restarted:
            # Tell the coordinator where this incarnation serves; don't wait on it: it can
            # always ask us (refresh).
            coordinator.shard_restarted.remote(shard_index, self.info())

    def info(self) -> dict:
        return {"shard_index": self.shard_index, "address": self.address, "node_id": self.node_id, "pid": self.pid}

    def create_table(self, spec: dict) -> None:
        from memstore.spec import TableSpec

        self.engine.create_table(TableSpec.from_dict(spec))

    def drop_table(self, name: str) -> bool:
        return self.engine.drop_table(name)

    def stop(self, grace_s: float = 2.0) -> None:
        self.server.stop(grace_s)


class _Coordinator:
    """The layout of one store; the only writer of it."""

    def __init__(self, store: str, num_shards: int, started_local_ray: bool = False) -> None:
        self.store = store
        self.num_shards = num_shards
        self.started_local_ray = started_local_ray
        self.created = time.time()
        self.tables: dict[str, dict] = {}  # name -> spec dict; guarded by _lock
        self.shards: list[dict] = []  # shard info by index; guarded by _lock
        self.epoch = 0  # guarded by _lock
        self._actors = []
        self._lock = threading.Lock()  # guards tables, shards and epoch (threaded actor)

    def start(self, table_specs: list[dict], resource: str | None) -> dict:
        """Creates the shard actors, waits until every shard serves, returns the layout."""
        options = {"max_restarts": -1, "max_task_retries": -1, "num_cpus": 0, "scheduling_strategy": "SPREAD"}
        if resource:
            options["resources"] = {resource: RESOURCE_SHARE}
        actor_cls = ray.remote(_ShardActor).options(**options)
        with self._lock:
            self.tables = {spec["name"]: spec for spec in table_specs}
        self._actors = [actor_cls.remote(self.store, i, self.num_shards, table_specs) for i in range(self.num_shards)]
        infos = ray.get([a.info.remote() for a in self._actors])
        with self._lock:
            self.shards = infos
            self.epoch += 1
        return self.layout()

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
            }

    def shard_restarted(self, shard_index: int, info: dict) -> int:
        with self._lock:
            if shard_index < len(self.shards):
                self.shards[shard_index] = info
            self.epoch += 1
            return self.epoch

    def refresh(self) -> dict:
        """Asks every shard where it serves now (a restarted one may not have reported yet)."""
        ready, _ = ray.wait([a.info.remote() for a in self._actors], num_returns=len(self._actors), timeout=30)
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
                if self.shards[i] != info:
                    self.shards[i] = info
                    changed = True
            if changed:
                self.epoch += 1
        return self.layout()

    def register_table(self, spec: dict) -> None:
        """Records a table created through a client, so restarted shards recreate it."""
        with self._lock:
            self.tables[spec["name"]] = spec

    def create_table(self, spec: dict) -> None:
        ray.get([a.create_table.remote(spec) for a in self._actors])
        self.register_table(spec)

    def drop_table(self, name: str) -> None:
        with self._lock:
            self.tables.pop(name, None)

    def actors(self) -> list:
        return list(self._actors)

    def shutdown(self) -> None:
        """Stops every shard server gracefully, then kills the shard actors."""
        try:
            ray.get([a.stop.remote() for a in self._actors], timeout=30)
        except ray.exceptions.RayError:
            pass
        for a in self._actors:
            ray.kill(a, no_restart=True)
        self._actors = []
