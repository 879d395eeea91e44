"""The driver's heap while a run works through its files: what it built before is left out of
Python's cyclic garbage collection until the run ends.

A run's start (Prefect, MLflow, SQLAlchemy, pandas, torch and the model: some 850,000 tracked
objects) lives as long as the run, yet each full collection walks all of it again, and the
objects a file of 2,000 lines makes and drops (per-line dicts, rows for the database) set one
off about every file: 0.3 s each on 2 cores. Frozen (`gc.freeze`), those objects are still freed
by reference counting when they are dropped; only a reference cycle among them waits for the end
of the block, when `gc.unfreeze` hands everything back to the collector (one process may run
many flows).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Leaves every object alive now out of the collector's scans for the block's duration."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
