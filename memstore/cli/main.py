"""Entry point of the `memstore` command: parses flags, dispatches, maps failures to exit codes.

Every failure becomes one line on stderr and a documented exit code (`ExitStatus`);
`--debug` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import enum
import logging
import sys
import traceback

from memstore.cli import checkpoint, demo, down, exp, health, ls, plan, restore, serve, stats, status, train, up
from memstore.errors import InvalidArgument, StoreNotFound, TableNotFound, Unavailable

SUBCOMMANDS = {
    "serve": serve, "demo": demo, "up": up, "down": down, "ls": ls, "health": health,
    "status": status, "checkpoint": checkpoint, "restore": restore, "train": train, "stats": stats,
    "exp": exp, "plan": plan,
}


class ExitStatus(enum.IntEnum):
    OK = 0
    ERROR = 1  # the command failed (bad input, a rejected request)
    UNAVAILABLE = 2  # the store or a shard could not be reached / not found
    USAGE = 64  # bad flags (argparse itself exits with 2 on syntax errors)
    INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memstore", description="A sharded memory store for Engram tables.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return SUBCOMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
    except Exception as e:  # the one ladder that turns failures into exit codes
        if args.debug:
            traceback.print_exc()
        e = getattr(e, "cause", None) or e  # a failure inside a Ray actor: report its cause
        ray = sys.modules.get("ray")
        if ray is not None and isinstance(e, ray.exceptions.RayActorError):  # a shard or coordinator is dead
            from cluster.store import _root_cause

            print(f"memstore {args.command}: error: an actor of the store died: {_root_cause(e)}", file=sys.stderr)
            return ExitStatus.UNAVAILABLE
        if isinstance(e, (Unavailable, StoreNotFound, TableNotFound)):
            status = ExitStatus.UNAVAILABLE
        elif isinstance(e, (ValueError, InvalidArgument)):
            status = ExitStatus.USAGE
        else:
            status = ExitStatus.ERROR
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"memstore {args.command}: error: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
