"""A terminal progress bar of a run over many files: files finished, rows scored, rows/s.

It watches the ledger from a thread (one small query every half second), so the flow run
itself knows nothing of it, and it works the same on SQLite and Postgres.
"""

from __future__ import annotations

import threading
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import func, select

from flows.settings import Settings
from flows.storage.database import Database
from flows.storage.models import Batch, BatchStatus


class LedgerProgress:
    INTERVAL_SECONDS = 0.5

    def __init__(self, settings: Settings, files: int) -> None:
        self.db = Database(settings.database_url)
        self.files = files
        self._stop = threading.Event()
        self._progress = Progress(
            TextColumn("[bold]backfill"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("files · {task.fields[rows]:,} rows · {task.fields[rate]:,.0f} rows/s"),
            TimeElapsedColumn(),
            transient=False,
        )
        self._task = self._progress.add_task("files", total=files, rows=0, rate=0.0)
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _finished(self) -> tuple[int, int]:
        with self.db.session() as session:
            done, rows = session.execute(
                select(func.count(), func.coalesce(func.sum(Batch.rows_scored), 0)).where(
                    Batch.status != BatchStatus.PENDING
                )
            ).one()
        return int(done), int(rows)

    def _watch(self) -> None:
        done0, rows0 = self._finished()
        started = time.perf_counter()
        while not self._stop.wait(self.INTERVAL_SECONDS):
            self._show(done0, rows0, started)
        self._show(done0, rows0, started)

    def _show(self, done0: int, rows0: int, started: float) -> None:
        done, rows = self._finished()
        rows -= rows0
        rate = rows / max(time.perf_counter() - started, 1e-9)
        self._progress.update(self._task, completed=min(done - done0, self.files), rows=rows, rate=rate)

    def __enter__(self) -> LedgerProgress:
        self._progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._progress.stop()
        self.db.dispose()
