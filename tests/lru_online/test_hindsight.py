"""The hindsight model of lru_online.hindsight: both directions against a row-by-row loop of the
LRU's own step, no row seen by its own prediction, padding and other lines without effect, a
source that did not report adding nothing, and on a learnt signal a spike standing out from the
rows around it while the normal rows are predicted better than by their neighbour alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lru_online.hindsight import HindsightConfig, HindsightModel, train_hindsight

SOURCES = {"vibration": [0, 1], "hydraulic": [2]}


def _model(seed: int = 0) -> HindsightModel:
    torch.manual_seed(seed)
    return HindsightModel(SOURCES, HindsightConfig(d_model=8, d_state=6)).double()


def _window(lines: int, rows: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    rng = np.random.default_rng(seed)
    readings = torch.tensor(rng.normal(size=(lines, rows, 3)))
    present = torch.ones(lines, rows, 3, dtype=torch.bool)
    dt = torch.tensor(rng.uniform(0.5, 2.0, size=(lines, rows)))
    steps = torch.ones(lines, rows, dtype=torch.bool)
    return readings, present, dt, steps


def test_both_directions_equal_a_row_by_row_loop_of_the_lru_step():
    model = _model()
    readings, present, dt, steps = _window(2, 9)
    past, future = model.priors(readings, present, dt, steps)
    encoded = model.encode(readings, present)
    for line in range(2):
        h = torch.zeros(1, model.config.d_state, dtype=torch.complex128)
        for t in range(9):  # what rows 0..t-1 say about row t, decayed over its gap
            expected = model.forward_lru.decay(dt[line, t : t + 1]) * h
            torch.testing.assert_close(past[line, t], expected[0])
            h = model.forward_lru.next_state(encoded[line, t : t + 1], h, dt[line, t : t + 1])
        h = torch.zeros(1, model.config.d_state, dtype=torch.complex128)
        for t in reversed(range(9)):  # rows t+1.. read backwards, decayed over the gap t → t+1
            gap = dt[line, t + 1 : t + 2] if t < 8 else torch.zeros(1, dtype=torch.float64)
            torch.testing.assert_close(future[line, t], (model.backward_lru.decay(gap) * h)[0])
            h = model.backward_lru.next_state(encoded[line, t : t + 1], h, gap)


def test_a_row_is_predicted_from_its_neighbours_never_from_itself():
    model = _model()
    readings, present, dt, steps = _window(1, 12)
    before = model(readings, present, dt, steps)
    changed = readings.clone()
    changed[0, 5] += 10.0
    after = model(changed, present, dt, steps)
    torch.testing.assert_close(after[0, 5], before[0, 5])
    assert not torch.allclose(after[0, 4], before[0, 4]) and not torch.allclose(after[0, 6], before[0, 6])


def test_padding_and_the_other_lines_of_a_batch_change_nothing():
    model = _model()
    readings, present, dt, steps = _window(2, 15)
    steps[1, 9:] = False  # line 1 has 9 rows, right-padded
    readings[1, 9:] = 1e6  # whatever the padding holds
    together = model(readings, present, dt, steps)
    alone = model(readings[1:, :9], present[1:, :9], dt[1:, :9], steps[1:, :9])
    torch.testing.assert_close(together[1, :9], alone[0])
    first = model(readings[:1], present[:1], dt[:1], steps[:1])
    torch.testing.assert_close(together[0], first[0])


def test_a_source_that_did_not_report_adds_nothing_and_nan_stays_out():
    model = _model()
    readings, present, dt, steps = _window(1, 10)
    present[0, 4, 0:2] = False  # the vibration source did not report at row 4
    readings[0, 4, 0:2] = math.nan
    predicted = model(readings, present, dt, steps)
    assert bool(torch.isfinite(predicted).all())
    other = readings.clone()
    other[0, 4, 0:2] = 123.0  # any value where it did not report: the same predictions
    torch.testing.assert_close(model(other, present, dt, steps), predicted)
    residuals = model.residuals(readings, present, dt, steps)
    assert bool(torch.isnan(residuals[0, 4, 0:2]).all()) and bool(torch.isfinite(residuals[0, 4, 2]))


def test_sources_must_cover_every_column_once():
    with pytest.raises(ValueError, match="cover columns"):
        HindsightModel({"a": [0, 1], "b": [1]})


def test_after_training_a_spike_stands_out_and_normal_rows_beat_their_neighbour():
    """Eight lines of two slow sines and their sum (three sensors in two sources), with noise:
    after training, a one-row spike's hindsight residual is many times the typical one, and
    normal rows are predicted better than by the row before them (persistence)."""
    torch.manual_seed(3)
    rng = np.random.default_rng(4)
    lines, rows = 8, 200
    t = np.arange(rows)[None, :] + rng.uniform(0, 50, size=(lines, 1))
    a, b = np.sin(t / 7.0), np.cos(t / 11.0)
    clean = np.stack([a, b, a + b], -1)
    readings = torch.tensor(clean + 0.05 * rng.normal(size=clean.shape))
    present = torch.ones(lines, rows, 3, dtype=torch.bool)
    dt = torch.ones(lines, rows, dtype=torch.float64)
    steps = torch.ones(lines, rows, dtype=torch.bool)
    model = HindsightModel(SOURCES, HindsightConfig(d_model=16, d_state=16)).double()
    losses = train_hindsight(model, readings, present, dt, steps, epochs=300, learning_rate=1e-2)
    assert losses[-1] < 0.1 * losses[0]

    with torch.no_grad():
        normal = model.residuals(readings, present, dt, steps)[:, 10:-10]
        persistence = (readings[:, 10:-10] - readings[:, 9:-11]).abs()
        assert float(normal.abs().mean()) < float(persistence.mean())
        spiked = readings.clone()
        spiked[0, 100, 2] += 2.0
        residual = model.residuals(spiked, present, dt, steps)[0, :, 2].abs()
    typical = float(residual[10:-10].median())
    assert float(residual[100]) > 8 * typical
