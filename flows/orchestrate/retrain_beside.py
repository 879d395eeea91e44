"""Retraining beside ingestion: a drift-triggered `retrain` flow run in a process of its own.

The update run starts it and goes on with the next files; the retraining swaps its challenger in
between two of them (`flows.model.retraining`). The process reports its flow run to the same
Prefect API as the update run, so on embedded defaults the update run keeps its temporary API
up until the retraining ends: before it returns it releases the pipeline (a next run may start)
and waits for the process. One retraining at a time: a request while one runs is logged and
left to the next detection (the fleet-wide cooldown spaces them anyway).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)
RETRAIN_NICENESS = 19


def current_api_url() -> str | None:
    """The Prefect API this process reports to (a temporary local one included)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url) if client.api_url else None


def _lower_priority() -> None:
    if hasattr(os, "nice"):
        os.nice(RETRAIN_NICENESS)


class RetrainBeside:
    def __init__(self, config: str | None, workdir: str) -> None:
        self.config, self.workdir = config, workdir
        self._process: subprocess.Popen | None = None
        self.log_file: Path | None = None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, trigger: str, drift_event_id: int | None) -> bool:
        """Starts `lru-online retrain` for the detection; False if a retraining still runs."""
        if self.running():
            log.info("a retraining is still running; drift event %s waits for the next detection", drift_event_id)
            return False
        command = [sys.executable, "-m", "flows", "retrain", "--workdir", self.workdir, "--trigger", trigger]
        if self.config:
            command += ["--config", self.config]
        if drift_event_id is not None:
            command += ["--drift-event-id", str(drift_event_id)]
        # One torch thread at the lowest CPU priority: the retraining takes what ingestion
        # leaves of the cores, so the files behind it are not slowed by it either (200 lines x
        # 40 rows on 2 cores: 6.4k rows/s at the same priority, 11.4k at nice 10, 13.6k at 19,
        # 13.8k without retraining).
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        api_url = current_api_url()
        if api_url:
            environment["PREFECT_API_URL"] = api_url
        # Its output goes to a file of the work folder, not into the update run's own output.
        self.log_file = Path(self.workdir) / "logs" / f"retrain-{datetime.now(UTC):%Y%m%dT%H%M%S%f}.log"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("w") as output:
            self._process = subprocess.Popen(
                command, env=environment, preexec_fn=_lower_priority, stdout=output, stderr=subprocess.STDOUT
            )
        log.info(
            "retraining for drift event %s started beside the update run (output: %s)", drift_event_id, self.log_file
        )
        return True

    def wait(self) -> int | None:
        """Waits for the retraining in flight; its exit status (None: none was started)."""
        if self._process is None:
            return None
        status = self._process.wait()
        if status != 0:
            log.warning("the retraining process exited with status %d; its output: %s", status, self.log_file)
        return status
