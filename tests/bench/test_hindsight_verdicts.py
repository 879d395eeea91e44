"""bench/hindsight_verdicts.py's pieces: alarmed runs merged into episodes, and an episode's rows
hidden from the model so that its prediction comes from the rows around it alone."""

from __future__ import annotations

import numpy as np
import torch

from bench.hindsight_verdicts import Line, episodes, hidden_residuals
from lru_online.hindsight import HindsightConfig, HindsightModel


def test_alarmed_runs_fewer_than_four_quiet_rows_apart_are_one_episode():
    alarm = np.zeros(30, bool)
    alarm[[2, 3, 6, 15, 16, 17, 25]] = True
    assert episodes(alarm) == [(2, 6), (15, 17), (25, 25)]
    assert episodes(np.zeros(5, bool)) == []


def test_a_hidden_span_is_predicted_from_its_surroundings_only():
    torch.manual_seed(0)
    model = HindsightModel({"a": [0, 1], "b": [2]}, HindsightConfig(d_model=8, d_state=6)).double()
    rng = np.random.default_rng(1)
    values = rng.normal(size=(80, 3))
    values[40, 1] = np.nan  # an absent reading stays absent in the residuals
    line = Line(values, np.ones(80), np.zeros(80, bool), np.zeros(80, bool), np.zeros(80, bool))
    before = hidden_residuals(model, line, [(35, 44)], margin=20)[0]
    shifted = Line(values.copy(), line.dt, line.alarm, line.label, line.training)
    shifted.values[35:45] += 5.0  # whatever the span holds, its prediction is the same
    after = hidden_residuals(model, shifted, [(35, 44)], margin=20)[0]
    assert before.shape == (10, 3) and np.isnan(before[5, 1])
    np.testing.assert_allclose(after, before + 5.0)
    outside = Line(values.copy(), line.dt, line.alarm, line.label, line.training)
    outside.values[30] += 5.0  # a row of the margin does move it
    assert not np.allclose(hidden_residuals(model, outside, [(35, 44)], margin=20)[0], before, equal_nan=True)
