"""The live fleet model: one online learner per pipeline, checkpointed per committed batch."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from pathlib import Path

from features.spec import FeatureSpec
from flows.settings import Settings
from lru_online import LearnerConfig, LRUForecaster, ModelConfig, OnlineLearner

log = logging.getLogger(__name__)


def model_config(settings: Settings, spec: FeatureSpec) -> ModelConfig:
    return ModelConfig(n_inputs=spec.n_inputs, n_targets=spec.n_targets, **settings.model.model_dump())


def learner_config(settings: Settings, learning_rate: float | None = None) -> LearnerConfig:
    config = LearnerConfig(**settings.update.learner_fields())
    return config if learning_rate is None else dataclasses.replace(config, learning_rate=learning_rate)


def new_learner(settings: Settings, spec: FeatureSpec) -> OnlineLearner:
    import torch

    torch.manual_seed(settings.update.seed)
    return OnlineLearner(LRUForecaster(model_config(settings, spec)), learner_config(settings))


def load_learner(path: Path, settings: Settings) -> OnlineLearner:
    """A checkpointed learner. Its learning settings and the model's run-time ones (scan
    backend, dropout) follow the current configuration; its shape stays the checkpoint's until a
    retraining builds a model of the configured shape."""
    learner = OnlineLearner.load_checkpoint(path)
    wanted = learner_config(settings)
    stored = learner.model.config
    configured = settings.model.model_dump()
    runtime = {"scan_backend": configured["scan_backend"], "dropout": configured["dropout"]}
    shape = {key: value for key, value in configured.items() if key not in runtime}
    if any(getattr(stored, key) != value for key, value in shape.items()):
        log.warning(
            "the live model in %s keeps its shape %s until a retraining builds the configured one", path, stored
        )
    if learner.config == wanted and all(getattr(stored, key) == value for key, value in runtime.items()):
        return learner
    state = learner.state_dict()
    model = LRUForecaster(dataclasses.replace(stored, **runtime))
    model.load_state_dict(state["model"])
    restored = OnlineLearner(model, wanted)
    restored.optimizer.load_state_dict(state["optimizer"])
    for group in restored.optimizer.param_groups:
        group["lr"] = wanted.learning_rate
        group["weight_decay"] = wanted.weight_decay
    restored.replay.load_state_dict(state["replay"])
    restored.replay.capacity = wanted.replay_capacity
    del restored.replay.windows[wanted.replay_capacity :]  # a uniform sample stays one when cut
    restored.ewc.load_state_dict(state["ewc"])
    restored.ewc.weight, restored.ewc.decay = wanted.ewc_weight, wanted.ewc_decay
    restored.updates = learner.updates
    return restored


def save_checkpoint(learner: OnlineLearner, folder: Path, label: str) -> Path:
    """Writes a new, uniquely named checkpoint; nothing points to it until a commit does."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{label}-{uuid.uuid4().hex[:12]}.pt"
    tmp = path.with_suffix(".tmp")
    learner.save_checkpoint(tmp)
    tmp.replace(path)
    return path
