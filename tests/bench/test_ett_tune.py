"""bench/ett_tune.py: a member set replayed from a recording of more members is what a run of
that set forecasts, the seasonal members earn their weight on a series that repeats daily, and
the rule keeps the simpler member set among near-equal scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench import ett, ett_tune
from lru_online.mixture import MixtureConfig
from lru_online.paced_mixture import PacedMixtureConfig

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
    slow, fast = PacedMixtureConfig.single(12.0, 8.0), PacedMixtureConfig.single(3.0, 2.0)
    scores = {(four, slow): [0.420, 0.424], (six, fast): [0.418, 0.420], (six, slow): [0.430, 0.430]}
    assert ett_tune.choose(scores) == (four, slow)  # 0.422 is within 0.005 of 0.419
    scores[four, slow] = [0.430, 0.430]
    assert ett_tune.choose(scores) == (six, fast)


def test_the_rule_keeps_one_level_among_near_equal_scores_of_the_same_members():
    members = ("a", "b")
    one = PacedMixtureConfig.single(96.0, 8.0)
    two = PacedMixtureConfig((MixtureConfig(1.5, 4.0), MixtureConfig(96.0, 8.0)), MixtureConfig(96.0, 8.0))
    scores = {(members, two): [0.480, 0.482], (members, one): [0.483, 0.485]}
    assert ett_tune.choose(scores) == (members, one)  # 0.484 is within 0.005 of 0.481
    scores[members, one] = [0.490, 0.490]
    assert ett_tune.choose(scores) == (members, two)
    # Fewer members still come first: a paced mixture of fewer members beats one level of more.
    scores[("a", "b", "c"), one] = [0.479, 0.479]
    assert ett_tune.choose(scores) == (members, two)


def test_each_family_counts_once_however_many_series_it_holds():
    one, other = (("a",), PacedMixtureConfig.single(1.5, 2.0)), (("a",), PacedMixtureConfig.single(6.0, 4.0))
    families = ["ETT", "nab-aws", "nab-aws", "nab-aws"]
    # `one` wins three nab-aws streams by a little and loses ETT by a lot: the plain mean over
    # the four (0.475 against 0.4875) would take it, the families' mean (0.55 against 0.458) not.
    scores = {one: [0.70, 0.40, 0.40, 0.40], other: [0.40, 0.55, 0.55, 0.45]}
    assert ett_tune.family_mean(scores[one], families) == pytest.approx((0.70 + 0.40) / 2)
    assert ett_tune.choose(scores, families) == other
    assert ett_tune.choose(scores) == one  # one family: every value counts the same


def test_a_series_of_another_length_is_cut_in_etts_shares_and_standardised_on_its_own_training_rows(tmp_path):
    assert ett.Cuts.proportional(ett.STREAM_END) == ett.ETT_CUTS
    rows = 4_000
    times = pd.date_range("2024-01-01", periods=rows, freq="5min")
    level = np.r_[np.full(800, 10.0), np.full(rows - 800, 50.0)]  # a level the training rows never saw
    values = level + np.random.default_rng(0).normal(size=rows)
    path = tmp_path / "stream.csv"
    pd.DataFrame({"timestamp": times, "value": values}).to_csv(path, index=False)
    series = ett_tune.table_series(path, "timestamp")
    assert series.cuts == ett.Cuts(800, 1000, 4000)
    assert series.rows_per_day == 288
    training = series.values[: series.cuts.train_end, 0]
    assert abs(training.mean()) < 1e-5 and training.std() == pytest.approx(1.0, rel=1e-4)
    assert series.values[900:, 0].mean() > 30  # 40 training deviations up, not re-standardised
    recording = ett_tune.record("stream", series, ett.Protocol("fsnet", 24), NO_FIT, MixtureConfig(1.5, 2.0))
    starts = [start for start, _, _ in recording.recorded]
    assert starts[0] == series.cuts.valid_end and starts[-1] == series.cuts.tuning_end - 1


def test_an_ett_files_rows_after_the_stream_are_a_series_of_their_own(tmp_path):
    rows = ett.STREAM_END + 2_000
    frame = pd.DataFrame(
        {"date": pd.date_range("2016-07-01", periods=rows, freq="h").astype(str), "OT": np.arange(rows, dtype=float)}
    )
    path = tmp_path / "ETTx.csv"
    frame.to_csv(path, index=False)
    tail = ett_tune.tail_series(path)
    assert tail is not None and tail.cuts == ett.Cuts.proportional(2_000)
    raw_training = np.arange(ett.STREAM_END, ett.STREAM_END + tail.cuts.train_end, dtype=float)
    expected = (ett.STREAM_END + 1_000 - raw_training.mean()) / raw_training.std()
    assert tail.values[1_000, 0] == pytest.approx(expected, rel=1e-5)
    frame.iloc[: ett.STREAM_END + 500].to_csv(path, index=False)
    assert ett_tune.tail_series(path) is None  # 500 rows: too few to train, validate and tune on


def test_a_seasonal_member_whose_period_the_rows_before_the_stream_do_not_hold_is_left_out():
    every = ("lru-blocks", "persistence", "seasonal-day", "seasonal-week")
    assert ett.usable_members(every, 24, ett.VALID_END) == every  # ETTh: a week is 168 of 3,600 rows
    nab = ett.Cuts.proportional(4_032)  # 5-minute readings: a day is 288 rows, a week 2,016
    assert ett.usable_members(every, 288, nab.valid_end) == ("lru-blocks", "persistence", "seasonal-day")
    assert ett.usable_members(every, 86_400, 2_351) == ("lru-blocks", "persistence")  # SKAB's 1-second log
    built = ett.ensemble(rows_per_day=288, members=NO_FIT, cuts=nab).members
    assert tuple(built) == ("persistence", "seasonal-day")
