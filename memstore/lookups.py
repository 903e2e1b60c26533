"""One lookup call, planned: what each shard is asked, and how what comes back is assembled.

`MemStoreClient` fans a `LookupCall`'s parts out and retries; the call decides the parts and
checks and places the answers. A table's keys are de-duplicated (memstore.keys). Shards on
this host (`delivering`) get the table's keys in a shared-memory lease (memstore.segments),
pick their own, and write the rows into the lease in place; the others get their keys in the
request, grouped by shard and split below the message limits, and reply with the rows, which
are copied into the same buffer. Every table's rows are counted: a call that got fewer or
more rows than it asked for fails.

Plain numpy/torch and the protobuf messages; no gRPC.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from memstore import keys as keyplan
from memstore import segments, wire
from memstore.errors import MemStoreError, TableChanged
from memstore.spec import TableSpec
from memstore.v1 import memstore_pb2 as pb

KEY_BYTES = 8  # a key on the wire: little-endian int64


def ranges(n: int, pieces: int) -> list[tuple[int, int]]:
    """[0, n) cut into `pieces` near-equal ranges (none when n is 0)."""
    cuts = [n * i // pieces for i in range(pieces + 1)]
    return [(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]


def chunks(keys: np.ndarray, row_bytes: int, max_bytes: int) -> list[np.ndarray]:
    """One shard's keys split into the fewest near-equal parts whose rows, and keys, each fit
    in max_bytes (rows under 8 bytes have more bytes of key than of row): 32,769 rows of 256
    bytes under 8 MiB go as two halves, not as 32,768 and a straggler of one (each request
    costs a round trip of its own)."""
    per = max(1, max_bytes // max(row_bytes, KEY_BYTES))
    return [keys[lo:hi] for lo, hi in ranges(len(keys), max(1, -(-len(keys) // per)))]


class LookupCall:
    """The lookups of {table: (spec, keys array)} over `num_shards` shards (module doc).

    parts: (shard, LookupRequest without route, payload pieces) per part; where[i]: (table,
    first buffer row of part i's reply, or None for a delivered part). lease(nbytes) gives
    the shared-memory lease when some shard delivers."""

    def __init__(self, jobs: dict[str, tuple[TableSpec, np.ndarray]], num_shards: int, delivering: set[int],
                 max_request_bytes: int, lease: Callable[[int], segments.Lease] | None) -> None:
        self.jobs = jobs
        self.num_shards = num_shards
        # Delivering shards pick their own keys: only replying ones need the keys grouped.
        self.plans = {name: keyplan.plan_keys(arr.reshape(-1), spec, num_shards, group=len(delivering) < num_shards)
                      for name, (spec, arr) in jobs.items()}
        sizes = {name: (segments.align(8 * p.buffer_rows), segments.align(p.buffer_rows * jobs[name][0].wire_row_bytes))
                 for name, p in self.plans.items()}
        nbytes, self.lease = sum(map(sum, sizes.values())), None
        if delivering and nbytes <= segments.MAX_LEASE_BYTES:
            try:
                self.lease = lease(nbytes)
            except OSError:  # no memfd to be had now (descriptors, memory): replies this time
                pass
        if self.lease is None and delivering:
            delivering = set()
            self.plans = {name: keyplan.plan_keys(arr.reshape(-1), spec, num_shards)
                          for name, (spec, arr) in jobs.items()}
        self.delivering = delivering
        replying = [s for s in range(num_shards) if s not in delivering]
        self.assemblers: dict[str, keyplan.RowAssembler] = {}
        self.parts: list[tuple[int, pb.LookupRequest, tuple]] = []
        self.where: list[tuple[str, int | None]] = []
        self.filled = dict.fromkeys(jobs, 0)  # rows each table got, replied or delivered
        at = 0
        for name, (spec, _) in jobs.items():
            plan, n, rb = self.plans[name], self.plans[name].buffer_rows, spec.wire_row_bytes
            buffer = None
            if self.lease is not None:  # the table's keys, then its rows [n, dim], in the lease
                keys_at, rows_at = at, at + sizes[name][0]
                self.lease.data[keys_at : keys_at + 8 * n] = plan.buffer_keys.view(np.uint8)
                region = self.lease.data[rows_at : rows_at + n * rb]
                buffer = torch.from_numpy(region).view(spec.wire_torch_dtype).view(n, spec.dim)
                self._delivered_parts(name, n, delivering, keys_at, rows_at,
                                      -(-n * rb // (num_shards * max_request_bytes)) or 1)
                at = rows_at + sizes[name][1]
            self.assemblers[name] = plan.assembler(spec.dim, spec.wire_torch_dtype, buffer)
            for shard in replying:
                start = int(plan.bounds[shard])
                for chunk in chunks(plan.shard_keys(shard), rb, max_request_bytes):
                    self.parts.append((shard, pb.LookupRequest(table=name, num_keys=len(chunk)), (chunk,)))
                    self.where.append((name, start))
                    start += len(chunk)

    def _delivered_parts(self, name: str, n: int, delivering: set[int], keys_at: int, rows_at: int,
                         pieces: int) -> None:
        """A delivering shard scans every key of its parts' ranges for its own; the ranges
        split its share of the rows as `chunks` splits a reply's."""
        spec, ref = self.jobs[name][0], self.lease.ref
        segment = pb.Segment(pid=ref.pid, fd=ref.fd, size=ref.size, token=ref.token)
        for shard in sorted(delivering):
            for lo, hi in ranges(n, pieces):
                delivery = pb.Delivery(segment=segment, keys_offset=segments.HEADER_BYTES + keys_at,
                                       rows_offset=segments.HEADER_BYTES + rows_at, first=lo,
                                       dim=spec.dim, dtype=wire.DTYPE_TO_PB[spec.wire_dtype])
                self.parts.append((shard, pb.LookupRequest(table=name, num_keys=hi - lo, delivery=delivery), ()))
                self.where.append((name, None))

    def request_bytes(self, i: int) -> int:
        """The bytes of rows part i reads (a delivered part: about its shard's share), or of
        the keys it sends where those are more, for packing parts into requests."""
        head = self.parts[i][1]
        if head.HasField("delivery"):  # its keys are in the segment, not the request
            return head.num_keys * self.jobs[head.table][0].wire_row_bytes // self.num_shards
        return head.num_keys * max(self.jobs[head.table][0].wire_row_bytes, KEY_BYTES)

    def place(self, members: list[int], heads: list[pb.LookupResponse], payload) -> None:
        """Checks and places one reply: the headers of its parts (part indices `members`) and
        its payload, each replied part's rows in turn."""
        if len(heads) != len(members):
            raise MemStoreError(f"lookup: a shard answered {len(heads)} parts, asked {len(members)}")
        at = 0
        for i, head in zip(members, heads):
            name, start = self.where[i]
            spec, asked = self.jobs[name][0], self.parts[i][1]
            size = 0 if start is None else asked.num_keys * spec.wire_row_bytes
            rows = self._rows(name, spec, head, payload[at : at + size], asked)
            if rows is not None:
                self.assemblers[name].put(start, rows)
            self.filled[name] += head.num_keys
            at += size
        if at != len(payload):
            raise MemStoreError(f"lookup: a shard's reply holds {len(payload)} bytes of rows, {at} expected")

    @staticmethod
    def _rows(name: str, spec: TableSpec, head: pb.LookupResponse, payload,
              asked: pb.LookupRequest) -> torch.Tensor | None:
        """The rows of one replied part, checked against what was asked; None when delivered."""
        dtype = wire.dtype_name(head.dtype, "lookup reply")
        if (head.dim, dtype) != (spec.dim, spec.wire_dtype):
            raise TableChanged(f"table {name!r} now has dim {head.dim} and wire dtype {dtype}; "
                               f"this call assumed {spec.dim} and {spec.wire_dtype}: retry")
        delivered = asked.HasField("delivery")  # then num_keys: the shard's own keys of the range
        if not (head.num_keys <= asked.num_keys if delivered else head.num_keys == asked.num_keys) or \
                head.delivered != delivered or len(payload) != (0 if delivered else asked.num_keys * spec.wire_row_bytes):
            raise MemStoreError(f"lookup of {name!r}: a shard returned {head.num_keys} rows "
                                f"({'delivered' if head.delivered else f'{len(payload)} bytes'}); asked "
                                f"{asked.num_keys} ({'delivered' if delivered else 'in the reply'})")
        return None if delivered else wire.rows_from_buffer(payload, head.num_keys, head.dim, dtype)

    def rows(self) -> dict[str, torch.Tensor]:
        """Every table's rows [N, dim] in key order, once every reply is placed."""
        short = {name: (self.filled[name], p.buffer_rows) for name, p in self.plans.items()
                 if self.filled[name] != p.buffer_rows}
        if short:
            raise MemStoreError(f"lookup: the shards returned (rows, asked) {short}")
        return {name: a.result() for name, a in self.assemblers.items()}

    def detach(self, rows: dict[str, torch.Tensor], pool: segments.SegmentPool | None) -> dict[str, torch.Tensor]:
        """The call's results: its lease's own memory, or copies when the lease is small
        (cheaper than holding a whole segment) or many are held (each is a descriptor)."""
        if self.lease is None or (len(self.lease.data) >= segments.COPY_OUT_BYTES
                                  and len(pool.leased) <= segments.MAX_LEASED):
            return rows
        return {name: t.clone() if self.plans[name].position is None else t for name, t in rows.items()}

    def discard(self) -> None:
        """After a failure: the lease is never reused (a shard may still be writing into it),
        and this call lets go of it now. The failure's traceback holds the call in a reference
        cycle until the garbage collector runs, and the segment (up to 1 GiB, populated) with it."""
        if self.lease is not None:
            self.lease.discard()
        self.lease, self.assemblers = None, {}
