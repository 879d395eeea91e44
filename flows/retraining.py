"""Retraining: a challenger trained on the recent window, judged against the champion.

The newest `holdout_batches` of each entity are held out. The challenger is a fresh model
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
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import func, select

from features import FeatureBatch
from features.windows import concatenate
from flows.fleet import new_learner, save_checkpoint
from flows.initial_training import flat_settings
from flows.pipeline import Pipeline, json_safe
from flows.reference import build_reference
from flows.storage.models import BatchSummary, EntityState, ModelState, RetrainDecision
from flows.tracking import CHALLENGER, CHAMPION
from lru_online import OnlineLearner, RecurrentState

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
class _Window:
    entity: str
    train: FeatureBatch
    full: FeatureBatch
    holdout_rows: int
    holdout_residuals: np.ndarray  # the champion's test-then-train residuals there
    holdout_update_index: int  # the champion's update count when the holdout began
    raw: np.ndarray
    last_sequence: int


def _load_windows(pipeline: Pipeline) -> list[_Window]:
    settings = pipeline.settings.retrain
    spec = pipeline.spec
    windows = []
    with pipeline.db.session() as session:
        entities = list(session.scalars(select(BatchSummary.entity).distinct().order_by(BatchSummary.entity)))
        recent = {
            entity: list(
                session.scalars(
                    select(BatchSummary)
                    .where(BatchSummary.entity == entity)
                    .order_by(BatchSummary.sequence.desc())
                    .limit(settings.recent_batches)
                )
            )[::-1]
            for entity in entities
        }
    for entity, summaries in recent.items():
        if len(summaries) <= settings.holdout_batches:
            continue
        frames = [pd.read_parquet(s.features_path) for s in summaries]
        batches = [FeatureBatch.from_frame(f, spec) for f in frames]
        split = len(batches) - settings.holdout_batches
        raw = np.concatenate([f[[f"raw_{s}" for s in spec.sensors]].to_numpy(np.float64) for f in frames])
        residual_columns = [f"residual_{s}" for s in spec.sensors]
        windows.append(
            _Window(
                entity=entity,
                train=concatenate(batches[:split]),
                full=concatenate(batches),
                holdout_rows=sum(len(b) for b in batches[split:]),
                holdout_residuals=np.concatenate([f[residual_columns].to_numpy(np.float64) for f in frames[split:]]),
                holdout_update_index=int(summaries[split].metrics.get("update_index") or 0),
                raw=raw,
                last_sequence=summaries[-1].sequence,
            )
        )
    return windows


def _champion_mse(windows: list[_Window]) -> float:
    residuals = np.concatenate([w.holdout_residuals.ravel() for w in windows])
    finite = residuals[np.isfinite(residuals)]
    return float(np.mean(finite**2)) if finite.size else float("nan")


def _evaluate(learner: OnlineLearner, windows: list[_Window]) -> tuple[float, dict[str, RecurrentState]]:
    """Held-out one-step MSE over all entities, and each entity's state at its newest event."""
    squared, count, states = 0.0, 0, {}
    for window in windows:
        u, y, dt = window.full.tensors()
        scored = learner.score(u, y, None, dt)
        held = scored.residuals[:, -window.holdout_rows :]
        finite = held[held.isfinite()]
        squared += float((finite**2).sum())
        count += finite.numel()
        states[window.entity] = scored.state
    return (squared / count if count else float("nan")), states


def retrain(pipeline: Pipeline, trigger: str = "manual", drift_event_id: int | None = None) -> RetrainOutcome:
    settings = pipeline.settings
    state = pipeline.model_state()
    if state is None:
        return RetrainOutcome(False, "no live model to retrain yet")
    windows = _load_windows(pipeline)
    if not windows:
        return RetrainOutcome(False, "not enough processed batches for a held-out slice")
    champion = pipeline.load_live_model()
    loaded_version = pipeline._model_version

    challenger = new_learner(settings, pipeline.spec)
    for group in challenger.optimizer.param_groups:
        group["lr"] = settings.retrain.learning_rate
    challenger.replay.load_state_dict(champion.replay.state_dict())
    challenger.forget_replay_from(min(w.holdout_update_index for w in windows))
    losses = []
    for _ in range(settings.retrain.epochs):
        epoch = []
        for window in windows:
            u, y, dt = window.train.tensors()
            epoch.append(challenger.update(u, y, None, dt)["loss"])
        losses.append(float(np.mean(epoch)))

    champion_mse = _champion_mse(windows)
    challenger_mse, challenger_states = _evaluate(challenger, windows)
    margin = settings.retrain.margin
    promoted = bool(challenger_mse < champion_mse * (1 - margin))
    reason = (
        f"challenger held-out MSE {challenger_mse:.4f} vs champion {champion_mse:.4f} "
        f"(needs < {champion_mse * (1 - margin):.4f})"
    )

    tracker = pipeline.tracker
    run_id = tracker.start_run(f"retrain-{trigger}", "retrain", params=flat_settings(settings))
    for epoch, loss in enumerate(losses):
        tracker.log_metrics(run_id, {"train_loss": loss}, step=epoch)
    tracker.log_metrics(run_id, {"champion_mse": champion_mse, "challenger_mse": challenger_mse}, step=0)
    checkpoint = save_checkpoint(challenger, settings.paths.checkpoints, "challenger")
    challenger_version = tracker.register(run_id, checkpoint, "challenger", reason)
    tracker.set_alias(CHALLENGER, challenger_version)

    raw = np.concatenate([w.raw for w in windows])
    reference = json_safe(
        build_reference(raw, pipeline.spec.sensors, mae=float(np.sqrt(challenger_mse if promoted else champion_mse)))
    )
    newest = max(w.last_sequence for w in windows)
    with pipeline.db.session() as session:
        model = session.get(ModelState, settings.pipeline)
        latest = session.scalar(select(func.max(BatchSummary.sequence)))
        if promoted and (model.version != loaded_version or latest != newest):
            promoted, reason = False, reason + "; not promoted: new batches were committed during retraining"
        if promoted:
            for window in windows:
                entity = session.get(EntityState, window.entity)
                entity.hidden_state = challenger_states[window.entity].to_bytes()
                entity.model_version = challenger_version
            model.checkpoint_path = str(checkpoint)
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
        pipeline.learner = None  # the new champion is loaded on next use
        Path(state.checkpoint_path).unlink(missing_ok=True)
    else:
        if pipeline._model_version == loaded_version:
            pipeline._model_version = new_version  # same weights, only the reference moved
        Path(checkpoint).unlink(missing_ok=True)
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
