import math

import numpy as np
import pytest
import torch

from lru_online.mixture import LossMixture, MixtureConfig, MixtureState
from lru_online.paced_mixture import PacedMixture, PacedMixtureConfig, paced_config

FAST, SLOW, BETWEEN = MixtureConfig(1.5, 4.0), MixtureConfig(96.0, 8.0), MixtureConfig(24.0, 8.0)


def _stream(paced: PacedMixture, forecasts: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """One-step forecasts (B, T, M, 1, S) and values (B, T, S), streamed row by row."""
    lines, rows, members, _, sensors = forecasts.shape
    state = paced.fresh(lines, torch.ones(members, 1, sensors, dtype=torch.float64))
    state = paced.seen(state, torch.from_numpy(truth))
    out = []
    for t in range(rows):
        fallback = torch.zeros(lines, 1, sensors, dtype=torch.float64)
        mixed = paced.combine(state, torch.from_numpy(forecasts[:, t]), fallback)
        out.append(mixed.forecast[:, 0].numpy())
        state = paced.observe(state, mixed.members, mixed.levels, torch.from_numpy(truth[:, t, None]))
    return np.stack(out, axis=1)


def _softmax_by_hand(losses: list[float], temperature: float) -> list[float]:
    mean = sum(losses) / len(losses)
    exps = [math.exp(-temperature * loss / mean) for loss in losses]
    return [e / sum(exps) for e in exps]


def test_one_level_is_that_levels_loss_mixture_forecast_for_forecast():
    rng = np.random.default_rng(0)
    forecasts, truth = rng.normal(size=(3, 60, 3, 1, 2)), rng.normal(size=(3, 60, 2))
    paced = _stream(PacedMixture(PacedMixtureConfig((FAST,))), forecasts, truth)
    mixture = LossMixture(FAST)
    state = mixture.seen(MixtureState.fresh(3, 3, 1, 2), torch.from_numpy(truth))
    for t in range(60):
        mixed = mixture.combine(state, torch.from_numpy(forecasts[:, t]), torch.zeros(3, 1, 2, dtype=torch.float64))
        np.testing.assert_array_equal(paced[:, t], mixed.forecast[:, 0].numpy())
        state = mixture.observe(state, mixed.members, torch.from_numpy(truth[:, t, None]))


def test_the_levels_are_weighed_by_their_own_recent_losses_like_a_scalar_reference():
    """Two levels over three members, one line and sensor: each level combines as its own
    LossMixture would; `between` weighs the levels' forecasts by the exponentially weighted
    squared errors of those forecasts, computed here by hand."""
    rng = np.random.default_rng(1)
    rows = 40
    forecasts, truth = rng.normal(size=(1, rows, 3, 1, 1)), rng.normal(size=(1, rows, 1))
    config = PacedMixtureConfig((FAST, SLOW), BETWEEN)
    paced = _stream(PacedMixture(config), forecasts, truth)
    levels = [LossMixture(c) for c in (FAST, SLOW)]
    states = [m.seen(MixtureState.fresh(1, 3, 1, 1), torch.from_numpy(truth)) for m in levels]
    level_losses = [1.0, 1.0]
    decay = 0.5 ** (1 / BETWEEN.half_life)
    for t in range(rows):
        by_level = []
        for i, mixture in enumerate(levels):
            mixed = mixture.combine(states[i], torch.from_numpy(forecasts[:, t]), torch.zeros(1, 1, 1))
            by_level.append(float(mixed.forecast))
            states[i] = mixture.observe(states[i], mixed.members, torch.from_numpy(truth[:, t, None]))
        weights = _softmax_by_hand(level_losses, BETWEEN.temperature)
        assert paced[0, t, 0] == pytest.approx(sum(w * f for w, f in zip(weights, by_level, strict=True)), rel=1e-12)
        level_losses = [
            decay * loss + (1 - decay) * (f - truth[0, t, 0]) ** 2
            for loss, f in zip(level_losses, by_level, strict=True)
        ]


def _switching(rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two members, each right (error 0.1) in alternate blocks of 40 rows and off by 2 in the
    others: the leader changes every 40 rows, which a fast pace follows within a row or two."""
    truth = rng.normal(size=(1, rows, 1))
    right = np.arange(rows) // 40 % 2 == 0
    noise = rng.normal(scale=0.1, size=(2, rows))
    first = truth[0, :, 0] + np.where(right, noise[0], 2.0)
    second = truth[0, :, 0] + np.where(right, 2.0, noise[1])
    return np.stack([first, second], axis=-1)[None, :, :, None, None], truth


def _steady(rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two members, the second the first plus noise of its own: the first is always the better
    (no mix of the two beats it), and their recent losses are mostly noise, which a fast pace
    chases and a slow one averages out."""
    truth = rng.normal(size=(1, rows, 1))
    first = truth[0, :, 0] + rng.normal(scale=1.0, size=rows)
    second = first + rng.normal(scale=1.5, size=rows)
    return np.stack([first, second], axis=-1)[None, :, :, None, None], truth


@pytest.mark.parametrize("make", [_switching, _steady])
def test_the_pace_that_suits_the_stream_is_chosen_online(make):
    """On a stream whose leader switches the fast level wins, on a steady one the slow level:
    the paced mixture is close to whichever wins, on both, and clearly better than the other."""
    forecasts, truth = make(3000, np.random.default_rng(2))
    mse = {}
    for name, config in {
        "fast": PacedMixtureConfig((FAST,)),
        "slow": PacedMixtureConfig((SLOW,)),
        "paced": PacedMixtureConfig((FAST, SLOW), BETWEEN),
    }.items():
        mse[name] = float(np.mean((_stream(PacedMixture(config), forecasts, truth)[0, 200:] - truth[0, 200:]) ** 2))
    best, worst = min(mse["fast"], mse["slow"]), max(mse["fast"], mse["slow"])
    assert worst > 1.08 * best  # the streams do tell the paces apart
    assert mse["paced"] <= 1.05 * best
    assert mse["paced"] < worst - 0.5 * (worst - best)


def test_the_member_weights_of_several_levels_sum_to_one_and_weigh_the_forecast():
    rng = np.random.default_rng(3)
    paced = PacedMixture(PacedMixtureConfig((FAST, SLOW), BETWEEN))
    state = paced.seen(paced.fresh(2, torch.ones(3, 2, 1, dtype=torch.float64)), torch.randn(2, 10, 1))
    for _ in range(30):
        forecasts = torch.from_numpy(rng.normal(size=(2, 3, 2, 1)))
        mixed = paced.combine(state, forecasts, torch.zeros(2, 2, 1, dtype=torch.float64))
        state = paced.observe(state, mixed.members, mixed.levels, torch.from_numpy(rng.normal(size=(2, 2, 1))))
    np.testing.assert_allclose(mixed.weights.sum(1).numpy(), 1.0, rtol=1e-12)
    np.testing.assert_allclose((mixed.weights * mixed.members).sum(1).numpy(), mixed.forecast.numpy(), rtol=1e-10)
    np.testing.assert_allclose(paced.weights(state).sum(1).numpy(), 1.0, rtol=1e-12)


def test_settings_that_cannot_be_combined_are_refused():
    with pytest.raises(ValueError, match="at least one level"):
        PacedMixtureConfig(())
    with pytest.raises(ValueError, match="need `between`"):
        PacedMixtureConfig((FAST, SLOW))
    with pytest.raises(ValueError, match="one level has none"):
        PacedMixtureConfig((FAST,), BETWEEN)
    assert paced_config({"half_life": 96, "temperature": 8}) == PacedMixtureConfig((SLOW,))
    levels = [{"half_life": 1.5, "temperature": 4}, {"half_life": 96, "temperature": 8}]
    assert paced_config({"levels": levels, "between": {"half_life": 24, "temperature": 8}}) == PacedMixtureConfig(
        (FAST, SLOW), BETWEEN
    )
