"""Reading and validating landed files ahead of processing, on Dask workers when configured.

Reading a file and running its Great Expectations suite depend on nothing but the file, so they
fan out over a Dask scheduler's workers as Prefect tasks, a few files ahead of the driver. The
driver then scores, learns and commits each file in ledger order: every entity shares one fleet
model whose weights each batch updates, so that part is a chain, and keeping it in order is what
makes a run on servers end in exactly the state of an embedded run.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.ingest import BatchReadError, iter_batch
from flows.settings import LogSchema, Settings
from flows.validation import ValidationOutcome, validator_for

logger = logging.getLogger(__name__)

# Files checked ahead of the one being processed: enough to keep two workers busy while the
# driver updates the model, few enough that their frames stay small in the driver's memory.
LOOKAHEAD = 4


@dataclass
class FileCheck:
    """A file read and validated ahead of processing.

    `outcome` is None when the file holds more than one part of `ingest.chunk_rows` rows: such a
    file is validated part by part while it is processed, so memory stays flat.
    """

    rows: int = 0
    outcome: ValidationOutcome | None = None
    read_error: str | None = None

    @property
    def decided(self) -> bool:
        return self.read_error is not None or self.outcome is not None


def check_file(path: Path, schema: LogSchema, chunk_rows: int) -> FileCheck:
    chunks = iter_batch(path, schema, chunk_rows)
    try:
        first = next(chunks)
        if next(chunks, None) is not None:
            return FileCheck()
    except BatchReadError as error:
        return FileCheck(read_error=str(error))
    return FileCheck(len(first), validator_for(schema).validate(first, path.name))


@task(name="check-file", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
def check_file_task(path: str, schema: LogSchema, chunk_rows: int) -> FileCheck:
    return check_file(Path(path), schema, chunk_rows)


@contextmanager
def checked_ahead(
    settings: Settings, files: list[tuple[int, Path]]
) -> Iterator[Iterator[tuple[int, FileCheck | None]]]:
    """Yields (batch id, check) in the order given; the check is None without a Dask scheduler,
    and the file is then read and validated in the driver as it is processed."""
    if not settings.prefect.dask_address:
        yield ((batch_id, None) for batch_id, _ in files)
        return
    from prefect_dask import DaskTaskRunner

    with DaskTaskRunner(address=settings.prefect.dask_address) as runner:
        yield _in_order(runner, settings, files)


def _in_order(runner, settings: Settings, files: list[tuple[int, Path]]) -> Iterator[tuple[int, FileCheck | None]]:
    waiting: deque = deque()
    queue = iter(files)

    def submit_next() -> None:
        for batch_id, path in queue:
            parameters = {"path": str(path), "schema": settings.log_schema, "chunk_rows": settings.ingest.chunk_rows}
            waiting.append((batch_id, runner.submit(check_file_task, parameters)))
            return

    for _ in range(LOOKAHEAD):
        submit_next()
    while waiting:
        batch_id, future = waiting.popleft()
        submit_next()
        try:
            check = future.result()
        except Exception as error:  # a lost worker, say: the driver checks the file itself
            logger.warning("checking batch %s on Dask failed (%s); validating it in the driver", batch_id, error)
            check = None
        yield batch_id, check
