"""Row prefetch for the trainer, exact under sync semantics (DESIGN.md section 3).

Hash ids depend only on tokens, and the batches are a pure function of (seed, step)
(`trainer.data`), so the rows of steps t+1 .. t+D (D = `depth`) can be looked up while step t
computes: `RowPrefetcher.ahead(t)` hashes those batches and starts their lookups on the row
source's background threads (`EngramRows.issue` -> `lookup_many_async`); nothing waits for them
until the step that needs them.

Staleness and the refresh. A lookup issued for step s before update u (the push of step u < s)
was acknowledged may have read rows from before u. Sync mode must give exactly the parameters
of training without prefetch, so before step s consumes its prefetched rows they are brought up
to date, without a second round trip:

- Per Engram layer, the prefetcher keeps a queue of issued steps: the step, its input ids,
  its hash ids (B, T, H), one Future per table (`{table: Future}`), and each head's distinct
  keys.
- Before a step's update is sent, `watch()` names, per table, the distinct keys of every step
  already issued and not yet taken; the update goes out as `update_read` with those keys, and
  each shard replies with the rows among them that the update changed, read right after
  applying it (memstore.client.update_read).
- `acknowledge(step, fresh)` takes those replies: for every queued step, its stale keys are
  its keys among the fresh ones (np.intersect1d, vectorised), and their fresh rows are kept
  with the step, in acknowledgement order.
- `take(s, x)` waits for the step's lookups, copies the prefetched rows into a fresh writable
  tensor and writes each kept fresh row at the positions holding its key (np.isin +
  searchsorted), in acknowledgement order (a later update wins). Keys no update touched since
  the issue are unchanged in the store, so the result equals a fresh lookup, bit for bit,
  whether the prefetch ran before, after or concurrently with the updates (a torn read across
  shards only affects touched keys, which are refreshed).
- This relies on the store's optimizer touching only the updated rows (memstore.optim: sparse
  Adam, decoupled weight decay on the updated rows only) and on every update to these tables
  passing through `acknowledge`: with data-parallel workers each worker pushes one piece of
  the step's summed update and acknowledges all of it, with the changed rows it watches
  routed back from the workers that pushed the other pieces (trainer.parallel).

Accounting: `wait_s` counts only the time blocked on rows (Future.result of the lookups), not
hashing or concatenation; `rows_fetched` counts unique keys per table and step looked up,
`rows_refreshed` the unique keys patched from update replies. Measured at the default sizes
(8 x 128 tokens, ~50k rows per head): 6.8 % of fetched rows refreshed at depth 1, 11.5 % at
depth 2; before the replies carried them, these were re-read by a second lookup per table,
which on real shards cost about what the prefetch saved.

depth 0 turns prefetch off: `take` issues the step's lookups itself and waits for them, and
`watch()` is empty.

Public API: RowPrefetcher(rows, mapping, depth, batch_fn=None, limit=None);
take(step, input_ids) -> (hashes {layer: (B,T,H)}, rows {layer: {table: (B,T,d) tensor}});
ahead(step); watch() -> {layer: {table: keys}}; acknowledge(step, fresh {layer: {table:
(keys, rows)}}); close(); stats() -> dict; events (issue/ack/take log).
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch


@dataclass
class _Issued:
    step: int
    input_ids: torch.Tensor  # (B, T)
    hashes: dict[int, np.ndarray]  # layer -> (B, T, H) int64
    futures: dict[int, dict[str, Future]]  # layer -> {table: Future of (B, T, d)}
    acked: int  # updates acknowledged when the lookups were issued
    uniques: dict[int, list[np.ndarray]]  # layer -> per head, the step's distinct keys (sorted)
    # One entry per update acknowledged after the issue, in order: (layer, table) ->
    # (head, stale keys (sorted), their rows right after that update).
    patches: list[dict[tuple[int, str], tuple[int, np.ndarray, torch.Tensor]]]


class RowPrefetcher:
    """Looks up the rows of the next `depth` steps ahead and patches them exactly (module doc).

    rows: {layer: EngramRows}; mapping: the NgramHashMapping; batch_fn(step) -> input ids
    (B, T) of that training step (needed for depth > 0); limit: the first step not to prefetch
    (the end of the run)."""

    def __init__(self, rows: Mapping[int, Any], mapping: Any, depth: int = 1,
                 batch_fn: Callable[[int], torch.Tensor] | None = None, limit: int | None = None) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.rows = dict(rows)
        self.mapping = mapping
        self.depth = int(depth)
        self.batch_fn = batch_fn
        self.limit = limit
        self.acked = 0  # updates acknowledged so far
        self._queue: deque[_Issued] = deque()
        self.events: deque[tuple[str, int]] = deque(maxlen=4096)  # ("issue"|"take"|"ack", step)
        self.wait_s = 0.0  # blocked on lookups
        self.rows_fetched = 0
        self.rows_refreshed = 0
        self.patched_steps = 0

    # ------------------------------------------------------------------ issuing

    def _issue(self, step: int, input_ids: torch.Tensor) -> _Issued:
        hashes = {l: np.asarray(h, dtype=np.int64) for l, h in self.mapping.hash(input_ids).items()}
        futures = {l: r.issue(hashes[l]) for l, r in self.rows.items()}
        uniques = {l: [np.unique(h[..., i]) for i in range(h.shape[-1])] for l, h in hashes.items()}
        self.events.append(("issue", step))
        return _Issued(step, input_ids, hashes, futures, self.acked, uniques, [])

    def ahead(self, step: int) -> None:
        """Starts the lookups of steps step+1 .. step+depth not yet issued (below `limit`)."""
        if self.depth == 0 or self.batch_fn is None or not self.rows:
            return
        last = self._queue[-1].step if self._queue else step
        for s in range(max(last, step) + 1, step + self.depth + 1):
            if self.limit is not None and s >= self.limit:
                break
            self._queue.append(self._issue(s, self.batch_fn(s)))

    # ------------------------------------------------------------------ consuming

    def take(self, step: int, input_ids: torch.Tensor) -> tuple[dict[int, np.ndarray], dict[int, dict[str, torch.Tensor]]]:
        """(hash ids, up-to-date rows) of `step`, whose input ids are `input_ids`: its prefetched
        lookups patched for the updates acknowledged since, or lookups issued now."""
        while self._queue and self._queue[0].step < step:
            self._drain(self._queue.popleft())  # skipped steps
        entry = None
        if self._queue and self._queue[0].step == step:
            entry = self._queue.popleft()
            if not torch.equal(entry.input_ids, input_ids):  # not the stream's batch: start afresh
                self._drain(entry)
                self._drop_all()
                entry = None
        if entry is None:
            entry = self._issue(step, input_ids)
        self.events.append(("take", step))
        out = {}
        t0 = time.perf_counter()
        for l, futs in entry.futures.items():
            out[l] = {name: f.result() for name, f in futs.items()}
        self.wait_s += time.perf_counter() - t0
        self._patch(entry, out)
        return entry.hashes, out

    def _patch(self, entry: _Issued, rows: dict[int, dict[str, torch.Tensor]]) -> None:
        """Writes the fresh rows of every update acknowledged since the issue into fresh
        copies of the prefetched rows, in acknowledgement order (a later update wins)."""
        self.rows_fetched += sum(u.size for us in entry.uniques.values() for u in us)
        if not any(entry.patches):
            return
        copied = set()
        for patch in entry.patches:
            for (l, name), (h, stale, values) in patch.items():
                keys = entry.hashes[l][..., h].reshape(-1)  # (B*T,)
                pos = np.flatnonzero(np.isin(keys, stale))
                idx = np.searchsorted(stale, keys[pos])
                if (l, name) not in copied:
                    rows[l][name] = rows[l][name].clone().contiguous()  # a fresh writable tensor
                    copied.add((l, name))
                out = rows[l][name]
                out.view(-1, out.shape[-1])[torch.from_numpy(pos)] = values[torch.from_numpy(idx)].to(out.dtype)
                self.rows_refreshed += stale.size
        self.patched_steps += 1

    def watch(self) -> dict[int, dict[str, np.ndarray]]:
        """Per layer and table, the distinct keys of the steps issued and not yet taken: the
        keys whose changed rows the next update's reply must carry."""
        if not self._queue:
            return {}
        return {l: {name: np.unique(np.concatenate([e.uniques[l][h] for e in self._queue]))
                    for h, name in enumerate(r.tables)} for l, r in self.rows.items()}

    def acknowledge(self, step: int, fresh: Mapping[int, Mapping[str, tuple[np.ndarray, torch.Tensor]]]) -> None:
        """Records that `step`'s update has been applied by the store, with `fresh`, per layer
        and table, the (sorted keys, rows) it changed among the watched keys, as read right
        after it: each queued step keeps the fresh rows of its own keys for `take`."""
        for entry in self._queue:
            patch = {}
            for l, r in self.rows.items():
                for h, name in enumerate(r.tables):
                    assert name in fresh.get(l, {}), (
                        f"step {step}'s update of {name} came back without the watched rows: "
                        f"prefetched step {entry.step} would use stale rows")
                    keys, values = fresh[l][name]
                    stale = np.intersect1d(entry.uniques[l][h], keys, assume_unique=True)
                    if stale.size:
                        patch[(l, name)] = (h, stale, values[torch.from_numpy(np.searchsorted(keys, stale))])
            entry.patches.append(patch)
        self.acked += 1
        self.events.append(("ack", step))

    # ------------------------------------------------------------------ the rest

    @staticmethod
    def _drain(entry: _Issued) -> None:
        for futs in entry.futures.values():
            for f in futs.values():
                try:
                    f.result()
                except Exception:  # noqa: BLE001 - a discarded prefetch's error matters to no one
                    pass

    def _drop_all(self) -> None:
        while self._queue:
            self._drain(self._queue.popleft())

    def close(self) -> None:
        """Waits out the lookups still in flight (before the store closes)."""
        self._drop_all()

    def stats(self) -> dict:
        return {"prefetch_depth": self.depth, "row_wait_s": self.wait_s, "rows_fetched": self.rows_fetched,
                "rows_refreshed": self.rows_refreshed,
                "refreshed_share": self.rows_refreshed / self.rows_fetched if self.rows_fetched else 0.0,
                "patched_steps": self.patched_steps}
