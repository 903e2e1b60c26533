"""Frames, payload views and spec messages.

Run: python -m pytest tests/test_wire.py -q
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from memstore import wire
from memstore.errors import InvalidArgument
from memstore.spec import InitSpec, OptimizerSpec, TableSpec
from memstore.v1 import memstore_pb2 as pb


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_frame_round_trip(dtype):
    keys = np.array([3, 1, 4, 1 << 40], dtype=np.int64)
    values = torch.randn(4, 6).to(getattr(torch, dtype))
    header = pb.UpdateRequest(table="t", num_keys=4, dim=6, dtype=wire.DTYPE_TO_PB[dtype], lr=0.5, update_id="u")
    frame = wire.encode_frame(header, keys, wire.tensor_bytes(values))
    assert len(frame) == 4 + header.ByteSize() + keys.nbytes + values.numel() * values.element_size()
    got, payload = wire.decode_frame(frame, pb.UpdateRequest)
    assert got == header
    k, v = wire.split_payload(payload, got.num_keys, got.dim, dtype, "gradient")
    np.testing.assert_array_equal(k, keys)
    assert v.dtype == values.dtype and torch.equal(v, values)


def test_payload_views_do_not_copy():
    keys = np.arange(5, dtype=np.int64)
    frame = wire.encode_frame(pb.LookupRequest(num_keys=5), keys)
    _, payload = wire.decode_frame(frame, pb.LookupRequest)
    k = wire.keys_from_payload(payload, 5)
    assert not k.flags.owndata


def test_bad_frames_are_invalid_argument():
    for frame in (b"", b"\x01\x00", (99).to_bytes(4, "little") + b"x"):
        with pytest.raises(InvalidArgument, match="truncated"):
            wire.decode_frame(frame, pb.LookupRequest)
    with pytest.raises(InvalidArgument, match="malformed"):
        wire.decode_frame((2).to_bytes(4, "little") + b"\xff\xff", pb.LookupRequest)
    with pytest.raises(InvalidArgument, match="payload is 15 bytes"):
        wire.split_payload(memoryview(bytes(15)), 1, 2, "float32", "gradient")
    with pytest.raises(InvalidArgument, match="key payload"):
        wire.keys_from_payload(memoryview(bytes(12)), 2)


def test_spec_round_trips_through_proto_and_dict():
    spec = TableSpec("engram.l1.h3", num_rows=2_262_401, dim=160, dtype="bfloat16", wire_dtype="float32",
                     init=InitSpec("uniform", bound=0.02), seed=2**40 + 3,
                     optimizer=OptimizerSpec("sgd", momentum=0.5, weight_decay=0.1, stochastic_rounding=True))
    assert wire.spec_from_pb(wire.spec_to_pb(spec)) == spec
    assert TableSpec.from_dict(spec.to_dict()) == spec
    plain = dataclasses.replace(spec, optimizer=OptimizerSpec("sgd", momentum=0.5, weight_decay=0.1))
    assert wire.spec_from_pb(wire.spec_to_pb(plain)) == plain != spec
    assert TableSpec("a", 1, 1).wire_dtype == "float32"
    assert TableSpec("a", 1, 1, dtype="float16").wire_dtype == "float16"


@pytest.mark.parametrize("bad,match", [
    (dict(name="", num_rows=1, dim=1), "table name"),
    (dict(name="a b", num_rows=1, dim=1), "table name"),
    (dict(name="a", num_rows=0, dim=1), "num_rows"),
    (dict(name="a", num_rows=1, dim=0), "dim"),
    (dict(name="a", num_rows=1, dim=1, dtype="int8"), "dtype"),
    (dict(name="a", num_rows=1, dim=1, init={"kind": "xavier"}), "init kind"),
    (dict(name="a", num_rows=1, dim=1, optimizer={"kind": "adam", "beta1": 1.0}), "betas"),
    (dict(name="a", num_rows=1, dim=1, optimizer={"kind": "adam", "lr": 1.0}), "lr"),
    (dict(name="a", num_rows=1, dim=1, colour="red"), "unknown fields"),
    (dict(name="a", dim=1), "needs name, num_rows and dim"),
])
def test_bad_specs_are_rejected_with_the_field_named(bad, match):
    with pytest.raises(InvalidArgument, match=match):
        TableSpec.from_dict(bad)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_new_frame_is_filled_in_place(dtype):
    values = torch.randn(5, 3).to(getattr(torch, dtype))
    header = pb.LookupResponse(num_keys=5, dim=3, dtype=wire.DTYPE_TO_PB[dtype], version=7)
    frame, rows = wire.new_frame(header, 5, 3, dtype)
    rows.copy_(values)
    assert isinstance(frame, bytes) and frame == wire.encode_frame(header, wire.tensor_bytes(values))
    got, payload = wire.decode_frame(frame, pb.LookupResponse)
    assert got.version == 7 and torch.equal(wire.rows_from_buffer(payload, 5, 3, dtype), values)
    empty, rows = wire.new_frame(pb.LookupResponse(), 0, 3, dtype)
    assert rows.shape == (0, 3) and wire.decode_frame(empty, pb.LookupResponse)[1].nbytes == 0
