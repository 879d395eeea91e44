"""From validated log rows of many lines to model inputs, carrying each line's feature state.

Sources report on their own clocks, so a row holds only the sensors whose source reported.
Each row is one event on its line's sequence; every sensor contributes its standardised
reading, carried forward from its last report when absent, and a mask saying whether it is
fresh. Δt since the previous event (across batches, from the carried timestamp) feeds the
model's continuous-time decay and, as log(1 + Δt), its input.

All lines of a file are built at once, with array operations that run per line, so a line's
features are the same whichever lines share its batch (a Dask worker building one group of
lines gets what the driver would).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from features.changes import changes_from_previous
from features.scaling import ScalerStatistics, last_observed, latest_observed, standardize
from features.spec import CLOCK_PERIODS_SECONDS, FeatureSpec
from features.state import NO_EVENT, EntityFeatureState, LineFeatureStates
from features.stretch import level_stretch


@dataclass
class FeatureBatch:
    """Features of one or more lines, flat: each line's rows together, in time order."""

    entities: list[str]
    offsets: np.ndarray  # (L + 1,) where each line's rows start
    timestamps: pd.DatetimeIndex  # (R,) UTC
    inputs: np.ndarray  # (R, n_inputs) float32
    targets: np.ndarray  # (R, n_targets) float32, standardised readings, NaN where absent
    dt: np.ndarray  # (R,) float32, Δt in units of the time scale
    raw: np.ndarray  # (R, n_targets) float64 readings as logged (NaN where absent)
    labels: np.ndarray | None  # (R, n_labels) when label columns are present
    label_names: tuple[str, ...] = ()  # the label columns in `labels`
    # (R, n_targets) how far level changes have stretched each reading's unit (features.stretch);
    # None where not known (features read back from an archive)
    level_stretch: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.timestamps)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def entity(self) -> str:
        """The line of a one-line batch."""
        if len(self.entities) != 1:
            raise ValueError(f"this batch holds {len(self.entities)} lines, not one")
        return self.entities[0]

    @property
    def line_index(self) -> np.ndarray:
        """(R,) the line of each row, as an index into `entities`."""
        return np.repeat(np.arange(len(self.entities)), self.lengths)

    @property
    def positions(self) -> np.ndarray:
        """(R,) each row's step within its line."""
        return np.arange(len(self)) - np.repeat(self.offsets[:-1], self.lengths)

    def select(self, lines: list[int] | np.ndarray) -> FeatureBatch:
        """The given lines (indices into `entities`), in that order."""
        lines = np.asarray(lines, dtype=np.int64)
        lengths = self.lengths[lines]
        rows = (
            np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in lines])
            if len(lines)
            else np.empty(0, dtype=np.int64)
        )
        return FeatureBatch(
            entities=[self.entities[i] for i in lines],
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            timestamps=self.timestamps[rows],
            inputs=self.inputs[rows],
            targets=self.targets[rows],
            dt=self.dt[rows],
            raw=self.raw[rows],
            labels=self.labels[rows] if self.labels is not None else None,
            label_names=self.label_names,
            level_stretch=self.level_stretch[rows] if self.level_stretch is not None else None,
        )

    @classmethod
    def stack(cls, batches: list[FeatureBatch]) -> FeatureBatch:
        """Batches of different lines as one, lines in the order given."""
        if not batches:
            raise ValueError("stack needs at least one batch")
        lengths = np.concatenate([b.lengths for b in batches])
        labels = [b.labels for b in batches]
        same_labels = len({b.label_names for b in batches}) == 1 and all(lab is not None for lab in labels)
        return cls(
            entities=[e for b in batches for e in b.entities],
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            timestamps=batches[0].timestamps.append([b.timestamps for b in batches[1:]]),
            inputs=np.concatenate([b.inputs for b in batches]),
            targets=np.concatenate([b.targets for b in batches]),
            dt=np.concatenate([b.dt for b in batches]),
            raw=np.concatenate([b.raw for b in batches]),
            labels=np.concatenate(labels) if same_labels else None,
            label_names=batches[0].label_names if same_labels else (),
            level_stretch=_joined_stretch(batches),
        )

    def padded(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Per-row values (R, ...) as (L, T, ...), right-padded with `fill` to the longest line."""
        longest = int(self.lengths.max()) if len(self.entities) else 0
        out = np.full((len(self.entities), longest, *values.shape[1:]), fill, dtype=values.dtype)
        out[self.line_index, self.positions] = values
        return out

    def flat(self, padded: np.ndarray) -> np.ndarray:
        """The inverse of `padded`: per-row values (R, ...) from (L, T, ...)."""
        return padded[self.line_index, self.positions]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Model tensors, right-padded to the longest line: inputs (L, T, n_inputs), targets
        (L, T, n_targets) (NaN at padding), dt (L, T) and the step mask (L, T), False at padding."""
        steps = self.padded(np.ones(len(self), dtype=bool), fill=False)
        return (
            torch.from_numpy(self.padded(self.inputs)),
            torch.from_numpy(self.padded(self.targets, fill=np.nan)),
            torch.from_numpy(self.padded(self.dt)),
            torch.from_numpy(steps),
        )

    def to_frame(self, spec: FeatureSpec) -> pd.DataFrame:
        frame = pd.DataFrame(self.inputs, columns=spec.input_names)
        frame.insert(0, spec.timestamp_column, self.timestamps)
        frame.insert(0, spec.entity_column, np.repeat(np.asarray(self.entities, dtype=object), self.lengths))
        for index, sensor in enumerate(spec.sensors):
            frame[f"target_{sensor}"] = self.targets[:, index]
        frame["dt"] = self.dt
        return frame

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, spec: FeatureSpec, runs_by: str | None = None) -> FeatureBatch:
        """Reads back what `to_frame` wrote (the archived features of a processed batch); the
        frame's rows of a line must be together, in time order. With `runs_by`, a change of that
        column within a line also starts a sequence of its own (each file of a line a run): the
        line then appears once per run, in the frame's order."""
        entity = frame[spec.entity_column].astype(str).to_numpy()
        boundary = entity[1:] != entity[:-1]
        if runs_by is not None:
            run = frame[runs_by].to_numpy()
            boundary |= run[1:] != run[:-1]
        starts = np.flatnonzero(np.r_[True, boundary]) if len(entity) else np.empty(0, np.int64)
        targets = frame[[f"target_{s}" for s in spec.sensors]].to_numpy(np.float32)
        return cls(
            entities=[str(entity[i]) for i in starts],
            offsets=np.r_[starts, len(entity)].astype(np.int64),
            timestamps=pd.DatetimeIndex(pd.to_datetime(frame[spec.timestamp_column], utc=True)),
            inputs=frame[spec.input_names].to_numpy(np.float32),
            targets=targets,
            dt=frame["dt"].to_numpy(np.float32),
            raw=np.full(targets.shape, np.nan),
            labels=None,
        )


def _joined_stretch(batches: list[FeatureBatch]) -> np.ndarray | None:
    if any(b.level_stretch is None for b in batches):
        return None
    return np.concatenate([b.level_stretch for b in batches])


def clock_phases(nanoseconds: np.ndarray, periods: tuple[str, ...]) -> np.ndarray:
    """(R, 2 × periods): the sine and cosine of each row's phase (UTC) in each period."""
    seconds = nanoseconds.astype(np.float64) / 1e9
    columns = []
    for period in periods:
        angle = 2 * np.pi * np.mod(seconds, CLOCK_PERIODS_SECONDS[period]) / CLOCK_PERIODS_SECONDS[period]
        columns += [np.sin(angle), np.cos(angle)]
    return np.stack(columns, axis=1) if columns else np.empty((len(seconds), 0))


def build_features(
    rows: pd.DataFrame, spec: FeatureSpec, states: Mapping[str, EntityFeatureState | bytes | None]
) -> tuple[FeatureBatch, LineFeatureStates]:
    """Features of validated rows of any number of lines, each from its carried state (stored
    bytes, an `EntityFeatureState`, or a `LineFeatureStates`; a line missing from `states`
    starts fresh), and every line's state after them.

    Lines come out sorted by id; each line's rows in time order.
    """
    if rows.empty:
        raise ValueError("build_features needs at least one row")
    codes, entities = pd.factorize(rows[spec.entity_column].astype(str), sort=True)
    timestamps = pd.DatetimeIndex(pd.to_datetime(rows[spec.timestamp_column], utc=True))
    nanoseconds = timestamps.as_unit("ns").asi8  # parsed text and Parquet may differ in unit
    order = np.lexsort((nanoseconds, codes))
    line = codes[order]
    nanoseconds = nanoseconds[order]
    timestamps = timestamps[order]
    counts = np.bincount(line, minlength=len(entities))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    entities = [str(e) for e in entities]
    sensors = spec.sensors
    carried = LineFeatureStates.from_states(entities, states, sensors)
    raw = rows[list(sensors)].to_numpy(np.float64)[order]
    measured = raw
    changing = [sensors.index(name) for name in spec.change_sensors]
    last_readings = carried.last_readings.copy()
    if changing:
        measured = raw.copy()
        measured[:, changing], last_readings[:, changing] = changes_from_previous(
            raw[:, changing], line, offsets, carried.last_readings[:, changing]
        )

    statistics = ScalerStatistics(carried.counts, carried.means, carried.variances)
    standardised, after, stds = standardize(measured, line, offsets, statistics, spec.baseline_rows)
    # A held baseline cannot stretch; a change sensor is a difference already (features.stretch).
    stretched = np.array([not spec.baseline_rows and name not in spec.change_sensors for name in sensors])
    fresh = ~np.isnan(standardised)
    latest = latest_observed(fresh)
    stretch, steps = level_stretch(measured, stds, line, offsets, carried.steps, stretched, latest)

    # Carry each sensor's last reading forward (from the previous batch too; 0 before any).
    starts = offsets[:-1][line][:, None]
    columns = np.arange(len(sensors))
    in_line = latest >= starts
    values = np.where(in_line, standardised[np.where(in_line, latest, 0), columns], carried.last_values[line])
    values = np.nan_to_num(values, nan=0.0)

    seconds = np.diff(nanoseconds, prepend=nanoseconds[:1]) / 1e9
    first_rows = offsets[:-1]
    before = carried.last_event_ns
    known = before != NO_EVENT
    since_carried = (nanoseconds[first_rows] - np.where(known, before, 0)) / 1e9
    # A line's first event ever: one nominal step.
    seconds[first_rows] = np.where(known, since_carried, spec.time_scale_seconds)
    dt = np.maximum(seconds, 0.0) / spec.time_scale_seconds

    inputs = np.concatenate(
        [values, fresh.astype(np.float64), np.log1p(dt)[:, None], clock_phases(nanoseconds, spec.clock_periods)], axis=1
    )
    present = [c for c in spec.label_columns if c in rows.columns]
    labels = rows[present].to_numpy(np.float64)[order] if present else None

    last = last_observed(latest, offsets)
    seen = last >= 0
    new_states = LineFeatureStates(
        entities=entities,
        sensors=sensors,
        counts=after.counts,
        means=after.means,
        variances=after.variances,
        last_values=np.where(seen, standardised[np.where(seen, last, 0), columns], carried.last_values),
        last_readings=last_readings,
        last_event_ns=nanoseconds[offsets[1:] - 1].astype(np.int64),
        events=carried.events + counts,
        steps=steps,
    )
    batch = FeatureBatch(
        entities=entities,
        offsets=offsets,
        timestamps=timestamps,
        inputs=inputs.astype(np.float32),
        targets=standardised.astype(np.float32),
        dt=dt.astype(np.float32),
        raw=raw,
        labels=labels,
        label_names=tuple(present),
        level_stretch=stretch.astype(np.float32),
    )
    return batch, new_states
