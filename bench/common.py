"""What the benchmark scripts share: the repository's place, its benchmark configs, the
learning rate of a running learner, and matplotlib without a screen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str) -> dict[str, Any]:
    """configs/NAME.yaml as a dict (empty when the file is missing)."""
    import yaml

    path = ROOT / "configs" / f"{name}.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def set_learning_rate(learner, value: float) -> None:
    """Sets the learning rate of an lru_online OnlineLearner's optimizer."""
    for group in learner.optimizer.param_groups:
        group["lr"] = value


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
