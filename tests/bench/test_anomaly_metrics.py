"""SKAB-style scores on small cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.anomaly_metrics import (
    NabScore,
    OutlierCounts,
    changepoints_from_outliers,
    match_changepoints,
    prediction_file_name,
    roc_auc,
    scoring_windows,
    write_predictions,
)

SECOND = pd.Timedelta("1s")


def test_f1_far_mar_on_a_pooled_confusion_matrix():
    counts = OutlierCounts()
    counts.add(np.array([1, 1, 1, 0, 0, 0, 0, 0]), np.array([1, 1, 0, 1, 0, 0, 0, 0]))  # TP 2 FN 1 FP 1 TN 4
    counts.add(np.array([1, 0]), np.array([1, 1]))  # TP 1 FP 1
    assert (counts.tp, counts.tn, counts.fp, counts.fn) == (3, 4, 2, 1)
    assert counts.f1 == pytest.approx(3 / (3 + 1.5))
    assert counts.far_percent == pytest.approx(100 * 2 / 6)
    assert counts.mar_percent == pytest.approx(25.0)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        OutlierCounts().add(np.zeros(3), np.zeros(2))


def test_changepoints_are_the_switches_of_the_outlier_series_first_value_kept():
    assert changepoints_from_outliers(np.array([1, 1, 0, 0, 1, 1, 1, 0])).tolist() == [1, 0, 1, 0, 1, 0, 0, 1]
    assert changepoints_from_outliers(np.array([0, 0, 1])).tolist() == [0, 0, 1]


def test_overlapping_windows_start_where_the_previous_one_ends():
    t0 = pd.Timestamp("2020-01-01")
    windows = scoring_windows(pd.DatetimeIndex([t0, t0 + 30 * SECOND]), 60 * SECOND)
    assert windows == [(t0, t0 + 60 * SECOND), (t0 + 60 * SECOND, t0 + 90 * SECOND)]


def _toy(predicted_at: list[int]):
    """300 one-second rows, true changepoints at rows 50 and 200, windows of 60 s."""
    stamps = pd.date_range("2020-01-01", periods=300, freq="s")
    truth = np.zeros(300, int)
    truth[[50, 200]] = 1
    predicted = np.zeros(300, int)
    predicted[predicted_at] = 1
    return match_changepoints(stamps, truth, predicted, 60 * SECOND)


def test_nab_on_two_changepoints_one_hit_at_once_one_false_positive_one_missed():
    result = _toy([50, 120])
    assert (result.windows, result.false_positives, result.missed) == (2, 1, 1)
    nab = NabScore([result])
    # standard: S = 1 - 0.11 - 1, null = -2, perfect = 2
    assert nab.score("standard") == pytest.approx(100 * (-0.11 + 2) / 4)
    assert nab.score("low_fp") == pytest.approx(100 * (-0.22 + 2) / 4)
    # low FN: S = 1 - 0.11 - 2, null = -4, perfect = 2
    assert nab.score("low_fn") == pytest.approx(100 * (-1.11 + 4) / 6)


def test_a_hit_at_the_window_end_is_worth_a_false_positive_and_later_hits_are_ignored():
    result = _toy([110, 200, 230])  # row 110 = end of the first window; 230 is a second hit in window 2
    assert (result.false_positives, result.missed) == (0, 0)
    nab = NabScore([result])
    assert nab.score("standard") == pytest.approx(100 * ((-0.11 + 1.0) + 2) / 4)


def test_perfect_and_silent_detectors_score_100_and_0_and_scores_add_over_files():
    assert NabScore([_toy([50, 200])]).score() == pytest.approx(100.0)
    assert NabScore([_toy([])]).score() == pytest.approx(0.0)
    both = NabScore([_toy([50, 200]), _toy([])])
    assert both.score() == pytest.approx(50.0) and both.missed == 2


def test_exchange_format_file(tmp_path):
    stamps = pd.date_range("2020-03-09 10:14:33", periods=3, freq="s")
    path = write_predictions(tmp_path, "valve1/3.csv", stamps, np.array([0, 1, 1]), np.array([0, 1, 0]), [0.1, 2.0, 3])
    assert path.name == "valve1__3.csv" == prediction_file_name("valve1/3.csv")
    assert path.read_text().splitlines() == [
        "datetime,anomaly,changepoint,score",
        "2020-03-09 10:14:33,0,0,0.1",
        "2020-03-09 10:14:34,1,1,2.0",
        "2020-03-09 10:14:35,1,0,3.0",
    ]


def test_auc_is_the_share_of_labelled_normal_pairs_ordered_right_ties_counting_half():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    positive, negative = scores[labels], scores[~labels]
    pairs = (positive[:, None] > negative[None, :]) + 0.5 * (positive[:, None] == negative[None, :])
    assert roc_auc(labels.astype(int), scores) == pytest.approx(pairs.mean())
    assert np.isnan(roc_auc(np.zeros(5, dtype=int), np.arange(5.0)))
