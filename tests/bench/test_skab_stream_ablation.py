"""bench/skab_stream_ablation.py: the standardisations its variants use."""

from __future__ import annotations

import numpy as np
import pytest

from bench.skab import TRAIN_ROWS, LruDetectorConfig
from bench.skab_stream_ablation import AblatedLru


def _measured(scaling: str, runs: list[np.ndarray]) -> np.ndarray:
    """Each run's rows through the variant as the protocol feeds them: baseline, then the rows."""
    detector = AblatedLru(LruDetectorConfig(), scaling, recalibrate=True)
    for rows in runs:
        detector._set_baseline(rows)
        detector.previous_row = None
        z = detector._tensor(rows)[0].numpy()
    return z


def test_a_running_standardisation_measures_each_row_by_the_rows_up_to_it_per_run_or_over_the_stream():
    rng = np.random.default_rng(5)
    first = rng.normal(0.0, 1.0, size=(50, 3))
    second = rng.normal(4.0, 2.0, size=(40, 3))  # white noise: no sensor is slow

    def causal(history: np.ndarray, rows: int) -> np.ndarray:
        out = []
        for t in range(len(history) - rows, len(history)):
            seen = history[: t + 1]
            spread = seen.std(axis=0)
            out.append((history[t] - seen.mean(axis=0)) / np.where(spread > 0, spread, 1.0))
        return np.array(out)

    per_run = _measured("running-per-run", [first, second])
    np.testing.assert_allclose(per_run, causal(second, len(second)), rtol=1e-4, atol=1e-5)
    stream = _measured("running-stream", [first, second])
    np.testing.assert_allclose(stream, causal(np.concatenate([first, second]), len(second)), rtol=1e-4, atol=1e-5)


def test_a_held_standardisation_runs_over_a_runs_training_part_then_keeps_its_figures():
    rng = np.random.default_rng(6)
    training, test = rng.normal(1.0, 2.0, size=(TRAIN_ROWS, 2)), rng.normal(5.0, 1.0, size=(30, 2))
    detector = AblatedLru(LruDetectorConfig(), "held-per-run", recalibrate=True)
    detector._set_baseline(training)
    detector.previous_row = None
    during = detector._tensor(training)[0].numpy()
    after = detector._tensor(test)[0].numpy()
    np.testing.assert_allclose(during[5], (training[5] - training[:6].mean(0)) / training[:6].std(0), rtol=1e-4)
    np.testing.assert_allclose(after, (test - training.mean(0)) / training.std(0), rtol=1e-4, atol=1e-5)


def test_the_first_runs_baseline_is_kept_for_later_runs_only_in_that_variant():
    rng = np.random.default_rng(7)
    first, second = rng.normal(0.0, 1.0, size=(50, 2)), rng.normal(3.0, 1.0, size=(50, 2))
    kept = _measured("first-run", [first, second])
    own = _measured("per-run", [first, second])
    np.testing.assert_allclose(kept, (second - first.mean(axis=0)) / first.std(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(own, (second - second.mean(axis=0)) / second.std(axis=0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="scaling"):
        AblatedLru(LruDetectorConfig(), "fixed", recalibrate=True)
