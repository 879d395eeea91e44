"""bench/ett_tune.py: a member set replayed from a recording of more members is what a run of
that set forecasts, the seasonal members earn their weight on a series that repeats daily, and
the rule keeps the simpler member set among near-equal scores."""

from __future__ import annotations

import numpy as np
import pytest

from bench import ett, ett_tune
from lru_online.mixture import MixtureConfig

NO_FIT = ("persistence", "seasonal-day", "seasonal-week")  # members that learn nothing: fast


def _daily_series(rows: int = 14_400, columns: int = 3) -> ett.Series:
    hours = np.arange(rows)
    noise = np.random.default_rng(3).normal(scale=0.2, size=(rows, columns))
    values = np.sin(2 * np.pi * hours / 24)[:, None] + 0.3 * np.sin(2 * np.pi * hours / 168)[:, None] + noise
    values = values.astype(np.float32)
    return ett.Series(values, tuple(f"c{i}" for i in range(columns)), np.zeros(columns), np.ones(columns), 24)


@pytest.mark.parametrize("protocol", ["fsnet", "delayed"])
def test_a_member_subset_replayed_is_what_a_run_of_it_forecasts(protocol):
    series, combine = _daily_series(), MixtureConfig(3.0, 2.0)
    recording = ett_tune.record("daily", series, ett.Protocol(protocol, 24), NO_FIT, combine)
    subset = ("persistence", "seasonal-week")
    alone = ett.ensemble(rows_per_day=24, members=subset, combine=combine)
    result = ett.run_stream(alone, series.values, ett.Protocol(protocol, 24), forgetting=False, until=ett.TUNING_END)
    expected = float(np.mean((result.pred - result.true) ** 2)) / recording.persistence
    assert recording.ratio(subset, combine) == pytest.approx(expected, rel=1e-5)
    # On a series that repeats daily the day-back member carries the ensemble far below persistence.
    assert recording.ratio(("persistence",), combine) == pytest.approx(1.0)
    assert recording.ratio(("persistence", "seasonal-day"), combine) < 0.5


def test_the_rule_keeps_fewer_members_among_near_equal_scores():
    four, six = ("a", "b", "c", "d"), ("a", "b", "c", "d", "e", "f")
    slow, fast = MixtureConfig(12.0, 8.0), MixtureConfig(3.0, 2.0)
    scores = {(four, slow): [0.420, 0.424], (six, fast): [0.418, 0.420], (six, slow): [0.430, 0.430]}
    assert ett_tune.choose(scores) == (four, slow)  # 0.422 is within 0.005 of 0.419
    scores[four, slow] = [0.430, 0.430]
    assert ett_tune.choose(scores) == (six, fast)
