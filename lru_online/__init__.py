"""lru_online: streaming Linear Recurrent Units with carried state, in pure PyTorch."""

from lru_online.block import LRUBlock
from lru_online.hindsight import HindsightConfig, HindsightModel, train_hindsight
from lru_online.layer import LRU
from lru_online.learner import LearnerConfig, LearnStep, OnlineLearner, ScoringGraph, forecast_targets
from lru_online.linear_path import LinearPath
from lru_online.linear_scan import available_backends, scan
from lru_online.model import LRUForecaster, ModelConfig, ScoredSequence
from lru_online.state import RecurrentState

__all__ = [
    "LRU",
    "LRUBlock",
    "HindsightConfig",
    "HindsightModel",
    "LRUForecaster",
    "LearnStep",
    "LearnerConfig",
    "LinearPath",
    "ModelConfig",
    "OnlineLearner",
    "ScoringGraph",
    "RecurrentState",
    "ScoredSequence",
    "available_backends",
    "forecast_targets",
    "scan",
    "train_hindsight",
]
