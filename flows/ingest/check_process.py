"""A second interpreter that reads and validates a command's landed files ahead of its driver.

A `run` or `backfill` command spends its first seconds importing: torch, Prefect and MLflow in
the driver, and Great Expectations (~2.5 s on 2 cores) for the first file's validation. Reading
and validating a file needs pandas and GE, none of the rest (`flows.log_schema` keeps the
schema apart from the settings that import torch). Started before the flows' imports, it
imports them on the other core while the driver imports its own, then checks each file ahead
of the driver outside its GIL, and hands back the validated rows as a thread would.

A process that has imported GE already (a test session, a flow run inside a long-lived process)
validates in a thread (`flows.orchestrate.line_work`): the interpreter would only repeat an
import it has paid for; so do runs whose files Dask workers check. If the interpreter dies, the
driver validates the files itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing import get_context

# Its scheduling priority: below the driver's and the temporary API's, which boot at the same
# time on two cores and which the first file waits for (at an equal share, three processes on
# two cores slowed a run's first file by 1.5 s); it takes what they leave, which is plenty for
# one validation per file.
NICENESS = 10

_checker: ProcessPoolExecutor | None = None


def _prepare() -> None:
    os.nice(NICENESS)
    # GE's progress bars (off, but made) would give tqdm a process-shared lock: a semaphore the
    # killed interpreter could not unlink, which multiprocessing then reports as leaked.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _import_checks() -> None:
    import great_expectations  # noqa: F401

    import flows.ingest.checks  # noqa: F401


@contextlib.contextmanager
def checking_interpreter() -> Iterator[None]:
    """Starts the checking interpreter and its imports now, unless this process has imported
    GE already (or runs the interpreter), and stops it when the block ends."""
    global _checker
    if _checker is not None or "great_expectations" in sys.modules:
        yield
        return
    # spawn, not fork: a lean interpreter, not a copy of one that holds torch and its threads.
    _checker = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), initializer=_prepare)
    _checker.submit(_import_checks)
    try:
        yield
    finally:
        checker, _checker = _checker, None
        # Killed, not asked to exit: it holds nothing to save, and its own teardown of pandas
        # and GE (about a second) would hold up the command's exit, which joins it.
        processes = list((checker._processes or {}).values())
        for process in processes:
            process.terminate()
        checker.shutdown(wait=True, cancel_futures=True)


def checking_for_command(dask_address: str | None) -> contextlib.AbstractContextManager:
    """What a `run` or `backfill` checks its files in: this interpreter, unless Dask workers
    check them (a servers profile's `prefect.dask_address`)."""
    return contextlib.nullcontext() if dask_address else checking_interpreter()


def checker() -> Executor | None:
    """The checking interpreter, while a command's block runs one."""
    return _checker
