"""Retraining: a challenger trained on the recent window, judged against the champion.

The newest `holdout_batches` of each entity are held out. When each file is a run of its
lines (`log_schema.file_is_run`), each batch of a line is a sequence of its own, from a zero
state, for training and judging alike, as the stream reads it. The challenger is a fresh model
trained for a few epochs on each entity's recent batches before them, mixed with the
champion's replay windows from before the held-out slice (so neither sees it). The champion
is judged by the one-step errors it made on the held-out batches before learning from them
(test-then-train, as recorded); the challenger by reading each entity's recent window from a
zero state and forecasting the held-out part. The `champion` alias moves only if the
challenger's MSE is below the champion's by at least the configured margin; then the live
model becomes the challenger and each entity carries the challenger's state at its newest
event. Either way the drift reference becomes the recent window and the detectors restart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy import bindparam, func, select, update

from features import FeatureBatch
from flows.model.fleet import new_learner, save_checkpoint
from flows.model.live import LiveModel
from flows.model.reference import build_reference
from flows.model.registry_package import register_version
from flows.monitor.tracking import CHALLENGER, CHAMPION, Tracker, flat_settings
from flows.storage.line_states import carried_by_every_line, json_safe
from flows.storage.models import BatchSummary, EntityState, ModelState, RetrainDecision
from flows.storage.work_folder import resolved_path, stored_path
from lru_online import OnlineLearner
from lru_online.learner import lines_per_step_for

log = logging.getLogger(__name__)


@dataclass
class RetrainOutcome:
    promoted: bool
    reason: str
    champion_version: str | None = None
    challenger_version: str | None = None
    champion_mse: float | None = None
    challenger_mse: float | None = None
    decision_id: int | None = None


@dataclass
class RecentWindow:
    """Every line's recent batches, its newest `holdout_batches` held out."""

    # Each line's batches before its held-out ones, and with them (lines in the same order; a
    # line once per batch when each file is a run).
    train: FeatureBatch
    full: FeatureBatch
    holdout: np.ndarray  # (rows of `full`,) bool: the held-out rows
    holdout_residuals: np.ndarray  # the champion's test-then-train residuals there
    holdout_update_index: int  # the champion's update count when the first held-out batch began
    raw: np.ndarray  # readings of every row
    last_sequence: int


def _load_window(live: LiveModel) -> RecentWindow | None:
    """Reads each line's last `recent_batches` summaries (one query) and their output files
    (each file once, whatever the number of its lines)."""
    settings = live.settings.retrain
    spec = live.spec
    newest_first = (
        func.row_number().over(partition_by=BatchSummary.entity, order_by=BatchSummary.sequence.desc()).label("age")
    )
    ranked = select(
        BatchSummary.entity, BatchSummary.sequence, BatchSummary.features_path, BatchSummary.metrics, newest_first
    ).subquery()
    with live.db.session() as session:
        rows = session.execute(select(ranked).where(ranked.c.age <= settings.recent_batches)).all()
    summaries = pd.DataFrame(rows, columns=["entity", "sequence", "features_path", "metrics", "age"])
    counts = summaries.groupby("entity")["sequence"].transform("size")
    summaries = summaries[counts > settings.holdout_batches]
    if summaries.empty:
        return None
    summaries["held_out"] = summaries["age"] <= settings.holdout_batches

    residuals = [f"residual_{s}" for s in spec.sensors]
    readings = [f"raw_{s}" for s in spec.sensors]
    columns = [
        spec.entity_column,
        spec.timestamp_column,
        *spec.input_names,
        *(f"target_{s}" for s in spec.sensors),
        "dt",
        *readings,
        *residuals,
    ]
    frames = []
    for path, group in summaries.groupby("features_path", sort=False):
        frame = pd.read_parquet(resolved_path(live.settings.workdir, path), columns=columns)
        frame[spec.entity_column] = frame[spec.entity_column].astype(str)
        tags = group[["entity", "sequence", "held_out"]].rename(columns={"entity": spec.entity_column})
        frames.append(frame.merge(tags, on=spec.entity_column, how="inner"))
    rows = pd.concat(frames, ignore_index=True).sort_values(
        [spec.entity_column, "sequence", spec.timestamp_column], kind="stable", ignore_index=True
    )
    holdout = rows["held_out"].to_numpy()
    runs_by = "sequence" if live.settings.log_schema.file_is_run else None
    first_held = summaries[summaries["age"] == settings.holdout_batches]
    update_index = min(int((m or {}).get("update_index") or 0) for m in first_held["metrics"])
    return RecentWindow(
        train=FeatureBatch.from_frame(rows[~holdout], spec, runs_by),
        full=FeatureBatch.from_frame(rows, spec, runs_by),
        holdout=holdout,
        holdout_residuals=rows.loc[holdout, residuals].to_numpy(np.float64),
        holdout_update_index=update_index,
        raw=rows[readings].to_numpy(np.float64),
        last_sequence=int(summaries["sequence"].max()),
    )


def _champion_mse(window: RecentWindow) -> float:
    finite = window.holdout_residuals[np.isfinite(window.holdout_residuals)]
    return float(np.mean(finite**2)) if finite.size else float("nan")


def _evaluate(learner: OnlineLearner, window: RecentWindow) -> tuple[float, dict[str, bytes]]:
    """Held-out one-step MSE over all lines, each read from a zero state, and each line's state
    at its newest event (the end of its last sequence: rows are in time order)."""
    u, y, dt, steps = window.full.tensors()
    scored = learner.score(u, y, None, dt, steps)
    held = window.full.flat(scored.residuals.numpy())[window.holdout]
    finite = held[np.isfinite(held)]
    states = {e: s.to_bytes() for e, s in zip(window.full.entities, scored.state.unbind(), strict=True)}
    return (float(np.mean(finite**2)) if finite.size else float("nan")), states


def retrain(
    live: LiveModel, tracker: Tracker, trigger: str = "manual", drift_event_id: int | None = None
) -> RetrainOutcome:
    settings = live.settings
    state = live.state()
    if state is None:
        return RetrainOutcome(False, "no live model to retrain yet")
    window = _load_window(live)
    if window is None:
        return RetrainOutcome(False, "not enough processed batches for a held-out slice")
    champion = live.load()
    loaded_version = live.version

    challenger = new_learner(settings, live.spec)
    for group in challenger.optimizer.param_groups:
        group["lr"] = settings.retrain.learning_rate
    challenger.replay.load_state_dict(champion.replay.state_dict())
    challenger.forget_replay_from(window.holdout_update_index)
    u, y, dt, steps = window.train.tensors()
    groups = lines_per_step_for(len(window.train.entities), settings.retrain.steps_per_window)
    losses = [
        challenger.update(u, y, None, dt, steps, lines_per_step=groups)["loss"] for _ in range(settings.retrain.epochs)
    ]

    champion_mse = _champion_mse(window)
    challenger_mse, challenger_states = _evaluate(challenger, window)
    margin = settings.retrain.margin
    promoted = bool(challenger_mse < champion_mse * (1 - margin))
    reason = (
        f"challenger held-out MSE {challenger_mse:.4f} vs champion {champion_mse:.4f} "
        f"(needs < {champion_mse * (1 - margin):.4f})"
    )

    run_id = tracker.start_run(f"retrain-{trigger}", "retrain", params=flat_settings(settings))
    for epoch, loss in enumerate(losses):
        tracker.log_metrics(run_id, {"train_loss": loss}, step=epoch)
    tracker.log_metrics(run_id, {"champion_mse": champion_mse, "challenger_mse": challenger_mse}, step=0)
    checkpoint = save_checkpoint(challenger, settings.paths.checkpoints, "challenger")
    with live.db.session() as session:
        lines = carried_by_every_line(session)
    lines.hidden.update(challenger_states)  # the challenger read each recent window itself
    challenger_version = register_version(tracker, settings, run_id, checkpoint, "challenger", reason, lines)
    tracker.set_alias(CHALLENGER, challenger_version)

    reference = json_safe(
        build_reference(window.raw, live.spec.sensors, mae=float(np.sqrt(challenger_mse if promoted else champion_mse)))
    )
    newest = window.last_sequence
    with live.db.session() as session:
        model = session.get(ModelState, settings.pipeline)
        latest = session.scalar(select(func.max(BatchSummary.sequence)))
        if promoted and (model.version != loaded_version or latest != newest):
            promoted, reason = False, reason + "; not promoted: new batches were committed during retraining"
        if promoted:
            session.connection().execute(
                update(EntityState)
                .where(EntityState.entity == bindparam("key"))
                .values(
                    hidden_state=bindparam("hidden"),
                    model_version=challenger_version,
                    version=EntityState.version + 1,
                )
                .execution_options(synchronize_session=False),
                [{"key": entity, "hidden": hidden} for entity, hidden in challenger_states.items()],
            )
            model.checkpoint_path = stored_path(settings.workdir, checkpoint)
            model.champion_version = challenger_version
        model.reference = reference
        model.drift_since_sequence = latest or 0
        decision = RetrainDecision(
            pipeline=settings.pipeline,
            drift_event_id=drift_event_id,
            trigger=trigger,
            champion_version=state.champion_version,
            challenger_version=challenger_version,
            champion_mse=champion_mse,
            challenger_mse=challenger_mse,
            margin=margin,
            promoted=promoted,
            reason=reason,
            mlflow_run_id=run_id,
        )
        session.add(decision)
        session.flush()
        decision_id, new_version = decision.id, model.version
    if promoted:
        tracker.set_alias(CHAMPION, challenger_version)
        live.drop()  # the new champion is loaded on next use
        live.remove_checkpoint(state.checkpoint_path)
    else:
        if live.version == loaded_version:
            live.version = new_version  # same weights, only the reference moved
        checkpoint.unlink(missing_ok=True)  # this run's own file, just written
    tracker.log_metrics(run_id, {"promoted": float(promoted)}, step=0)
    tracker.end_run(run_id)
    log.info("retrain (%s): %s", trigger, reason)
    return RetrainOutcome(
        promoted,
        reason,
        state.champion_version,
        challenger_version,
        champion_mse,
        challenger_mse,
        decision_id,
    )
