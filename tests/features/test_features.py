import numpy as np
import pandas as pd
import pytest
from river.preprocessing import StandardScaler

from features import EntityFeatureState, FeatureSpec, FeatureStateError, build_features
from features.scaling import RunningStandardizer
from features.windows import concatenate, sliding_windows

SPEC = FeatureSpec("entity", "timestamp", ("a", "b"), time_scale_seconds=10.0, label_columns=("anomaly",))


def _rows(n: int, start: str = "2026-01-01T00:00:00Z", seed: int = 0, unit: str = "ns") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    stamps = pd.Timestamp(start) + pd.to_timedelta(np.cumsum(rng.uniform(1, 20, n)).round(1), unit="s")
    values = rng.normal([50.0, -3.0], [5.0, 0.5], (n, 2))
    values[rng.random((n, 2)) < 0.3] = np.nan
    return pd.DataFrame(
        {
            "entity": "m1",
            "timestamp": pd.DatetimeIndex(stamps).as_unit(unit),
            "a": values[:, 0],
            "b": values[:, 1],
            "anomaly": 0,
        }
    )


def test_standardizer_equals_river_one_row_at_a_time():
    rng = np.random.default_rng(1)
    values = rng.normal(5, 3, (400, 2))
    values[rng.random((400, 2)) < 0.25] = np.nan
    fast = RunningStandardizer(["a", "b"])
    out = np.vstack([fast.transform_learn(values[:150]), fast.transform_learn(values[150:])])
    river, expected = StandardScaler(), np.full_like(values, np.nan)
    for t, row in enumerate(values):
        present = {k: row[i] for i, k in enumerate("ab") if not np.isnan(row[i])}
        river.learn_one(present)
        for key, value in river.transform_one(present).items():
            expected[t, "ab".index(key)] = value
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-12, equal_nan=True)
    state = fast.state()
    for key in "ab":
        assert state["counts"][key] == river.counts[key]
        assert state["means"][key] == pytest.approx(river.means[key], rel=1e-12)
        assert state["vars"][key] == pytest.approx(river.vars[key], rel=1e-9)


@pytest.mark.parametrize("cuts", [[1], [37, 38], [10, 60, 61, 99]])
def test_features_stream_exactly_across_batches(cuts):
    rows = _rows(120)
    whole, whole_state = build_features(rows, SPEC, EntityFeatureState())
    state, parts = EntityFeatureState(), []
    # Alternate time units, as CSV (parsed) and Parquet batches arrive.
    for index, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, 120], strict=True)):
        part = rows.iloc[lo:hi].copy()
        part["timestamp"] = pd.DatetimeIndex(part["timestamp"]).as_unit("us" if index % 2 else "ns")
        features, state = build_features(part, SPEC, state)
        state = EntityFeatureState.from_bytes(state.to_bytes())
        parts.append(features)
    joined = concatenate(parts)
    np.testing.assert_array_equal(joined.inputs, whole.inputs)
    np.testing.assert_array_equal(joined.targets, whole.targets)
    np.testing.assert_array_equal(joined.dt, whole.dt)
    assert state.last_values == pytest.approx(whole_state.last_values, rel=1e-9)
    assert state.events == whole_state.events == 120


def test_carry_forward_masks_and_time_steps():
    rows = pd.DataFrame(
        {
            "entity": "m1",
            "timestamp": pd.to_datetime(["2026-01-01T00:00:00Z", "2026-01-01T00:00:20Z", "2026-01-01T00:00:25Z"]),
            "a": [1.0, np.nan, 3.0],
            "b": [np.nan, 2.0, np.nan],
        }
    )
    features, state = build_features(rows, SPEC, EntityFeatureState())
    z_a, z_b, fresh_a, fresh_b, log_dt = features.inputs.T
    assert fresh_a.tolist() == [1, 0, 1] and fresh_b.tolist() == [0, 1, 0]
    assert z_a[1] == z_a[0]  # a did not report at event 1: its last reading is carried
    assert z_b[0] == 0.0 and z_b[2] == z_b[1]  # nothing to carry before b's first reading
    np.testing.assert_allclose(features.dt, [1.0, 2.0, 0.5])  # first event ever: one nominal step
    np.testing.assert_allclose(log_dt, np.log1p([1.0, 2.0, 0.5]), rtol=1e-6)
    assert np.isnan(features.targets[1, 0]) and not np.isnan(features.targets[1, 1])
    later = rows.iloc[[-1]].assign(timestamp=pd.Timestamp("2026-01-01T00:01:25Z"))
    next_batch, _ = build_features(later, SPEC, state)
    assert next_batch.dt[0] == pytest.approx(6.0)  # 60 s after the carried last timestamp


def test_feature_state_refuses_bad_bytes():
    for payload in [b"", b"not json", b'{"version": 2}', b'{"version": 1}', b"\x80\x04\x95pickle"]:
        with pytest.raises(FeatureStateError):
            EntityFeatureState.from_bytes(payload)


def test_one_entity_per_call_and_windows():
    rows = _rows(50)
    with pytest.raises(ValueError, match="one entity"):
        build_features(pd.concat([rows, rows.assign(entity="m2")]), SPEC, EntityFeatureState())
    features, _ = build_features(rows, SPEC, EntityFeatureState())
    inputs, targets, dt = sliding_windows([features], length=20, stride=10)
    assert inputs.shape == (4, 20, SPEC.n_inputs) and targets.shape == (4, 20, 2) and dt.shape == (4, 20)
    np.testing.assert_array_equal(inputs[1].numpy(), features.inputs[10:30])
    with pytest.raises(ValueError, match="full window"):
        sliding_windows([features], length=60)
