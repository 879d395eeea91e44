"""Factory-log simulator: production lines with several sensor sources on irregular clocks.

Each line (entity) runs through operating regimes (idle / normal / high load) that drive its
sensors: motor current and flow follow the load, pressure follows load and a pump cycle,
temperature lags behind the load, vibration carries a shaft rhythm. Sources report on their
own clocks, so a row holds only the sensors whose source reported then (the others are empty).
On top come a gradual drift (bearing wear: temperature and vibration creep up), an abrupt
drift (a valve change: the pressure/flow relation jumps), labelled anomalies (spikes and stuck
readings) and a few broken batches. Files land one per line and batch, alternating CSV and
Parquet; the ground truth goes to a JSON file outside the landing folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from flows.log_schema import LogSchema

START = pd.Timestamp("2026-01-05T06:00:00Z")
# Reporting probability of each source at an event.
SOURCE_RATES = {"thermal": 1.0, "vibration": 0.9, "hydraulic": 0.75, "electrical": 0.85}
BROKEN_KINDS = ("wrong_schema", "nan_burst", "out_of_range", "unsorted_timestamps")


@dataclass
class SimulationConfig:
    entities: int = 3
    batches: int = 36
    rows_per_batch: int = 240
    mean_interval_seconds: float = 10.0
    gradual_drift_start: int = 14  # batch index where wear begins
    gradual_drift_batches: int = 8  # batches until full wear
    abrupt_drift_batch: int = 26  # batch index of the valve change
    anomaly_rate: float = 0.004
    broken_batches: dict[str, int] = field(
        default_factory=lambda: {
            "wrong_schema": 9,
            "nan_burst": 17,
            "out_of_range": 21,
            "unsorted_timestamps": 30,
        }
    )
    seed: int = 7
    # One file per period holding every line's rows (as a plant exports them), instead of one
    # file per line and period; a broken kind then breaks the whole period's file.
    plant_files: bool = False


@dataclass
class GroundTruth:
    entities: list[str]
    batches: int
    rows_per_batch: int
    drifts: list[dict]
    anomalies: list[dict]
    broken_files: list[dict]
    files: list[str]


def _entity_frame(index: int, config: SimulationConfig, rng: np.random.Generator) -> pd.DataFrame:
    rows = config.batches * config.rows_per_batch
    gaps = rng.exponential(config.mean_interval_seconds, rows).clip(0.5, None).round(1)
    seconds = np.cumsum(gaps) + index * 3.0
    times = START + pd.to_timedelta(seconds, unit="s")

    # Operating regime: a Markov chain over load levels, then a first-order lag.
    levels = np.array([0.3, 0.7, 1.0])
    state, load_target = 1, np.empty(rows)
    for t in range(rows):
        if rng.random() < 1 / 15:
            state = rng.integers(3)
        load_target[t] = levels[state]
    load = np.empty(rows)
    current = load_target[0]
    for t in range(rows):
        current += 0.15 * (load_target[t] - current)
        load[t] = current

    batch_of_row = np.arange(rows) // config.rows_per_batch
    wear = np.clip((batch_of_row - config.gradual_drift_start) / config.gradual_drift_batches, 0, 1)
    valve = (batch_of_row >= config.abrupt_drift_batch).astype(float)

    temperature = np.empty(rows)
    temp = 40 + 30 * load[0]
    for t in range(rows):
        temp += 0.05 * (40 + 30 * load[t] - temp)
        temperature[t] = temp
    temperature += 12 * wear + rng.normal(0, 0.3, rows)
    shaft = np.sin(2 * np.pi * seconds / 37.0)
    vibration = 2 + 3 * load + (0.8 + 1.5 * wear) * shaft + rng.normal(0, 0.2, rows)
    pump = np.sin(2 * np.pi * seconds / 300.0)
    pressure = 2 + 8 * load * (1 - 0.45 * valve) + 0.5 * pump + rng.normal(0, 0.15, rows)
    flow = (100 + 250 * load) * (1 + 0.35 * valve) + rng.normal(0, 4, rows)
    current_a = 20 + 50 * load + 6 * valve + rng.normal(0, 0.8, rows)

    frame = pd.DataFrame(
        {
            "entity": f"line-{index + 1}",
            "timestamp": times,
            "temperature": temperature,
            "vibration": vibration.clip(0, None),
            "pressure": pressure.clip(0, None),
            "flow": flow.clip(0, None),
            "motor_current": current_a.clip(0, None),
            "anomaly": 0,
        }
    )
    anomalies = np.flatnonzero(rng.random(rows) < config.anomaly_rate)
    for row in anomalies:
        if rng.random() < 0.5:
            frame.loc[row, "vibration"] *= 3.0
        else:
            frame.loc[row : row + 4, "pressure"] = frame.loc[row, "pressure"] + 6.0
            frame.loc[row : row + 4, "anomaly"] = 1
        frame.loc[row, "anomaly"] = 1
    return frame


def _drop_unreported(frame: pd.DataFrame, schema: LogSchema, rng: np.random.Generator) -> pd.DataFrame:
    """Empties the sensors of each source at the events where that source did not report."""
    for source, sensors in schema.sources.items():
        rate = SOURCE_RATES.get(source, 0.8)
        silent = rng.random(len(frame)) >= rate
        frame.loc[silent, sensors] = np.nan
    return frame


def _break(batch: pd.DataFrame, kind: str, rng: np.random.Generator) -> pd.DataFrame:
    broken = batch.copy()
    if kind == "wrong_schema":
        return broken.drop(columns=["pressure"]).rename(columns={"flow": "flow_rate"})
    if kind == "nan_burst":
        broken.loc[broken.index[: int(len(broken) * 0.9)], "temperature"] = np.nan
        return broken
    if kind == "out_of_range":
        rows = rng.choice(len(broken), 5, replace=False)
        broken.iloc[rows, broken.columns.get_loc("temperature")] = 480.0
        return broken
    if kind == "unsorted_timestamps":
        return broken.sample(frac=1.0, random_state=int(rng.integers(1 << 31)))
    raise ValueError(f"unknown broken-batch kind {kind!r}; choose from {BROKEN_KINDS}")


def _write(batch: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    if path.suffix == ".parquet":
        batch.to_parquet(tmp, index=False)
    else:
        out = batch.copy()
        out["timestamp"] = out["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        out.to_csv(tmp, index=False)
    tmp.replace(path)  # appears in the landing folder only when complete


def simulate(
    landing: Path,
    ground_truth_path: Path,
    config: SimulationConfig | None = None,
    schema: LogSchema | None = None,
) -> GroundTruth:
    """Writes the simulated batches into `landing` and the ground truth to `ground_truth_path`."""
    config = config or SimulationConfig()
    schema = schema or LogSchema()
    rng = np.random.default_rng(config.seed)
    landing.mkdir(parents=True, exist_ok=True)
    frames = [_drop_unreported(_entity_frame(i, config, rng), schema, rng) for i in range(config.entities)]
    broken_at = {batch: kind for kind, batch in config.broken_batches.items() if batch < config.batches}

    files, broken_files, anomalies = [], [], []

    def land(batch: pd.DataFrame, name: str, kind: str | None) -> None:
        if kind:
            batch = _break(batch, kind, rng)
            broken_files.append({"file": name, "kind": kind, "rows": len(batch)})
        else:
            for row in batch.loc[batch["anomaly"] == 1].itertuples():
                anomalies.append({"entity": row.entity, "timestamp": row.timestamp.isoformat(), "file": name})
        _write(batch, landing / name)
        files.append(name)

    for batch_index in range(config.batches):
        rows = slice(batch_index * config.rows_per_batch, (batch_index + 1) * config.rows_per_batch)
        if config.plant_files:
            suffix = "csv" if batch_index % 2 == 0 else "parquet"
            period = pd.concat([frame.iloc[rows] for frame in frames], ignore_index=True)
            land(period, f"plant_batch-{batch_index:04d}.{suffix}", broken_at.get(batch_index))
            continue
        for entity_index, frame in enumerate(frames):
            batch = frame.iloc[rows]
            suffix = "csv" if (batch_index + entity_index) % 2 == 0 else "parquet"
            # Each broken kind hits one line only, so every line keeps most of its history.
            kind = broken_at.get(batch_index) if entity_index == batch_index % config.entities else None
            land(batch, f"{batch['entity'].iloc[0]}_batch-{batch_index:04d}.{suffix}", kind)

    def batch_start(index: int) -> str:
        return min(f["timestamp"].iloc[index * config.rows_per_batch] for f in frames).isoformat()

    drifts = []
    if config.gradual_drift_start < config.batches:
        drifts.append(
            {
                "kind": "gradual",
                "batch": config.gradual_drift_start,
                "time": batch_start(config.gradual_drift_start),
                "until_batch": config.gradual_drift_start + config.gradual_drift_batches,
                "sensors": ["temperature", "vibration"],
            }
        )
    if config.abrupt_drift_batch < config.batches:
        drifts.append(
            {
                "kind": "abrupt",
                "batch": config.abrupt_drift_batch,
                "time": batch_start(config.abrupt_drift_batch),
                "sensors": ["pressure", "flow", "motor_current"],
            }
        )
    truth = GroundTruth(
        entities=[f["entity"].iloc[0] for f in frames],
        batches=config.batches,
        rows_per_batch=config.rows_per_batch,
        drifts=drifts,
        anomalies=anomalies,
        broken_files=broken_files,
        files=files,
    )
    ground_truth_path.parent.mkdir(parents=True, exist_ok=True)
    ground_truth_path.write_text(json.dumps(asdict(truth), indent=2))
    return truth
