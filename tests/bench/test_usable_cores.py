"""bench.common.usable_cores: the tuners' default worker count follows a container's CPU quota."""

from __future__ import annotations

import os

from bench.common import usable_cores


def test_a_cgroup_quota_caps_the_cores_and_no_quota_leaves_the_affinity(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # 1.5 cores of quota: 2 workers at most
    assert usable_cores(cpu_max) == min(affinity, 2)
    cpu_max.write_text("50000 100000\n")  # half a core still runs one worker
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == affinity
    assert usable_cores(tmp_path / "missing") == affinity
