"""The write gate of a shard: how a store takes a consistent cut across all its shards.

A client call (one update or assign) reaches S shards as `parts` requests sharing a `group`
id. A cut must hold every call wholly or not at all, so the coordinator runs, on all shards:

1. `freeze()`: new writes are held back; writes already applying finish first. Each shard
   returns how many parts of each recent group it has applied.
2. Groups applied on some shards but not all (their other parts are still in flight) are
   `release()`d everywhere: their held parts may apply, nothing else may. The coordinator
   polls `applied()` until they complete (or a deadline: a client that died mid-call never
   sends its other parts; such a call was never acknowledged, and its applied parts stay).
   A call whose last part applied over STALE_GROUP_S ago is abandoned at once.
3. Each shard snapshots its tables (rows and optimizer state together), then `unfreeze()`.

Plain Python: no gRPC, no Ray; the engine calls `write()` around every write.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

from memstore.errors import Unavailable

# Groups a shard remembers between cuts, at most, and for STALE_GROUP_S at most: enough for
# every call that can be in flight (65,536 calls in 5 minutes: 218 a second on one shard).
REMEMBERED_GROUPS = 1 << 16
# How long a freeze may last unended: far above a cut's copy of a shard's tables.
FREEZE_LEASE_S = 300.0
# A call whose last part applied anywhere this long ago is not in flight: its missing parts
# will not come (a client that died mid-call), or were applied and forgotten (a shard keeps
# REMEMBERED_GROUPS, and shards forget different ones near that bound). A cut abandons it at
# once instead of holding every write for its deadline. Far above a client's RPC deadline
# plus its retries (60 + 30 s by default).
STALE_GROUP_S = 300.0

log = logging.getLogger("memstore.cut")


class CutLost(RuntimeError):
    """A shard lost its part of a cut (its process restarted since the freeze, and with it
    the frozen gate or the copy): the cut is void, and taking it again will do."""


class WriteGate:
    def __init__(self) -> None:
        # Guards every field below; writers wait on it while frozen.
        self._cond = threading.Condition(threading.Lock())
        self._frozen = False
        self._released: set[str] = set()
        self._active = 0  # writes inside write()
        # group -> [parts, applied here, time.monotonic() of the last applied here]
        self._groups: OrderedDict[str, list] = OrderedDict()
        self._lease_until = 0.0  # a freeze nobody ends (its coordinator died) lapses then
        # Why writes (and the engine's lookups) are refused now, or None: a hold outlasts a
        # freeze's end and has no lease (a restore whose swap began and has not reached
        # this shard: the rows here are going, and a write to them would be lost).
        self._held: str | None = None
        # Writes a frozen gate parks at most, each holding a server thread while it waits;
        # one more is UNAVAILABLE (its client retries). A server keeps threads beyond these
        # for the parts a cut releases and for lookups: with every thread parked, a released
        # part would queue for one until the cut's deadline, and the cut would abandon its
        # call half applied. None: no bound (callers with threads of their own).
        self.max_waiting: int | None = None
        self._waiting = 0

    @contextmanager
    def write(self, group: str, parts: int) -> Iterator[list[bool]]:
        """Wraps one write; blocks while a cut holds its group back. The caller reports
        whether it applied (a duplicate retry does not count) through the yielded list."""
        with self.write_all([(group, parts)]) as applied:
            yield applied

    @contextmanager
    def write_all(self, calls: list[tuple[str, int]]) -> Iterator[list[bool]]:
        """Wraps the writes of one request, a (group, parts) each, applied in order inside:
        they pass the gate as one write. While a cut holds it, the request passes once the
        cut has released one of its groups and each other group of it is released too or has
        every part in this request (it applies before the released one counts as applied: wholly
        in the cut). Before, a part held back stopped a released part behind it, and the cut
        gave up on that call half applied. The caller marks each write applied in the
        yielded list; they count when the last is done."""
        groups = [g for g, _ in calls]
        here = {g: groups.count(g) for g in groups}

        def held() -> bool:
            if not self._frozen:
                return False
            if not self._released.intersection(groups):
                return True
            return not all(g in self._released or (g and here[g] == parts) for g, parts in calls)

        with self._cond:
            self._check_held()
            if held():
                self._park(held)
            self._active += 1
        applied = [False] * len(calls)
        try:
            yield applied
        finally:
            with self._cond:
                self._active -= 1
                now = time.monotonic()
                for (group, parts), done in zip(calls, applied):
                    if done and group:
                        entry = self._groups.setdefault(group, [parts, 0, now])
                        entry[1] += 1
                        entry[2] = now
                        self._groups.move_to_end(group)  # oldest last part first
                while self._groups and (len(self._groups) > REMEMBERED_GROUPS
                                        or now - next(iter(self._groups.values()))[2] > STALE_GROUP_S):
                    self._groups.popitem(last=False)  # a cut would abandon it at once anyway
                self._cond.notify_all()

    def _park(self, held) -> None:
        """Under _cond, frozen: one more waiting write (UNAVAILABLE past max_waiting) until
        held() is false, or the freeze's lease lapses."""
        if self.max_waiting is not None and self._waiting >= self.max_waiting:
            raise Unavailable(f"the shard is taking a cut and {self._waiting} writes wait for it already "
                              "(each holds one of its server's threads); retry")
        self._waiting += 1
        try:
            self._wait_for_cut(held)
        finally:
            self._waiting -= 1

    def _wait_for_cut(self, held) -> None:
        """Under _cond: waits while held(), until the freeze's lease lapses."""
        while held():
            left = self._lease_until - time.monotonic()
            if left <= 0:
                log.warning("a cut's freeze lapsed after its lease without being ended; writes resume")
                self._frozen = False
                self._released.clear()
                self._cond.notify_all()
                return
            self._cond.wait(timeout=left if left < threading.TIMEOUT_MAX else None)  # inf: no lease
            self._check_held()

    def freeze(self, timeout_s: float = 60.0, lease_s: float = FREEZE_LEASE_S) -> dict[str, tuple[int, int, float]]:
        """Holds back new writes, waits for running ones, returns {group: (parts, applied,
        seconds since its last part applied here)}.
        Unless unfrozen first, the freeze lapses after lease_s (a cut whose coordinator died
        must not stop the shard's writes for good; the cut itself then fails its checks);
        math.inf for a freeze its own thread ends (memstore.durable)."""
        with self._cond:
            self._frozen = True
            self._lease_until = time.monotonic() + lease_s
            self._released.clear()
            if not self._cond.wait_for(lambda: self._active == 0, timeout=timeout_s):
                self._frozen = False
                self._cond.notify_all()
                raise TimeoutError(f"writes did not drain within {timeout_s} s")
            now = time.monotonic()
            return {g: (p, a, now - t) for g, (p, a, t) in self._groups.items()}

    def release(self, groups: list[str]) -> None:
        """Lets held parts of these groups apply during the cut."""
        with self._cond:
            self._released.update(groups)
            self._cond.notify_all()

    def applied(self, groups: list[str]) -> dict[str, int]:
        """Parts of these groups applied here so far (waits for released writes to finish)."""
        with self._cond:
            self._cond.wait_for(lambda: self._active == 0, timeout=5.0)
            return {g: self._groups.get(g, (0, 0, 0.0))[1] for g in groups}

    def forget(self) -> None:
        """Forgets the groups counted so far (a log replay reaching a completed cut's mark)."""
        with self._cond:
            self._groups.clear()

    def unfreeze(self, forget: bool = True) -> None:
        """Lets writes flow again; after a completed cut, forgets the groups it covered."""
        with self._cond:
            self._frozen = False
            self._released.clear()
            if forget:
                self._groups.clear()
            self._cond.notify_all()

    def hold(self, why: str) -> None:
        """Refuses every write (UNAVAILABLE, naming `why`) until end_hold(), freeze or no freeze."""
        with self._cond:
            self._held = why
            self._cond.notify_all()

    def end_hold(self) -> None:
        with self._cond:
            self._held = None

    def check_held(self) -> None:
        """Raises Unavailable while held (a lookup's check)."""
        with self._cond:
            self._check_held()

    def _check_held(self) -> None:
        if self._held is not None:
            raise Unavailable(self._held)

    @property
    def held(self) -> str | None:
        return self._held

    @property
    def frozen(self) -> bool:
        with self._cond:
            return self._frozen


def take_cut(shards: list, snapshot, deadline_s: float = 30.0, poll_s: float = 0.01):
    """Runs the cut protocol over `shards` (objects with freeze/release/applied/unfreeze, e.g.
    WriteGates, or proxies of remote shards) and calls `snapshot()` while all are frozen and
    every in-flight call is complete. Returns (snapshot's result, groups completed during
    the cut, groups abandoned: at the deadline, or at once when stale, STALE_GROUP_S)."""
    import time

    frozen = []
    try:
        seen: dict[str, list] = {}  # group -> [parts, applied on all shards, youngest part's age]
        for shard in shards:
            frozen.append(shard)  # thawed on failure even if its freeze failed: it may yet arrive
            for group, (parts, applied, age_s) in shard.freeze().items():
                entry = seen.setdefault(group, [parts, 0, age_s])
                entry[1] += applied
                entry[2] = min(entry[2], age_s)
        partial = [g for g, (parts, applied, age_s) in seen.items() if 0 < applied < parts and age_s < STALE_GROUP_S]
        stale = [g for g, (parts, applied, age_s) in seen.items() if 0 < applied < parts and age_s >= STALE_GROUP_S]
        if partial:
            for shard in shards:
                shard.release(partial)
            deadline = time.monotonic() + deadline_s
            while partial and time.monotonic() < deadline:
                totals = dict.fromkeys(partial, 0)
                for shard in shards:
                    for group, n in shard.applied(partial).items():
                        totals[group] += n
                partial = [g for g in partial if totals[g] < seen[g][0]]
                if partial:
                    time.sleep(poll_s)
        completed = [g for g, (parts, applied, age_s) in seen.items()
                     if 0 < applied < parts and age_s < STALE_GROUP_S and g not in partial]
        partial += stale
        result = snapshot()
    except BaseException:
        _thaw(frozen, forget=False, raising=False)  # the cut's own error is the one to raise
        raise
    _thaw(frozen, forget=True, raising=True)
    return result, completed, partial


def _thaw(frozen: list, forget: bool, raising: bool) -> None:
    """Unfreezes every shard, even past one that fails (a full disk refusing its cut record,
    a dead shard): the others' writes must not wait out the freeze's lease. Then raises the
    first failure, or only logs them (raising=False)."""
    errors = []
    for shard in frozen:
        try:
            shard.unfreeze(forget=forget)
        except Exception as e:  # noqa: BLE001 -- raised or logged below, after the rest are thawed
            errors.append(e)
    for e in errors if not raising else ():
        log.warning("a shard failed to thaw after a failed cut: %s", e)
    if errors and raising:
        raise errors[0]
