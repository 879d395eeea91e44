"""A process SIGKILLed at any stage of a batch leaves nothing half-done: a rerun counts every
row exactly once, ends in the same states as a run that was never interrupted, and MLflow
holds each batch's step once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from flows import faults
from flows.monitor.status import balanced, pipeline_status
from flows.monitor.tracking import Tracker
from flows.orchestrate.prefect_flows import continual_update
from flows.storage.database import Database
from flows.storage.models import Batch, BatchSummary, EntityState, ModelState
from tests.flows.helpers import small_config, small_plant

# Seven runs in subprocesses, each killed at a stage: about a minute.
pytestmark = pytest.mark.slow


# Files of 1,100 rows are read in parts of 1,000, so kills land between and inside parts too.
def _plant(workdir: Path):
    settings, config = small_config(
        workdir,
        initial_training={"batches": 2, "epochs": 1},
        drift={"on_detect": "record"},
        ingest={"chunk_rows": 1000},
    )
    small_plant(settings, entities=2, batches=3, rows_per_batch=1100, broken_batches={"out_of_range": 2})
    return settings, config


def _cli(config: str, workdir: Path, api_url: str, **env) -> tuple[int, str]:
    """`lru-online run` in its own process group, against the session's Prefect API."""
    environment = {**os.environ, "PREFECT_API_URL": api_url, **env}
    log = workdir / "crash-run.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows", "run", "--config", config],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return code, log.read_text()[-3000:]


def _snapshot(settings) -> tuple[dict, dict, list[int], str]:
    db = Database(settings.database_url)
    with db.session() as session:
        ledger = {
            Path(b.source_file).name: (b.status, b.rows_received, b.rows_scored, b.rows_quarantined, b.parts_done)
            for b in session.scalars(select(Batch))
        }
        states = {
            s.entity: (s.hidden_state, s.feature_state, s.watermark) for s in session.scalars(select(EntityState))
        }
        sequences = sorted(set(session.scalars(select(BatchSummary.sequence))))
        run_id = session.get(ModelState, settings.pipeline).online_run_id
    db.dispose()
    return ledger, states, sequences, run_id


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect_api):
    settings, config = _plant(tmp_path_factory.mktemp("uninterrupted"))
    continual_update(config=config)
    return _snapshot(settings)


def test_killed_at_every_stage_in_turn_then_rerun(tmp_path, reference):
    """One work folder, one `lru-online run` per stage, each SIGKILLed at that stage after the
    previous run's progress; after every kill nothing is counted twice and MLflow holds no
    step twice; a final rerun ends exactly where an uninterrupted run ends."""
    from prefect.settings import PREFECT_API_URL

    settings, config = _plant(tmp_path / "killed")
    for stage in faults.BATCH_STAGES:
        # The stage passes once (something gets done), then the process dies there.
        code, output = _cli(
            config, settings.workdir, PREFECT_API_URL.value(), LRU_ONLINE_KILL_AT=stage, LRU_ONLINE_KILL_AFTER="1"
        )
        assert code == -signal.SIGKILL, f"{stage}: {output}"
        ledger, _, sequences, run_id = _snapshot(settings)
        expected_ledger = reference[0]
        assert any(entry[0] == "pending" for entry in ledger.values()), f"{stage}: the run finished before the kill"
        for name, entry in ledger.items():
            if entry[0] != "pending":
                assert entry == expected_ledger[name], f"{stage}: {name} finished differently"
            else:
                assert entry[1] <= expected_ledger[name][1] and entry[4] <= expected_ledger[name][4], stage
        steps = [m.step for m in Tracker(settings).client.get_metric_history(run_id, "rows")]
        assert len(steps) == len(set(steps)) and set(steps) <= set(sequences), f"{stage}: MLflow steps {steps}"

    continual_update(config=config)
    ledger, states, sequences, run_id = _snapshot(settings)
    expected_ledger, expected_states, expected_sequences, _ = reference
    assert ledger == expected_ledger  # every row counted exactly once, in the same place
    assert states == expected_states  # hidden and feature state as if never interrupted
    assert sequences == expected_sequences
    assert balanced(pipeline_status(settings))
    steps = [m.step for m in Tracker(settings).client.get_metric_history(run_id, "rows")]
    assert sorted(steps) == sequences  # no batch part logged twice, none missing
