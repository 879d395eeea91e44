"""From validated log rows of one entity to model inputs, carrying the feature state.

Sources report on their own clocks, so a row holds only the sensors whose source reported.
Each row is one event on the entity's sequence; every sensor contributes its standardised
reading, carried forward from its last report when absent, and a mask saying whether it is
fresh. Δt since the previous event (across batches, from the carried timestamp) feeds the
model's continuous-time decay and, as log(1 + Δt), its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from features.scaling import RunningStandardizer
from features.spec import FeatureSpec
from features.state import EntityFeatureState


@dataclass
class FeatureBatch:
    entity: str
    timestamps: pd.DatetimeIndex
    inputs: np.ndarray  # (T, n_inputs) float32
    targets: np.ndarray  # (T, n_targets) float32, standardised readings, NaN where absent
    dt: np.ndarray  # (T,) float32, Δt in units of the time scale
    raw: np.ndarray  # (T, n_targets) float64 readings as logged (NaN where absent)
    labels: np.ndarray | None  # (T, n_labels) when label columns are present

    def __len__(self) -> int:
        return len(self.timestamps)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1, T, n_inputs) inputs, (1, T, n_targets) targets and (1, T) dt for the model."""
        return (
            torch.from_numpy(self.inputs)[None],
            torch.from_numpy(self.targets)[None],
            torch.from_numpy(self.dt)[None],
        )

    def to_frame(self, spec: FeatureSpec) -> pd.DataFrame:
        frame = pd.DataFrame(self.inputs, columns=spec.input_names)
        frame.insert(0, spec.timestamp_column, self.timestamps)
        frame.insert(0, spec.entity_column, self.entity)
        for index, sensor in enumerate(spec.sensors):
            frame[f"target_{sensor}"] = self.targets[:, index]
        frame["dt"] = self.dt
        return frame

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, spec: FeatureSpec) -> FeatureBatch:
        """Reads back what `to_frame` wrote (the archived features of a processed batch)."""
        targets = frame[[f"target_{s}" for s in spec.sensors]].to_numpy(np.float32)
        return cls(
            entity=str(frame[spec.entity_column].iloc[0]),
            timestamps=pd.DatetimeIndex(frame[spec.timestamp_column]),
            inputs=frame[spec.input_names].to_numpy(np.float32),
            targets=targets,
            dt=frame["dt"].to_numpy(np.float32),
            raw=np.full(targets.shape, np.nan),
            labels=None,
        )


def build_features(
    rows: pd.DataFrame, spec: FeatureSpec, state: EntityFeatureState
) -> tuple[FeatureBatch, EntityFeatureState]:
    """Features of one entity's rows (sorted by time, validated), and the state after them."""
    if rows.empty:
        raise ValueError("build_features needs at least one row")
    entities = rows[spec.entity_column].unique()
    if len(entities) != 1:
        raise ValueError(f"build_features takes one entity's rows, got {list(entities)[:5]}")
    timestamps = pd.DatetimeIndex(pd.to_datetime(rows[spec.timestamp_column], utc=True))
    raw = rows[list(spec.sensors)].to_numpy(np.float64)

    scaler = RunningStandardizer(list(spec.sensors))
    if state.scaler["counts"]:
        scaler = RunningStandardizer.from_state(list(spec.sensors), state.scaler)
    standardised = scaler.transform_learn(raw)

    fresh = ~np.isnan(standardised)
    carried = pd.DataFrame(standardised, columns=list(spec.sensors))
    first = pd.DataFrame([[state.last_values.get(s, np.nan) for s in spec.sensors]], columns=list(spec.sensors))
    values = pd.concat([first, carried], ignore_index=True).ffill().fillna(0.0).to_numpy()[1:]

    nanoseconds = timestamps.as_unit("ns").asi8  # parsed text and Parquet may differ in unit
    seconds = np.diff(nanoseconds, prepend=nanoseconds[0]) / 1e9
    if state.last_timestamp is not None:
        seconds[0] = (timestamps[0] - state.last_timestamp).total_seconds()
    else:
        seconds[0] = spec.time_scale_seconds  # an entity's first event ever: one nominal step
    dt = np.maximum(seconds, 0.0) / spec.time_scale_seconds

    inputs = np.concatenate([values, fresh.astype(np.float64), np.log1p(dt)[:, None]], axis=1)
    labels = None
    present = [c for c in spec.label_columns if c in rows.columns]
    if present:
        labels = rows[present].to_numpy(np.float64)

    last_values = dict(state.last_values)
    for index, sensor in enumerate(spec.sensors):
        column_fresh = np.flatnonzero(fresh[:, index])
        if len(column_fresh):
            last_values[sensor] = float(standardised[column_fresh[-1], index])
    new_state = EntityFeatureState(
        scaler=scaler.state(),
        last_values=last_values,
        last_timestamp=timestamps[-1],
        events=state.events + len(rows),
    )
    batch = FeatureBatch(
        entity=str(entities[0]),
        timestamps=timestamps,
        inputs=inputs.astype(np.float32),
        targets=standardised.astype(np.float32),
        dt=dt.astype(np.float32),
        raw=raw,
        labels=labels,
    )
    return batch, new_state
