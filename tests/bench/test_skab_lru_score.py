"""The lru detector of bench/skab.py: which sensors count as slow, and that a drifting slow sensor
stays quiet while a flow drop alarms through the product's detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def skab():
    from bench import skab

    return skab


def test_slow_sensors_are_the_ones_still_correlated_lag_rows_later(skab):
    rng = np.random.default_rng(0)
    t = np.arange(400)
    rows = np.column_stack(
        [
            rng.normal(size=400),  # white noise
            np.cumsum(rng.normal(size=400)),  # a random walk: a drifting temperature
            np.sin(t / 3.0),  # fast oscillation: period ~19 rows, lag 10 is half a period away
            np.full(400, 5.0),  # constant: no correlation to speak of
        ]
    )
    assert skab.slow_sensors(rows, lag=10, threshold=0.6).tolist() == [False, True, False, False]
    # Too few rows to measure the lag: nothing is called slow.
    assert not skab.slow_sensors(rows[:11], lag=10, threshold=0.6).any()


def test_a_drifting_slow_sensor_raises_no_alarm_but_a_flow_drop_does(skab):
    """Train on 400 rows where the temperature creeps up; test rows where it drifts on far past its
    training range, then the flow drops by one standard deviation for 200 rows."""
    rng = np.random.default_rng(2)
    rows = 800
    temperature = 70.0 + np.cumsum(np.full(rows, 0.01) + 0.02 * rng.normal(size=rows))
    flow = 32.0 + rng.normal(size=rows)
    current = 1.0 + 0.2 * np.sin(np.arange(rows) / 2.0) + 0.05 * rng.normal(size=rows)
    flow[600:] -= 1.0
    values = np.column_stack([temperature, flow, current])
    detector = skab.LruForecastResidual(skab.LruDetectorConfig(fit_epochs=10))
    detector.adapt(values[:400])
    assert detector.slow.tolist() == [True, False, False]
    detection = detector.detect(values[400:])
    assert detection.alarms[:200].mean() < 0.1  # temperature 4 training ranges on: still normal
    assert detection.alarms[230:].mean() > 0.8  # the drop, once the mean chart has filled
