"""The demo plant's alarms beside two yardsticks scored on the same rows in the same run.

    python bench/demo_alarms.py --workdir DIR

Runs `lru-online demo` (its simulated plant, seed 7, embedded defaults) into DIR unless DIR
already holds a finished demo, then scores against its `ground_truth.json`, on the rows the
pipeline scored:
- the product's `anomaly` flags: precision, recall, F1, false alarms per 1,000 normal rows, and
  the alarm rate on normal rows against the configured α;
- a per-line rolling z-score of the raw readings over the previous 200 rows (max over sensors),
  at its best threshold chosen on the labels (an upper bound for it, not a deployable setting);
- river's HalfSpaceTrees, one per line, scoring then learning each row (readings scaled by the
  line's running min-max), at its best threshold chosen on the labels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import library_versions, run_cli

ROLLING_ROWS = 200


def run_demo(workdir: Path) -> None:
    if (workdir / "ground_truth.json").exists() and list((workdir / "output" / "batches").glob("*.parquet")):
        return
    run_cli(["demo", "--workdir", str(workdir)], workdir)


def scored_rows(workdir: Path) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    rows = pd.concat(
        [pd.read_parquet(p) for p in sorted((workdir / "output" / "batches").glob("*.parquet"))], ignore_index=True
    )
    rows = rows.sort_values(["entity", "timestamp"], kind="stable").reset_index(drop=True)
    truth = json.loads((workdir / "ground_truth.json").read_text())
    labelled = pd.DataFrame(truth["anomalies"], columns=["entity", "timestamp"])
    keys = pd.MultiIndex.from_arrays(
        [labelled["entity"], pd.to_datetime(labelled["timestamp"], utc=True, format="ISO8601")]
    )
    flags = pd.MultiIndex.from_frame(rows[["entity", "timestamp"]]).isin(keys)
    sensors = [c.removeprefix("raw_") for c in rows.columns if c.startswith("raw_")]
    return rows, flags, sensors


def counts(truth: np.ndarray, alarm: np.ndarray) -> dict[str, float]:
    tp, fp, fn = int((truth & alarm).sum()), int((~truth & alarm).sum()), int((truth & ~alarm).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "fa_per_1000": 1000 * fp / max(int((~truth).sum()), 1)}


def best_f1(truth: np.ndarray, score: np.ndarray) -> float:
    """The highest F1 over every threshold on the score (rows alarm at or above it)."""
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
    hits = np.cumsum(truth[order])
    f1 = 2 * hits / (np.arange(1, len(order) + 1) + truth.sum())
    return float(f1.max()) if len(f1) else 0.0


def rolling_z(rows: pd.DataFrame, sensors: list[str]) -> np.ndarray:
    """Per line and sensor, |reading − mean| / std over the previous ROLLING_ROWS readings; max over sensors."""
    scores = []
    for sensor in sensors:
        values = rows[f"raw_{sensor}"]
        past = values.groupby(rows["entity"]).shift(1)
        grouped = past.groupby(rows["entity"])
        mean = grouped.transform(lambda v: v.rolling(ROLLING_ROWS, min_periods=20).mean())
        std = grouped.transform(lambda v: v.rolling(ROLLING_ROWS, min_periods=20).std())
        scores.append(((values - mean).abs() / std).to_numpy())
    largest = np.max(np.where(np.isfinite(scores), scores, -np.inf), axis=0)
    return np.where(np.isfinite(largest), largest, np.nan)  # a row before any line has 20 readings


def half_space_trees(rows: pd.DataFrame, sensors: list[str]) -> np.ndarray:
    from river import anomaly, compose, preprocessing

    out = np.zeros(len(rows))
    for _, group in rows.groupby("entity", sort=False):
        model = compose.Pipeline(preprocessing.MinMaxScaler(), anomaly.HalfSpaceTrees(seed=0))
        readings = group[[f"raw_{s}" for s in sensors]].ffill().fillna(0.0).to_dict("records")
        for position, reading in zip(group.index, readings, strict=True):
            out[position] = model.score_one(reading)
            model.learn_one(reading)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    run_demo(workdir)
    rows, truth, sensors = scored_rows(workdir)
    from flows.settings import load_settings

    config = workdir / "config.yaml"
    alpha = load_settings(config if config.exists() else None, workdir=workdir).alarms.false_alarm_rate
    product = counts(truth, rows["anomaly"].to_numpy().astype(bool))
    print(f"{library_versions()}; {len(rows)} rows scored, {int(truth.sum())} labelled; configured α = {alpha}")
    print(f"{'detector':<44} {'precision':>9} {'recall':>7} {'F1':>6} {'FA/1000 normal':>14}")
    print(
        f"{'lru-online alarms (configured α)':<44} {product['precision']:>9.3f} {product['recall']:>7.3f} "
        f"{product['f1']:>6.3f} {product['fa_per_1000']:>14.2f}"
    )
    print(f"normal-row alarm rate {product['fa_per_1000'] / 1000:.4f} = {product['fa_per_1000'] / 1000 / alpha:.2f} α")
    yardsticks = {
        f"rolling z-score ({ROLLING_ROWS} rows), best threshold": best_f1(truth, rolling_z(rows, sensors)),
        "river HalfSpaceTrees, best threshold": best_f1(truth, half_space_trees(rows, sensors)),
    }
    for name, f1 in yardsticks.items():
        print(f"{name:<44} {'':>9} {'':>7} {f1:>6.3f}")


if __name__ == "__main__":
    main()
