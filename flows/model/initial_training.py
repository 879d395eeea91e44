"""Initial training: the first valid landed batches fit a fresh model, registered as version 1.

The orchestrator hands in their validated rows; the batches are then processed like any other
(scored and learned from), so their rows are accounted for; their scores are in-sample and the
README says so.
"""

from __future__ import annotations

import logging

import pandas as pd
from sqlalchemy.exc import IntegrityError

from features import FeatureBatch, FeatureSpec, build_features
from features.windows import concatenate
from flows.model.fleet import new_learner, save_checkpoint
from flows.model.live import LiveModel
from flows.model.reference import build_reference
from flows.model.registry_package import register_version
from flows.monitor.tracking import CHAMPION, Tracker, flat_settings
from flows.storage.line_states import json_safe
from flows.storage.models import ModelState
from flows.storage.work_folder import stored_path
from lru_online.learner import forecast_error, lines_per_step_for

log = logging.getLogger(__name__)


def training_features(picked: list[pd.DataFrame], spec: FeatureSpec, file_is_run: bool) -> list[FeatureBatch]:
    """The features of the picked files in order, each line's feature state carried from file
    to file, as the stream carries it; when each file is a run, each starts from nothing."""
    states: dict[str, bytes] = {}
    parts = []
    for rows in picked:
        features, after = build_features(rows, spec, states)
        if not file_is_run:  # a run's states end with its file: nothing to carry, each starts fresh
            states.update(after.to_bytes_many())
        parts.append(features)
    return parts


def training_sequences(picked: list[pd.DataFrame], spec: FeatureSpec, file_is_run: bool) -> FeatureBatch:
    """Every line's rows of the picked files as one sequence, all lines in one padded batch;
    when each file is a run, each line's run is a sequence of its own (its hidden state starts
    at zero, as the stream's does)."""
    parts = training_features(picked, spec, file_is_run)
    return FeatureBatch.stack(parts) if file_is_run else concatenate(parts)


def train_initial(live: LiveModel, tracker: Tracker, picked: list[pd.DataFrame]) -> str | None:
    """Fits the first model on the validated rows of the first files and registers it; returns
    its registry version (None: no rows yet)."""
    settings = live.settings
    spec = live.spec
    if not picked:
        return None

    sequences = training_sequences(picked, spec, settings.log_schema.file_is_run)
    u, y, dt, steps = sequences.tensors()
    learner = new_learner(settings, spec)
    groups = lines_per_step_for(len(sequences.entities), settings.initial_training.steps_per_window)
    losses = [
        learner.update(u, y, None, dt, steps, lines_per_step=groups)["loss"]
        for _ in range(settings.initial_training.epochs)
    ]
    errors = forecast_error(learner.score(u, y, None, dt, steps).residuals)
    raw = sequences.raw
    reference = build_reference(raw, spec.sensors, mae=errors["mae_before"])

    checkpoint = save_checkpoint(learner, settings.paths.checkpoints, "initial")
    run_id = tracker.start_run("initial-training", "initial", params=flat_settings(settings))
    for epoch, loss in enumerate(losses):
        tracker.log_metrics(run_id, {"train_loss": loss}, step=epoch)
    tracker.log_metrics(run_id, {"train_mae": reference["mae"], "rows": float(len(raw))}, step=0)
    version = register_version(
        tracker, settings, run_id, checkpoint, "initial", f"Initial training on {len(picked)} batches"
    )
    tracker.set_alias(CHAMPION, version)
    tracker.end_run(run_id)
    online_run = tracker.start_run("online-updates", "online", params=flat_settings(settings))
    try:
        with live.db.session() as session:
            session.add(
                ModelState(
                    pipeline=settings.pipeline,
                    checkpoint_path=stored_path(settings.workdir, checkpoint),
                    champion_version=version,
                    online_run_id=online_run,
                    reference=json_safe(reference),
                    drift_since_sequence=0,
                    batches_since_snapshot=0,
                )
            )
    except IntegrityError:
        log.warning("another run finished initial training first; using its model")
        tracker.end_run(online_run, "KILLED")
        checkpoint.unlink(missing_ok=True)
        return live.state().champion_version
    log.info("initial model: version %s from %d batches (%d rows)", version, len(picked), len(raw))
    return version
