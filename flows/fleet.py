"""The live fleet model: one online learner per pipeline, checkpointed per committed batch."""

from __future__ import annotations

import uuid
from pathlib import Path

from features.spec import FeatureSpec
from flows.settings import Settings
from lru_online import LearnerConfig, LRUForecaster, ModelConfig, OnlineLearner


def feature_spec(settings: Settings) -> FeatureSpec:
    schema = settings.log_schema
    return FeatureSpec(
        entity_column=schema.entity_column,
        timestamp_column=schema.timestamp_column,
        sensors=tuple(schema.sensor_names),
        time_scale_seconds=settings.features.time_scale_seconds,
        label_columns=tuple(schema.label_columns),
    )


def model_config(settings: Settings, spec: FeatureSpec) -> ModelConfig:
    m = settings.model
    return ModelConfig(
        n_inputs=spec.n_inputs,
        n_targets=spec.n_targets,
        d_model=m.d_model,
        d_state=m.d_state,
        n_layers=m.n_layers,
        linear_state=m.linear_state,
        horizon=m.horizon,
        dropout=m.dropout,
        r_min=m.r_min,
        r_max=m.r_max,
        max_phase=m.max_phase,
    )


def learner_config(settings: Settings, learning_rate: float | None = None) -> LearnerConfig:
    u = settings.update
    return LearnerConfig(
        learning_rate=u.learning_rate if learning_rate is None else learning_rate,
        window=u.window,
        epochs=u.epochs,
        grad_clip=u.grad_clip,
        replay_capacity=u.replay_capacity,
        replay_batch=u.replay_batch,
        ewc_weight=u.ewc_weight,
        seed=u.seed,
    )


def new_learner(settings: Settings, spec: FeatureSpec) -> OnlineLearner:
    import torch

    torch.manual_seed(settings.update.seed)
    return OnlineLearner(LRUForecaster(model_config(settings, spec)), learner_config(settings))


def load_learner(path: Path, settings: Settings) -> OnlineLearner:
    """A checkpointed learner; its learning settings follow the current configuration."""
    learner = OnlineLearner.load_checkpoint(path)
    wanted = learner_config(settings)
    if learner.config != wanted:
        restored = OnlineLearner(learner.model, wanted)
        state = learner.state_dict()
        restored.optimizer.load_state_dict(state["optimizer"])
        for group in restored.optimizer.param_groups:
            group["lr"] = wanted.learning_rate
        restored.replay.load_state_dict(state["replay"])
        restored.ewc.load_state_dict(state["ewc"])
        restored.updates = learner.updates
        learner = restored
    return learner


def save_checkpoint(learner: OnlineLearner, folder: Path, label: str) -> Path:
    """Writes a new, uniquely named checkpoint; nothing points to it until a commit does."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{label}-{uuid.uuid4().hex[:12]}.pt"
    tmp = path.with_suffix(".tmp")
    learner.save_checkpoint(tmp)
    tmp.replace(path)
    return path
