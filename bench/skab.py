"""Online anomaly detection on SKAB-format files, scored as the SKAB leaderboard scores it.

    python bench/skab.py --data DIR --out DIR [--protocol strict|continual] [--methods t2,hst,river-ar,lru]
                         [--json FILE] [--plots DIR] [--seeds 0,1,2,3,4]

`--data` is walked for SKAB files (`;`-separated, `datetime` first, `anomaly` and `changepoint`
labels last); a file named `anomaly-free.csv` is extra normal data, never scored as a file.

- strict (the leaderboard's protocol): per file, a fresh detector fits on the first 400 rows and
  sets its threshold there; rows 400 to the end are scored in order, and a detector may keep
  learning from a row after scoring it (test-then-train), never from labels.
- continual (the factory's case): one detector streams through the files in time order (the
  anomaly-free file first), adapting on each file's first 400 rows, which also reset its
  threshold, then scoring the rest; the LRU carries its state from file to file.

Methods: `t2` — Hotelling's T² control chart on the training part (the harness's yardstick: on
the 16 valve1 files it must score the leaderboard's F1 0.65); `hst` — river's HalfSpaceTrees on
min-max-scaled inputs, threshold a quantile of its training scores; `river-ar` — a river linear
model forecasting every sensor from the previous row, its standardised residual against an
online quantile; `lru` — the lru_online forecaster and online learner of the pipeline;
`lru-replay`, `lru-ewc` — the lru with the learner's replay or EWC (not run by default).

Splits: `configs/skab.yaml` declares the tuning files (anomaly-free.csv and the first half of
valve1, in time order) on which every lru setting was chosen; the tables print the report split
(every other file) first, then the tuning split, marked as such, then all files.

Predictions go to `--out/METHOD/` in the exchange format of the SKAB README; one table per split prints
F1, FAR %, MAR %, NAB (standard, LowFP, LowFN), missed changepoints, false positives and rows per
second per method, with the leaderboard's rows for valve1 beside them. Under `continual`, the
lru methods also report backward transfer: after the stream, frozen, they re-score the first
fifth of the files; FAR on those files' normal rows then, against the FAR while streaming.
`--seeds`: the lru methods run again at each of these model seeds (nothing written), and each
split prints their figures per seed and the mean: one seed's FAR moves by several points with
the seed, or with another CPU's float rounding, so a figure near a bar says little alone.
Normal runs (strict protocol, when the folder holds `anomaly-free.csv`): that file cut into
experiment-sized pieces (the experiments' median length), each run as an experiment whose test
rows are all normal; the share of them that alarms is the FAR a detector gets on the normal
operation of experiments it never saw. valve1's test parts are short and calm; SKAB's other
experiments and the long normal run wander over hundreds of rows in ways they do not show (the
team measured FAR 26 % on the 14 held-out "other" experiments against 2.5 % on valve1).
`anomaly-free.csv` is in the tuning split, so these figures are tuning figures.
`--plots DIR`: the first three files (sensors, scores, thresholds, true and predicted anomalies)
and a summary chart of every method.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from bench.anomaly_metrics import (
    ChangepointResult,
    NabScore,
    OutlierCounts,
    changepoints_from_outliers,
    match_changepoints,
    write_predictions,
)
from bench.common import load_config, pyplot

TRAIN_ROWS = 400
LABELS = ("anomaly", "changepoint")
NAB_WINDOW = pd.Timedelta("60s")
# The leaderboard's methods re-scored on the 16 valve1 files (from the data's README).
PUBLISHED_VALVE1 = {
    "MSET": (0.78, 38.53, 14.98, 15.49, 11.13, 19.32, 46, 41),
    "T-squared+Q (PCA)": (0.76, 23.89, 26.09, 23.98, 9.52, 31.33, 34, 156),
    "Conv-AE": (0.75, 14.40, 31.84, 20.90, 18.88, 24.52, 43, 12),
    "LSTM-AE": (0.70, 25.37, 34.76, 24.48, 21.24, 26.90, 43, 32),
    "T-squared": (0.65, 19.94, 44.05, 22.40, 13.45, 27.63, 39, 94),
}


@dataclass
class SkabFile:
    relative: str
    path: Path
    frame: pd.DataFrame  # sensors only, indexed by datetime
    anomaly: np.ndarray | None
    changepoint: np.ndarray | None

    @property
    def sensors(self) -> np.ndarray:
        return self.frame.to_numpy(dtype=float)


def load_folder(folder: Path) -> tuple[list[SkabFile], SkabFile | None]:
    """Every SKAB file under `folder`, in time order; the anomaly-free file apart."""
    found, normal = [], None
    for path in sorted(folder.rglob("*.csv")):
        frame = pd.read_csv(path, sep=";", index_col="datetime", parse_dates=True)
        labels = {name: frame.pop(name).to_numpy(dtype=int) if name in frame else None for name in LABELS}
        item = SkabFile(
            path.relative_to(folder).as_posix(), path.resolve(), frame, labels["anomaly"], labels["changepoint"]
        )
        if path.name == "anomaly-free.csv":
            normal = item
        elif item.anomaly is None or item.changepoint is None:
            raise SystemExit(f"{path}: no 'anomaly' and 'changepoint' columns; not a SKAB experiment file")
        else:
            found.append(item)
    if not found:
        raise SystemExit(f"no SKAB files under {folder}")
    found.sort(key=lambda f: f.frame.index[0])
    return found, normal


def experiment_rows(files: list[SkabFile]) -> int:
    """The median length of the experiment files: the size of a normal run's pieces."""
    return int(np.median([len(f.frame) for f in files]))


def normal_pieces(normal: SkabFile, rows: int) -> list[SkabFile]:
    """The normal run cut into consecutive pieces of `rows` rows (the remainder dropped), each
    an experiment with no anomaly: its first TRAIN_ROWS train a strict detector, every later row
    is a normal test row."""
    if rows <= TRAIN_ROWS:
        raise ValueError(f"normal pieces of {rows} rows leave no test rows after the {TRAIN_ROWS} training rows")
    pieces = []
    for number, start in enumerate(range(0, len(normal.frame) - rows + 1, rows)):
        frame = normal.frame.iloc[start : start + rows]
        zeros = np.zeros(rows, dtype=int)
        pieces.append(SkabFile(f"{normal.relative}#{number}", normal.path, frame, zeros, zeros.copy()))
    return pieces


def in_tuning_split(item: SkabFile, tuning_files: list[str]) -> bool:
    """Whether the file is one of the declared tuning files (matched by the end of its path,
    so `--data` may point at the SKAB folder or at valve1 itself)."""
    return any(item.path.as_posix().endswith("/" + name) for name in tuning_files)


# --- detectors ----------------------------------------------------------------------------
@dataclass
class Detection:
    """One file's test rows as a detector saw them."""

    alarms: np.ndarray  # 0/1 per row
    scores: np.ndarray  # the anomaly score written to the exchange file
    compared: np.ndarray  # what is held against the threshold (the score, or its median)
    threshold: np.ndarray  # per row: some thresholds keep learning


class HotellingT2:
    """T² of each row against the training part's mean and covariance, median of 5 rows, alarm
    above twice the F-distribution's 99.9 % control limit."""

    name = "t2"

    def __init__(self, p_value: float = 0.999, ucl_factor: float = 2.0, median_rows: int = 5) -> None:
        self.p_value, self.ucl_factor, self.median_rows = p_value, ucl_factor, median_rows

    def adapt(self, rows: np.ndarray) -> None:
        self.mean, scale = rows.mean(axis=0), rows.std(axis=0)
        self.varying = scale > 0
        self.scale = np.where(self.varying, scale, 1.0)
        z = self._standard(rows)
        self.inverse = np.linalg.pinv(np.cov(z.T))
        m, n = z.shape[1], len(z)
        self.limit = self.ucl_factor * m * (n - 1) * (n + 1) / (n * (n - m)) * stats.f.ppf(self.p_value, m, n - m)

    def _standard(self, rows: np.ndarray) -> np.ndarray:
        return ((rows - self.mean) / self.scale)[:, self.varying]

    def detect(self, rows: np.ndarray) -> Detection:
        z = self._standard(rows)
        t2 = np.einsum("ij,jk,ik->i", z, self.inverse, z)
        smoothed = pd.Series(t2).rolling(self.median_rows, min_periods=1).median().to_numpy()
        return Detection((smoothed > self.limit).astype(int), t2, smoothed, np.full(len(rows), self.limit))


class RiverHalfSpaceTrees:
    """HalfSpaceTrees on inputs min-max scaled by the training part; test-then-train."""

    name = "hst"

    def __init__(self, quantile: float = 0.9, seed: int = 0) -> None:
        from river import anomaly

        self.model = anomaly.HalfSpaceTrees(n_trees=25, height=10, window_size=200, seed=seed)
        self.quantile = quantile

    def _x(self, row: np.ndarray) -> dict[str, float]:
        scaled = np.clip((row - self.low) / self.span, -0.5, 1.5)
        return {str(i): float(v) for i, v in enumerate(scaled)}

    def adapt(self, rows: np.ndarray) -> None:
        self.low = rows.min(axis=0)
        self.span = np.where(rows.max(axis=0) > self.low, rows.max(axis=0) - self.low, 1.0)
        scores = []
        for row in rows:
            x = self._x(row)
            scores.append(self.model.score_one(x))
            self.model.learn_one(x)
        # The first window trains the trees' mass profile; its scores say nothing yet.
        self.limit = float(np.quantile(scores[len(scores) // 2 :], self.quantile))

    def detect(self, rows: np.ndarray) -> Detection:
        scores = np.empty(len(rows))
        for i, row in enumerate(rows):
            x = self._x(row)
            scores[i] = self.model.score_one(x)
            self.model.learn_one(x)
        return Detection((scores > self.limit).astype(int), scores, scores, np.full(len(rows), self.limit))


class RiverAutoregression:
    """A river linear model per sensor forecasting it from the previous row; the score is the
    mean squared residual standardised by the training residuals, against an online quantile."""

    name = "river-ar"

    def __init__(self, quantile: float = 0.9, median_rows: int = 5) -> None:
        self.models: list | None = None
        self.quantile, self.median_rows = quantile, median_rows
        self.previous: np.ndarray | None = None

    def _step(self, row: np.ndarray, learn: bool) -> float:
        from river import linear_model, optim, preprocessing

        if self.models is None:
            self.models = [
                preprocessing.StandardScaler() | linear_model.LinearRegression(optimizer=optim.SGD(0.01)) for _ in row
            ]
        if self.previous is None:
            self.previous = row
            return 0.0
        x = {str(i): float(v) for i, v in enumerate(self.previous)}
        residuals = np.array([row[i] - m.predict_one(x) for i, m in enumerate(self.models)])
        if learn:
            for i, m in enumerate(self.models):
                m.learn_one(x, float(row[i]))
        self.previous = row
        return float(np.mean((residuals / self.residual_scale) ** 2)) if hasattr(self, "residual_scale") else 0.0

    def adapt(self, rows: np.ndarray) -> None:
        from river import stats as river_stats

        residual_rows = []
        for row in rows:
            self._step(row, learn=True)
        # Residual scale from a second pass over the training part, once the model has learned.
        self.previous = rows[0]
        for row in rows[1:]:
            x = {str(i): float(v) for i, v in enumerate(self.previous)}
            residual_rows.append([row[i] - m.predict_one(x) for i, m in enumerate(self.models)])
            self.previous = row
        spread = np.std(np.array(residual_rows), axis=0)
        self.residual_scale = np.where(spread > 0, spread, 1.0)
        self.limit = river_stats.Quantile(self.quantile)
        scores = pd.Series([self._score(r) for r in residual_rows])
        for score in scores.rolling(self.median_rows, min_periods=1).median():
            self.limit.update(score)

    def _score(self, residual_row: list[float]) -> float:
        return float(np.mean((np.asarray(residual_row) / self.residual_scale) ** 2))

    def detect(self, rows: np.ndarray) -> Detection:
        raw = np.array([self._step(row, learn=True) for row in rows])
        smoothed = pd.Series(raw).rolling(self.median_rows, min_periods=1).median().to_numpy()
        alarms, thresholds = np.empty(len(rows), dtype=int), np.empty(len(rows))
        for i, score in enumerate(smoothed):
            thresholds[i] = self.limit.get()
            alarms[i] = int(score > thresholds[i])
            if not alarms[i]:  # the threshold keeps learning from rows it takes as normal
                self.limit.update(score)
        return Detection(alarms, raw, smoothed, thresholds)


@dataclass
class LruDetectorConfig:
    """configs/skab.yaml holds the values used and the split each was chosen on."""

    d_model: int = 2  # a narrow model cannot copy an unseen combination of sensors
    d_state: int = 16
    learning_rate: float = 3e-3
    window: int = 100
    fit_epochs: int = 30  # on a fresh model's first training part
    adapt_epochs: int = 5  # on each later training part (continual protocol)
    slow_lag: int = 10
    slow_autocorrelation: float = 0.6  # above it at slow_lag, a sensor enters as its change
    chunk_rows: int = 10  # rows scored together before the test-then-train update
    # The last rows of a training part calibrate the detector out of sample (split conformal):
    # the model is fitted on the rows before them, then on all of them once they are scored.
    calibration_holdout_rows: int = 100
    refit_epochs: int = 10
    online_learning_rate: float = 3e-3
    replay_batch: int = 0  # replayed windows mixed into every update
    ewc_weight: float = 0.0  # consolidated on each file's training part
    seed: int = 0
    alarm: dict = field(default_factory=dict)  # lru_online.alarms.AlarmConfig fields
    variants: dict = field(default_factory=dict)  # name → overrides (lru-replay, lru-ewc)


def configured_lru() -> LruDetectorConfig:
    """The lru detector's settings as configs/skab.yaml holds them."""
    return LruDetectorConfig(**load_config("skab").get("lru", {}))


def slow_sensors(rows: np.ndarray, lag: int, threshold: float) -> np.ndarray:
    """Sensors whose values still correlate with themselves `lag` rows later above `threshold`:
    slow drifts (temperatures) whose level in a short training part says little about the level
    to come."""
    if len(rows) <= lag + 1:
        return np.zeros(rows.shape[1], dtype=bool)
    now, then = rows[lag:], rows[:-lag]
    spread = now.std(axis=0) * then.std(axis=0)
    covariance = ((now - now.mean(axis=0)) * (then - then.mean(axis=0))).mean(axis=0)
    correlation = np.divide(covariance, spread, out=np.zeros_like(covariance), where=spread > 0)
    return correlation > threshold


class LruForecastResidual:
    """The lru_online forecaster, online learner and anomaly detector of the pipeline: a
    one-step forecast of every sensor from a narrow model trained on normal rows, its residuals
    judged by `lru_online.alarms.AnomalyDetector` (per-line scale, mean chart, conformal
    threshold at the configured false-alarm rate), as `lru-online run` judges a line's rows.
    Slow sensors (see `slow_sensors`) enter as their change from the row before, so a
    temperature drifting past its training range is no fault by itself. The training part
    calibrates the detector; the hidden state is carried through every row; after scoring a
    chunk the learner updates on it when it raised no alarm (test-then-train, no labels)."""

    name = "lru"

    def __init__(self, config: LruDetectorConfig | None = None, name: str = "lru") -> None:
        from lru_online.alarms import AlarmConfig, AnomalyDetector

        self.name = name
        base = config or configured_lru()
        self.config = replace(base, **base.variants.get(name, {}))
        self.detector = AnomalyDetector(AlarmConfig(**self.config.alarm))
        self.learner = None
        self.state = None
        self.alarm_state = None
        self.previous_row: np.ndarray | None = None  # the last row seen, for the slow sensors' change
        self.frozen = False  # re-scoring after the stream: weights stay as they are

    def _tensor(self, rows: np.ndarray) -> torch.Tensor:
        """Standardised rows, slow sensors as their standardised change from the row before."""
        z = (rows - self.mean) / self.scale
        if self.slow.any():
            first = z[:1] if self.previous_row is None else (self.previous_row[None] - self.mean) / self.scale
            change = np.diff(np.concatenate([first, z]), axis=0)
            z[:, self.slow] = change[:, self.slow] / self.change_scale[self.slow]
        self.previous_row = rows[-1]
        return torch.tensor(z, dtype=torch.float32)[None]

    def _set_baseline(self, rows: np.ndarray) -> None:
        """Each sensor's mean and scale, which sensors are slow and the scale of their change,
        all from a training part: the run's normal that its rows are measured against."""
        c = self.config
        self.mean, scale = rows.mean(axis=0), rows.std(axis=0)
        self.scale = np.where(scale > 0, scale, 1.0)
        standard = (rows - self.mean) / self.scale
        self.slow = slow_sensors(standard, c.slow_lag, c.slow_autocorrelation)
        change = np.diff(standard, axis=0).std(axis=0) if len(rows) > 1 else np.ones(rows.shape[1])
        self.change_scale = np.where(change > 0, change, 1.0)

    def adapt(self, rows: np.ndarray) -> None:
        from lru_online import LearnerConfig, LRUForecaster, ModelConfig, OnlineLearner
        from lru_online.alarms import AlarmState

        c = self.config
        self._set_baseline(rows)
        self.previous_row = None  # a file's training part starts afresh: no change across files
        epochs = c.adapt_epochs
        if self.learner is None:
            torch.manual_seed(c.seed)
            n = rows.shape[1]
            model = LRUForecaster(ModelConfig(n_inputs=n, n_targets=n, d_model=c.d_model, d_state=c.d_state))
            self.learner = OnlineLearner(
                model,
                LearnerConfig(
                    learning_rate=c.learning_rate,
                    window=c.window,
                    replay_batch=c.replay_batch,
                    replay_weight=1.0 if c.replay_batch else 0.0,
                    ewc_weight=c.ewc_weight,
                    seed=c.seed,
                ),
            )
            epochs = c.fit_epochs
        self.learner.set_learning_rate(c.learning_rate)
        z = self._tensor(rows)
        holdout = min(c.calibration_holdout_rows, len(rows) // 2)
        fit, held = z[:, : len(rows) - holdout], z[:, len(rows) - holdout :]
        if not self.frozen:
            for _ in range(epochs):
                self.learner.update(fit, fit, self.state)
        # The held-out rows are normal by the protocol and unseen by the fit: they calibrate a
        # fresh detector as the live rows after them will be judged.
        if holdout:
            before = self.learner.score(fit, fit, self.state).state
            scored = self.learner.score(held, held, before)
        else:  # no rows held out: calibrated in sample
            scored = self.learner.score(z, z, self.state)
        fresh = AlarmState.fresh(1, rows.shape[1], self.detector.config)
        self.alarm_state = self.detector.detect(scored.residuals, fresh, calibrate_only=True).state
        if not self.frozen:
            for _ in range(c.refit_epochs if holdout else 0):
                self.learner.update(z, z, self.state)
            self.learner.consolidate(z, z, self.state)  # a no-op unless ewc_weight > 0
        self.state = self.learner.score(z, z, self.state).state

    def detect(self, rows: np.ndarray) -> Detection:
        c = self.config
        z = self._tensor(rows)
        raw, compared, thresholds = np.empty(len(rows)), np.empty(len(rows)), np.empty(len(rows))
        alarms = np.zeros(len(rows), dtype=int)
        for lo in range(0, len(rows), c.chunk_rows):
            chunk = z[:, lo : lo + c.chunk_rows]
            hi = lo + chunk.shape[1]
            scored = self.learner.score(chunk, chunk, self.state)
            judged = self.detector.detect(scored.residuals, self.alarm_state)
            self.alarm_state = judged.state
            raw[lo:hi] = np.nan_to_num(scored.scores[0].numpy())
            compared[lo:hi] = judged.scores[0].numpy()
            thresholds[lo:hi] = float(judged.thresholds[0])
            alarms[lo:hi] = judged.alarms[0].numpy()
            if not self.frozen and c.online_learning_rate > 0 and not judged.alarms.any():
                self.learner.set_learning_rate(c.online_learning_rate)
                self.learner.update(chunk, chunk, self.state)
            self.state = scored.state
        return Detection(alarms, raw, compared, thresholds)


METHODS = {
    "t2": HotellingT2,
    "hst": RiverHalfSpaceTrees,
    "river-ar": RiverAutoregression,
    "lru": LruForecastResidual,
    # The lru with replay or EWC: the forgetting comparison of the continual protocol.
    "lru-replay": lambda: LruForecastResidual(name="lru-replay"),
    "lru-ewc": lambda: LruForecastResidual(name="lru-ewc"),
}
DEFAULT_METHODS = "t2,hst,river-ar,lru"


# --- protocols ----------------------------------------------------------------------------
@dataclass
class MethodResult:
    counts: list[OutlierCounts]  # per file, in the order of the files
    changepoints: list  # per file: bench.anomaly_metrics.ChangepointResult
    rows: int
    seconds: float
    detections: list[Detection]  # per file, in the order of the files
    forgetting: dict[str, float] | None = None

    def figures(self, selected: list[bool] | None = None) -> dict[str, float]:
        """F1, FAR, MAR, NAB… over the selected files (all by default)."""
        picked = [True] * len(self.counts) if selected is None else selected
        counts, nab = OutlierCounts(), NabScore()
        for file_counts, changepoints, keep in zip(self.counts, self.changepoints, picked, strict=True):
            if keep:
                counts.tp, counts.tn = counts.tp + file_counts.tp, counts.tn + file_counts.tn
                counts.fp, counts.fn = counts.fp + file_counts.fp, counts.fn + file_counts.fn
                nab.add(changepoints)
        figures = {
            "files": sum(picked),
            "f1": round(counts.f1, 3),
            "far_percent": round(counts.far_percent, 2),
            "mar_percent": round(counts.mar_percent, 2),
            "nab_standard": round(nab.score("standard"), 2),
            "nab_low_fp": round(nab.score("low_fp"), 2),
            "nab_low_fn": round(nab.score("low_fn"), 2),
            "missed_changepoints": nab.missed,
            "false_positives": nab.false_positives,
            "rows_per_second": round(self.rows / self.seconds, 1) if self.seconds else 0.0,
        }
        return figures | (self.forgetting or {})


def false_alarm_percent(files: list[SkabFile], detections: list[Detection]) -> float:
    """FAR over the normal test rows of the given files."""
    normal = np.concatenate([f.anomaly[TRAIN_ROWS:] == 0 for f in files])
    alarms = np.concatenate([d.alarms for d in detections])
    return round(100.0 * float(alarms[normal].mean()), 2) if normal.any() else float("nan")


def backward_transfer(detector, files: list[SkabFile], streamed: list[Detection]) -> dict[str, float]:
    """After the stream, the frozen detector re-scores the first fifth of the files (its threshold
    set again on each file's training part, its weights untouched); FAR on their normal rows,
    against the FAR it had there while streaming."""
    first = files[: max(1, len(files) // 5)]
    detector.frozen = True
    again = []
    for item in first:
        detector.adapt(item.sensors[:TRAIN_ROWS])
        again.append(detector.detect(item.sensors[TRAIN_ROWS:]))
    return {
        "first_fifth_files": len(first),
        "first_fifth_far_streaming": false_alarm_percent(first, streamed[: len(first)]),
        "first_fifth_far_frozen_after": false_alarm_percent(first, again),
    }


def scored_changepoints(item: SkabFile, predicted_changepoints: np.ndarray) -> ChangepointResult:
    """A file's changepoints predicted on its test rows (`changepoints_from_outliers` of the
    alarms), matched to the labelled ones within NAB_WINDOW, as the leaderboard's NAB scores them."""
    return match_changepoints(
        item.frame.index[TRAIN_ROWS:], item.changepoint[TRAIN_ROWS:], predicted_changepoints, NAB_WINDOW
    )


def run_method(
    name: str,
    files: list[SkabFile],
    normal: SkabFile | None,
    protocol: str,
    out: Path | None,
    make: Callable[[], object] | None = None,
) -> MethodResult:
    """One method through the files under the protocol; `make` builds its detector (the
    method's own by default); predictions go to `out/name/` unless `out` is None."""
    make = make or METHODS[name]
    counts, changepoints, rows, seconds, detections = [], [], 0, 0.0, []
    detector = make()
    if protocol == "continual" and normal is not None:
        started = time.perf_counter()
        detector.adapt(normal.sensors)
        seconds += time.perf_counter() - started
    for item in files:
        if protocol == "strict":
            detector = make()
        values = item.sensors
        started = time.perf_counter()
        detector.adapt(values[:TRAIN_ROWS])
        detection = detector.detect(values[TRAIN_ROWS:])
        seconds += time.perf_counter() - started
        rows += len(values)
        detections.append(detection)
        predicted_changepoints = changepoints_from_outliers(detection.alarms)
        counts.append(OutlierCounts())
        counts[-1].add(item.anomaly[TRAIN_ROWS:], detection.alarms)
        changepoints.append(scored_changepoints(item, predicted_changepoints))
        if out is not None:
            test_index = item.frame.index[TRAIN_ROWS:]
            write_predictions(
                out / name, item.relative, test_index, detection.alarms, predicted_changepoints, detection.scores
            )
    result = MethodResult(counts, changepoints, rows, seconds, detections)
    if protocol == "continual" and hasattr(detector, "frozen"):
        result.forgetting = backward_transfer(detector, files, detections)
    return result


COLUMNS = (
    "f1",
    "far_percent",
    "mar_percent",
    "nab_standard",
    "nab_low_fp",
    "nab_low_fn",
    "missed_changepoints",
    "false_positives",
    "rows_per_second",
)
HEADER = ("method", "F1", "FAR %", "MAR %", "NAB std", "LowFP", "LowFN", "missed", "FPs", "rows/s")


def print_table(results: dict[str, dict], published: bool, title: str) -> None:
    print(title)
    print(f"{HEADER[0]:<22}" + "".join(f"{h:>9}" for h in HEADER[1:]))
    for name, figures in results.items():
        # A space before each figure: a fast method's rows/s fill the whole width.
        print(f"{name:<22}" + "".join(f" {figures[c]:>8}" for c in COLUMNS))
    if published:
        print("published (leaderboard predictions re-scored, all 16 valve1 files):")
        for name, row in PUBLISHED_VALVE1.items():
            print(f"  {name:<20}" + "".join(f"{v:>9}" for v in row) + f"{'':>9}")


def seed_spread(
    name: str, files: list[SkabFile], normal: SkabFile | None, protocol: str, seeds: list[int]
) -> dict[int, MethodResult]:
    """An lru method at each model seed, its other settings as configured; nothing written."""
    base = configured_lru()
    return {
        seed: run_method(
            name, files, normal, protocol, None, make=partial(LruForecastResidual, replace(base, seed=seed), name=name)
        )
        for seed in seeds
    }


def mean_row(rows: list[dict]) -> dict:
    """The mean of each printed figure over rows (one per seed)."""
    return {column: round(float(np.mean([row[column] for row in rows])), 2) for column in COLUMNS}


def normal_run_figures(run: MethodResult) -> dict:
    """A method's figures on the normal run's pieces: FAR over all their test rows, the
    changepoints SKAB predicts from the alarms (each start and end of an alarm span, every one
    false here), and each piece's FAR."""
    pieces = [round(c.far_percent, 1) for c in run.counts]
    figures = run.figures()
    return {
        "pieces": len(pieces),
        "far_percent": figures["far_percent"],
        "false_positives": figures["false_positives"],
        "worst_piece_far_percent": max(pieces, default=0.0),
        "piece_far_percent": pieces,
    }


def print_normal_runs(results: dict[str, dict], rows: int) -> None:
    first = next(iter(results.values()))
    print(
        f"normal runs (tuning split): anomaly-free.csv as {first['pieces']} experiments of {rows} rows, strict "
        "protocol, every test row normal"
    )
    print(f"{'method':<22}{'FAR %':>9}{'FPs':>9}{'worst %':>9}  FAR % per piece")
    for name, f in results.items():
        print(
            f"{name:<22}{f['far_percent']:>9}{f['false_positives']:>9}{f['worst_piece_far_percent']:>9}  "
            + " ".join(f"{v:g}" for v in f["piece_far_percent"])
        )


def print_forgetting(results: dict[str, dict]) -> None:
    forgetting = {name: f for name, f in results.items() if "first_fifth_far_streaming" in f}
    if forgetting:
        print("backward transfer: FAR % on the normal test rows of the first fifth of the files")
        print(f"{'method':<22}{'files':>9}{'streaming':>11}{'frozen after':>14}")
        for name, f in forgetting.items():
            print(
                f"{name:<22}{f['first_fifth_files']:>9}{f['first_fifth_far_streaming']:>11}"
                f"{f['first_fifth_far_frozen_after']:>14}"
            )


def save_plots(folder: Path, files: list[SkabFile], results: dict[str, MethodResult], title: str) -> None:
    """Per file (the first three): sensors, each method's score against its threshold, the true
    anomaly spans and the predicted ones; and one chart of every method's F1, FAR and MAR."""
    plt = pyplot()

    folder.mkdir(parents=True, exist_ok=True)
    for number, item in enumerate(files[:3]):
        index = item.frame.index[TRAIN_ROWS:]
        fig, axes = plt.subplots(1 + len(results), 1, figsize=(12, 2.2 * (1 + len(results))), sharex=True)
        sensors = item.frame.iloc[TRAIN_ROWS:]
        axes[0].plot(index, (sensors - sensors.mean()) / sensors.std().replace(0, 1), linewidth=0.6)
        axes[0].set_title(f"{item.relative}: sensors (standardised); true anomalies shaded red")
        for axis in axes:
            _shade(axis, index, item.anomaly[TRAIN_ROWS:], "red", 0.15)
        for axis, (name, result) in zip(axes[1:], results.items(), strict=True):
            detection = result.detections[number]
            axis.plot(index, detection.compared, linewidth=0.8, label="score")
            axis.plot(index, detection.threshold, color="black", linestyle="--", linewidth=0.8, label="threshold")
            _shade(axis, index, detection.alarms, "tab:blue", 0.2)
            axis.set_yscale("symlog")
            axis.set_ylabel(name)
            axis.legend(loc="upper left", fontsize=7)
        axes[-1].set_xlabel("time (predicted anomalies shaded blue)")
        fig.tight_layout()
        fig.savefig(folder / f"file{number}_{item.relative.replace('/', '_').removesuffix('.csv')}.png", dpi=100)
        plt.close(fig)
    names = list(results)
    figures = [results[n].figures() for n in names]
    fig, axis = plt.subplots(figsize=(8, 4))
    for offset, (key, label) in enumerate((("f1", "F1 × 100"), ("far_percent", "FAR %"), ("mar_percent", "MAR %"))):
        values = [f[key] * (100 if key == "f1" else 1) for f in figures]
        axis.bar(np.arange(len(names)) + 0.27 * (offset - 1), values, width=0.27, label=label)
    axis.set_xticks(np.arange(len(names)), names)
    axis.set_title(f"{title}: all methods")
    axis.legend()
    fig.tight_layout()
    fig.savefig(folder / "summary.png", dpi=100)
    plt.close(fig)


def _shade(axis, index: pd.Index, flags: np.ndarray, color: str, alpha: float) -> None:
    edges = np.diff(np.concatenate([[0], flags.astype(int), [0]]))
    for start, stop in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
        axis.axvspan(index[start], index[stop - 1], color=color, alpha=alpha, linewidth=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--protocol", choices=("strict", "continual"), default="strict")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"any of {', '.join(METHODS)}")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plots", type=Path, default=None)
    parser.add_argument("--seeds", default=None, help="model seeds, comma-separated, for the lru methods' spread")
    args = parser.parse_args()
    files, normal = load_folder(args.data)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = set(names) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {sorted(METHODS)}")
    # One thread: the lru is two channels wide, so more threads only add overhead, and its
    # figures then do not depend on the machine's core count (bench/skab_tune.py runs so too).
    torch.set_num_threads(1)
    print(
        f"{len(files)} files, {sum(len(f.frame) for f in files)} rows, protocol {args.protocol}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread"
    )
    runs = {name: run_method(name, files, normal, args.protocol, args.out) for name in names}
    tuning = [in_tuning_split(f, load_config("skab").get("tuning_files", [])) for f in files]
    splits = {"all": None}
    if any(tuning):
        splits = {"report": [not t for t in tuning], "tuning": tuning, "all": None}
    titles = {
        "report": f"REPORT split: {len(tuning) - sum(tuning)} files no setting was chosen on",
        "tuning": f"tuning split: {sum(tuning)} files the settings were chosen on (configs/skab.yaml), not a result",
        "all": f"all {len(files)} files" + (", tuning files included" if any(tuning) else ", none in the tuning split"),
    }
    results = {}
    for split, selected in splits.items():
        if selected is not None and not any(selected):
            continue
        results[split] = {name: run.figures(selected) for name, run in runs.items()}
        valve1_only = split == "all" and all(f.relative.startswith("valve1/") for f in files)
        print_table(results[split], published=valve1_only, title=titles[split])
    print_forgetting(results["all"])
    normal_runs, pieces = {}, []
    if args.protocol == "strict" and normal is not None:
        pieces = normal_pieces(normal, experiment_rows(files))
        normal_runs = {name: normal_run_figures(run_method(name, pieces, None, "strict", None)) for name in names}
        print_normal_runs(normal_runs, len(pieces[0].frame))
    spread = {}
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",")]
        seeded = {
            name: seed_spread(name, files, normal, args.protocol, seeds) for name in names if name.startswith("lru")
        }
        for split, selected in splits.items():
            if selected is not None and not any(selected):
                continue
            rows = {}
            for name, by_seed in seeded.items():
                per_seed = {f"{name} seed {seed}": run.figures(selected) for seed, run in by_seed.items()}
                rows |= per_seed | {f"{name} mean": mean_row(list(per_seed.values()))}
            spread[split] = rows
            print_table(rows, published=False, title=f"{titles[split]}; the lru methods at seeds {args.seeds}")
        if pieces:
            by_seed = {
                f"{name} seed {seed}": normal_run_figures(run)
                for name in seeded
                for seed, run in seed_spread(name, pieces, None, "strict", seeds).items()
            }
            spread["normal_runs"] = by_seed
            print_normal_runs(by_seed, len(pieces[0].frame))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "protocol": args.protocol,
                    "files": len(files),
                    "methods": results["all"],
                    "splits": results,
                    "normal_runs": normal_runs,
                    "seeds": spread,
                },
                indent=2,
            )
        )
    if args.plots:
        save_plots(args.plots, files, runs, f"SKAB {args.data.name}, {args.protocol}")


if __name__ == "__main__":
    main()
