"""Where the per-line work of a file runs: in the driver, or on Dask workers by line group.

Everything of a file that touches no shared weights fans out: reading and Great Expectations
validation (a few files ahead of the driver), then per group of lines the features from their
carried feature states, and after the driver's one model step the drift detectors and the
output file. The driver scores all lines in one forward, updates the fleet model and commits,
file by file in ledger order: every line shares the model each file updates, so that part is a
chain, and keeping it in the driver is what makes a run on servers end in exactly the state of
an embedded run (the per-line functions give the same results whichever lines share a group).

The Dask tasks are plain `distributed` tasks, not Prefect tasks: a Prefect task run costs a few
API calls, more than the work of a line group; the Prefect flow still shows one task per file.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from features import FeatureSpec
from flows.ingest.checks import FileCheck, check_file
from flows.ingest.expectations import suite_path
from flows.model.file_step import FinishedLines, PreparedLines, ScoredLines, finish_lines, prepare_lines
from flows.settings import DriftSettings, Settings
from flows.storage.line_states import CarriedLines
from lru_online.alarms import AlarmConfig

log = logging.getLogger(__name__)

# Files checked ahead of the one being processed: enough to keep the workers busy while the
# driver updates the model, few enough that their rows stay small in the workers' memory.
LOOKAHEAD = 4


def _summary(check: FileCheck) -> FileCheck:
    """The check without its rows, for the driver."""
    return FileCheck(check.rows, check.outcome, check.read_error, check.groups, [], _worker_address())


def _part(check: FileCheck, index: int) -> pd.DataFrame:
    return check.parts[index]


def _worker_address() -> str | None:
    """The address of the Dask worker this runs on; None in the driver. A worker has imported
    `distributed` already; the driver of an embedded run never needs it, and importing it only
    to ask cost the first file about 0.45 s on 2 cores."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    try:
        return distributed.get_worker().address
    except ValueError:  # imported (a servers run's driver), but not on a worker
        return None


def _prepare(rows: pd.DataFrame, spec: FeatureSpec, carried: CarriedLines) -> PreparedLines:
    return prepare_lines(rows, spec, carried.features, carried.watermarks)


def _finish(prepared: PreparedLines, scored: ScoredLines, states, reference, spec, drift, alarms, since, path):
    drift_states, alarm_states = states
    finished = finish_lines(prepared, scored, drift_states, alarm_states, reference, spec, drift, alarms, since, path)
    finished.worker = _worker_address()
    return finished


class LocalLineWork:
    """All of a file's lines as one group, in this process; files are read and validated one
    ahead while the driver works on the current one: in the command's checking interpreter
    when it started one (`flows.ingest.check_process`), else in a thread (pandas, pyarrow and
    torch release the GIL for most of their work)."""

    def checked_ahead(
        self, settings: Settings, files: list[tuple[int, Path]]
    ) -> Iterator[tuple[int, FileCheck | None]]:
        from concurrent.futures import Future, ThreadPoolExecutor

        from flows.ingest.check_process import checker

        schema, chunk_rows, suite = settings.log_schema, settings.ingest.chunk_rows, suite_path(settings.workdir)
        interpreter = checker()
        with (
            contextlib.nullcontext(interpreter)
            if interpreter is not None
            else ThreadPoolExecutor(max_workers=1, thread_name_prefix="check-ahead")
        ) as pool:
            waiting: deque = deque()
            queue = iter(files)

            def submit_next() -> None:
                for batch_id, path in queue:
                    try:
                        future = pool.submit(check_file, path, schema, suite, chunk_rows, 1)
                    except Exception as error:  # a checking interpreter that died takes no more
                        future = Future()
                        future.set_exception(error)
                    waiting.append((batch_id, future))
                    return

            submit_next()
            while waiting:
                batch_id, future = waiting.popleft()
                submit_next()
                try:
                    check = future.result()
                except Exception as error:  # checked again in the driver, where it fails loudly
                    log.warning("checking batch %s ahead failed (%s); validating it in the driver", batch_id, error)
                    check = None
                yield batch_id, check

    def prepare(self, groups: list[list[str]], parts: list, spec: FeatureSpec, carried: CarriedLines) -> list:
        return [_prepare(rows, spec, carried.subset(group)) for group, rows in zip(groups, parts, strict=True)]

    def gather(self, handles: list) -> list[PreparedLines]:
        return handles

    def finish(
        self,
        handles: list,
        scored: list[ScoredLines],
        states: list[tuple[dict[str, bytes | None], dict[str, bytes | None]]],
        reference: dict,
        spec: FeatureSpec,
        drift: DriftSettings,
        alarms: AlarmConfig,
        since: int,
        paths: list[Path],
    ) -> list[FinishedLines]:
        """Alarms, drift and output of each group that has rows to learn from (`handles` of
        those); `states`: per group, the carried drift and alarm states of its lines."""
        return [
            _finish(prepared, part, carried, reference, spec, drift, alarms, since, path)
            for prepared, part, carried, path in zip(handles, scored, states, paths, strict=True)
        ]


class DaskLineWork(LocalLineWork):
    """Files checked ahead and line groups prepared and finished on a Dask scheduler's workers."""

    def __init__(self, address: str) -> None:
        from distributed import Client

        self.client = Client(address, set_as_default=False)
        # One group per worker thread: a file's lines spread over every worker.
        threads = self.client.nthreads()
        self.groups = max(1, sum(threads.values()))
        self.slots = [worker for worker, count in sorted(threads.items()) for _ in range(count)]

    def close(self) -> None:
        self.client.close()

    def checked_ahead(
        self, settings: Settings, files: list[tuple[int, Path]]
    ) -> Iterator[tuple[int, FileCheck | None]]:
        """(batch id, check) in the order given; None where checking on Dask failed (a lost
        worker, say): the driver then checks the file itself."""
        waiting: deque = deque()
        queue = iter(files)
        schema, chunk_rows, suite = settings.log_schema, settings.ingest.chunk_rows, suite_path(settings.workdir)

        def submit_next() -> None:
            for batch_id, path in queue:
                full = self.client.submit(check_file, path, schema, suite, chunk_rows, self.groups, pure=False)
                waiting.append((batch_id, full, self.client.submit(_summary, full, pure=False)))
                return

        for _ in range(LOOKAHEAD):
            submit_next()
        while waiting:
            batch_id, full, summary = waiting.popleft()
            submit_next()
            try:
                check = summary.result()
                check.parts = [self.client.submit(_part, full, index, pure=False) for index in range(len(check.groups))]
            except Exception as error:
                log.warning("checking batch %s on Dask failed (%s); validating it in the driver", batch_id, error)
                check = None
            del full  # the groups' futures keep the rows on the workers as long as they are needed
            yield batch_id, check

    def prepare(self, groups: list[list[str]], parts: list, spec: FeatureSpec, carried: CarriedLines) -> list:
        if parts and isinstance(parts[0], pd.DataFrame):  # a large file, read in the driver
            return super().prepare(groups, parts, spec, carried)
        # Group i goes to worker thread i (its rows move there, a few hundred kB); left to
        # itself the scheduler would keep every group where the file was read. Its finish step
        # then runs where its features are.
        return [
            self.client.submit(
                _prepare,
                rows,
                spec,
                carried.subset(group),
                pure=False,
                workers=[self.slots[index % len(self.slots)]] if self.slots else None,
                allow_other_workers=True,
            )
            for index, (group, rows) in enumerate(zip(groups, parts, strict=True))
        ]

    def gather(self, handles: list) -> list[PreparedLines]:
        if handles and isinstance(handles[0], PreparedLines):
            return handles
        return self.client.gather(handles)

    def finish(
        self,
        handles: list,
        scored: list[ScoredLines],
        states: list[tuple[dict[str, bytes | None], dict[str, bytes | None]]],
        reference: dict,
        spec: FeatureSpec,
        drift: DriftSettings,
        alarms: AlarmConfig,
        since: int,
        paths: list[Path],
    ) -> list[FinishedLines]:
        if handles and isinstance(handles[0], PreparedLines):
            return super().finish(handles, scored, states, reference, spec, drift, alarms, since, paths)
        futures = [
            self.client.submit(_finish, handle, part, carried, reference, spec, drift, alarms, since, path, pure=False)
            for handle, part, carried, path in zip(handles, scored, states, paths, strict=True)
        ]
        return self.client.gather(futures)
