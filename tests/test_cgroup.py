"""memstore.cgroup: a process's memory headroom and CPU quota under its cgroup, v1 and v2,
read from cgroup trees built of plain files; and memstore.alloc.available_bytes on top.

Run: python -m pytest tests/test_cgroup.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from memstore import alloc, cgroup


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


GIB = 1 << 30


def test_cgroup_v2_headroom_is_the_least_on_the_path_to_the_root(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    write_tree(proc, {"self/cgroup": "0::/pods/pod1/shard\n", "meminfo": f"MemAvailable: {20 * GIB // 1024} kB\n"})
    write_tree(cg, {
        "cgroup.controllers": "memory\n",
        "pods/memory.max": f"{16 * GIB}\n", "pods/memory.current": f"{10 * GIB}\n",
        "pods/memory.stat": "anon 1\ninactive_file 0\n",
        "pods/pod1/memory.max": f"{8 * GIB}\n", "pods/pod1/memory.current": f"{5 * GIB}\n",
        "pods/pod1/memory.stat": f"anon 5\ninactive_file {GIB}\nactive_file {GIB}\n",
        "pods/pod1/shard/memory.max": "max\n", "pods/pod1/shard/memory.current": f"{5 * GIB}\n",
        "pods/pod1/shard/memory.stat": "inactive_file 0\n",
    })
    # pod1: 8 - 5 + 1 (its inactive file cache) = 4 GiB; pods: 16 - 10 = 6; the shard's own: no limit.
    assert cgroup.memory_headroom(proc / "self/cgroup", cg) == 4 * GIB
    assert alloc.available_bytes(proc, cg) == 4 * GIB
    (cg / "pods/pod1/memory.max").write_text("max\n")
    assert alloc.available_bytes(proc, cg) == 6 * GIB
    (cg / "pods/memory.max").write_text("max\n")
    assert cgroup.memory_headroom(proc / "self/cgroup", cg) is None
    assert alloc.available_bytes(proc, cg) == 20 * GIB  # MemAvailable alone


def test_cgroup_v1_headroom_and_a_namespaced_path(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    write_tree(proc, {"self/cgroup": "5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/\n"})
    write_tree(cg, {  # no cgroup.controllers: v2 is not mounted here
        "memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "1\n",
        "memory/memory.stat": "total_inactive_file 0\n",
        "memory/docker/abc/memory.limit_in_bytes": f"{2 * GIB}\n",
        "memory/docker/abc/memory.usage_in_bytes": f"{GIB}\n",
        "memory/docker/abc/memory.stat": f"inactive_file 7\ntotal_inactive_file {GIB // 2}\n",
    })
    assert cgroup.memory_headroom(proc / "self/cgroup", cg) == 3 * GIB // 2
    assert alloc.available_bytes(proc, cg) == 3 * GIB // 2  # no meminfo: the cgroup alone
    # A container's own cgroup namespace: its path reads "/" of a mount that is its cgroup.
    (proc / "self/cgroup").write_text("4:memory:/\n")
    (cg / "memory/memory.limit_in_bytes").write_text(f"{GIB}\n")
    (cg / "memory/memory.usage_in_bytes").write_text(f"{GIB + 5}\n")
    assert cgroup.memory_headroom(proc / "self/cgroup", cg) == 0  # over its limit: no room, not negative
    (proc / "self/cgroup").write_text("4:memory:/not/here\n")  # a host path this mount lacks
    assert cgroup.memory_headroom(proc / "self/cgroup", cg) == 0


def test_no_cgroup_or_meminfo_says_nothing(tmp_path):
    assert cgroup.memory_headroom(tmp_path / "missing", tmp_path) is None
    assert alloc.available_bytes(tmp_path, tmp_path) is None
    write_tree(tmp_path, {"self/cgroup": "3:pids:/\n", "cg/memory/memory.limit_in_bytes": "junk\n"})
    assert cgroup.memory_headroom(tmp_path / "self/cgroup", tmp_path / "cg") is None


def test_a_v2_cpu_quota_caps_the_cores_and_the_least_level_wins(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    write_tree(proc, {"self/cgroup": "0::/kubepods/pod7/shard\n"})
    write_tree(cg, {"cgroup.controllers": "cpu memory\n", "cpu.max": "max 100000\n",
                    "kubepods/cpu.max": "max 100000\n",
                    "kubepods/pod7/cpu.max": "250000 100000\n",  # 2.5 cores -> 3
                    "kubepods/pod7/shard/cpu.max": "max 100000\n"})
    assert cgroup.cpu_limit(proc / "self/cgroup", cg) == 3
    (cg / "kubepods/cpu.max").write_text("100000 100000\n")  # a parent's single core binds too
    assert cgroup.cpu_limit(proc / "self/cgroup", cg) == 1
    (cg / "kubepods/cpu.max").write_text("max 100000\n")
    (cg / "kubepods/pod7/cpu.max").write_text("max 100000\n")
    assert cgroup.cpu_limit(proc / "self/cgroup", cg) is None


@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_a_v1_cpu_quota_co_mounted_or_alone(tmp_path, mount):
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    write_tree(proc, {"self/cgroup": "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"})
    write_tree(cg, {f"{mount}/cpu.cfs_quota_us": "-1\n", f"{mount}/cpu.cfs_period_us": "100000\n",
                    f"{mount}/docker/abc/cpu.cfs_quota_us": "150000\n",
                    f"{mount}/docker/abc/cpu.cfs_period_us": "50000\n"})  # 3 cores
    assert cgroup.cpu_limit(proc / "self/cgroup", cg) == 3
    (cg / f"{mount}/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup.cpu_limit(proc / "self/cgroup", cg) is None


def test_this_process_may_use_at_least_one_core_and_no_more_than_its_affinity():
    import os

    assert 1 <= cgroup.usable_cores() <= len(os.sched_getaffinity(0))


def test_a_quota_below_the_affinity_mask_sizes_the_pools(tmp_path):
    import os

    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    write_tree(proc, {"self/cgroup": "0::/shard\n"})
    write_tree(cg, {"cgroup.controllers": "cpu\n", "shard/cpu.max": "100000 100000\n"})
    assert cgroup.cores_within_quota(proc / "self/cgroup", cg) == 1
    (cg / "shard/cpu.max").write_text("max 100000\n")
    assert cgroup.cores_within_quota(proc / "self/cgroup", cg) == len(os.sched_getaffinity(0))


def test_a_path_that_climbs_out_of_the_mount_reads_the_mount(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    write_tree(proc, {"self/cgroup": "0::/../elsewhere\n"})  # a process outside its namespace's root
    write_tree(cg, {"cgroup.controllers": "memory\n", "memory.max": "1000\n", "memory.current": "400\n"})
    write_tree(tmp_path, {"elsewhere/memory.max": "100\n", "elsewhere/memory.current": "0\n"})  # not a cgroup of the mount
    assert cgroup.memory_headroom(proc / "self/cgroup", cg) == 600
