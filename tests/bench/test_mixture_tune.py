"""bench/mixture_tune.py on a real flow run with the mixture on: its members' errors equal an
independent computation from the output files (the model's own residuals, the line's latest
reading), and replaying the run's own mixture setting over the model's forecasts gives back
the stored (mixed) residuals, but for the rows the output cannot replay exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.mixture_tune import load_set, series_errors
from flows.orchestrate.prefect_flows import continual_update
from lru_online.mixture import MixtureConfig
from tests.flows.helpers import small_config, small_plant


def test_members_match_the_outputs_and_the_own_setting_gives_back_the_stored_residuals(tmp_path, prefect_api):
    settings, config = small_config(
        tmp_path, drift={"on_detect": "record"}, mixture={"enabled": True, "half_life": 6.0, "temperature": 4.0}
    )
    small_plant(settings, entities=2, batches=8, rows_per_batch=100, plant_files=True, broken_batches={})
    continual_update(config=config)

    found = load_set(settings, share=0.5)
    errors, replayed = series_errors(found, found.setup, found.steps)
    folder = f"{settings.workdir.parent.name}/{settings.workdir.name}"
    assert sorted(errors) == [f"{folder}/line-1", f"{folder}/line-2"]

    spec = settings.feature_spec
    frame = pd.concat(
        [pd.read_parquet(p) for p in sorted((settings.paths.output / "batches").glob("*.parquet"))], ignore_index=True
    ).sort_values([spec.entity_column, spec.timestamp_column], kind="stable")
    for line, rows in frame.groupby(spec.entity_column):
        targets = rows[[f"target_{s}" for s in spec.sensors]].to_numpy(np.float64)
        model = rows[[f"alarm_residual_{s}" for s in spec.sensors]].to_numpy(np.float64)
        persistence = targets - pd.DataFrame(targets).ffill().shift(1).to_numpy()
        mixed = rows[[f"residual_{s}" for s in spec.sensors]].to_numpy(np.float64)
        both = np.isfinite(model) & np.isfinite(persistence) & np.isfinite(mixed)
        found_errors = errors[f"{folder}/{line}"]
        assert found_errors.model == pytest.approx(np.sum(model[both] ** 2), rel=1e-5)
        assert found_errors.persistence == pytest.approx(np.sum(persistence[both] ** 2), rel=1e-5)

    stored = found.stored
    both = np.isfinite(replayed.numpy()) & np.isfinite(stored.numpy())
    close = (replayed - stored).abs().numpy()[both] < 1e-4
    assert close.mean() > 0.8
    assert float(replayed[both].pow(2).mean()) == pytest.approx(float(stored[both].pow(2).mean()), rel=0.02)
    # Another setting replays differently: the settings reach the mixture.
    other = found.setup._replace(config=MixtureConfig(half_life=48.0, temperature=0.0))
    _, uniform = series_errors(found, other, found.steps)
    assert not np.allclose(uniform.numpy()[both], stored.numpy()[both], atol=1e-3)
