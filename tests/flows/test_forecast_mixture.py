"""The forecast mixture in the pipeline (`mixture.enabled`): carried from file to file as one pass
over the rows would give it, a diverging model cannot poison a line's forecast, and a registry
version mixes as the pipeline does."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from features import build_features
from flows.ingest.landing import read_batch
from flows.model.file_step import score_lines
from flows.model.fleet import new_learner
from flows.model.forecast_mixture import (
    LINEAR_PREFIX,
    PREFIX,
    MixtureSetup,
    carried_mixtures,
    mix_lines,
    residuals_from_a_fresh_mixture,
)
from flows.model.registry_package import ScoringSetup
from flows.monitor.tracking import Tracker
from flows.orchestrate.prefect_flows import continual_update
from flows.settings import MixtureSettings, load_settings
from lru_online import RecurrentState, codec
from lru_online.mixture import MixtureConfig, MixtureState
from lru_online.online_linear import OnlineLinearConfig, OnlineLinearState
from tests.flows.helpers import one_pass, small_config, small_plant

MIXTURE = {"enabled": True, "half_life": 6.0, "temperature": 4.0}


def test_files_one_by_one_mix_as_one_pass_over_their_rows(tmp_path, prefect_api):
    """Learning off, so the model is the same for every file: the scores, forecasts and mixture
    state (the `linear` member's too, which learns as it goes) streamed file by file equal one
    pass of the model and the mixture over all rows."""
    settings, config = small_config(
        tmp_path,
        update={"learning_rate": 0.0, "replay_batch": 0},
        initial_training={"batches": 1, "epochs": 1},
        drift={"on_detect": "record"},
        mixture=MIXTURE,
    )
    truth = small_plant(settings, entities=1, batches=5, rows_per_batch=90, broken_batches={})
    originals = {name: read_batch(settings.paths.landing / name, settings.log_schema) for name in truth.files}
    continual_update(config=config)

    run = one_pass(settings, originals, "line-1")
    assert len(run.summaries) == 5
    outputs = run.outputs
    streamed = MixtureState.from_tensors(codec.decode(run.record)[0], PREFIX)
    streamed_linear = OnlineLinearState.from_tensors(codec.decode(run.record)[0], LINEAR_PREFIX)

    spec = settings.feature_spec
    u, y, dt, steps = run.features.tensors()
    model = run.learner.score(u, y, None, dt, steps)
    setup = settings.mixture.setup()
    fresh = carried_mixtures([], 1, setup, 1, len(spec.sensors))
    whole = mix_lines(setup, model.forecast, y, steps, fresh, None)

    np.testing.assert_allclose(outputs["score"], whole.scores[0].numpy(), rtol=1e-4, atol=1e-5, equal_nan=True)
    for index, sensor in enumerate(spec.sensors):
        np.testing.assert_allclose(
            outputs[f"forecast_h1_{sensor}"], whole.forecast[0, :, 0, index].numpy(), rtol=1e-4, atol=1e-5
        )
    torch.testing.assert_close(streamed.losses, whole.state.losses, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(streamed_linear.weights, whole.linear.weights, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(streamed_linear.recent, whole.linear.recent, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert setup.members == ("lru", "persistence", "linear")  # the defaults'
    assert whole.linear.weights.abs().max() > 0  # it learnt
    # Not the model's forecasts: the other members took part.
    assert not np.allclose(outputs["score"], model.scores[0].numpy(), equal_nan=True)
    assert (whole.weights[0, 100:].mean(0) > 0.05).sum() >= 2  # at least two members share the weight


def test_a_model_that_diverges_on_one_line_leaves_that_lines_forecast_to_persistence():
    """Two lines, a random walk each with a 50σ level shift halfway; the model's forecast is
    good on both until it blows up on line 0 (1e30, then NaN). Line 0's mixed forecast stays
    finite and is persistence's from the blow-up on; line 1 keeps leaning on the model."""
    rng = np.random.default_rng(2)
    walk = rng.normal(size=(2, 400, 3)).cumsum(1)
    walk[:, 200:] += 50.0
    targets = torch.from_numpy(walk)
    model = targets[:, 1:] + 0.1 * torch.from_numpy(rng.normal(size=(2, 399, 3)))  # next row, nearly
    model = torch.cat([model, targets[:, -1:]], dim=1)[:, :, None, :]  # (B, T, H = 1, S)
    model[0, 300:350] = 1e30
    model[0, 350:] = math.nan
    steps = torch.ones(2, 400, dtype=torch.bool)
    pipeline = MixtureSetup(("lru", "persistence"), MixtureSettings().config())  # the pipeline's own settings
    carried = carried_mixtures([], 2, pipeline, 1, 3)
    mixed = mix_lines(pipeline, model, targets, steps, carried, None)

    assert torch.isfinite(mixed.forecast).all()
    torch.testing.assert_close(mixed.forecast[0, 300:, 0], targets[0, 300:])  # persistence alone
    assert (mixed.weights[0, 300:, 0] == 0).all()
    assert (mixed.weights[1, 250:, 0] > 0.9).all()  # the model, right again soon after the shift
    persistence_error = (targets[1, 251:] - targets[1, 250:-1]).pow(2).mean()
    assert mixed.residuals[1, 251:].pow(2).mean() < 0.2 * persistence_error


def test_members_other_than_the_known_ones_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mixture"):
        small_config(tmp_path, mixture={"enabled": True, "members": ["lru", "arima"]})
    with pytest.raises(ValueError, match="lru"):
        small_config(tmp_path, mixture={"enabled": True, "members": ["persistence"]})


@pytest.mark.slow
def test_a_registry_version_mixes_the_next_file_as_the_pipeline_then_does(tmp_path, prefect_api):
    settings, config = small_config(
        tmp_path,
        initial_training={"batches": 2, "epochs": 2},
        drift={"on_detect": "record"},
        alarms={"false_alarm_rate": 0.02, "smoothing_rows": 1, "calibration_rows": 200, "warmup_rows": 50},
        tracking={"snapshot_every": 5},
        mixture=MIXTURE,
    )
    truth = small_plant(settings, entities=2, batches=6, rows_per_batch=60, plant_files=True, broken_batches={})
    next_file = settings.paths.landing / truth.files[-1]
    raw = pd.read_parquet(next_file) if next_file.suffix == ".parquet" else pd.read_csv(next_file)
    next_file.unlink()
    continual_update(config=config)
    snapshot = [v["version"] for v in Tracker(settings).versions() if v["kind"] == "snapshot"][-1]
    model = mlflow.pyfunc.load_model(f"models:/{settings.tracking.model_name}/{snapshot}")
    assert model.unwrap_python_model().setup.mixture == settings.mixture.setup()
    assert settings.mixture.setup().members == ("lru", "persistence", "linear")
    predicted = model.predict(raw)

    raw.to_csv(settings.paths.landing / "next.csv", index=False)
    continual_update(config=config)
    newest = max((settings.paths.output / "batches").glob("*.parquet"), key=lambda p: p.stat().st_mtime_ns)
    compared = ["score", "anomaly_score", "forecast_h1_temperature", "forecast_h1_pressure"]
    output = pd.read_parquet(newest, columns=["entity", "timestamp", *compared])
    keyed = predicted.assign(timestamp=pd.to_datetime(predicted["timestamp"], utc=True))
    keyed = keyed.set_index(["entity", "timestamp"])
    output = output.set_index(["entity", "timestamp"]).loc[keyed.index]
    for column in compared:
        np.testing.assert_allclose(keyed[column], output[column], rtol=1e-5, atol=1e-6, err_msg=column)


def test_the_scoring_setup_keeps_the_mixture_through_json(tmp_path):
    chosen = {**MIXTURE, "linear": {"lookback": 12, "step": 1.5}}
    with_mixture = ScoringSetup.from_settings(load_settings(None, workdir=tmp_path, mixture=chosen))
    setup = ScoringSetup.from_json(with_mixture.to_json())
    assert setup.mixture == MixtureSetup(
        ("lru", "persistence", "linear"), MixtureConfig(half_life=6.0, temperature=4.0), OnlineLinearConfig(12, 1.5)
    )
    assert ScoringSetup.from_settings(load_settings(None, workdir=tmp_path)).mixture is not None  # on by default
    without = load_settings(None, workdir=tmp_path, mixture={"enabled": False})
    assert ScoringSetup.from_json(ScoringSetup.from_settings(without).to_json()).mixture is None


def test_a_line_whose_model_forecast_blew_up_starts_its_next_file_from_a_fresh_state(tmp_path):
    """Two lines through the pipeline's scoring step; line-b arrives with a hidden state that
    makes the model's forecast explode. Its mixed forecast stays finite (persistence's), and it
    leaves the file with a fresh hidden state, while line-a keeps the state the model carried it
    to; on its next file the model forecasts line-b within range again and earns weight back."""
    settings = load_settings(None, workdir=tmp_path, mixture=MIXTURE, model={"d_model": 8, "d_state": 6})
    spec = settings.feature_spec
    learner = new_learner(settings, spec)
    rng = np.random.default_rng(0)
    stamps = pd.date_range("2026-01-01", periods=120, freq="10s", tz="UTC")
    frames = []
    for line in ("line-a", "line-b"):
        readings = {
            s.name: 0.5 * (s.min + s.max) + rng.normal(size=120).cumsum() * 0.01 * (s.max - s.min)
            for s in settings.log_schema.sensors
        }
        frames.append(pd.DataFrame({spec.entity_column: line, spec.timestamp_column: stamps, **readings}))
    rows = pd.concat(frames, ignore_index=True)
    first, feature_states = build_features(rows[rows[spec.timestamp_column] < stamps[60]], spec, {})
    second, _ = build_features(rows[rows[spec.timestamp_column] >= stamps[60]], spec, feature_states)
    blown = learner.model.initial_state(1)
    nothing_yet = torch.full((1, 1, len(spec.sensors)), math.nan)
    blown = RecurrentState([torch.full_like(h, 1e30) for h in blown.hidden], nothing_yet)
    hidden = {"line-a": None, "line-b": blown.to_bytes()}
    scored, _, _ = score_lines(learner, first, hidden, settings.mixture.setup())

    assert np.isfinite(scored.forecast).all() and np.abs(scored.forecast).max() < 1e3  # not the model's 1e30s
    ends = {e: RecurrentState.from_bytes(b) for e, b in scored.hidden.items()}
    assert all((h == 0).all() for h in ends["line-b"].hidden)
    plain, _, _ = score_lines(learner, first, {"line-a": None, "line-b": None})
    for kept, model in zip(
        ends["line-a"].hidden, RecurrentState.from_bytes(plain.hidden["line-a"]).hidden, strict=True
    ):
        torch.testing.assert_close(kept, model)

    # The alarms judge line-a's rows against the model's own forecast (persistence would follow a
    # sustained fault), line-b's, where the model blew up, against the combined one.
    a_rows, b_rows = slice(0, len(first.timestamps) // 2), slice(len(first.timestamps) // 2, None)
    assert first.entities == ["line-a", "line-b"] and first.lengths.tolist() == [60, 60]
    np.testing.assert_allclose(scored.alarm_residuals[a_rows], plain.residuals[a_rows], rtol=1e-6, equal_nan=True)
    assert not np.allclose(scored.residuals[a_rows], plain.residuals[a_rows], equal_nan=True)
    np.testing.assert_allclose(scored.alarm_residuals[b_rows][1:], scored.residuals[b_rows][1:], equal_nan=True)
    assert np.nanmax(np.abs(scored.alarm_residuals[b_rows][1:])) < 1e3

    again, _, _ = score_lines(learner, second, scored.hidden, settings.mixture.setup())
    mixture = MixtureState.from_tensors(codec.decode(again.hidden["line-b"])[0], PREFIX)
    assert np.isfinite(again.forecast).all()
    assert mixture.losses[0, 0].max() < 1e3  # the model's recent loss on line-b: back to a forecast's


def test_a_replayed_model_is_judged_through_a_fresh_mixture():
    """What a frozen or new model replayed over rows forecasts as a line's forecaster: where it
    blew up, persistence (the previous reading: an independent reference); where it is exact, the
    mixture starts from equal weights and moves to the model as it sees it be right."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.randn(2, 60, 3, generator=generator, dtype=torch.float64).cumsum(1)
    steps = torch.ones(2, 60, dtype=torch.bool)
    exact = torch.cat([targets[:, 1:], targets[:, -1:]], 1)[:, :, None, :]  # row t forecasts row t+1
    forecast = torch.stack([torch.full_like(exact[0], math.nan), exact[1]])  # line 0 blown, line 1 exact
    setup = MixtureSetup(("lru", "persistence"), MixtureConfig(half_life=6.0, temperature=4.0))
    residuals = residuals_from_a_fresh_mixture(setup, forecast, targets, steps).numpy()
    persistence = np.diff(targets[0].numpy(), axis=0)
    np.testing.assert_allclose(residuals[0, 1:], persistence, rtol=1e-9, atol=1e-9)
    assert np.isnan(residuals[:, 0]).all()  # no forecast for a line's first row
    # The exact model earns the weight within a few half-lives: its residuals fall to a hundredth
    # of persistence's.
    assert np.abs(residuals[1, 30:]).max() < 0.01 * np.abs(persistence).mean()
    assert np.abs(residuals[1, 1:5]).mean() > 0.1 * np.abs(persistence).mean()  # equal weights at first


def test_a_linear_member_that_diverged_on_a_line_is_reset_there_and_cannot_poison_it():
    """Two random-walk lines; line 0 arrives with linear weights blown to 1e30. Its mixed forecast
    stays finite (the other members'), and it leaves the chunk with zero linear weights
    (persistence, to relearn from); line 1 keeps what it learnt."""
    rng = np.random.default_rng(4)
    targets = torch.from_numpy(rng.normal(size=(2, 200, 3)).cumsum(1))
    model = torch.cat([targets[:, 1:], targets[:, -1:]], 1)[:, :, None, :] + 0.5  # biased, finite
    steps = torch.ones(2, 200, dtype=torch.bool)
    setup = MixtureSettings().setup()
    carried = carried_mixtures([], 2, setup, 1, 3)
    carried.linear.weights[0] = 1e30
    mixed = mix_lines(setup, model, targets, steps, carried, None)

    assert torch.isfinite(mixed.forecast[:, :-1]).all()
    assert (mixed.weights[0, :, setup.members.index("linear")] == 0).all()
    assert (mixed.linear.weights[0] == 0).all()
    assert mixed.linear.weights[1].abs().max() > 0
    stored = OnlineLinearState.from_tensors(mixed.record_tensors(), LINEAR_PREFIX).select(0)
    assert (stored.weights == 0).all()


def test_retraining_judges_the_champion_through_a_mixture_started_at_its_window(tmp_path, prefect_api):
    """Learning off, so the champion forecast every row as one pass of its frozen model over the
    line (the independent reference): its held-out MSE for a retraining is that pass's forecasts
    of the window put through a fresh mixture, as the challenger's are, read back from the
    stored model residuals; not its stored mixed residuals, which a mixture carried through the
    whole stream made."""
    from flows.model.retraining import _champion_mse, _load_window
    from flows.orchestrate.pipeline import Pipeline

    settings, config = small_config(
        tmp_path,
        update={"learning_rate": 0.0, "replay_batch": 0},
        initial_training={"batches": 1, "epochs": 1},
        drift={"on_detect": "record"},
        retrain={"window_rows": 120, "holdout_rows": 40, "epochs": 1},
        mixture=MIXTURE,
    )
    truth = small_plant(settings, entities=1, batches=5, rows_per_batch=90, broken_batches={})
    originals = {name: read_batch(settings.paths.landing / name, settings.log_schema) for name in truth.files}
    continual_update(config=config)
    run = one_pass(settings, originals, "line-1")
    pipeline = Pipeline(settings)
    try:
        window = _load_window(pipeline.live)
    finally:
        pipeline.close()

    setup = settings.mixture.setup()
    u, y, dt, steps = run.features.tensors()
    model = run.learner.score(u, y, None, dt, steps)
    recent = slice(y.shape[1] - 120, None)
    residuals = residuals_from_a_fresh_mixture(setup, model.forecast[:, recent, :1], y[:, recent], steps[:, recent])
    held = residuals[0, -40:].numpy()
    expected = float(np.mean(held[np.isfinite(held)] ** 2))
    assert _champion_mse(window, setup) == pytest.approx(expected, rel=1e-4)
    assert _champion_mse(window, None) != pytest.approx(expected, rel=1e-3)  # the stored mixed residuals'
