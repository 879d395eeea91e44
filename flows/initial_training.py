"""Initial training: the first valid landed batches fit a fresh model, registered as version 1.

Those batches are then processed like any other (scored and learned from), so their rows are
accounted for; their scores are in-sample and the README says so.
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import IntegrityError

from features import EntityFeatureState, build_features
from features.windows import concatenate
from flows.fleet import new_learner, save_checkpoint
from flows.line_states import json_safe
from flows.pipeline import Pipeline
from flows.reference import build_reference
from flows.storage.models import ModelState
from flows.tracking import CHAMPION
from lru_online.learner import forecast_error, lines_per_step_for

log = logging.getLogger(__name__)


def train_initial(pipeline: Pipeline) -> str | None:
    """Fits and registers the first model; returns its registry version (None: no data yet)."""
    settings = pipeline.settings
    spec = pipeline.spec
    wanted = settings.initial_training.batches
    picked = []
    for batch_id in pipeline.ledger.pending():
        rows, quarantined = pipeline.read_and_validate(pipeline.ledger.get(batch_id))
        if quarantined is None:
            picked.append(rows)
        if len(picked) == wanted:
            break
    if not picked:
        return None

    states: dict[str, EntityFeatureState] = {}
    parts = []
    for rows in picked:
        features, after = build_features(rows, spec, states)
        states.update(after)
        parts.append(features)
    # Every line's rows of the picked files as one sequence, all lines in one padded batch.
    sequences = concatenate(parts)
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
    tracker = pipeline.tracker
    run_id = tracker.start_run("initial-training", "initial", params=flat_settings(settings))
    for epoch, loss in enumerate(losses):
        tracker.log_metrics(run_id, {"train_loss": loss}, step=epoch)
    tracker.log_metrics(run_id, {"train_mae": reference["mae"], "rows": float(len(raw))}, step=0)
    version = tracker.register(run_id, checkpoint, "initial", f"Initial training on {len(picked)} batches")
    tracker.set_alias(CHAMPION, version)
    tracker.end_run(run_id)
    online_run = tracker.start_run("online-updates", "online", params=flat_settings(settings))
    try:
        with pipeline.db.session() as session:
            session.add(
                ModelState(
                    pipeline=settings.pipeline,
                    checkpoint_path=str(checkpoint),
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
        return pipeline.model_state().champion_version
    log.info("initial model: version %s from %d batches (%d rows)", version, len(picked), len(raw))
    return version


def flat_settings(settings) -> dict:
    """The settings as flat MLflow params; URLs with their passwords masked."""
    from flows.storage.database import masked

    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        elif isinstance(value, list):
            flat[prefix] = str(value)[:500]
        else:
            flat[prefix] = str(value)

    walk("", settings.model_dump(mode="json", exclude={"log_schema"}))
    flat["database_url"] = masked(settings.database_url)
    flat["tracking.tracking_uri"] = masked(settings.tracking.tracking_uri)
    flat["log_schema.sensors"] = ",".join(settings.log_schema.sensor_names)
    return flat
