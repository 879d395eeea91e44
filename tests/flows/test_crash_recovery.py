"""A process killed between the model update and the commit leaves no trace; a rerun completes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from flows.prefect_flows import continual_update
from flows.status import balanced, pipeline_status
from flows.storage.database import Database
from flows.storage.models import Batch, EntityState
from tests.flows.helpers import small_config, small_plant


def _plant(workdir: Path):
    settings, config = small_config(
        workdir, initial_training={"batches": 2, "epochs": 1}, drift={"on_detect": "record"}
    )
    small_plant(settings, entities=2, batches=5, rows_per_batch=80, broken_batches={})
    return settings, config


def _cli(config: str, workdir: Path, **env) -> tuple[int, str]:
    """Runs `lru-online run` in its own process group; returns its exit code and output.

    It talks to the session's Prefect API; anything it started is killed with its group.
    """
    from prefect.settings import PREFECT_API_URL

    environment = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), **env}
    log = workdir / f"cli-{len(list(workdir.glob('cli-*.log')))}.log"
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


def _snapshot(settings):
    db = Database(settings.database_url)
    with db.session() as session:
        ledger = {
            Path(b.source_file).name: (b.status, b.rows_scored, b.parts_done)
            for b in session.scalars(select(Batch).order_by(Batch.id))
        }
        states = {
            s.entity: (s.hidden_state, s.feature_state, s.watermark, s.batches)
            for s in session.scalars(select(EntityState))
        }
    db.dispose()
    return ledger, states


def test_kill_before_commit_then_rerun(tmp_path, prefect_api):
    (killed, killed_config), (reference, reference_config) = (
        _plant(tmp_path / "killed"),
        _plant(tmp_path / "reference"),
    )

    # Three batches commit; the fourth dies after its model update, before its commit.
    code, output = _cli(killed_config, killed.workdir, LRU_ONLINE_KILL_AT="updated", LRU_ONLINE_KILL_AFTER="3")
    assert code == -signal.SIGKILL, output
    continual_update(config=reference_config, max_batches=3)

    ledger_killed, states_killed = _snapshot(killed)
    ledger_reference, states_reference = _snapshot(reference)
    assert ledger_killed == ledger_reference  # the fourth batch is still pending, as if never started
    assert states_killed == states_reference
    assert len(list(killed.paths.checkpoints.glob("live-*.pt"))) == 1  # no orphan checkpoint in use

    code, output = _cli(killed_config, killed.workdir)
    assert code == 0, output
    continual_update(config=reference_config)
    ledger_killed, states_killed = _snapshot(killed)
    ledger_reference, states_reference = _snapshot(reference)
    assert ledger_killed == ledger_reference
    assert all(status == "processed" for status, _, _ in ledger_killed.values())
    assert states_killed == states_reference
    assert balanced(pipeline_status(killed))
