import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from river.preprocessing import StandardScaler

from features import EntityFeatureState, FeatureBatch, FeatureSpec, FeatureStateError, LineFeatureStates, build_features
from features.scaling import ScalerStatistics, standardize
from features.windows import concatenate

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


def _river_standardised(values: np.ndarray, columns: str) -> tuple[np.ndarray, StandardScaler]:
    """river's StandardScaler, one row at a time: learn_one, then transform_one."""
    river, expected = StandardScaler(), np.full_like(values, np.nan)
    for t, row in enumerate(values):
        present = {k: row[i] for i, k in enumerate(columns) if not np.isnan(row[i])}
        river.learn_one(present)
        for key, value in river.transform_one(present).items():
            expected[t, columns.index(key)] = value
    return expected, river


def test_standardizer_equals_river_one_row_at_a_time_for_every_line():
    rng = np.random.default_rng(1)
    lines = {"m1": rng.normal(5, 3, (400, 2)), "m2": rng.normal(-2, 0.5, (250, 2))}
    for values in lines.values():
        values[rng.random(values.shape) < 0.25] = np.nan
    # Two batches of both lines; the statistics carried between them are river's state.
    statistics = ScalerStatistics.from_states([{"counts": {}, "means": {}, "vars": {}}] * 2, ("a", "b"))
    outputs = {name: [] for name in lines}
    for lo, hi in ((0, 150), (150, 400)):
        parts = [values[lo:hi] for values in lines.values()]
        offsets = np.cumsum([0, *(len(p) for p in parts)])
        line = np.repeat(np.arange(2), [len(p) for p in parts])
        out, statistics, _ = standardize(np.vstack(parts), line, offsets, statistics)
        statistics = ScalerStatistics.from_states([statistics.state(i, ("a", "b")) for i in range(2)], ("a", "b"))
        for index, name in enumerate(lines):
            outputs[name].append(out[offsets[index] : offsets[index + 1]])
    for index, (name, values) in enumerate(lines.items()):
        expected, river = _river_standardised(values, "ab")
        np.testing.assert_allclose(np.vstack(outputs[name]), expected, rtol=1e-9, atol=1e-12, equal_nan=True)
        state = statistics.state(index, ("a", "b"))
        for key in "ab":
            assert state["counts"][key] == river.counts[key]
            assert state["means"][key] == pytest.approx(river.means[key], rel=1e-12)
            assert state["vars"][key] == pytest.approx(river.vars[key], rel=1e-9)


def test_a_held_standardizer_is_river_learning_each_sensors_first_readings_only():
    rng = np.random.default_rng(2)
    hold = 60
    lines = {"m1": rng.normal(5, 3, (200, 2)), "m2": rng.normal(-2, 0.5, (90, 2))}
    lines["m1"][100:, 0] += 20.0  # a fault after the baseline: it must not move the scaling
    for values in lines.values():
        values[rng.random(values.shape) < 0.25] = np.nan
    statistics = ScalerStatistics.from_states([{"counts": {}, "means": {}, "vars": {}}] * 2, ("a", "b"))
    outputs = {name: [] for name in lines}
    for lo, hi in ((0, 40), (40, 200)):  # the hold is reached in the second batch
        parts = [values[lo:hi] for values in lines.values()]
        offsets = np.cumsum([0, *(len(p) for p in parts)])
        line = np.repeat(np.arange(2), [len(p) for p in parts])
        out, statistics, _ = standardize(np.vstack(parts), line, offsets, statistics, hold_after=hold)
        for index, name in enumerate(lines):
            outputs[name].append(out[offsets[index] : offsets[index + 1]])
    for index, (name, values) in enumerate(lines.items()):
        river, expected = StandardScaler(), np.full_like(values, np.nan)
        learned = dict.fromkeys("ab", 0)
        for t, row in enumerate(values):
            present = {k: row[i] for i, k in enumerate("ab") if not np.isnan(row[i])}
            river.learn_one({k: v for k, v in present.items() if learned[k] < hold})
            for key in present:
                learned[key] += 1
            for key, value in river.transform_one(present).items():
                expected[t, "ab".index(key)] = value
        np.testing.assert_allclose(np.vstack(outputs[name]), expected, rtol=1e-9, atol=1e-12, equal_nan=True)
        state = statistics.state(index, ("a", "b"))
        for key in "ab":
            readings = int((~np.isnan(values[:, "ab".index(key)])).sum())
            assert state["counts"][key] == river.counts[key] == min(hold, readings)
            assert state["means"][key] == pytest.approx(river.means[key], rel=1e-12)


@pytest.mark.parametrize("cuts", [[1], [37, 38], [10, 60, 61, 99]])
def test_features_stream_exactly_across_batches(cuts):
    rows = _rows(120)
    whole, whole_states = build_features(rows, SPEC, {})
    whole_state = whole_states["m1"]
    state, parts = EntityFeatureState(), []
    # Alternate time units, as CSV (parsed) and Parquet batches arrive.
    for index, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, 120], strict=True)):
        part = rows.iloc[lo:hi].copy()
        part["timestamp"] = pd.DatetimeIndex(part["timestamp"]).as_unit("us" if index % 2 else "ns")
        features, states = build_features(part, SPEC, {"m1": state})
        state = EntityFeatureState.from_bytes(states["m1"].to_bytes())
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
    features, states = build_features(rows, SPEC, {})
    z_a, z_b, fresh_a, fresh_b, log_dt = features.inputs.T
    assert fresh_a.tolist() == [1, 0, 1] and fresh_b.tolist() == [0, 1, 0]
    assert z_a[1] == z_a[0]  # a did not report at event 1: its last reading is carried
    assert z_b[0] == 0.0 and z_b[2] == z_b[1]  # nothing to carry before b's first reading
    np.testing.assert_allclose(features.dt, [1.0, 2.0, 0.5])  # first event ever: one nominal step
    np.testing.assert_allclose(log_dt, np.log1p([1.0, 2.0, 0.5]), rtol=1e-6)
    assert np.isnan(features.targets[1, 0]) and not np.isnan(features.targets[1, 1])
    later = rows.iloc[[-1]].assign(timestamp=pd.Timestamp("2026-01-01T00:01:25Z"))
    next_batch, _ = build_features(later, SPEC, states)
    assert next_batch.dt[0] == pytest.approx(6.0)  # 60 s after the carried last timestamp


def test_feature_state_refuses_bad_bytes():
    for payload in [b"", b"not json", b'{"version": 2}', b'{"version": 1}', b"\x80\x04\x95pickle"]:
        with pytest.raises(FeatureStateError):
            EntityFeatureState.from_bytes(payload)


def _plant(lines: int = 6, rows: int = 40) -> pd.DataFrame:
    return pd.concat([_rows(rows, seed=i).assign(entity=f"m{i}") for i in range(lines)], ignore_index=True)


def test_a_plants_states_carried_as_stored_bytes_equal_them_carried_as_dicts():
    """The pipeline carries states as bytes decoded for all lines at once; each line's dict view
    (`EntityFeatureState`) carried instead gives the same features and the same states."""
    plant = _plant()
    first, second = plant.groupby("entity").head(25), plant.groupby("entity").tail(15)
    _, states = build_features(first, SPEC, {})
    stored = states.to_bytes_many()
    as_dicts = {entity: states[entity] for entity in states}
    from_bytes, after_bytes = build_features(second, SPEC, {**stored, "m9": None})
    from_dicts, after_dicts = build_features(second, SPEC, as_dicts)
    np.testing.assert_array_equal(from_bytes.inputs, from_dicts.inputs)
    assert after_bytes.to_bytes_many() == after_dicts.to_bytes_many()
    whole, after_whole = build_features(plant, SPEC, {})
    np.testing.assert_array_equal(concatenate([build_features(first, SPEC, {})[0], from_bytes]).dt, whole.dt)
    for name in ("counts", "means", "variances", "last_values", "last_event_ns", "events"):
        np.testing.assert_allclose(getattr(after_bytes, name), getattr(after_whole, name), rtol=1e-9, err_msg=name)


def test_a_state_stored_as_json_before_the_binary_layout_reads_the_same():
    _, states = build_features(_plant(2), SPEC, {})
    view = states["m1"]
    version_1 = json.dumps(
        {
            "version": 1,
            "scaler": view.scaler,
            "last_values": view.last_values,
            "last_timestamp": view.last_timestamp.isoformat(),
            "events": view.events,
            "last_readings": {},
        }
    ).encode()
    stored = states.to_bytes_many()
    # JSON held no level-stretch statistics: they start afresh, the rest reads the same.
    without_steps = dataclasses.replace(states, steps=None).to_bytes_many()
    read = LineFeatureStates.from_states(["m0", "m1"], {"m0": stored["m0"], "m1": version_1}, SPEC.sensors)
    assert read.to_bytes_many() == {"m0": stored["m0"], "m1": without_steps["m1"]}
    assert EntityFeatureState.from_bytes(version_1) == EntityFeatureState.from_bytes(without_steps["m1"])
    assert EntityFeatureState.from_bytes(stored["m1"]) == view


def test_a_state_stored_before_the_level_stretch_reads_its_other_statistics():
    _, states = build_features(_plant(2, rows=150), SPEC, {})
    stored = states.to_bytes_many()
    sensors = len(SPEC.sensors)
    header = 6 + int.from_bytes(stored["m1"][4:6], "little")
    # Version 2: its own tag, then the same record cut after the first five values per sensor.
    version_2 = b"LFS\x02" + stored["m1"][4 : header + 16 + 8 * 5 * sensors]
    read = LineFeatureStates.from_states(["m0", "m1"], {"m0": stored["m0"], "m1": version_2}, SPEC.sensors)
    for name in ("counts", "means", "variances", "last_values", "last_readings", "last_event_ns", "events"):
        np.testing.assert_array_equal(getattr(read, name), getattr(states, name), err_msg=name)
    np.testing.assert_array_equal(read.steps.counts, [states.steps.counts[0], np.zeros(sensors)])
    assert np.isnan(read.steps.references[1]).all() and not np.isnan(read.steps.references[0]).any()


def test_states_stored_with_other_sensors_carry_those_the_log_still_has():
    _, states = build_features(_plant(2), SPEC, {})
    now = FeatureSpec("entity", "timestamp", ("b", "c"))
    read = LineFeatureStates.from_states(["m0", "m1"], states.to_bytes_many(), now.sensors)
    np.testing.assert_array_equal(read.means[:, 0], states.means[:, 1])  # b
    assert (read.counts[:, 1] == 0).all() and np.isnan(read.last_values[:, 1]).all()  # c: never seen
    assert read["m0"].scaler["counts"].keys() == {"b"}


def test_damaged_binary_states_are_refused():
    stored = build_features(_plant(1), SPEC, {})[1].to_bytes_many()["m0"]
    infinite = bytearray(stored)
    infinite[-8:] = np.array([np.inf]).tobytes()
    for payload in (stored[:-3], bytes(infinite), stored[:6] + b"\xff" * (len(stored) - 6)):
        with pytest.raises(FeatureStateError):
            LineFeatureStates.from_states(["m0"], {"m0": payload}, SPEC.sensors)


def test_lines_together_equal_each_line_alone_in_any_order():
    """Features of a file holding many lines are each line's own: built with other lines, in any
    row order, they equal the line built alone, exactly (a Dask worker's group gets the same)."""
    lines = {f"m{i}": _rows(30 + 7 * i, seed=i).assign(entity=f"m{i}") for i in range(5)}
    warm = {name: build_features(rows.iloc[:10], SPEC, {})[1][name] for name, rows in lines.items()}
    later = {name: rows.iloc[10:] for name, rows in lines.items()}
    mixed = pd.concat(later.values()).sample(frac=1.0, random_state=3)  # interleaved rows
    carried = {k: v for k, v in warm.items() if k != "m0"}  # m0 is a line seen for the first time
    together, states = build_features(mixed, SPEC, carried)
    assert together.entities == sorted(lines)
    for index, name in enumerate(together.entities):
        alone, alone_states = build_features(later[name], SPEC, {name: carried[name]} if name in carried else {})
        line = together.select([index])
        for field in ("inputs", "targets", "dt", "raw", "labels"):
            np.testing.assert_array_equal(getattr(line, field), getattr(alone, field), err_msg=field)
        assert line.timestamps.equals(alone.timestamps)
        assert states[name].to_bytes() == alone_states[name].to_bytes()


def test_padded_tensors_flat_rows_and_frames_round_trip():
    rows = pd.concat([_rows(12, seed=1).assign(entity="b"), _rows(5, seed=2).assign(entity="a")])
    batch, _ = build_features(rows, SPEC, {})
    assert batch.entities == ["a", "b"] and batch.lengths.tolist() == [5, 12]
    u, y, dt, steps = batch.tensors()
    assert u.shape == (2, 12, SPEC.n_inputs) and steps.sum(1).tolist() == [5, 12]
    assert torch.isnan(y[0, 5:]).all() and (u[0, 5:] == 0).all()
    np.testing.assert_array_equal(batch.flat(u.numpy()), batch.inputs)
    again = FeatureBatch.from_frame(batch.to_frame(SPEC), SPEC)
    assert again.entities == batch.entities and again.offsets.tolist() == batch.offsets.tolist()
    np.testing.assert_array_equal(again.inputs, batch.inputs)
    assert again.timestamps.equals(batch.timestamps)
    with pytest.raises(ValueError, match="2 lines"):
        _ = batch.entity


def test_concatenate_joins_each_lines_batches_in_order():
    rows = pd.concat([_rows(40, seed=1).assign(entity="a"), _rows(30, seed=2).assign(entity="b")])
    whole, _ = build_features(rows, SPEC, {})
    first, states = build_features(rows.groupby("entity").head(20), SPEC, {})
    second, _ = build_features(pd.concat([rows.iloc[20:40], rows.iloc[60:70]]), SPEC, states)
    only_a, _ = build_features(rows.iloc[20:40], SPEC, states)
    joined = concatenate([first, second])
    assert joined.entities == ["a", "b"] and joined.lengths.tolist() == [40, 30]
    assert joined.timestamps.equals(whole.timestamps)
    np.testing.assert_allclose(joined.inputs, whole.inputs, rtol=1e-6, atol=1e-6)
    # A line missing from one batch keeps its rows from the others.
    assert concatenate([first, only_a]).lengths.tolist() == [40, 20]


def test_clock_phases_enter_the_inputs_from_each_rows_utc_time():
    spec = FeatureSpec("entity", "timestamp", ("a", "b"), clock_periods=("day", "week"))
    # 06:00 is a quarter of a day; a week's phase counts from Thursday 00:00 UTC (the epoch's).
    stamps = ["2026-01-05T06:00:00Z", "2026-01-08T12:00:00+06:00", "2026-01-09T12:00:00Z"]  # text, as logged
    rows = pd.DataFrame({"entity": "m1", "timestamp": stamps, "a": [1.0, 2.0, 3.0], "b": [0.0, 1.0, 0.5]})
    batch, _ = build_features(rows, spec, {})
    assert spec.n_inputs == batch.inputs.shape[1] == 2 * 2 + 1 + 4
    clock = pd.DataFrame(batch.inputs, columns=spec.input_names).filter(like="clock_")
    assert list(clock) == ["clock_day_sin", "clock_day_cos", "clock_week_sin", "clock_week_cos"]
    day = 2 * np.pi * np.array([6, 6, 12]) / 24  # the +06:00 row is 06:00 UTC
    np.testing.assert_allclose(clock[["clock_day_sin", "clock_day_cos"]], np.c_[np.sin(day), np.cos(day)], atol=1e-6)
    since_thursday = np.array([4 * 24 + 6, 6, 24 + 12])  # hours: Monday 06:00, Thursday 06:00, Friday 12:00
    week = 2 * np.pi * since_thursday / (7 * 24)
    weekly = np.c_[np.sin(week), np.cos(week)]
    np.testing.assert_allclose(clock[["clock_week_sin", "clock_week_cos"]], weekly, atol=1e-6)
    # The other inputs are those of a spec without a clock.
    plain, _ = build_features(rows, FeatureSpec("entity", "timestamp", ("a", "b")), {})
    np.testing.assert_array_equal(batch.inputs[:, :5], plain.inputs)
    assert FeatureBatch.from_frame(batch.to_frame(spec), spec).inputs.tolist() == batch.inputs.tolist()


@pytest.mark.parametrize("periods", [("hour",), ("day", "day")])
def test_a_clock_period_not_known_or_named_twice_is_refused(periods):
    with pytest.raises(ValueError, match="clock_periods"):
        FeatureSpec("entity", "timestamp", ("a",), clock_periods=periods)
