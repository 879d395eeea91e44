"""The feature state each line carries from batch to batch, and its stored bytes (never pickle).

A plant's file holds thousands of lines, so the states of a file's lines are read, built on and
written as arrays (`LineFeatureStates`), one row per line; `EntityFeatureState` is one line's
state as dicts, for reading and for tests. Stored layout (version 3, per line): a 4-byte tag,
the sensors' names (JSON, with a 2-byte length), then the time of the line's last event
(int64 UTC nanoseconds), its event count (int64) and nine float64 values per sensor: river's
count, mean and variance, the last standardised reading, the last raw reading of a sensor
that enters as its change (NaN where a line has none), then the level stretch's statistics
(features.stretch: differences learned, the mean of their half squares, the last reading
learned, the reference ratio). Lines stored with the same sensors are decoded together in one
read. Version 2 (the first five values only, before 2026-12-07's level stretch: its statistics
start afresh) and version 1 (JSON) are still read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from features.scaling import ScalerStatistics
from features.stretch import StepStatistics


class FeatureStateError(ValueError):
    """Stored feature state that cannot be read back."""


TAG = b"LFS\x03"  # version 3; version 1 is JSON and starts with "{"
TAG_V2 = b"LFS\x02"  # without the level stretch's statistics
_BINARY_TAGS = (TAG, TAG_V2)
NO_EVENT = np.iinfo(np.int64).min  # last event time of a line that has none
_PER_SENSOR = 9  # counts, means, variances, last values, last readings, then the four of StepStatistics
_PER_SENSOR_V2 = 5
_STEP_FIELDS = ("step_counts", "step_square_means", "step_last_readings", "stretch_references")


@dataclass
class EntityFeatureState:
    # river StandardScaler statistics: {"counts": {...}, "means": {...}, "vars": {...}}
    scaler: dict = field(default_factory=lambda: {"counts": {}, "means": {}, "vars": {}})
    # Last standardised reading of each sensor, carried forward over missing readings.
    last_values: dict[str, float] = field(default_factory=dict)
    last_timestamp: pd.Timestamp | None = None
    events: int = 0
    # Last raw reading of each sensor that enters as its change (FeatureSpec.change_sensors).
    last_readings: dict[str, float] = field(default_factory=dict)
    # The level stretch's statistics (features.stretch), {field: {sensor: value}} over _STEP_FIELDS.
    level_steps: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def sensors(self) -> tuple[str, ...]:
        """The sensors it holds anything of, in the order first met."""
        return tuple(dict.fromkeys([*self.scaler["counts"], *self.last_values, *self.last_readings]))

    def to_bytes(self) -> bytes:
        return LineFeatureStates.from_states(["line"], {"line": self}, self.sensors).to_bytes_many()["line"]

    @classmethod
    def from_bytes(cls, data: bytes) -> EntityFeatureState:
        if data[:4] in _BINARY_TAGS:
            states = LineFeatureStates.from_states(["line"], {"line": data}, None)
            return states["line"]
        return _from_json(data)


@dataclass(eq=False)
class LineFeatureStates(Mapping):
    """The feature states of L lines over S sensors, as (L, S) and (L,) arrays; also a read-only
    mapping from each line to its `EntityFeatureState`."""

    entities: list[str]
    sensors: tuple[str, ...]
    counts: np.ndarray  # (L, S) river's counts; 0: the sensor never seen
    means: np.ndarray
    variances: np.ndarray
    last_values: np.ndarray  # (L, S) NaN: none yet
    last_readings: np.ndarray  # (L, S) NaN: none (or not a change sensor)
    last_event_ns: np.ndarray  # (L,) int64 UTC nanoseconds, NO_EVENT: none yet
    events: np.ndarray  # (L,) int64
    steps: StepStatistics | None = None  # the level stretch's, (L, S) each; None: empty

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = StepStatistics.empty(self.counts.shape)

    @classmethod
    def empty(cls, entities: list[str], sensors: tuple[str, ...]) -> LineFeatureStates:
        shape = (len(entities), len(sensors))
        zeros, missing = np.zeros(shape), np.full(shape, np.nan)
        return cls(
            list(entities),
            tuple(sensors),
            zeros,
            zeros.copy(),
            zeros.copy(),
            missing,
            missing.copy(),
            np.full(len(entities), NO_EVENT, dtype=np.int64),
            np.zeros(len(entities), dtype=np.int64),
        )

    @classmethod
    def from_states(
        cls,
        entities: list[str],
        states: Mapping[str, EntityFeatureState | bytes | None],
        sensors: tuple[str, ...] | None,
    ) -> LineFeatureStates:
        """The lines' states in `entities` order from stored bytes, `EntityFeatureState`s or
        another `LineFeatureStates` (a line absent or None starts fresh), on `sensors` (None:
        those of the first stored state; a sensor a state does not hold starts fresh)."""
        if isinstance(states, LineFeatureStates) and (sensors is None or states.sensors == tuple(sensors)):
            return states._pick(entities)
        stored = [states.get(e) for e in entities]
        if sensors is None:
            sensors = next((_sensors_of(s) for s in stored if s is not None), ())
        out = cls.empty(entities, tuple(sensors))
        binary: dict[tuple[bytes, bytes], list[int]] = {}  # lines grouped by their version and sensors
        as_dicts: dict[int, EntityFeatureState] = {}
        for row, state in enumerate(stored):
            if state is None:
                continue
            if isinstance(state, bytes | bytearray | memoryview):
                state = bytes(state)
                if state[:4] in _BINARY_TAGS:
                    binary.setdefault((state[:4], _header(state)), []).append(row)
                    continue
                state = _from_json(state)
            as_dicts[row] = state
        if as_dicts:
            out._set_dicts(list(as_dicts), list(as_dicts.values()))
        for (_, header), rows in binary.items():
            out._set_binary(rows, header, [stored[r] for r in rows])
        return out

    def to_bytes_many(self) -> dict[str, bytes]:
        """Each line's stored bytes."""
        names = json.dumps(list(self.sensors)).encode()
        prefix = TAG + len(names).to_bytes(2, "little") + names
        times = np.stack([self.last_event_ns, self.events], axis=1).astype("<i8")
        steps = self.steps
        values = np.concatenate(
            [
                *(self.counts, self.means, self.variances, self.last_values, self.last_readings),
                *(steps.counts, steps.square_means, steps.last_readings, steps.references),
            ],
            axis=1,
        ).astype("<f8")
        return {
            entity: prefix + times[row].tobytes() + values[row].tobytes() for row, entity in enumerate(self.entities)
        }

    def __getitem__(self, entity: str) -> EntityFeatureState:
        row = self._rows[entity]
        stamp = self.last_event_ns[row]
        return EntityFeatureState(
            scaler=ScalerStatistics(self.counts, self.means, self.variances).state(row, self.sensors),
            last_values=_present(self.sensors, self.last_values[row]),
            last_timestamp=pd.Timestamp(int(stamp), tz="UTC") if stamp != NO_EVENT else None,
            events=int(self.events[row]),
            last_readings=_present(self.sensors, self.last_readings[row]),
            level_steps=self._level_steps(row),
        )

    def _level_steps(self, row: int) -> dict[str, dict[str, float]]:
        """One line's level-stretch statistics as dicts; none for a line that has none yet."""
        if not self.steps.counts[row].any() and np.isnan(self.steps.last_readings[row]).all():
            return {}
        return {name: _present(self.sensors, values[row]) for name, values in self._step_arrays().items()}

    def _step_arrays(self) -> dict[str, np.ndarray]:
        steps = self.steps
        return dict(
            zip(_STEP_FIELDS, (steps.counts, steps.square_means, steps.last_readings, steps.references), strict=True)
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self.entities)

    def __len__(self) -> int:
        return len(self.entities)

    @cached_property
    def _rows(self) -> dict[str, int]:
        return {entity: row for row, entity in enumerate(self.entities)}

    def _pick(self, entities: list[str]) -> LineFeatureStates:
        rows = np.array([self._rows.get(e, -1) for e in entities], dtype=np.int64)
        known = rows >= 0
        out = LineFeatureStates.empty(entities, self.sensors)
        for name in ("counts", "means", "variances", "last_values", "last_readings", "last_event_ns", "events"):
            getattr(out, name)[known] = getattr(self, name)[rows[known]]
        for mine, theirs in zip(self._step_arrays().values(), out._step_arrays().values(), strict=True):
            theirs[known] = mine[rows[known]]
        return out

    def _set_dicts(self, rows: list[int], states: list[EntityFeatureState]) -> None:
        scaler = ScalerStatistics.from_states([state.scaler for state in states], self.sensors)
        self.counts[rows], self.means[rows], self.variances[rows] = scaler.counts, scaler.means, scaler.variances
        for row, state in zip(rows, states, strict=True):
            self.last_values[row] = [state.last_values.get(sensor, np.nan) for sensor in self.sensors]
            self.last_readings[row] = [state.last_readings.get(sensor, np.nan) for sensor in self.sensors]
            for name, values in self._step_arrays().items():
                stored = state.level_steps.get(name)
                if stored:
                    values[row] = [stored.get(sensor, values[row, col]) for col, sensor in enumerate(self.sensors)]
            if state.last_timestamp is not None:
                stamp = pd.Timestamp(state.last_timestamp)
                stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
                self.last_event_ns[row] = stamp.as_unit("ns").value
            self.events[row] = state.events

    def _set_binary(self, rows: list[int], header: bytes, blobs: list[bytes]) -> None:
        stored = _stored_sensors(header)
        per_sensor = _PER_SENSOR if blobs[0][:4] == TAG else _PER_SENSOR_V2
        width = 4 + 2 + len(header) + 16 + 8 * per_sensor * len(stored)
        if any(len(blob) != width for blob in blobs):
            raise FeatureStateError(f"feature state is unreadable: a record is not {width} bytes long")
        body = np.frombuffer(b"".join(blob[6 + len(header) :] for blob in blobs), dtype=np.uint8)
        body = body.reshape(len(blobs), -1)
        times = body[:, :16].copy().view("<i8")
        values = body[:, 16:].copy().view("<f8").reshape(len(blobs), per_sensor, len(stored))
        if np.isinf(values).any() or np.isnan(values[:, :3]).any() or (values[:, 0] < 0).any():
            raise FeatureStateError("feature state holds a non-finite or negative statistic")
        if per_sensor == _PER_SENSOR and (np.isnan(values[:, 5:7]).any() or (values[:, 5:7] < 0).any()):
            raise FeatureStateError("feature state holds a non-finite or negative level-stretch statistic")
        rows_index = np.asarray(rows)
        columns = [(self.sensors.index(s), j) for j, s in enumerate(stored) if s in self.sensors]
        for target, source in columns:
            for part, name in enumerate(("counts", "means", "variances", "last_values", "last_readings")):
                getattr(self, name)[rows_index, target] = values[:, part, source]
            if per_sensor == _PER_SENSOR:
                for part, array in enumerate(self._step_arrays().values(), start=_PER_SENSOR_V2):
                    array[rows_index, target] = values[:, part, source]
        self.last_event_ns[rows_index] = times[:, 0]
        self.events[rows_index] = times[:, 1]


def _header(data: bytes) -> bytes:
    size = int.from_bytes(data[4:6], "little")
    return data[6 : 6 + size]


def _stored_sensors(header: bytes) -> tuple[str, ...]:
    try:
        return tuple(json.loads(header.decode()))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FeatureStateError(f"feature state is unreadable: {error}") from error


def _sensors_of(state: EntityFeatureState | bytes) -> tuple[str, ...]:
    if isinstance(state, bytes | bytearray | memoryview) and bytes(state[:4]) in _BINARY_TAGS:
        return _stored_sensors(_header(bytes(state)))
    if not isinstance(state, EntityFeatureState):
        state = _from_json(bytes(state))
    return state.sensors


def _present(sensors: tuple[str, ...], values: np.ndarray) -> dict[str, float]:
    return {sensor: float(v) for sensor, v in zip(sensors, values, strict=True) if not math.isnan(v)}


def _from_json(data: bytes) -> EntityFeatureState:
    """A version-1 state (JSON)."""
    try:
        payload = json.loads(data.decode())
        if payload.get("version") != 1:
            raise FeatureStateError(f"feature state version {payload.get('version')!r} is not supported")
        scaler = {part: dict(payload["scaler"][part]) for part in ("counts", "means", "vars")}
        last_values = {str(k): float(v) for k, v in payload["last_values"].items()}
        stamp = payload["last_timestamp"]
        events = int(payload["events"])
        # A state stored before sensors could enter as changes has none.
        last_readings = {str(k): float(v) for k, v in payload.get("last_readings", {}).items()}
    except FeatureStateError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise FeatureStateError(f"feature state is unreadable: {error}") from error
    if not all(math.isfinite(v) for v in [*last_values.values(), *last_readings.values()]):
        raise FeatureStateError("feature state holds a non-finite carried value")
    return EntityFeatureState(scaler, last_values, pd.Timestamp(stamp) if stamp else None, events, last_readings)
