"""The checked-in generated code matches protos/, and the server serves every RPC of it.

Run: python -m pytest tests/test_protos.py -q
"""

from __future__ import annotations

from pathlib import Path

from memstore import protogen
from memstore.server import MemStoreServicer
from memstore.v1 import memstore_pb2 as pb

GENERATED = Path(protogen.ROOT) / "memstore" / "v1"


def test_generated_code_is_in_sync_with_protos(tmp_path):
    fresh = protogen.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        checked_in = GENERATED / path.name
        assert checked_in.exists(), f"{path.name} is generated but not checked in; run python -m memstore.protogen"
        assert checked_in.read_bytes() == path.read_bytes(), (
            f"memstore/v1/{path.name} is out of sync with protos/; run python -m memstore.protogen"
        )


def test_every_rpc_has_a_servicer_method():
    methods = [m.name for m in pb.DESCRIPTOR.services_by_name["MemStore"].methods]
    assert {"CreateTable", "DescribeTable", "ListTables", "DropTable", "Lookup", "LookupMany", "Update", "UpdateMany", "Assign", "Stats"} <= set(methods)
    for name in methods:
        assert callable(getattr(MemStoreServicer, name, None)), f"no servicer method for RPC {name}"
