"""What the benchmark scripts share: the repository's place, its benchmark configs, the
learning rate of a running learner, matplotlib without a screen, and settings run side by side."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

Result = TypeVar("Result")

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


def run_in_scratch_folders(settings: list[dict], run: Callable[[dict, Path], Result], workers: int) -> list[Result]:
    """`run(setting, folder)` for every setting, each in an empty folder of its own that is
    removed after, `workers` at once (threads: each run is a child process of its own). Child
    processes get one torch thread each."""
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(workers) as pool:

        def one(numbered: tuple[int, dict]) -> Result:
            number, setting = numbered
            folder = Path(scratch) / f"setting-{number}"
            folder.mkdir()
            return run(setting, folder)

        return list(pool.map(one, enumerate(settings)))


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
