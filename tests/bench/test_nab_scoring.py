"""bench/nab_scoring.py against NAB's rules computed by hand (the data's README): the worth of a
detection by its place in the window, false positives before and after windows, probation,
only the first detection of a window, and the normalised corpus score's ends."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.nab_scoring import CorpusScore, match_file, probationary_rows, scaled_sigmoid

ROWS = 2000  # probation: the first 300 rows
WINDOWS = [(500, 599), (1200, 1399)]


def _sigma(x: float) -> float:
    return 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


def test_probation_is_15_percent_capped_at_750_rows():
    assert probationary_rows(2000) == 300 and probationary_rows(10_000) == 750 and probationary_rows(101) == 15


def test_a_detection_is_worth_its_place_in_the_window():
    outcome = match_file(ROWS, WINDOWS, np.array([550, 1399]))
    # 550 in [500, 599]: p = −(599 − 550 + 1)/100 = −0.5; 1399 at the right edge: p = −1/200.
    expected = [_sigma(-0.5) / _sigma(-1.0), _sigma(-1 / 200) / _sigma(-1.0)]
    assert outcome.hit_worth == pytest.approx(expected)
    assert expected[0] == pytest.approx(0.8598, abs=1e-4) and expected[1] < 0.02
    assert outcome.score("standard") == pytest.approx(sum(expected))


def test_only_the_first_detection_in_a_window_counts_and_a_miss_costs_a_fn():
    outcome = match_file(ROWS, WINDOWS, np.array([510, 520, 590]))
    assert len(outcome.hit_worth) == 1 and outcome.false_positives == 0 and outcome.missed == 1
    assert outcome.score("low_fn") == pytest.approx(outcome.hit_worth[0] - 2.0)


def test_false_positives_cost_by_their_distance_past_the_window_before():
    outcome = match_file(ROWS, WINDOWS, np.array([100, 400, 601, 1100, 1990]))
    # 100 is probationary; 400 lies before any window: full cost. 601 is 2 rows past a
    # 100-row window: d = 2/99, almost free; 1100: d = 501/99 > 3, full cost; 1990: d = 591/199.
    weights = [1.0, -_sigma(2 / 99), 1.0, -_sigma(591 / 199)]
    assert outcome.false_positive_weights == pytest.approx(weights)
    assert weights[1] < 0.06 and outcome.missed == 2
    assert outcome.score("standard") == pytest.approx(-0.11 * sum(weights) - 2.0)
    assert outcome.score("low_fp") == pytest.approx(-0.22 * sum(weights) - 2.0)
    assert scaled_sigmoid(3.5) == -1.0


def test_normalised_score_runs_from_no_detection_to_every_window_at_its_left_edge():
    perfect = CorpusScore({"a": match_file(ROWS, WINDOWS, np.array([500, 1200])), "b": match_file(900, [], [])})
    nothing = CorpusScore({"a": match_file(ROWS, WINDOWS, np.array([], dtype=int))})
    assert perfect.normalised("standard") == pytest.approx(100.0)
    assert nothing.normalised("standard") == pytest.approx(0.0)
    one_fp = CorpusScore({"a": match_file(ROWS, WINDOWS, np.array([500, 1200])), "b": match_file(900, [], [200])})
    assert one_fp.normalised("standard") == pytest.approx(100.0 * (4.0 - 0.11) / 4.0)
    assert one_fp.subset(["b"]).normalised("standard") == 0.0  # no windows: nothing to normalise by


def test_overlapping_windows_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        match_file(ROWS, [(500, 600), (600, 700)], np.array([]))
