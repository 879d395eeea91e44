"""bench/scale.py's CPU clock: the CPU a run's own threads and the processes it starts spend
between two moments, each counted on its side."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.scale import CpuClock

BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass"


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_the_cpu_clock_counts_own_work_and_a_childs_apart_over_a_span():
    with CpuClock(every=0.05) as clock:
        time.sleep(0.2)
        start = time.time()
        _burn(0.6)
        child = subprocess.Popen([sys.executable, "-c", BURN.format(seconds=0.8)])
        child.wait()  # read while it ran; an exited child keeps its last figure
        end = time.time()
        time.sleep(0.2)
    own, children = clock.between(start, end)
    assert 0.5 < own < 0.9  # the burn, not the sleeps around it
    assert 0.6 < children < 1.1  # the child's burn (its interpreter's start on top)
    assert clock.between(start, start) == (0.0, 0.0)
