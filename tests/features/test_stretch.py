"""The level stretch (features.stretch): a jump that stays stretches a line's scaling unit,
bursts and noise do not, and the figures do not depend on how a line's rows are cut into files."""

from __future__ import annotations

import numpy as np
import pandas as pd

from features import FeatureSpec, build_features
from features.stretch import REFERENCE_STEPS

SPEC = FeatureSpec("entity", "timestamp", ("value", "other"), time_scale_seconds=60.0)


def _line(values: np.ndarray, name: str, other: np.ndarray | None = None) -> pd.DataFrame:
    rows = len(values)
    other = np.random.default_rng(1).normal(size=rows) if other is None else other
    stamps = pd.date_range("2026-01-01", periods=rows, freq="60s", tz="UTC")
    return pd.DataFrame({"entity": name, "timestamp": stamps, "value": values, "other": other})


def _reference_stretch(values: np.ndarray) -> np.ndarray:
    """Row by row, from the definition: the population std of the readings so far over the root
    mean half squared difference of successive ones, against that ratio at the line's
    `REFERENCE_STEPS`-th difference (1 before it, and where a reading is missing)."""
    out = np.ones(len(values))
    seen: list[float] = []
    reference = None
    for row, value in enumerate(values):
        if np.isnan(value):
            continue
        seen.append(value)
        if len(seen) < 2:
            continue
        steps = np.diff(seen)
        ratio = np.std(seen) / np.sqrt(np.mean(steps**2) / 2)
        if reference is None and len(steps) >= REFERENCE_STEPS:
            reference = ratio
        if reference is not None:
            out[row] = ratio / reference
    return out


def test_the_stretch_follows_its_definition_across_files_and_missing_readings():
    rng = np.random.default_rng(0)
    values = np.r_[rng.normal(0, 1, 300), rng.normal(40, 1, 300)]
    values[[5, 150, 420]] = np.nan  # a missing reading is skipped, as the scaler skips it
    frame = _line(values, "m0")
    whole, _ = build_features(frame, SPEC, {})
    np.testing.assert_allclose(whole.level_stretch[:, 0], _reference_stretch(values), rtol=1e-5)
    # The same line cut into three files, its state carried as stored bytes.
    carried, parts = {}, []
    for part in (frame.iloc[:70], frame.iloc[70:380], frame.iloc[380:]):
        features, states = build_features(part, SPEC, carried)
        carried = states.to_bytes_many()
        parts.append(features.level_stretch)
    np.testing.assert_allclose(np.concatenate(parts), whole.level_stretch, rtol=1e-6)


def test_a_jump_stretches_the_unit_and_bursts_of_the_same_size_do_not():
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 1, 2000)
    jump = noise + np.where(np.arange(2000) >= 1000, 40.0, 0.0)
    bursts = noise.copy()
    bursts[rng.choice(np.arange(200, 2000), 40, replace=False)] += 40.0
    features, _ = build_features(pd.concat([_line(jump, "jump"), _line(bursts, "bursts")]), SPEC, {})
    by_line = dict(zip(features.entities, np.split(features.level_stretch[:, 0], features.offsets[1:-1]), strict=True))
    assert by_line["jump"][1500:].min() > 10  # the std grew ~20-fold, the row noise did not
    assert by_line["jump"][:1000].max() < 1.5
    assert by_line["bursts"].max() < 1.5  # a burst moves the std and the row noise alike
    assert np.all(features.level_stretch[:, 1] < 1.5)  # the other sensor is plain noise throughout


def test_a_held_baseline_and_a_change_sensor_do_not_stretch():
    values = np.r_[np.zeros(200), np.full(200, 50.0)] + np.random.default_rng(4).normal(size=400)
    frame = _line(values, "m0", other=np.cumsum(np.abs(values)))
    held = FeatureSpec("entity", "timestamp", ("value", "other"), time_scale_seconds=60.0, baseline_rows=150)
    changes = FeatureSpec("entity", "timestamp", ("value", "other"), time_scale_seconds=60.0, change_sensors=("value",))
    assert np.all(build_features(frame, held, {})[0].level_stretch == 1.0)
    assert np.all(build_features(frame, changes, {})[0].level_stretch[:, 0] == 1.0)
