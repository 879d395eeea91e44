"""`log_schema.file_is_run` in a real flow run: every file of a line starts a new run, so its
features are built from nothing carried (a held baseline from its own first rows, changes from
its own first reading), its alarms calibrate within it (`alarms.judge_rows`), and training and
retraining read each run as a sequence of its own."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select

from features import EntityFeatureState, FeatureBatch, FeatureSpec, build_features
from flows.ingest.landing import read_batch
from flows.model.initial_training import training_features, training_sequences
from flows.model.registry_package import ScoringSetup, signature
from flows.model.retraining import _champion_mse, _evaluate, _load_window
from flows.orchestrate.pipeline import Pipeline
from flows.orchestrate.prefect_flows import continual_update
from flows.settings import LogSchema
from flows.storage.database import Database
from flows.storage.models import EntityState
from lru_online.alarms import AlarmConfig
from tests.flows.helpers import small_config, small_plant

SENSORS_AS_CHANGE = ["temperature"]


def test_each_file_is_built_afresh_and_a_fresh_line_alarms_within_its_file(tmp_path, prefect_api):
    schema = LogSchema().model_dump()
    schema["file_is_run"] = True
    for sensor in schema["sensors"]:
        sensor["as_change"] = sensor["name"] in SENSORS_AS_CHANGE
    settings, config = small_config(
        tmp_path,
        log_schema=schema,
        initial_training={"batches": 2, "epochs": 2},
        drift={"on_detect": "record"},
        features={"baseline_rows": 30},
        alarms={"false_alarm_rate": 0.02, "calibration_rows": 100, "warmup_rows": 30, "judge_rows": 10},
    )
    assert settings.feature_spec.change_sensors == tuple(SENSORS_AS_CHANGE)
    truth = small_plant(settings, entities=2, batches=5, rows_per_batch=80, plant_files=True, broken_batches={})
    last = settings.paths.landing / truth.files[-1]
    rows = read_batch(last, settings.log_schema)
    # A fault in line-2's last file after its baseline: it must alarm within that file.
    fault = rows.index[rows["entity"] == "line-2"][50:70]
    rows.loc[fault, "pressure"] = 24.5
    last.unlink()
    rows.to_csv(settings.paths.landing / "last.csv", index=False)
    continual_update(config=config)

    outputs = pd.concat(pd.read_parquet(p) for p in sorted((settings.paths.output / "batches").glob("*.parquet")))
    alone, states = build_features(rows, settings.feature_spec, {})  # the file with nothing carried
    expected = alone.to_frame(settings.feature_spec).set_index(["entity", "timestamp"])
    got = outputs.set_index(["entity", "timestamp"]).loc[expected.index]
    z_columns = [c for c in expected.columns if c.startswith("z_")]
    np.testing.assert_allclose(got[z_columns].to_numpy(), expected[z_columns].to_numpy(), rtol=1e-5, atol=1e-5)

    db = Database(settings.database_url)
    with db.session() as session:
        lines = session.scalars(select(EntityState))
        stored = {line.entity: EntityFeatureState.from_bytes(line.feature_state) for line in lines}
    db.dispose()
    for entity, state in states.items():
        assert stored[entity].events == state.events == int((rows["entity"] == entity).sum())
        assert stored[entity].scaler == state.scaler

    faulty = got.loc[[("line-2", t) for t in pd.to_datetime(rows.loc[fault, "timestamp"], utc=True)]]
    assert faulty["anomaly"].mean() > 0.5  # a line alarms in the file its run started with


def test_initial_training_builds_each_file_afresh_when_it_is_a_run():
    spec = FeatureSpec("entity", "timestamp", ("a",), time_scale_seconds=1.0, baseline_rows=5)
    rng = np.random.default_rng(8)
    files = [
        pd.DataFrame(
            {
                "entity": "line-1",
                "timestamp": pd.date_range(f"2026-01-0{day}", periods=12, freq="1s", tz="UTC"),
                "a": rng.normal(10.0 * day, 1.0, 12),
            }
        )
        for day in (1, 2)
    ]
    runs = training_features(files, spec, file_is_run=True)
    carried = training_features(files, spec, file_is_run=False)
    alone = build_features(files[1], spec, {})[0]
    np.testing.assert_array_equal(runs[1].inputs, alone.inputs)
    np.testing.assert_array_equal(runs[0].inputs, carried[0].inputs)
    assert not np.allclose(carried[1].inputs, alone.inputs)  # carried: the first file's baseline
    sequences = training_sequences(files, spec, file_is_run=True)
    assert sequences.entities == ["line-1", "line-1"] and sequences.lengths.tolist() == [12, 12]
    np.testing.assert_array_equal(sequences.inputs[12:], alone.inputs)
    assert training_sequences(files, spec, file_is_run=False).lengths.tolist() == [24]


def test_the_per_run_settings_travel_with_a_registered_version_and_a_request_is_a_new_run():
    spec = FeatureSpec("line", "datetime", ("a", "b"), baseline_rows=400, change_sensors=("b",), clock_periods=("day",))
    setup = ScoringSetup(spec, AlarmConfig(judge_rows=10, warmup_rows=400, calibration_rows=512), file_is_run=True)
    restored = ScoringSetup.from_json(setup.to_json())
    assert restored == setup and restored.spec.change_sensors == ("b",) and restored.spec.clock_periods == ("day",)
    assert not restored.starts_from_stored_states(None)  # a request is a run of its own
    assert restored.starts_from_stored_states({"carried_states": True})
    (param,) = signature(restored, horizon=1).params.params
    assert param.name == "carried_states" and param.default is False

    continuous = ScoringSetup(spec, AlarmConfig())
    assert continuous.starts_from_stored_states(None) and not continuous.starts_from_stored_states(
        {"carried_states": False}
    )
    stored_before = json.loads(continuous.to_json())
    del stored_before["file_is_run"]  # a version registered before the setting existed
    assert ScoringSetup.from_json(json.dumps(stored_before)) == continuous


def _retraining_window_of_runs(tmp_path, batches: int, **overrides):
    """A 2-line plant of plant-wide files, each a run, through a real flow run: its settings,
    the retraining window `_load_window` reads and the live model."""
    settings, config = small_config(
        tmp_path,
        log_schema=LogSchema().model_dump() | {"file_is_run": True},
        initial_training={"batches": 2, "epochs": 2},
        drift={"on_detect": "record"},
        retrain={"window_rows": 120, "holdout_rows": 40, "epochs": 1},
        **overrides,
    )
    small_plant(settings, entities=2, batches=batches, rows_per_batch=40, plant_files=True, broken_batches={})
    continual_update(config=config)
    pipeline = Pipeline(settings)
    try:
        return settings, _load_window(pipeline.live), pipeline.live.load()
    finally:
        pipeline.close()


def test_retraining_reads_each_file_of_a_line_as_its_own_run(tmp_path, prefect_api):
    """With each file a run, the retraining window holds one sequence per line and file, and
    the challenger is judged on each held-out file read from a zero state: its MSE equals that
    of the model scoring every file of every line on its own (an independent loop over the
    output files)."""
    settings, window, learner = _retraining_window_of_runs(tmp_path, batches=5)
    mse, states = _evaluate(learner, window, None)  # the model alone, as the loop below scores
    spec = settings.feature_spec
    outputs = sorted((settings.paths.output / "batches").glob("*.parquet"))
    assert len(outputs) == 5
    assert window.full.entities == ["line-1"] * 3 + ["line-2"] * 3
    assert window.train.entities == ["line-1"] * 2 + ["line-2"] * 2

    held_out = []
    for path in outputs[-3:]:
        frame = pd.read_parquet(path)
        for entity in ("line-1", "line-2"):
            run = FeatureBatch.from_frame(frame[frame["entity"] == entity], spec)
            u, y, dt, steps = run.tensors()
            scored = learner.score(u, y, None, dt, steps)
            if path == outputs[-1]:
                held_out.append(run.flat(scored.residuals.numpy()))
                assert states[entity] == scored.state.to_bytes()  # each line's newest run's end
    residuals = np.concatenate(held_out)
    finite = residuals[np.isfinite(residuals)]
    assert mse == pytest.approx(float(np.mean(finite**2)), rel=1e-5)


def test_with_the_mixture_on_champion_and_challenger_are_judged_through_the_same_fresh_mixture(tmp_path, prefect_api):
    """Learning off and each file a run, so the champion forecast every held-out row as the
    frozen model reading that file from a zero state: a challenger that is the champion's model
    must then be judged exactly as the champion, both through a mixture started afresh at the
    window (each file's, as each file is a run)."""
    settings, window, champion = _retraining_window_of_runs(
        tmp_path,
        batches=6,
        update={"learning_rate": 0.0, "replay_batch": 0},
        mixture={"enabled": True, "half_life": 6.0, "temperature": 4.0},
    )
    setup = settings.mixture.setup()
    assert window.model_residuals is not None
    challenger_mse, _ = _evaluate(champion, window, setup)
    champion_mse = _champion_mse(window, setup)
    assert champion_mse == pytest.approx(challenger_mse, rel=1e-5)
