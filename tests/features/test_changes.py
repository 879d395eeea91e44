"""Sensors that enter as their change: against a row-by-row reference, across batches and lines."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from features import EntityFeatureState, FeatureSpec, build_features
from features.changes import changes_from_previous


def _reference(values: np.ndarray) -> np.ndarray:
    """Each present reading minus the previous present one of its column; the first: 0."""
    out = np.full_like(values, np.nan)
    for col in range(values.shape[1]):
        previous = np.nan
        for t, value in enumerate(values[:, col]):
            if np.isnan(value):
                continue
            out[t, col] = 0.0 if np.isnan(previous) else value - previous
            previous = value
    return out


def _plant(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lines = {"m1": np.cumsum(rng.normal(size=(70, 2)), axis=0), "m2": np.cumsum(rng.normal(size=(40, 2)), axis=0)}
    for values in lines.values():
        values[rng.random(values.shape) < 0.3] = np.nan
    return lines


def test_changes_carry_each_lines_last_reading_across_batches():
    lines = _plant(4)
    previous = np.full((2, 2), np.nan)
    got = {name: [] for name in lines}
    for lo, hi in ((0, 1), (1, 25), (25, 70)):
        parts = [values[lo:hi] for values in lines.values()]
        offsets = np.cumsum([0, *(len(p) for p in parts)])
        line = np.repeat(np.arange(2), [len(p) for p in parts])
        changes, previous = changes_from_previous(np.vstack(parts), line, offsets, previous)
        for index, name in enumerate(lines):
            got[name].append(changes[offsets[index] : offsets[index + 1]])
    for name, values in lines.items():
        np.testing.assert_allclose(np.vstack(got[name]), _reference(values), equal_nan=True)


def _frame(lines: dict[str, np.ndarray], lo: int, hi: int) -> pd.DataFrame:
    frames = []
    for entity, values in lines.items():
        part = values[lo:hi]
        stamps = pd.date_range("2026-01-01", periods=len(values), freq="10s", tz="UTC")[lo:hi]
        frames.append(pd.DataFrame({"entity": entity, "timestamp": stamps, "a": part[:, 0], "b": part[:, 1]}))
    return pd.concat(frames, ignore_index=True)


def test_a_change_sensor_is_built_as_if_its_changes_had_been_logged():
    lines = _plant(6)
    spec = FeatureSpec("entity", "timestamp", ("a", "b"), change_sensors=("a",), baseline_rows=30)
    plain = FeatureSpec("entity", "timestamp", ("a", "b"), baseline_rows=30)
    logged_changes = {name: np.column_stack([_reference(v)[:, 0], v[:, 1]]) for name, v in lines.items()}
    states, expected_states = {}, {}
    for lo, hi in ((0, 20), (20, 70)):
        built, states = build_features(_frame(lines, lo, hi), spec, states)
        expected, expected_states = build_features(_frame(logged_changes, lo, hi), plain, expected_states)
        np.testing.assert_allclose(built.inputs, expected.inputs, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(built.targets, expected.targets, rtol=1e-6, atol=1e-6, equal_nan=True)
        np.testing.assert_array_equal(built.raw, _frame(lines, lo, hi).sort_values(["entity", "timestamp"])[["a", "b"]])
        states = {e: EntityFeatureState.from_bytes(s.to_bytes()) for e, s in states.items()}  # as stored
    last_a = {name: values[~np.isnan(values[:, 0]), 0][-1] for name, values in lines.items()}
    assert {e: s.last_readings["a"] for e, s in states.items()} == pytest.approx(last_a)


def test_a_state_stored_before_change_sensors_existed_reads_back_without_readings():
    # Version 1 (JSON), as stored before the binary layout and before change sensors.
    payload = {
        "version": 1,
        "scaler": {"counts": {}, "means": {}, "vars": {}},
        "last_values": {"a": 0.5},
        "last_timestamp": None,
        "events": 0,
    }
    restored = EntityFeatureState.from_bytes(json.dumps(payload).encode())
    assert restored.last_readings == {} and restored.last_values == {"a": 0.5}


def test_a_change_sensor_must_be_a_sensor_of_the_log():
    with pytest.raises(ValueError, match="change_sensors"):
        FeatureSpec("entity", "timestamp", ("a", "b"), change_sensors=("c",))
