"""Stores on Ray: bring one up, find it by name, take it down.

The public face of cluster/coordinator.py and cluster/actors.py. `deploy` joins (or starts) a
Ray cluster, creates the store's detached coordinator, which places the shard actors on the
nodes offering the `memstore` resource (all nodes when none does), and returns once every
shard serves.
`StoreDirectory` resolves a store's shard addresses for `MemStoreClient.connect`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import ray

from cluster import storefile
from cluster.actors import NAMESPACE, RESOURCE, coordinator_name, shard_actor_name
from cluster.coordinator import EXCEPTION_LINE, _Coordinator, raised_line
from memstore import errors
from memstore.errors import InvalidArgument, MemStoreError, StoreNotFound, Unavailable
from memstore.spec import TableSpec


# Where `ray start` records the address that ray.init(address="auto") connects to.
CURRENT_CLUSTER_FILE = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")
# Every Ray head offers this resource: the coordinator lives there, with the GCS it depends on,
# not on a memory node that may be removed.
HEAD_NODE_RESOURCE = "node:__internal_head__"
# How long a coordinator may take to answer an operator's question beyond the call's own
# deadline (health, status, ls), and a program's (a restarted coordinator answers only once
# it is back: that can take a while).
COORDINATOR_WAIT_S = 5.0
COORDINATOR_CALL_S = 120.0
# A store's name: it goes into actor names ("shard:NAME/i") and a default data dir's path.
STORE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


class _QuietTokenNotice(logging.Filter):
    """Drops Ray's notice that token authentication is on (a good state, printed on every
    connect once ~/.ray/auth_token exists): it broke the CLI's one-line messages. Ray's
    warning that authentication is *off* still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()


logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_QuietTokenNotice())


def ensure_ray(address: str | None = None, *, start_local: bool = False) -> str | None:
    """Connects this process to Ray; returns the GCS address of the local Ray head it started
    for this, or None when it joined a running Ray.

    address, else $RAY_ADDRESS, else a Ray already running on this machine; with
    start_local, a new local head (`ray start --head`) that outlives this process."""
    if ray.is_initialized():
        return None
    target = address or os.environ.get("RAY_ADDRESS") or "auto"
    # A Ray stopped without `ray stop` leaves its address file behind, and ray.init would
    # wait a long time on it, as on any address nothing listens at: look first.
    if target != "auto" and not _answers(target):
        raise Unavailable(f"cannot reach Ray at {target}: nothing accepts a connection there")
    if target != "auto" and not _speaks_grpc(target):  # ray.init would wait on it for minutes
        raise Unavailable(f"cannot reach Ray at {target}: what listens there is not a Ray GCS (no gRPC)")
    if target != "auto" or _local_ray_answers():
        try:
            ray.init(address=target, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")
            return None
        except (ConnectionError, RuntimeError) as e:
            if target != "auto" or not start_local:
                raise Unavailable(f"cannot reach Ray at {target}: {e}") from None
    elif not start_local:
        raise Unavailable("no Ray is running on this machine (give --address or set RAY_ADDRESS)")
    # Ray waits 30 s for a new head's GCS to publish its port; a host busy with other work
    # can take longer, and the wait costs nothing when the GCS is quick.
    env = {"RAY_gcs_server_port_wait_time_s": "120", **os.environ}
    subprocess.run([ray_executable(), "start", "--head", "--disable-usage-stats"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")
    return ray.get_runtime_context().gcs_address


def ray_executable() -> str:
    """The `ray` command of this Python environment (its bin/ may not be on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), "ray")
    return beside if os.path.exists(beside) else (shutil.which("ray") or "ray")


def stop_local_ray(gcs_address: str) -> int:
    """Stops the Ray whose GCS serves at gcs_address (one `ensure_ray` started): its GCS,
    raylet and helper processes, found by that address on their command lines; its workers
    exit with their raylet. Other Rays on this machine are left alone (unlike `ray stop`).
    Returns the number of processes signalled."""
    ray.shutdown()
    port = gcs_address.rsplit(":", 1)[1]
    # Ray's daemons name their GCS so; a user's `--address=` (a script, this CLI) is not matched,
    # but that of the Ray Client server `ray start --head` leaves running (reparented to init).
    markers = (f"--gcs_server_port={port}", f"--gcs-address={gcs_address}")
    client_server = ("ray.util.client.server", f"--address={gcs_address}")
    programs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(arg in markers for arg in argv) or all(arg in argv for arg in client_server):
            programs[int(entry)] = os.path.basename(argv[0])
    # the raylet's agents (dashboard, runtime env) name no address
    pids = list(programs) + _descendants(list(programs))
    pids = [p for p in pids if p not in _ancestors()]  # never this process or what runs it
    # As `ray stop` does: the raylet first (its agents exit with it), the GCS last: a GCS sent
    # SIGTERM while its raylet runs waits out the whole grace period (10 s here).
    raylet = [p for p in pids if programs.get(p) == "raylet"]
    gcs = [p for p in pids if programs.get(p) == "gcs_server"]
    for wave in (raylet, [p for p in pids if p not in raylet and p not in gcs], gcs):
        _terminate(wave)
    with contextlib.suppress(OSError):
        with open(CURRENT_CLUSTER_FILE) as f:
            stale = f.read().strip() == gcs_address
        if stale:
            os.remove(CURRENT_CLUSTER_FILE)
    return len(pids)


def _terminate(pids: list[int]) -> None:
    """SIGTERM to pids, SIGKILL to those still running 10 s later; returns when all have
    exited or 5 s after that."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.1)
        if not any(_running(p) for p in pids):
            return


def _descendants(roots: list[int]) -> list[int]:
    """Every live process below `roots` in the process tree, from /proc's parent ids."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in roots and child not in out:
                out.append(child)
                todo.append(child)
    return out


def _ancestors() -> set[int]:
    """This process and its parents up to init."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def _local_ray_address() -> str | None:
    """The GCS address in Ray's address file (the Ray `ray start` last started here)."""
    try:
        with open(CURRENT_CLUSTER_FILE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _local_ray_answers(timeout_s: float = 1.0) -> bool:
    """Whether the Ray that `address="auto"` would pick (Ray's address file) accepts a TCP
    connection: a Ray stopped without `ray stop` leaves the file behind."""
    address = _local_ray_address()
    return address is not None and _answers(address, timeout_s)


def _answers(address: str, timeout_s: float = 5.0) -> bool:
    """Whether HOST:PORT (or ray://HOST:PORT) accepts a TCP connection. An address of another
    form (e.g. "local") is left for ray.init to judge: True."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return True
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _speaks_grpc(address: str, timeout_s: float = 5.0) -> bool:
    """Whether HOST:PORT answers gRPC, as a Ray GCS does: a call of a method no server has
    comes back UNIMPLEMENTED (or refused as unauthenticated) from one; a server of another
    protocol fails it as UNAVAILABLE. ray:// and other forms are left for ray.init: True."""
    import grpc

    if address.startswith("ray://") or not address.rpartition(":")[2].isdigit():
        return True
    with grpc.insecure_channel(address) as channel:
        try:
            channel.unary_unary("/memstore.v1.Probe/Ping")(b"", timeout=timeout_s)
        except grpc.RpcError as e:
            return e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return True


def memory_resource() -> str | None:
    """The custom resource shards ask for: `memstore` when some node offers it, else none."""
    return RESOURCE if ray.cluster_resources().get(RESOURCE, 0) > 0 else None


def find(name: str):
    """The coordinator actor of store `name`; StoreNotFound if there is none."""
    try:
        return ray.get_actor(coordinator_name(name), namespace=NAMESPACE)
    except ValueError:
        raise StoreNotFound(f"no store named {name!r} on this Ray cluster") from None


def default_data_dir(name: str) -> str:
    """A fresh directory for one deployment's logs and checkpoints (local to this machine:
    pass a shared path for shards to recover on other nodes)."""
    root = os.environ.get("MEMSTORE_DATA_DIR") or os.path.join(tempfile.gettempdir(), "memstore")
    return os.path.join(root, f"{name}-{uuid.uuid4().hex[:8]}")


def deploy(name: str, num_shards: int, specs: list[TableSpec], *, data_dir: str | None = None,
           wal_sync: str | None = None, started_local_ray: str | None = None) -> dict:
    """Brings store `name` up (Ray must be connected); idempotent for the same shard count.

    data_dir holds the shards' write-ahead logs and, by default, their checkpoints (one chosen
    here is removed at shutdown; one given is kept). A data dir that holds this store (its
    store.json: the store went down, or its whole Ray cluster did) resumes it: every shard
    loads the recovery checkpoint and replays its log, so no acknowledged write is lost;
    `specs` new to it are created, the others must match. wal_sync
    is the log's durability: "always" (fsync per write; the default), "group" (shared fsyncs)
    or "none"; given to a store that is up already, it must be the store's.
    started_local_ray: the GCS address of a local Ray started for this store, for `down`."""
    data_dir = os.path.abspath(data_dir) if data_dir else None  # the actors' working dir is not ours
    check_deploy(num_shards, specs, wal_sync or "always", name=name, data_dir=data_dir)  # the coordinator checks again
    for attempt in range(10):  # another deploy or shutdown of the name may be under way
        try:
            return _join(find(name), name, num_shards, specs, data_dir, wal_sync)
        except StoreNotFound:
            pass
        try:
            coordinator = (
                ray.remote(_Coordinator)
                .options(name=coordinator_name(name), namespace=NAMESPACE, lifetime="detached", num_cpus=0,
                         max_concurrency=16, max_restarts=-1, max_task_retries=-1,
                         resources={HEAD_NODE_RESOURCE: 0.001})
                .remote(name, num_shards, data_dir or default_data_dir(name), wal_sync or "always", started_local_ray,
                        data_dir is None)
            )
            break
        except ray.exceptions.ActorAlreadyExistsError:  # another deploy of the name got there first
            time.sleep(0.1 * attempt)
    else:
        raise Unavailable(f"store {name!r} is being brought up or down by another call meanwhile: try again")
    try:
        # Never retried on a restarted coordinator: that one resumes from the record, or fails.
        return ray.get(coordinator.start.options(max_task_retries=0).remote([s.to_dict() for s in specs],
                                                                            memory_resource()))
    except ray.exceptions.RayError as e:
        # No half-made store left behind: a later `up` of the name would find it and call it up.
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(coordinator.shutdown.options(max_task_retries=0).remote(), timeout=60)
        ray.kill(coordinator, no_restart=True)
        _kill_shard_actors(name, num_shards)
        cause = _root_cause(e)
        raise _error_class(cause)(f"store {name!r} did not come up: {cause}") from None


def _join(existing, name: str, num_shards: int, specs: list[TableSpec], data_dir: str | None = None,
          wal_sync: str | None = None) -> dict:
    """deploy() of a store that is up, or being brought up by another deploy: its layout once
    whole, with `specs` created, and "joined": True."""
    try:
        started = ray.get(existing.started.remote())
    except ray.exceptions.RayActorError:  # that deploy failed, and took its coordinator down
        raise Unavailable(f"store {name!r} did not come up (another deploy of it failed): try again") from None
    if not started:
        raise Unavailable(f"store {name!r} is being brought up by another deploy, which has not finished")
    layout = ray.get(existing.layout.remote())
    if layout["num_shards"] != num_shards:
        raise InvalidArgument(f"store {name!r} is already up with {layout['num_shards']} shards, not {num_shards}")
    if data_dir is not None and os.path.realpath(data_dir) != os.path.realpath(layout["data_dir"]):
        raise InvalidArgument(f"store {name!r} is already up on data dir {layout['data_dir']}, not {data_dir}")
    if wal_sync is not None and wal_sync != layout.get("wal_sync", wal_sync):
        raise InvalidArgument(f"store {name!r} is already up with wal sync {layout['wal_sync']}, not {wal_sync}")
    if not layout["shards"]:
        raise Unavailable(f"store {name!r} did not come up (another deploy of it failed): try again")
    for spec in specs:
        ray.get(existing.create_table.remote(spec.to_dict()))
    return ray.get(existing.layout.remote()) | {"joined": True}


def check_deploy(num_shards: int, specs: list[TableSpec], wal_sync: str = "always", *, name: str | None = None,
                 data_dir: str | None = None) -> None:
    """deploy's argument checks, which callers run before they start anything (a local Ray);
    with name and data_dir, also that the data dir holds no other store."""
    if name is not None and not STORE_NAME.fullmatch(name):
        raise InvalidArgument(f"store name {name!r} must be 1-100 letters, digits, '.', '_' or '-', not starting "
                              "with '.' (it names Ray actors and a data dir)")
    if not 1 <= num_shards <= 4096:
        raise InvalidArgument(f"a store needs 1..4096 shards, got {num_shards}")
    if wal_sync not in ("always", "group", "none"):
        raise InvalidArgument(f"wal sync must be always, group or none, got {wal_sync!r}")
    for spec in specs:
        spec.validate()
    if name is not None and data_dir is not None:
        storefile.check_resume(data_dir, name, num_shards)


def _kill_orphaned_shards(name: str) -> int:
    """Kills every shard actor of store `name`, found by name; returns how many. Only
    "shard:NAME/<i>": the shards of a store "NAME/b" (named before names were checked) are not its."""
    prefix = shard_actor_name(name, 0).rsplit("/", 1)[0] + "/"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == NAMESPACE and a["name"].startswith(prefix) and a["name"][len(prefix):].isdigit()]
    for n in names:
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(n, namespace=NAMESPACE), no_restart=True)
    return len(names)


def _kill_shard_actors(name: str, num_shards: int) -> None:
    """Kills shard actors of store `name` that outlived their coordinator (they are detached)."""
    for i in range(num_shards):
        try:
            ray.kill(ray.get_actor(shard_actor_name(name, i), namespace=NAMESPACE), no_restart=True)
        except ValueError:
            continue


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost error of a Ray failure (an actor's creation task, a
    task's exception), without Ray's traceback and colour codes."""
    while getattr(e, "cause", None) is not None and e.cause is not e:
        e = e.cause
    if "raised in its creation task" in str(e):  # ActorDiedError: the creation task's exception is only in its text
        return raised_line(str(e)) or type(e).__name__
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _error_class(cause: str) -> type[MemStoreError]:
    """The memstore error a shard raised, named in `cause` (so a table too large for its host
    stays ResourceExhausted, bad input InvalidArgument); Unavailable for any other failure."""
    m = EXCEPTION_LINE.match(cause)
    cls = getattr(errors, m.group("cls") or "", None) if m else None
    return cls if isinstance(cls, type) and issubclass(cls, MemStoreError) else Unavailable


def _ask(name: str, ref, timeout_s: float):
    """ray.get of a call to store `name`'s coordinator, within timeout_s: a coordinator that
    does not answer (its process stopped, its node gone) must not hang `health`, a probe."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise Unavailable(f"the coordinator of store {name!r} did not answer within {timeout_s:g} s") from None


def layout(name: str, timeout_s: float = COORDINATOR_CALL_S) -> dict:
    return _ask(name, find(name).layout.remote(), timeout_s)


def death_causes(name: str, timeout_s: float = COORDINATOR_CALL_S) -> list[str | None]:
    """For each DEAD shard of store `name`, why it died (one line); None for the others."""
    return _ask(name, find(name).death_causes.remote(), timeout_s)


def shard_states(name: str, timeout_s: float = COORDINATOR_CALL_S) -> list[str]:
    """Ray's state of each shard actor of store `name` (ALIVE, RESTARTING, ...)."""
    return _ask(name, find(name).shard_states.remote(), timeout_s)


def shutdown(name: str) -> str | None:
    """Takes store `name` down: its shards, then its coordinator. Returns the GCS address of
    the local Ray that `memstore up` started, once no store is left on it (the caller stops
    it then); while other stores remain, one of them inherits that duty."""
    try:
        coordinator = find(name)
    except StoreNotFound:
        if _kill_orphaned_shards(name):  # their coordinator died for good
            return None
        raise
    layout = ray.get(coordinator.layout.remote())
    started = layout["started_local_ray"]
    try:
        ray.get(coordinator.shutdown.options(max_task_retries=0).remote())
    finally:  # its detached shards must not outlive a coordinator that died meanwhile
        ray.kill(coordinator, no_restart=True)
        _kill_shard_actors(name, layout["num_shards"])
    for other in list_stores() if started else ():
        try:
            _ask(other["store"], find(other["store"]).adopt_local_ray.remote(started), COORDINATOR_WAIT_S)
            return None
        except (StoreNotFound, Unavailable, ray.exceptions.RayError):
            continue  # going down meanwhile itself, or not answering: the next one
    return started


def refresh_layout(name: str, timeout_s: float = 30.0) -> dict:
    """The layout after asking every shard where it serves now (each within timeout_s)."""
    return _ask(name, find(name).refresh.remote(timeout_s), timeout_s + COORDINATOR_WAIT_S)


def checkpoint(name: str, root: str | None = None, *, progress=None) -> dict:
    """A consistent checkpoint of every shard under root (default: the store's data dir), as
    root/ckpt-<version>; it becomes the store's recovery point. Returns its facts.
    progress: called with (done, total) bytes while the shards write."""
    coordinator = find(name)
    return _wait(coordinator, coordinator.checkpoint.remote(os.path.abspath(root) if root else None), progress)


def restore(name: str, directory: str, *, progress=None) -> dict:
    """Loads a checkpoint (a ckpt-<n> directory, or a root whose LATEST names one) into every
    shard of the store, whatever shard count wrote it."""
    coordinator = find(name)
    # The id keeps a restore that Ray runs again on a restarted coordinator from running twice.
    return _wait(coordinator, coordinator.restore.remote(os.path.abspath(directory), uuid.uuid4().hex), progress)


def _wait(coordinator, ref, progress, poll_s: float = 0.5):
    """ray.get(ref), reporting the shards' byte progress meanwhile."""
    while progress is not None and not ray.wait([ref], timeout=poll_s)[0]:
        progress(*ray.get(coordinator.progress.remote()))
    return ray.get(ref)


def list_stores() -> list[dict]:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == NAMESPACE and a["name"].startswith("store:")]
    out = []
    for n in sorted(names):
        name = n.split(":", 1)[1]
        try:
            out.append(layout(name, COORDINATOR_WAIT_S))
        except (StoreNotFound, ray.exceptions.RayError):
            continue  # taken down while we listed
        except Unavailable as e:  # listed, so that no caller takes it for gone
            out.append({"store": name, "unreachable": str(e)})
    return out


class StoreDirectory:
    """Where store `name`'s shards serve now; what MemStoreClient.connect routes by."""

    def __init__(self, name: str, address: str | None = None) -> None:
        ensure_ray(address)
        self.name = name
        self._coordinator = find(name)
        self.layout = ray.get(self._coordinator.layout.remote())

    @property
    def epoch(self) -> int:
        return self.layout["epoch"]

    def addresses(self) -> list[str]:
        return [s["address"] for s in self.layout["shards"]]

    def refresh(self) -> bool:
        """Re-reads the layout (asking the shards where they serve); True if it changed. A
        store taken down and resumed from its data dir (a new coordinator) is found anew; a
        new store of the same name is not: its rows are others."""
        old = self.addresses()
        try:
            layout = ray.get(self._coordinator.refresh.remote())
        except ray.exceptions.RayActorError:  # that coordinator is gone for good
            coordinator = find(self.name)
            layout = ray.get(coordinator.refresh.remote())
            if layout["created"] != self.layout["created"]:  # a resume keeps it; a new store does not
                raise Unavailable(f"store {self.name!r} was brought up anew, not resumed: connect to it anew") from None
            self._coordinator = coordinator
        if len(layout["shards"]) != layout["num_shards"]:  # a resume placing its shards: not yet
            return False
        self.layout = layout
        return self.addresses() != old

    def register_table(self, spec: TableSpec) -> None:
        ray.get(self._coordinator.register_table.remote(spec.to_dict()))

    def unregister_table(self, name: str) -> None:
        ray.get(self._coordinator.drop_table.remote(name))


def status(name: str, timeout_s: float = 2.0) -> dict:
    """One document about store `name`: per shard its place, state, tables, rows, bytes held
    next to process RSS, recent call rates and latencies, and log bytes since the last
    checkpoint; then a summary. States: SERVING, NOT_SERVING, RESTARTING (Ray is bringing the
    shard's actor back: states are Ray's when the call starts), DEAD (its recovery failed for
    good; "cause" says why, in one line), PENDING_CREATION (no node places it), UNREACHABLE. A restarting
    shard holds the call up to timeout_s."""
    from memstore.status import shard_status

    coordinator = find(name)
    states = _ask(name, coordinator.shard_states.remote(), COORDINATOR_WAIT_S)
    refreshed, logs = coordinator.refresh.remote(timeout_s), coordinator.log_bytes.remote(timeout_s)
    wait_s = timeout_s + COORDINATOR_WAIT_S
    layout, log_bytes = _ask(name, refreshed, wait_s), _ask(name, logs, wait_s)
    shards = [
        ({"shard_index": s["shard_index"], "address": s["address"], "node_id": s.get("node_id", ""),
          "metrics_address": s.get("metrics_address"), "state": state}
         if state in ("RESTARTING", "DEAD", "PENDING_CREATION") else shard_status(s, timeout_s)) | {"log_bytes": b}
        for s, b, state in zip(layout["shards"], log_bytes, states)
    ]
    if "DEAD" in states:  # why, from Ray's record of the actor (else only in its worker's log)
        causes = _ask(name, coordinator.death_causes.remote(), COORDINATOR_WAIT_S)
        for shard, cause in zip(shards, causes):
            if shard["state"] == "DEAD":
                shard["cause"] = cause
    recovery = layout["recovery"]
    serving = sum(s["state"] == "SERVING" for s in shards)
    return {
        "store": name,
        "epoch": layout["epoch"],
        "num_shards": layout["num_shards"],
        "tables": sorted(layout["tables"]),
        "data_dir": layout["data_dir"],
        "last_checkpoint": {"version": recovery["version"], "path": recovery["checkpoint"],
                            "age_s": time.time() - recovery["created"] if recovery.get("created") else None},
        # A restore whose swap began and is not finished: the shards that had not swapped refuse calls.
        "restoring": ({"version": layout["restoring"]["version"], "path": layout["restoring"]["checkpoint"]}
                      if layout.get("restoring") else None),
        "resumed": layout.get("resumed"),
        "shards": shards,
        "summary": {
            "serving": serving,
            "rows": sum(s.get("rows", 0) for s in shards),
            "bytes_held": sum(s.get("bytes_held", 0) for s in shards),
            "lookups_per_s": sum(s.get("lookups_per_s", 0.0) for s in shards),
            "updates_per_s": sum(s.get("updates_per_s", 0.0) for s in shards),
            "log_bytes": sum(b or 0 for b in log_bytes),
        },
    }
