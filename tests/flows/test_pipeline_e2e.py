"""The whole pipeline on a simulated plant: real Prefect flow runs, SQLite, MLflow, GE."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sqlalchemy import select

from flows.model.forecast_mixture import forecasts_from_residuals, residuals_from_a_fresh_mixture
from flows.monitor.status import balanced, pipeline_status
from flows.monitor.tracking import CHAMPION, Tracker
from flows.orchestrate.prefect_flows import continual_update
from flows.storage.database import Database
from flows.storage.models import Batch, BatchSummary, DriftEvent, RetrainDecision
from flows.storage.work_folder import resolved_path
from tests.flows.helpers import small_config, small_plant

# A whole simulated plant with drifts and retraining: about 30 s.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def plant(tmp_path_factory, prefect_api):
    settings, config = small_config(tmp_path_factory.mktemp("plant"))
    truth = small_plant(settings)
    continual_update(config=config)
    return settings, truth, config


def _batches(settings):
    db = Database(settings.database_url)
    with db.session() as session:
        return list(session.scalars(select(Batch).order_by(Batch.id)))


def test_every_landed_row_is_accounted_for(plant):
    settings, truth, _ = plant
    status = pipeline_status(settings)
    assert status["rows"]["received"] == len(truth.files) * truth.rows_per_batch
    assert balanced(status)
    assert status["batches"]["pending"] == 0
    assert status["batches"]["processed"] + status["batches"]["quarantined"] == len(truth.files)
    assert not list(settings.paths.landing.iterdir())  # everything was filed away


def test_broken_batches_are_quarantined_with_reasons(plant):
    """Each broken file costs what its fault concerns: a wrong schema or a burst of missing
    readings the file, a reading out of range its line's rows (here the file's only line), and
    a line's rows out of order nothing (they are put in order and scored)."""
    settings, truth, _ = plant
    batches = {b.source_file.rsplit("/", 1)[-1]: b for b in _batches(settings)}
    quarantined = {name for name, b in batches.items() if b.status == "quarantined"}
    reordered = {f["file"] for f in truth.broken_files if f["kind"] == "unsorted_timestamps"}
    assert reordered and quarantined == {f["file"] for f in truth.broken_files} - reordered
    expected_words = {
        "wrong_schema": "missing column 'pressure'",
        "nan_burst": "values missing",
        "out_of_range": "outside the physical range",
    }
    for broken in truth.broken_files:
        batch = batches[broken["file"]]
        if broken["file"] in reordered:
            assert batch.status == "processed" and batch.rows_scored == broken["rows"]
            continue
        assert any(expected_words[broken["kind"]] in reason for reason in batch.reasons), batch.reasons
        assert all(reason.startswith(broken["file"]) for reason in batch.reasons)
        assert (settings.paths.quarantine / broken["file"]).exists()
        assert batch.rows_quarantined == broken["rows"]


def test_drift_is_detected_after_the_abrupt_change_within_the_delay(plant):
    settings, truth, _ = plant
    abrupt = next(d for d in truth.drifts if d["kind"] == "abrupt")
    gradual = next(d for d in truth.drifts if d["kind"] == "gradual")
    db = Database(settings.database_url)
    with db.session() as session:
        events = session.execute(select(DriftEvent.event_time, DriftEvent.detector)).all()
    change = pd.Timestamp(abrupt["time"])
    timely = [
        e
        for e in events
        if change <= pd.Timestamp(e.event_time)
        and _batch_index(settings, e.event_time) <= abrupt["batch"] + settings.drift.max_delay_batches
    ]
    assert timely, f"no detection within {settings.drift.max_delay_batches} batches of the abrupt drift: {events}"
    # Nothing fires while the plant is unchanged.
    assert all(pd.Timestamp(e.event_time) >= pd.Timestamp(gradual["time"]) for e in events)


def test_every_drift_event_has_its_report_in_mlflow(plant):
    settings, _, _ = plant
    db = Database(settings.database_url)
    with db.session() as session:
        events = list(session.scalars(select(DriftEvent)))
    assert events and all(e.report_uri for e in events), [e.report_uri for e in events]
    tracker = Tracker(settings)
    for uri in sorted({e.report_uri for e in events}):
        run_id, path = uri.removeprefix("runs:/").split("/", 1)
        files = {item.path.rsplit("/", 1)[-1] for item in tracker.client.list_artifacts(run_id, path)}
        assert files == {"feature_distributions.png", "error_over_time.png", "drift_summary.json"}, uri


def _batch_index(settings, event_time) -> int:
    for batch in _batches(settings):
        if batch.last_ts is not None and batch.last_ts == event_time:
            return int(batch.source_file.rsplit("batch-", 1)[1].split(".")[0])
    raise AssertionError(f"no batch ends at {event_time}")


def test_retraining_ran_and_the_champion_alias_marks_the_winner(plant):
    settings, _, _ = plant
    db = Database(settings.database_url)
    with db.session() as session:
        decisions = list(session.scalars(select(RetrainDecision).order_by(RetrainDecision.id)))
    assert decisions, "drift fired but no retraining ran"
    tracker = Tracker(settings)
    promoted = [d for d in decisions if d.promoted]
    initial = tracker.versions()[0]["version"]
    expected = promoted[-1].challenger_version if promoted else initial
    assert tracker.alias_version(CHAMPION) == expected
    # The champion's side of every decision, recomputed from what the pipeline wrote: its
    # test-then-train residuals on each line's newest batch at the decision.
    for decision in decisions:
        assert decision.champion_mse == pytest.approx(_champion_holdout_mse(settings, decision), rel=1e-5)
    kinds = [v["kind"] for v in tracker.versions()]
    assert kinds[0] == "initial" and kinds.count("challenger") == len(decisions)


def _champion_holdout_mse(settings, decision) -> float:
    """Squared residuals of each line's newest `holdout_rows` rows committed up to the end of
    the decision's window, read back from the output files. With the forecast mixture on, the
    champion model's own forecasts of each line's newest `window_rows` rows (its readings minus
    its model residuals) go through a mixture started afresh at the window's first row."""
    db = Database(settings.database_url)
    with db.session() as session:
        summaries = list(session.scalars(select(BatchSummary).where(BatchSummary.sequence <= decision.window_sequence)))
    frames = []
    for summary in summaries:
        rows = pd.read_parquet(resolved_path(settings.workdir, summary.features_path))
        frames.append(rows[rows["entity"] == summary.entity].assign(sequence=summary.sequence))
    rows = pd.concat(frames).sort_values(["entity", "sequence", "timestamp"], kind="stable")
    setup = settings.mixture.setup()
    if setup is None:
        newest = rows.groupby("entity").tail(settings.retrain.holdout_rows)
        values = newest.filter(regex="^residual_").to_numpy().ravel()
        return float(np.mean(values[np.isfinite(values)] ** 2))
    sensors = settings.feature_spec.sensors
    held = []
    for _, line in rows.groupby("entity", sort=False):
        window = line.tail(settings.retrain.window_rows)
        targets = torch.from_numpy(window[[f"target_{s}" for s in sensors]].to_numpy(np.float64))[None]
        model_residuals = torch.from_numpy(window[[f"alarm_residual_{s}" for s in sensors]].to_numpy(np.float64))[None]
        steps = torch.ones(1, len(window), dtype=torch.bool)
        forecast = forecasts_from_residuals(targets, model_residuals)
        residuals = residuals_from_a_fresh_mixture(setup, forecast, targets, steps)[0].numpy()
        if len(window) > settings.retrain.holdout_rows:
            held.append(residuals[-settings.retrain.holdout_rows :].ravel())
    values = np.concatenate(held)
    return float(np.mean(values[np.isfinite(values)] ** 2))


def test_mlflow_holds_one_metric_step_per_processed_batch(plant):
    settings, _, _ = plant
    tracker = Tracker(settings)
    db = Database(settings.database_url)
    with db.session() as session:
        from flows.storage.models import ModelState

        run_id = session.get(ModelState, settings.pipeline).online_run_id
        sequences = set(session.scalars(select(BatchSummary.sequence)))
    history = tracker.client.get_metric_history(run_id, "mae_before")
    assert sorted(m.step for m in history) == sorted(sequences)  # each step once


def test_landing_the_same_file_again_processes_it_once(plant):
    settings, _, _ = plant
    archived = sorted(settings.paths.archive.glob("*_batch-*"))[:2]
    shutil.copy(archived[0], settings.paths.landing / archived[0].name)  # same name, same bytes
    shutil.copy(archived[1], settings.paths.landing / f"copy of {archived[1].name}")  # new name
    before = pipeline_status(settings)
    continual_update(config=plant[2])
    after = pipeline_status(settings)
    assert after["batches"]["processed"] == before["batches"]["processed"]
    assert after["batches"]["duplicate"] == before["batches"]["duplicate"] + 2
    assert after["rows"] == before["rows"]
    assert not list(settings.paths.landing.iterdir())
