"""A work folder is whole on its own: a copy runs beside the original without touching its
files, and a lost live checkpoint is restored from the registry, also after a kill -9 in the
middle of the restore."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from flows.model.recovery import NothingToRecover
from flows.monitor.status import balanced, pipeline_status
from flows.monitor.tracking import Tracker
from flows.orchestrate.prefect_flows import continual_update
from flows.settings import load_settings
from flows.storage.database import Database
from flows.storage.models import Batch, BatchSummary, ModelRecovery, ModelState
from flows.storage.work_folder import resolved_path
from tests.flows.helpers import small_config, small_plant

pytestmark = pytest.mark.slow


def _first_run(workdir: Path, **overrides):
    """A trained folder: 2 lines, 4 files each landed (3 train the first model, then all are
    streamed), 2 more each held back."""
    settings, config = small_config(
        workdir, initial_training={"batches": 3, "epochs": 1}, drift={"on_detect": "record"}, **overrides
    )
    small_plant(settings, entities=2, batches=6, rows_per_batch=60, broken_batches={})
    held_back = settings.workdir / "held-back"
    held_back.mkdir()
    for path in settings.paths.landing.iterdir():  # batches 4 and 5 of both lines
        if "batch-0004" in path.name or "batch-0005" in path.name:
            path.rename(held_back / path.name)
    continual_update(config=config)
    return settings, config, held_back


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _live_checkpoint(settings) -> tuple[str, Path]:
    db = Database(settings.database_url)
    with db.session() as session:
        stored = session.get(ModelState, settings.pipeline).checkpoint_path
    db.dispose()
    return stored, resolved_path(settings.workdir, stored)


def _land(settings, held_back: Path, names: list[str]) -> None:
    for name in names:
        shutil.copy2(held_back / name, settings.paths.landing / name)


def test_a_copied_work_folder_runs_beside_the_original(tmp_path, prefect_api):
    original, config, held_back = _first_run(tmp_path / "original")
    stored, _ = _live_checkpoint(original)
    assert not Path(stored).is_absolute() and stored.startswith("checkpoints/")

    copy_dir = tmp_path / "copy"
    shutil.copytree(original.workdir, copy_dir)
    copy = load_settings(config, workdir=copy_dir)
    names = sorted(p.name for p in held_back.iterdir())
    before = _files(original.workdir)

    _land(copy, held_back, names[:2])
    result = continual_update(config=config, workdir=str(copy_dir))
    assert result["run"]["processed"] == 2
    assert _files(original.workdir) == before  # the copy neither deleted nor changed a file there
    _, copy_checkpoint = _live_checkpoint(copy)
    assert copy_checkpoint.is_relative_to(copy_dir) and copy_checkpoint.exists()

    _land(original, held_back, names[:2])
    result = continual_update(config=config)
    assert result["run"]["processed"] == 2  # no conflict, no missing checkpoint
    for settings in (original, copy):
        status = pipeline_status(settings)
        assert balanced(status) and status["batches"]["pending"] == 0 and not status["recoveries"]
        _, checkpoint = _live_checkpoint(settings)
        assert checkpoint.is_relative_to(settings.workdir) and checkpoint.exists()
        db = Database(settings.database_url)
        with db.session() as session:
            outputs = set(session.scalars(sa.select(BatchSummary.features_path)))
            stored = [b.stored_at for b in session.scalars(sa.select(Batch))]
        db.dispose()
        assert all(resolved_path(settings.workdir, p).exists() for p in outputs | set(stored))


def test_a_deleted_checkpoint_is_restored_in_the_run_and_every_row_is_counted(tmp_path, prefect_api):
    settings, config, held_back = _first_run(tmp_path / "work")
    stored, checkpoint = _live_checkpoint(settings)
    checkpoint.unlink()
    _land(settings, held_back, sorted(p.name for p in held_back.iterdir()))

    result = continual_update(config=config)
    assert result["run"]["processed"] == 4
    status = pipeline_status(settings)
    assert balanced(status) and status["batches"]["pending"] == 0
    [recovery] = status["recoveries"]
    assert recovery["missing_checkpoint"] == stored and recovery["trigger"] == "run"
    assert recovery["restored_version"] == status["champion_version"] == "1"  # the initial model
    assert str(checkpoint) in recovery["reason"] and "does not exist" in recovery["reason"]
    run = Tracker(settings).client.get_run(recovery["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["missing_checkpoint"] == stored
    _, restored = _live_checkpoint(settings)
    assert restored.exists() and restored != checkpoint


def test_with_recovery_off_the_run_names_the_file_and_recover_restores_it(tmp_path, prefect_api):
    settings, config, held_back = _first_run(tmp_path / "work", recovery={"on_missing_checkpoint": "fail"})
    _, checkpoint = _live_checkpoint(settings)
    checkpoint.write_bytes(b"not a checkpoint")  # a torn copy, say
    _land(settings, held_back, sorted(p.name for p in held_back.iterdir())[:2])

    with pytest.raises(Exception) as error:
        continual_update(config=config)
    assert f"checkpoint {checkpoint}" in str(error.value) and "lru-online recover" in str(error.value)
    assert pipeline_status(settings)["batches"]["pending"] == 2  # nothing lost: still to do

    done = subprocess.run(
        [sys.executable, "-m", "flows", "recover", "--config", config], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "restored the live model from registry version 1" in done.stdout
    with pytest.raises(NothingToRecover):
        _recover_in_process(settings)

    continual_update(config=config)
    status = pipeline_status(settings)
    assert balanced(status) and status["batches"]["pending"] == 0
    assert [r["trigger"] for r in status["recoveries"]] == ["command"]


def _recover_in_process(settings):
    from flows.model.recovery import restore_live_model
    from flows.orchestrate.pipeline import Pipeline

    pipeline = Pipeline(settings)
    try:
        return restore_live_model(pipeline.live, pipeline.tracker, pipeline.ledger, trigger="command")
    finally:
        pipeline.close()


def test_recover_killed_after_writing_the_checkpoint_then_rerun(tmp_path, prefect_api):
    """kill -9 between the restored file and the commit: the live model still points at the
    missing file, and the next recover clears the stray file and the dead run, then restores."""
    settings, config, held_back = _first_run(tmp_path / "work")
    stored, checkpoint = _live_checkpoint(settings)
    checkpoint.unlink()

    environment = {**os.environ, "LRU_ONLINE_KILL_AT": "restored"}
    process = subprocess.Popen(
        [sys.executable, "-m", "flows", "recover", "--config", config],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL, output.decode()[-2000:]
    assert _live_checkpoint(settings)[0] == stored  # not pointed at anything half-done
    strays = list(settings.paths.checkpoints.glob("restored-*"))
    assert len(strays) == 1
    tracker = Tracker(settings)
    killed_runs = tracker.client.search_runs([tracker.experiment_id], "tags.`lru-online.kind` = 'recovery'")
    assert [r.info.status for r in killed_runs] == ["RUNNING"]

    recovery = _recover_in_process(settings)
    assert not strays[0].exists() and recovery.checkpoint.exists()
    runs = {
        r.info.run_id: r.info.status
        for r in tracker.client.search_runs([tracker.experiment_id], "tags.`lru-online.kind` = 'recovery'")
    }
    assert runs == {killed_runs[0].info.run_id: "KILLED", recovery.run_id: "FINISHED"}
    db = Database(settings.database_url)
    with db.session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(ModelRecovery)) == 1
    db.dispose()

    _land(settings, held_back, sorted(p.name for p in held_back.iterdir()))
    continual_update(config=config)
    status = pipeline_status(settings)
    assert balanced(status) and status["batches"]["pending"] == 0 and len(status["recoveries"]) == 1


def test_migration_0003_makes_stored_paths_relative_to_the_folder_they_were_written_in(tmp_path):
    database = Database(f"sqlite:///{tmp_path}/old.db")
    database.migrate("0002")
    old = "/srv/plant/work"
    stamp = pd.Timestamp("2026-01-01").to_pydatetime()
    with database.engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO batches (id, content_hash, source_file, size_bytes, status, kind, rows_received, "
                "rows_scored, rows_quarantined, rows_late, parts_done, received_at, stored_at, output_path) "
                "VALUES (1, 'h', :src, 1, 'processed', 'live', 3, 3, 0, 0, 1, :t, :arch, :out), "
                "(2, 'g', '/mnt/shared/landing/b.csv', 1, 'pending', 'live', 0, 0, 0, 0, 0, :t, NULL, NULL)"
            ),
            {
                "src": f"{old}/landing/a.csv",
                "arch": f"{old}/archive/a.csv",
                "out": f"{old}/output/batches/b1.parquet",
                "t": stamp,
            },
        )
        connection.execute(
            sa.text(
                "INSERT INTO model_state (pipeline, checkpoint_path, drift_since_sequence, batches_since_snapshot, "
                "version, updated_at) VALUES ('factory', :c, 0, 0, 1, :t)"
            ),
            {"c": f"{old}/checkpoints/live-1.pt", "t": stamp},
        )
    database.migrate()
    with database.session() as session:
        batches = {b.id: b for b in session.scalars(sa.select(Batch))}
        checkpoint = session.get(ModelState, "factory").checkpoint_path
    database.dispose()
    assert checkpoint == "checkpoints/live-1.pt"
    assert (batches[1].source_file, batches[1].stored_at, batches[1].output_path) == (
        "landing/a.csv",
        "archive/a.csv",
        "output/batches/b1.parquet",
    )
    assert batches[2].source_file == "/mnt/shared/landing/b.csv"  # outside the folder: kept absolute
