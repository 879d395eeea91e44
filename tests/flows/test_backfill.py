"""`lru-online backfill`: a folder of historical files replayed in time order, whatever their
names, with a progress bar."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flows.ingest.simulator import SimulationConfig, simulate
from flows.monitor.status import balanced, pipeline_status
from tests.flows.helpers import small_config

# A backfill through the command line in a subprocess: about 20 s.
pytestmark = pytest.mark.slow


def test_backfill_replays_in_time_order_with_a_progress_bar(tmp_path, prefect_api):
    from prefect.settings import PREFECT_API_URL

    settings, config = small_config(
        tmp_path, initial_training={"batches": 2, "epochs": 1}, drift={"on_detect": "record"}
    )
    history = tmp_path / "history"
    truth = simulate(
        history,
        tmp_path / "truth.json",
        SimulationConfig(entities=2, batches=6, rows_per_batch=50, broken_batches={}),
        settings.log_schema,
    )
    # Names that sort against time: the newest file comes first by name.
    for index, name in enumerate(truth.files):
        (history / name).rename(history / f"{len(truth.files) - index:03d}-{name}")
    done = subprocess.run(
        [sys.executable, "-m", "flows", "backfill", str(history), "-c", config],
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "12/12 files" in done.stdout + done.stderr  # the bar's final state
    status = pipeline_status(settings)
    assert status["batches"]["processed"] == 12 and balanced(status)
    assert status["rows"]["late"] == 0  # in name order the older files would have come late
