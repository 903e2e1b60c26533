"""`memstore health`: ask every shard's grpc.health.v1 service, with a deadline.

Exit codes (for container and Kubernetes probes): 0 every shard serving, 1 degraded (some
shard not serving or not answering), 2 store not found or Ray unreachable.
"""

from __future__ import annotations

import argparse
import math

DEGRADED = 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("health", help="check every shard of a store (exit 0 serving, 1 degraded, 2 not found)")
    p.add_argument("name", help="the store's name")
    p.add_argument("--address", help="Ray cluster (default $RAY_ADDRESS, else the local Ray)")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline per shard in seconds (default 2)")


def check(address: str, timeout: float) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from memstore.service import SERVICE

    try:
        with grpc.insecure_channel(address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as e:
        return "UNREACHABLE" if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else e.code().name


def run(args: argparse.Namespace) -> int:
    from cluster import store

    if not 0 < args.timeout < math.inf:
        raise ValueError(f"--timeout must be > 0 seconds and finite, got {args.timeout}")
    store.ensure_ray(args.address)
    layout = store.layout(args.name, args.timeout + store.COORDINATOR_WAIT_S)
    states = [check(s["address"], args.timeout) for s in layout["shards"]]
    if any(st != "SERVING" for st in states):  # name the shards Ray is bringing back (not serving yet)
        ray_states = store.shard_states(args.name, args.timeout + store.COORDINATOR_WAIT_S)
        # Ray's word where it has one: RESTARTING (coming back), DEAD (its recovery failed for
        # good: why, from Ray's record of it), PENDING_CREATION (no node can place it).
        states = [r if st != "SERVING" and r in ("RESTARTING", "DEAD", "PENDING_CREATION") else st
                  for st, r in zip(states, ray_states, strict=True)]
    causes = store.death_causes(args.name, args.timeout + store.COORDINATOR_WAIT_S) if "DEAD" in states else []
    for i, (s, state) in enumerate(zip(layout["shards"], states)):
        cause = f": {causes[i] or 'no cause on record (see its Ray worker log)'}" if state == "DEAD" else ""
        print(f"shard {s['shard_index']:>3}  {s['address']:<22} {state}{cause}")
    serving = sum(st == "SERVING" for st in states)
    print(f"store {args.name!r}: {serving}/{len(states)} shards serving")
    return 0 if states and serving == len(states) else DEGRADED  # no shards (yet) is not healthy
