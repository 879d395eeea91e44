"""The online linear member: the block-wise normalised LMS it documents (against a plain loop
over rows and sensors), carried across chunks and batched over lines without changing a line's
forecasts, learning what persistence cannot, and finite whatever the readings do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lru_online.online_linear import (
    BLOCK_ROWS,
    ENERGY_FLOOR,
    OnlineLinear,
    OnlineLinearConfig,
    OnlineLinearState,
)


def reference(values: np.ndarray, lookback: int, horizon: int, step: float) -> np.ndarray:
    """One line (T, S), from a fresh state, a loop per row and sensor: forecasts (T, H, S)."""
    length, sensors = values.shape
    weights = np.zeros((sensors, horizon, lookback))
    filled = values.copy()
    for t in range(1, length):  # carried forward
        filled[t] = np.where(np.isnan(filled[t]), filled[t - 1], filled[t])

    def features(t: int, s: int) -> tuple[np.ndarray, float]:
        seen = filled[: t + 1, s][~np.isnan(filled[: t + 1, s])]
        latest = filled[t, s]
        if not len(seen):
            return np.zeros(lookback), latest  # nothing read yet: no forecast (NaN)
        # Slots before the sensor's first reading hold that first reading.
        slots = range(t - lookback + 1, t + 1)
        window = np.array([filled[i, s] if i >= 0 and not np.isnan(filled[i, s]) else seen[0] for i in slots])
        changes = window - latest
        changes[-1] = 1.0
        return changes, latest

    out = np.full((length, horizon, sensors), np.nan)
    for lo in range(0, length, BLOCK_ROWS):
        rows = range(lo, min(lo + BLOCK_ROWS, length))
        for t in rows:
            for s in range(sensors):
                changes, latest = features(t, s)
                out[t, :, s] = latest + weights[s] @ changes
        for h in range(horizon):
            for s in range(sensors):
                gradient, energy = np.zeros(lookback), 0.0
                for target_row in rows:
                    t = target_row - h - 1
                    if t < 0 or np.isnan(values[target_row, s]):
                        continue
                    changes, latest = features(t, s)
                    guess = latest + weights[s, h] @ changes
                    if np.isnan(guess):
                        continue
                    gradient += (values[target_row, s] - guess) * changes
                    energy += changes @ changes
                weights[s, h] += step * gradient / (ENERGY_FLOOR + energy)
    return out


def _run(values: np.ndarray, config: OnlineLinearConfig, horizon: int = 1, state=None):
    lines, length, sensors = values.shape
    state = state or OnlineLinearState.fresh(lines, sensors, horizon, config)
    return OnlineLinear(config).run(state, torch.from_numpy(values), torch.ones(lines, length, dtype=torch.bool))


@pytest.mark.parametrize("horizon", [1, 3])
def test_the_batched_run_is_the_documented_normalised_lms(horizon):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(1, 100, 2)).cumsum(1)
    values[0, 40:43, 1] = np.nan  # missing readings: carried forward, teach nothing
    values[0, :5, 0] = np.nan  # a sensor that starts late: no forecast before its first reading
    config = OnlineLinearConfig(lookback=6, step=0.7)
    run = _run(values, config, horizon)
    expected = reference(values[0], 6, horizon, 0.7)
    # The member computes in float32.
    np.testing.assert_allclose(run.forecast[0].numpy(), expected, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert torch.isnan(run.forecast[0, :5, :, 0]).all() and torch.isfinite(run.forecast[0, 5:]).all()


def test_chunks_cut_anywhere_and_lines_batched_give_each_line_its_own_forecasts():
    """A line's chunks, cut anywhere and carried through the state, equal one pass over its rows
    (blocks count the line's rows, not a chunk's); lines at different points of their blocks,
    batched with right-padding, forecast and learn as each does alone."""
    rng = np.random.default_rng(1)
    config = OnlineLinearConfig(lookback=5, step=0.5)
    long = rng.normal(size=(1, 5 * BLOCK_ROWS + 7, 3)).cumsum(1)
    whole = _run(long, config, horizon=2)
    cuts, state, pieces = [0, 37, 70, long.shape[1]], None, []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        part = _run(long[:, lo:hi], config, horizon=2, state=state)
        pieces.append(part.forecast)
        state = part.state
    torch.testing.assert_close(torch.cat(pieces, 1), whole.forecast, equal_nan=True)
    torch.testing.assert_close(state.weights, whole.state.weights)
    torch.testing.assert_close(state.gradient, whole.state.gradient)

    # Line 0 is 37 rows into its stream (5 into a block), line 1 only 3; their next chunks have
    # 50 and 20 rows, batched.
    other = rng.normal(size=(1, 23, 3)).cumsum(1)
    before = [_run(long[:, :37], config, horizon=2).state, _run(other[:, :3], config, horizon=2).state]
    chunks = [long[:, 37:87], other[:, 3:23]]
    padded = [np.concatenate([c, np.full((1, 50 - c.shape[1], 3), np.nan)], 1) for c in chunks]
    steps = torch.ones(2, 50, dtype=torch.bool)
    steps[1, 20:] = False
    both = OnlineLinear(config).run(OnlineLinearState.cat(before), torch.from_numpy(np.concatenate(padded)), steps)
    for line, chunk in enumerate(chunks):
        alone = _run(chunk, config, horizon=2, state=before[line])
        torch.testing.assert_close(both.forecast[line, : chunk.shape[1]], alone.forecast[0], equal_nan=True)
        mine = both.state.select(line)
        for name in ("weights", "recent", "phase", "gradient", "energy"):
            torch.testing.assert_close(getattr(mine, name), getattr(alone.state, name), equal_nan=True, msg=name)
    assert torch.isnan(both.forecast[1, 20:]).all()
    assert both.state.phase.tolist() == [(37 + 50) % BLOCK_ROWS, (3 + 20) % BLOCK_ROWS]


def test_it_learns_an_oscillation_persistence_cannot_follow():
    """An AR(2) process (a damped oscillation driven by noise of variance 0.09): persistence's
    one-step MSE is about twice the noise's; the member, with the default settings, learns the
    recursion online (96 weights by normalised LMS: within a few thousand rows)."""
    rng = np.random.default_rng(2)
    x = np.zeros(8000)
    for t in range(2, len(x)):
        x[t] = 1.5 * x[t - 1] - 0.7 * x[t - 2] + 0.3 * rng.normal()
    run = _run(x[None, :, None], OnlineLinearConfig())
    made = run.forecast[0, :-1, 0, 0].numpy()
    later = slice(4000, None)
    member = np.mean((x[1:] - made)[later] ** 2)
    persistence = np.mean(np.diff(x)[later] ** 2)
    assert member < 0.7 * persistence
    assert member < 1.4 * 0.09


def test_forecasts_stay_finite_through_a_50_sigma_shift_and_any_scale():
    """Normalised LMS is stable whatever the readings' scale: a 50σ level shift, then the same
    series a million times larger, leave the forecasts finite and near persistence's error."""
    rng = np.random.default_rng(3)
    walk = rng.normal(size=3000).cumsum()
    walk[1500:] += 50.0
    for scale in (1.0, 1e6):
        values = scale * walk[None, :, None]
        run = _run(values, OnlineLinearConfig(lookback=24, step=1.9))
        made = run.forecast[0, :-1, 0, 0].numpy()
        assert np.isfinite(made).all() and torch.isfinite(run.state.weights).all()
        member = np.mean((values[0, 1:, 0] - made)[100:] ** 2)
        persistence = np.mean(np.diff(values[0, :, 0])[100:] ** 2)
        assert member < 2.0 * persistence


def test_settings_outside_the_stable_range_are_refused():
    with pytest.raises(ValueError, match="step"):
        OnlineLinearConfig(step=2.0)
    with pytest.raises(ValueError, match="lookback"):
        OnlineLinearConfig(lookback=0)
