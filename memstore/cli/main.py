"""Entry point of the `memstore` command: parses flags, dispatches, maps failures to exit codes.

Every failure becomes one line on stderr and a documented exit code (`ExitStatus`);
`--debug` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import enum
import logging
import sys
import threading
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


class CommandStdout:
    """sys.stdout while a command runs: what the command's own thread writes reaches stdout,
    what any other thread writes goes to stderr. Ray's notice thread prints cluster notices
    (a killed worker, a dead node) on every driver's stdout, and each command here is a
    driver: stdout now holds the command's output only (one JSON document with --json)."""

    def __init__(self, stdout, stderr) -> None:
        self._stdout, self._stderr, self._owner = stdout, stderr, threading.get_ident()

    def _stream(self):
        return self._stdout if threading.get_ident() == self._owner else self._stderr

    def write(self, text: str) -> int:
        return self._stream().write(text)

    def flush(self) -> None:
        self._stream().flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding, ... of the real stdout
        return getattr(self._stdout, name)


def main(argv: list[str] | None = None, *, leave_ray: bool = False) -> int:
    """Runs one command; leave_ray also disconnects from Ray before stdout is given back
    (the `memstore` command): the notices Ray holds back and prints as a driver disconnects
    (the repeats it folded into one line) go to stderr as well."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stdout, sys.stdout = sys.stdout, CommandStdout(sys.stdout, sys.stderr)
    try:
        return _run(args)
    finally:
        try:
            sys.stdout.flush()
            ray = sys.modules.get("ray")
            if leave_ray and ray is not None and ray.is_initialized():
                sys.stdout = sys.stderr  # the command has had its say; Ray flushes held notices here
                ray.shutdown()
        except Exception as e:  # the command's outcome stands; a failed disconnect is one line
            print(f"memstore {args.command}: warning: disconnecting from Ray failed: {e}", file=sys.stderr)
        finally:
            sys.stdout = stdout


def command() -> int:
    """The `memstore` console command."""
    return main(leave_ray=True)


def _run(args: argparse.Namespace) -> int:
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
    sys.exit(command())
