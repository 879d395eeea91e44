"""Scores of anomaly and changepoint detection as the SKAB leaderboard computes them.

Outlier detection: one confusion matrix pooled over every test row of every file;
F1 = TP / (TP + (FP + FN) / 2), FAR = FP / (FP + TN), MAR = FN / (FN + TP).

Changepoint detection: the NAB score with a window of `window` to the right of each true
changepoint (a window that would overlap the next one starts where the previous one ends). In each
window the first predicted changepoint is a true positive worth between A_tp (at the window's
start) and A_fp (at its end) on a scaled tanh; a window with none is a miss (A_fn); a prediction
outside every window is a false positive (A_fp). Scores, and their null (all missed) and perfect
(all hit at once) values, add up over files; the result is 100 (S - null) / (perfect - null).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

# (A_tp, A_fp, A_fn) per NAB profile.
NAB_PROFILES: dict[str, tuple[float, float, float]] = {
    "standard": (1.0, -0.11, -1.0),
    "low_fp": (1.0, -0.22, -1.0),
    "low_fn": (1.0, -0.11, -2.0),
}
# The scaled tanh is read off a grid of this many points across the window.
_GRID = 1000


@dataclass
class OutlierCounts:
    tp: int = 0
    tn: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, truth: np.ndarray, predicted: np.ndarray) -> None:
        truth, predicted = np.asarray(truth) == 1, np.asarray(predicted) == 1
        if truth.shape != predicted.shape:
            raise ValueError(f"{truth.shape[0]} labels but {predicted.shape[0]} predictions")
        self.tp += int(np.sum(truth & predicted))
        self.tn += int(np.sum(~truth & ~predicted))
        self.fp += int(np.sum(~truth & predicted))
        self.fn += int(np.sum(truth & ~predicted))

    @property
    def f1(self) -> float:
        denominator = self.tp + (self.fp + self.fn) / 2
        return self.tp / denominator if denominator else 0.0

    @property
    def far_percent(self) -> float:
        return 100.0 * self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    @property
    def mar_percent(self) -> float:
        return 100.0 * self.fn / (self.fn + self.tp) if self.fn + self.tp else 0.0


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: the chance that a labelled row outscores a normal one."""
    from scipy import stats

    ranks = stats.rankdata(scores)
    positive = labels.astype(bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def changepoints_from_outliers(predicted: np.ndarray) -> np.ndarray:
    """Predicted changepoints: where the outlier series switches, its first value kept."""
    predicted = np.asarray(predicted, dtype=int)
    if predicted.size == 0:
        return predicted
    return np.concatenate([predicted[:1], np.abs(np.diff(predicted))])


def scoring_windows(changepoints: pd.DatetimeIndex, window: pd.Timedelta) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """[cp, cp + window] per true changepoint; an overlapping window starts where the last ends."""
    windows = [[cp, cp + window] for cp in sorted(changepoints)]
    for previous, current in zip(windows, windows[1:], strict=False):
        if previous[1] >= current[0]:
            current[0] = previous[1]
    return [(left, right) for left, right in windows]


def _true_positive_score(position: float, a_tp: float, a_fp: float) -> float:
    """Worth of a first detection at `position` (0 = window start, 1 = window end)."""
    grid = np.linspace(-np.pi / 2, np.pi / 2, _GRID)
    x = grid[min(int(position * _GRID), _GRID - 1)]
    half = (a_tp - a_fp) / 2
    return float(-half * np.tanh(x) / np.tanh(np.pi / 2) + half + a_fp)


@dataclass
class ChangepointResult:
    """One file's changepoint outcome; add several with `NabScore`."""

    windows: int
    false_positives: int
    missed: int
    hit_positions: list[float] = field(default_factory=list)


def match_changepoints(
    timestamps: pd.DatetimeIndex,
    true_changepoints: np.ndarray,
    predicted_changepoints: np.ndarray,
    window: pd.Timedelta,
) -> ChangepointResult:
    """Hits, misses and false positives of one file's predicted changepoints."""
    timestamps = pd.DatetimeIndex(timestamps)
    truth = timestamps[np.asarray(true_changepoints) == 1]
    predicted = timestamps[np.asarray(predicted_changepoints) == 1].sort_values()
    windows = scoring_windows(truth, window)
    if not windows:
        return ChangepointResult(0, len(predicted), 0)
    inside = np.zeros(len(predicted), dtype=bool)
    missed, positions = 0, []
    for left, right in windows:
        hits = (predicted >= left) & (predicted <= right)
        inside |= hits
        if not hits.any():
            missed += 1
            continue
        first = predicted[hits][0]
        positions.append((first - left) / (right - left) if right > left else 0.0)
    return ChangepointResult(len(windows), int(np.sum(~inside)), missed, positions)


@dataclass
class NabScore:
    results: list[ChangepointResult] = field(default_factory=list)

    def add(self, result: ChangepointResult) -> None:
        self.results.append(result)

    @property
    def missed(self) -> int:
        return sum(r.missed for r in self.results)

    @property
    def false_positives(self) -> int:
        return sum(r.false_positives for r in self.results)

    def score(self, profile: str = "standard") -> float:
        a_tp, a_fp, a_fn = NAB_PROFILES[profile]
        total = null = perfect = 0.0
        for r in self.results:
            total += a_fp * r.false_positives + a_fn * r.missed
            total += sum(_true_positive_score(p, a_tp, a_fp) for p in r.hit_positions)
            null += a_fn * r.windows
            perfect += a_tp * r.windows
        return 100.0 * (total - null) / (perfect - null) if perfect != null else 0.0


def prediction_file_name(relative_path: str) -> str:
    """`valve1/3.csv` -> `valve1__3.csv`, the exchange format's name for a file's predictions."""
    return relative_path.replace("\\", "/").replace("/", "__")


def write_predictions(
    folder: Path,
    relative_path: str,
    timestamps: pd.DatetimeIndex,
    anomaly: np.ndarray,
    changepoint: np.ndarray | None = None,
    score: np.ndarray | None = None,
) -> Path:
    """One file's test-row predictions in the exchange format (`datetime,anomaly[,changepoint][,score]`)."""
    frame = pd.DataFrame(
        {"datetime": pd.DatetimeIndex(timestamps).strftime("%Y-%m-%d %H:%M:%S"), "anomaly": np.asarray(anomaly, int)}
    )
    if changepoint is not None:
        frame["changepoint"] = np.asarray(changepoint, int)
    if score is not None:
        frame["score"] = np.asarray(score, float)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / prediction_file_name(relative_path)
    frame.to_csv(path, index=False)
    return path
