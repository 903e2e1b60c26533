"""The limits of this process's cgroup: memory headroom and CPU quota, v1 or v2.

A container's or a pod's limits are invisible to /proc/meminfo and to the CPU affinity mask:
a shard that trusted MemAvailable took tables its cgroup's OOM killer would kill it for,
and one that trusted the affinity mask started a thread per host core under a quota of two
(every one of them then throttled). Each limit is the least along the path from the
process's cgroup up to its mount's root (a parent's limit binds its children too); inside a
container with its own cgroup namespace the mount's root is the container's cgroup.

The paths are parameters so that tests can build a cgroup tree of plain files. Relies on the
standard library only.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

SELF_CGROUP = Path("/proc/self/cgroup")
CGROUPS = Path("/sys/fs/cgroup")

# Per version: the limit file, the usage file, and the memory.stat field of file cache the
# kernel reclaims before it kills (counted in usage; the "working set" excludes it).
_MEMORY_FILES = {
    2: ("memory.max", "memory.current", "inactive_file"),
    1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}
_NO_LIMIT = 1 << 62  # cgroup v1 writes "no limit" as a huge page-rounded number (2^63 - 4096)


def memory_headroom(self_cgroup: Path = SELF_CGROUP, cgroups: Path = CGROUPS) -> int | None:
    """The least room left under a memory limit on the way up (limit - usage + reclaimable
    file cache, at each level that sets a limit); None where no level sets one or none can be
    read."""
    return _least(self_cgroup, cgroups, "memory", _memory_room)


def cpu_limit(self_cgroup: Path = SELF_CGROUP, cgroups: Path = CGROUPS) -> int | None:
    """The fewest whole cores a CPU quota on the way up allows (quota / period, rounded up);
    None where no level sets a quota."""
    return _least(self_cgroup, cgroups, "cpu", _cpu_cores)


def _least(self_cgroup: Path, cgroups: Path, controller: str, of_level) -> int | None:
    """The least of_level(directory, version) over the levels of `controller`'s cgroup that
    set a limit (of_level gives None for the others)."""
    found = _levels(self_cgroup, cgroups, controller)
    if found is None:
        return None
    version, levels = found
    limits = [x for x in (of_level(d, version) for d in levels) if x is not None]
    return min(limits) if limits else None


@functools.cache
def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, and no more than its CPU quota
    allows (read once: thread pools are sized from it)."""
    return cores_within_quota()


def cores_within_quota(self_cgroup: Path = SELF_CGROUP, cgroups: Path = CGROUPS) -> int:
    """usable_cores() of the given cgroup files (not cached)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_limit(self_cgroup, cgroups)
    return max(1, min(cores, quota) if quota is not None else cores)


def _levels(self_cgroup: Path, cgroups: Path, controller: str) -> tuple[int, list[Path]] | None:
    """(version, the directories from the process's cgroup of `controller` up to its mount's
    root), or None where the process is in no such cgroup that can be found."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        # os.path's tests, not Path's: they say False for a directory this user may not read.
        if controllers == "" and os.path.exists(cgroups / "cgroup.controllers"):
            version, mount = 2, cgroups
        elif controller in controllers.split(","):
            # v1 mounts a controller alone or co-mounted ("cpu,cpuacct"), often with a link per name.
            mounts = [m for m in (cgroups / controllers, cgroups / controller) if os.path.isdir(m)]
            if not mounts:
                continue
            version, mount = 1, mounts[0]
        else:
            continue
        here = mount / path.strip().lstrip("/")
        if ".." in here.parts or not os.path.isdir(here):  # not under this mount (a namespace)
            here = mount
        return version, [here, *here.parents[: len(here.parts) - len(mount.parts)]]
    return None


def _memory_room(directory: Path, version: int) -> int | None:
    """limit - usage + inactive file cache of one cgroup; None where it sets no limit."""
    limit_file, usage_file, cache_field = _MEMORY_FILES[version]
    try:
        limit = (directory / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= _NO_LIMIT:
            return None
        usage = int((directory / usage_file).read_text())
    except (OSError, ValueError):
        return None
    return max(0, int(limit) - usage + _stat_field(directory / "memory.stat", cache_field))


def _stat_field(path: Path, name: str) -> int:
    """One field of a memory.stat file; 0 where it cannot be read (no cache counted back:
    the limit still holds)."""
    try:
        for line in path.read_text().splitlines():
            field, _, value = line.partition(" ")
            if field == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cpu_cores(directory: Path, version: int) -> int | None:
    """ceil(quota / period) of one cgroup; None where it sets no quota."""
    try:
        if version == 2:
            quota, _, period = (directory / "cpu.max").read_text().strip().partition(" ")
            if quota == "max":
                return None
        else:
            quota = (directory / "cpu.cfs_quota_us").read_text().strip()
            period = (directory / "cpu.cfs_period_us").read_text().strip()
            if int(quota) < 0:  # -1: no quota
                return None
        quota, period = int(quota), int(period or 100_000)
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
