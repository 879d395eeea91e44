"""The run's monitoring helper: a process beside the driver that logs to MLflow what the driver
committed, so the next file does not wait for it.

Two kinds of job, done in order: the metrics of committed file parts not yet in MLflow (one
step per part; `flows.monitor.tracking.track_pending`, idempotent, so a job that never ran is
done by the next run) and drift reports (`flows.monitor.drift_report`). Per file that is about
a tenth of a second of SQLite and MLflow work, and up to a second of matplotlib for a report,
which would otherwise hold the driver's GIL. The helper is a plain process of its own
(`python -m flows.monitor.helper`, job files named on its stdin, one answer line each), not
multiprocessing's, which would import the caller's main script again. The run waits for every
job before it ends and fails if one failed.

A run of one file has no next file to overlap with: the helper would only make it wait for a
second interpreter's imports (MLflow, torch, river: seconds on 2 cores). Its jobs are done in
the driver instead, when the run waits for them, with the driver's own database and MLflow
client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING

from flows.settings import Settings

if TYPE_CHECKING:
    from flows.monitor.tracking import Tracker
    from flows.storage.database import Database


class MonitorHelper:
    """`in_driver()` gives the database and MLflow client that jobs done in the driver use."""

    def __init__(self, settings: Settings, in_driver: Callable[[], tuple[Database, Tracker]]) -> None:
        self.settings = settings
        self.in_driver = in_driver
        self._helper: subprocess.Popen | None = None
        self._pending = 0
        self._driver_jobs: list[dict] | None = None  # set: jobs wait for `wait()` in the driver

    def track(self, started_at: datetime) -> None:
        """Logs the metrics of every committed part not yet in MLflow (`started_at`: when this
        run started; parts committed before it may have been logged by a run that died)."""
        self._submit({"kind": "track", "started_at": started_at.isoformat()})

    def report(self, run_id: str, event_ids: list[int], reference: dict) -> None:
        """Draws the report of one file part's drift events into the run `run_id`."""
        self._submit({"kind": "report", "run_id": run_id, "events": event_ids, "reference": reference})

    def start(self, files: int) -> None:
        """Starts the helper now for a run of `files` files, if it is not running: its imports
        (MLflow, matplotlib; seconds on 2 cores) then overlap the run's first file instead of
        delaying its end. With one file there is nothing to overlap: its jobs wait for `wait()`."""
        if files <= 1 and self._helper is None:
            self._driver_jobs = [] if self._driver_jobs is None else self._driver_jobs
            return
        if self._helper is None:
            self._helper = subprocess.Popen(
                [sys.executable, "-m", "flows.monitor.helper"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )

    def _submit(self, job: dict) -> None:
        if self._driver_jobs is not None:
            self._driver_jobs.append(job)
            return
        self.start(files=2)
        # The job goes in a file: a line longer than the pipe's buffer would block the driver until
        # the helper, still importing at its first job, reads it. The file lives in the work folder,
        # so one a killed helper never read goes where the run's other files go, not into /tmp.
        jobs = self.settings.workdir / "monitor-jobs"
        jobs.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, prefix="job-", dir=jobs) as file:
            json.dump({"settings": self.settings.model_dump(mode="json"), **job}, file)
        self._helper.stdin.write(file.name + "\n")
        self._helper.stdin.flush()
        self._pending += 1

    def wait(self) -> None:
        """Waits for every job submitted; raises the first failure (after waiting for all)."""
        failures = []
        if self._driver_jobs:
            db, tracker = self.in_driver()
            jobs, self._driver_jobs = self._driver_jobs, []
            answers = [_answer(job, self.settings, db, tracker) for job in jobs]
            failures += [answer["error"] for answer in answers if "error" in answer]
        while self._pending:
            self._pending -= 1
            line = self._helper.stdout.readline()
            answer = json.loads(line) if line else {"error": "the monitoring helper exited"}
            if "error" in answer:
                failures.append(answer["error"])
        if failures:
            raise RuntimeError(f"monitoring helper: {failures[0]}")

    def close(self) -> None:
        """Waits for the jobs still running, without raising, and ends the helper."""
        if self._helper is None:
            return
        try:
            self.wait()
        except RuntimeError:
            pass  # raised by wait() already where the run could still fail
        finally:
            self._helper.stdin.close()
            self._helper.wait(timeout=60)
            self._helper = None


def _answer(job: dict, settings: Settings, db: Database, tracker: Tracker) -> dict:
    """Does one job; its answer, or the error it met (reported to the run, which fails on it)."""
    from flows.monitor.drift_report import report_to_mlflow
    from flows.monitor.tracking import track_pending

    try:
        if job["kind"] == "track":
            return {"tracked": track_pending(db, tracker, settings.pipeline, datetime.fromisoformat(job["started_at"]))}
        uri = report_to_mlflow(
            db,
            tracker,
            job["run_id"],
            job["events"],
            job["reference"],
            settings.feature_spec.sensors,
            settings.log_schema.entity_column,
            settings.drift,
            settings.pipeline,
            settings.workdir,
        )
        return {"uri": uri}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


def _serve(jobs: IO[str], answers: IO[str]) -> None:
    """The helper's loop: one job per file named on a line, one answer line each."""
    from flows.monitor.tracking import Tracker
    from flows.storage.database import Database

    parent = os.getppid()
    opened: dict[str, tuple] = {}  # per settings: database and MLflow client, kept between jobs
    for line in jobs:
        path = Path(line.strip())
        if os.getppid() != parent:
            # The run was killed: what is left is done by the next run, which must not meet a
            # helper of this one still logging the same steps.
            path.unlink(missing_ok=True)
            continue
        try:
            job = json.loads(path.read_text())
            path.unlink()
            key = json.dumps(job["settings"], sort_keys=True)
            if key not in opened:
                settings = Settings.model_validate(job["settings"])
                opened[key] = (settings, Database(settings.database_url), Tracker(settings))
            answer = _answer(job, *opened[key])
        except Exception as error:  # an unreadable job or settings: reported to the run as well
            answer = {"error": f"{type(error).__name__}: {error}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    # Answers go out on the real stdout; anything a library prints goes to stderr instead.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _serve(sys.stdin, answers)
    # Every job is answered and its writes committed; the run waits for this process to end,
    # and the interpreter's teardown of torch, MLflow and river takes about a second.
    answers.flush()
    sys.stderr.flush()
    os._exit(0)
