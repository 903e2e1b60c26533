"""Regenerates the protobuf code in memstore/v1/ from protos/ (the wire contract).

Run from a source checkout: `python -m memstore.protogen`. Needs grpcio-tools (the `dev`
extra). tests/test_protos.py regenerates into a temporary folder and fails when the
checked-in code differs, so the contract and the code cannot drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
SOURCES = ("memstore/v1/memstore.proto",)


def generate(out_dir: Path) -> list[Path]:
    """Writes memstore/v1/*_pb2.py(i) under out_dir; returns the files written."""
    from grpc_tools import protoc  # dev-only dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", *SOURCES]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    return sorted(p for p in (out_dir / "memstore" / "v1").iterdir() if p.suffix in (".py", ".pyi"))


if __name__ == "__main__":
    written = generate(ROOT)
    print("\n".join(str(p.relative_to(ROOT)) for p in written))
    sys.exit(0)
