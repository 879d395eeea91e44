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
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import IO

from flows.settings import Settings


class MonitorHelper:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._helper: subprocess.Popen | None = None
        self._pending = 0

    def track(self, started_at: datetime) -> None:
        """Logs the metrics of every committed part not yet in MLflow (`started_at`: when this
        run started; parts committed before it may have been logged by a run that died)."""
        self._submit({"kind": "track", "started_at": started_at.isoformat()})

    def report(self, run_id: str, event_ids: list[int], reference: dict) -> None:
        """Draws the report of one file part's drift events into the run `run_id`."""
        self._submit({"kind": "report", "run_id": run_id, "events": event_ids, "reference": reference})

    def start(self) -> None:
        """Starts the helper now if it is not running: its imports (MLflow, matplotlib; seconds
        on 2 cores) then overlap the run's first file instead of delaying its end."""
        if self._helper is None:
            self._helper = subprocess.Popen(
                [sys.executable, "-m", "flows.monitor.helper"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )

    def _submit(self, job: dict) -> None:
        self.start()
        # The job goes in a file: a line longer than the pipe's buffer would block the driver until
        # the helper, still importing at its first job, reads it.
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, prefix="lru-online-job-") as file:
            json.dump({"settings": self.settings.model_dump(mode="json"), **job}, file)
        self._helper.stdin.write(file.name + "\n")
        self._helper.stdin.flush()
        self._pending += 1

    def wait(self) -> None:
        """Waits for every job submitted; raises the first failure (after waiting for all)."""
        failures = []
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


def _serve(jobs: IO[str], answers: IO[str]) -> None:
    """The helper's loop: one job per file named on a line, one answer line each."""
    from flows.monitor.drift_report import report_to_mlflow
    from flows.monitor.tracking import Tracker, track_pending
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
            settings, db, tracker = opened[key]
            if job["kind"] == "track":
                started = datetime.fromisoformat(job["started_at"])
                answer = {"tracked": track_pending(db, tracker, settings.pipeline, started)}
            else:
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
                answer = {"uri": uri}
        except Exception as error:  # reported to the run, which fails on it
            answer = {"error": f"{type(error).__name__}: {error}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    # Answers go out on the real stdout; anything a library prints goes to stderr instead.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _serve(sys.stdin, answers)
