"""The cores a process may use, and how many of them the fleet step's torch kernels take."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota. A
    container limited to 2 cores still sees every core of its host in `os.cpu_count()`, and a
    tuner starting one worker per host core there would slow every setting down."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = cgroup_cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read: the affinity stands
    return cores


def driver_threads(configured: int | None, cores: int | None = None) -> int:
    """Torch's intra-op threads for the process that runs the fleet step: `configured`, or the
    usable cores less one. Why one less: the run's helper process (MLflow logging, drift
    reports) and Prefect's local API work beside the driver, and torch's parallel kernels given
    every core wait on threads those processes have displaced (200 lines × 40 rows on 2 cores:
    10-13k rows/s with two threads, 17-18k with one; 2,000 lines: about equal)."""
    if configured is not None:
        return configured
    return max(1, (usable_cores() if cores is None else cores) - 1)
