import math

import numpy as np
import pytest
import torch

from lru_online.codec import CodecError
from lru_online.mixture import LossMixture, MixtureConfig, MixtureState


def _reference_weights(losses: list[float], temperature: float) -> list[float]:
    """softmax(−τ·L_k / mean L) for one line, step and sensor, written out by hand."""
    mean = max(sum(losses) / len(losses), 1e-12)
    logits = [-temperature * loss / mean for loss in losses]
    top = max(logits)
    exps = [math.exp(logit - top) for logit in logits]
    return [e / sum(exps) for e in exps]


def test_weights_follow_each_lines_recent_losses_like_a_scalar_reference():
    """B = 3 lines, M = 3 members, H = 2 steps, S = 2 sensors, 20 judged forecasts with a few
    unknown values: every weight equals a per-element scalar computation, and one line's
    observations never touch another's losses."""
    config = MixtureConfig(half_life=3.0, temperature=5.0)
    mixture = LossMixture(config)
    rng = np.random.default_rng(0)
    lines, members, horizon, sensors = 3, 3, 2, 2
    start = rng.uniform(0.5, 2.0, size=(members, horizon, sensors))
    state = MixtureState.fresh(lines, members, horizon, sensors, torch.from_numpy(start))
    reference = np.broadcast_to(start, (lines, members, horizon, sensors)).copy()
    decay = 0.5 ** (1 / 3.0)
    for step in range(20):
        forecasts = rng.normal(size=(lines, members, horizon, sensors))
        truth = rng.normal(size=(lines, horizon, sensors))
        truth[1, 0, 1] = np.nan if step % 4 == 0 else truth[1, 0, 1]  # not read: that loss waits
        observed = np.array([True, True, step % 3 != 0])  # line 2 has nothing to judge every third time
        state = mixture.observe(state, torch.from_numpy(forecasts), torch.from_numpy(truth), torch.from_numpy(observed))
        for b in range(lines):
            for k in range(members):
                for h in range(horizon):
                    for s in range(sensors):
                        if observed[b] and not np.isnan(truth[b, h, s]):
                            error = forecasts[b, k, h, s] - truth[b, h, s]
                            reference[b, k, h, s] = decay * reference[b, k, h, s] + (1 - decay) * error**2
    np.testing.assert_allclose(state.losses.numpy(), reference, rtol=1e-12)
    weights = mixture.weights(state).numpy()
    for b in range(lines):
        for h in range(horizon):
            for s in range(sensors):
                expected = _reference_weights(list(reference[b, :, h, s]), 5.0)
                np.testing.assert_allclose(weights[b, :, h, s], expected, rtol=1e-10)
    assert not np.allclose(weights[0], weights[2])  # the lines learned apart


def test_the_combination_is_the_weighted_mean_and_uniform_at_temperature_zero():
    state = MixtureState.fresh(1, 2, 1, 1, torch.tensor([[[1.0]], [[9.0]]]))
    forecasts = torch.tensor([10.0, 20.0]).reshape(1, 2, 1, 1)
    fallback = torch.zeros(1, 1, 1)
    flat = LossMixture(MixtureConfig(temperature=0.0)).combine(state, forecasts, fallback)
    assert flat.forecast.item() == pytest.approx(15.0)
    sharp = LossMixture(MixtureConfig(temperature=4.0))
    expected = _reference_weights([1.0, 9.0], 4.0)
    mixed = sharp.combine(state, forecasts, fallback)
    assert mixed.forecast.item() == pytest.approx(expected[0] * 10.0 + expected[1] * 20.0)
    assert mixed.healthy.all()


def test_a_diverged_member_gets_weight_zero_and_a_large_finite_loss():
    """Line 0's second member says inf on one sensor, line 1's says NaN, line 2's leaves the
    bound (values seen in [0, 1]: bound [−1, 2]); the others stay inside. Each diverged member
    gets weight 0 on its line only, the combination is the healthy member's forecast, and the
    charged loss is that of the forecast clipped to the bound."""
    mixture = LossMixture()
    state = MixtureState.fresh(3, 2, 1, 2)
    state = mixture.seen(state, torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]).expand(3, 2, 2))
    healthy_forecast = torch.full((3, 1, 2), 0.5, dtype=torch.float64)
    wild = torch.full((3, 1, 2), 0.5, dtype=torch.float64)
    wild[0, 0, 1], wild[1, 0, 0], wild[2, 0, 1] = math.inf, math.nan, 2.5
    forecasts = torch.stack([healthy_forecast, wild], dim=1)
    mixed = mixture.combine(state, forecasts, fallback=torch.zeros(3, 1, 2))
    assert mixed.healthy[:, 0].all() and not mixed.healthy[:, 1].any()
    assert (mixed.weights[:, 1] == 0).all()
    torch.testing.assert_close(mixed.forecast, healthy_forecast)
    assert mixed.members[0, 1, 0, 1] == 2.0 and mixed.members[1, 1, 0, 0] == 2.0 and mixed.members[2, 1, 0, 1] == 2.0
    after = mixture.observe(state, mixed.members, torch.zeros(3, 1, 2))
    assert torch.isfinite(after.losses).all()
    assert (after.losses[:, 1].amax(dim=(1, 2)) > after.losses[:, 0].amax(dim=(1, 2))).all()
    assert torch.isfinite(mixture.weights(after)).all()


def test_where_every_member_diverged_the_fallback_is_returned():
    mixture = LossMixture()
    state = mixture.seen(MixtureState.fresh(2, 2, 1, 1), torch.tensor([[[0.0], [1.0]], [[0.0], [1.0]]]))
    forecasts = torch.tensor([[math.nan, math.inf], [0.2, 0.4]]).reshape(2, 2, 1, 1)
    fallback = torch.tensor([[[0.7]], [[0.9]]])
    mixed = mixture.combine(state, forecasts, fallback)
    assert mixed.forecast[0].item() == pytest.approx(0.7)
    assert 0.2 < mixed.forecast[1].item() < 0.4


def test_a_sensor_never_seen_has_no_bound_and_losses_stay_finite():
    mixture = LossMixture()
    state = MixtureState.fresh(1, 2, 1, 1)
    forecasts = torch.tensor([1e200, 0.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    mixed = mixture.combine(state, forecasts, torch.zeros(1, 1, 1))
    assert mixed.healthy.all()
    after = mixture.observe(state, mixed.members, torch.zeros(1, 1, 1))
    assert torch.isfinite(after.losses).all() and torch.isfinite(mixture.weights(after)).all()
    assert mixture.weights(after)[0, 1, 0, 0] > 0.99


def _stream(lines: int, rows: int, seed: int) -> np.ndarray:
    """Random walks with a level shift of 50 standard deviations of their first 300 rows."""
    rng = np.random.default_rng(seed)
    walk = 5.0 + np.cumsum(rng.normal(scale=0.1, size=(lines, rows, 2)), axis=1)
    walk[:, 400:] += 50 * walk[:, :300].std(axis=1, keepdims=True)
    return walk


# The core's defaults and the pipeline's (flows/settings.py, chosen by bench/mixture_tune.py).
@pytest.mark.parametrize("half_life, temperature", [(12.0, 8.0), (48.0, 16.0)])
def test_a_level_shift_of_fifty_sigma_and_a_diverging_member_cannot_poison_the_mixture(half_life, temperature):
    """Four lines streamed row by row, one step ahead: persistence, the mean of the last 20 rows
    (finite, but wrong for 20 rows after the shift) and a member that grows its forecast
    100-fold every row from row 350 (inf from row 505) and says NaN from row 600. The mixture
    stays finite on every row and is no worse than its best healthy member on every forecast
    but one: the one after the jump, where the weights still reflect the jump itself that
    every member missed alike (lru_online.mixture); even there it misses by less than the
    worst healthy member."""
    walk = _stream(4, 1500, seed=3)
    mixture = LossMixture(MixtureConfig(half_life=half_life, temperature=temperature))
    state = mixture.seen(MixtureState.fresh(4, 3, 1, 2), torch.from_numpy(walk[:, :300]))
    errors = {"mixture": [], "persistence": [], "mean": []}
    rows = range(300, 1499)
    for t in rows:
        history = walk[:, : t + 1]
        state = mixture.seen(state, torch.from_numpy(history[:, -1:]))
        last = history[:, -1]
        with np.errstate(over="ignore"):
            exploding = last * np.float64(100.0) ** max(t - 350, 0) if t < 600 else np.full_like(last, np.nan)
        members = np.stack([last, history[:, -20:].mean(axis=1), exploding], axis=1)[:, :, None]
        mixed = mixture.combine(state, torch.from_numpy(members), fallback=torch.from_numpy(history[:, -1:]))
        assert torch.isfinite(mixed.forecast).all()
        truth = walk[:, t + 1][:, None]
        state = mixture.observe(state, mixed.members, torch.from_numpy(truth))
        errors["mixture"].append(((mixed.forecast[:, 0].numpy() - truth[:, 0]) ** 2).mean())
        errors["persistence"].append(((members[:, 0, 0] - truth[:, 0]) ** 2).mean())
        errors["mean"].append(((members[:, 1, 0] - truth[:, 0]) ** 2).mean())
    assert np.isnan(members[:, 2]).all()  # the third member did diverge
    after_jump = rows.index(400)  # forecast of row 401, the first after the shift at row 400
    on_row = {name: values[after_jump] for name, values in errors.items()}
    assert on_row["mixture"] < max(on_row["persistence"], on_row["mean"])
    rest = {name: float(np.mean(np.delete(values, after_jump))) for name, values in errors.items()}
    assert rest["mixture"] <= 1.05 * min(rest["persistence"], rest["mean"])


def test_the_state_of_each_line_round_trips_through_bytes():
    mixture = LossMixture()
    state = MixtureState.fresh(3, 2, 2, 2)
    state = mixture.seen(state, torch.randn(3, 5, 2, dtype=torch.float64))
    forecasts, truth = torch.randn(3, 2, 2, 2, dtype=torch.float64), torch.randn(3, 2, 2, dtype=torch.float64)
    state = mixture.observe(state, forecasts, truth)
    rebuilt = MixtureState.cat([MixtureState.from_bytes(state.select(i).to_bytes()) for i in range(3)])
    for name in ("losses", "low", "high", "pending"):
        torch.testing.assert_close(getattr(rebuilt, name), getattr(state, name), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="select it first"):
        state.to_bytes()
    with pytest.raises(CodecError):
        MixtureState.from_bytes(b"not a state")


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"half_life": 0.0}, "half_life"),
        ({"temperature": -1.0}, "temperature"),
        ({"diverged_ranges": math.inf}, "diverged_ranges"),
    ],
)
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        MixtureConfig(**settings)


def test_starting_losses_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="starting_losses"):
        MixtureState.fresh(1, 2, 1, 1, torch.ones(3, 1, 1))


def _row_by_row(mixture: LossMixture, state: MixtureState, forecasts, values, steps):
    """`LossMixture.run` written as the one-row calls: at each real row of each line, judge
    the forecasts whose values came with it, widen the range, combine the row's forecasts."""
    lines, length, members, horizon, sensors = forecasts.shape
    out = torch.full((lines, length, horizon, sensors), math.nan, dtype=torch.float64)
    states = []
    for b in range(lines):
        line = state.select(b)
        made = [line.pending[0, j] for j in range(horizon)]  # clipped forecasts, oldest first
        for t in range(length):
            if not steps[b, t]:
                continue
            judged = torch.stack([made[-k - 1][:, k] for k in range(horizon)], dim=1)[None]  # (1, M, H, S)
            truth = values[b, t][None, None].expand(1, horizon, sensors)
            line = mixture.observe(line, judged, truth)
            line = mixture.seen(line, values[b, t][None, None])
            mixed = mixture.combine(line, forecasts[b, t][None], fallback=truth)
            out[b, t] = mixed.forecast[0]
            made.append(mixed.members[0])
        pending = torch.stack(made[-horizon:])[None]
        states.append(MixtureState(line.losses, line.low, line.high, pending))
    return out, MixtureState.cat(states)


@pytest.mark.parametrize("horizon", [1, 3])
def test_a_chunk_at_once_equals_the_row_by_row_calls(horizon):
    """B = 3 right-padded lines over two chunks (the second continues from the first's state):
    a member that leaves the bound now and then, another that goes NaN, missing readings; the
    chunk computed at once gives the forecasts and the state of `observe`/`seen`/`combine`
    called row by row, to float64 rounding. Half-life 2 rows, so the loss recurrence crosses
    several of its blocks within a chunk."""
    mixture = LossMixture(MixtureConfig(half_life=0.5, temperature=4.0))
    rng = np.random.default_rng(5)
    lines, members, sensors = 3, 3, 2
    starting = torch.from_numpy(rng.uniform(0.5, 2, (members, horizon, sensors)))
    state = MixtureState.fresh(lines, members, horizon, sensors, starting)
    reference = state
    for length, lengths in ((90, [90, 61, 0]), (70, [12, 70, 40])):
        values = torch.from_numpy(rng.normal(size=(lines, length, sensors)).cumsum(1))
        values[rng.random(values.shape) < 0.1] = math.nan
        noise = rng.normal(size=(lines, length, members, horizon, sensors))
        forecasts = values[:, :, None, None, :] + torch.from_numpy(noise)
        forecasts[:, ::7, 1] *= 1e6  # out of bounds: weight 0 on those rows
        forecasts[:, 30:35, 2] = math.nan
        steps = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
        run = mixture.run(state, forecasts, values, steps)
        expected, reference = _row_by_row(mixture, reference, forecasts, values, steps)
        torch.testing.assert_close(run.forecast, expected, rtol=1e-9, atol=1e-12, equal_nan=True)
        for name in ("losses", "low", "high", "pending"):
            torch.testing.assert_close(
                getattr(run.state, name), getattr(reference, name), rtol=1e-9, atol=0, equal_nan=True
            )
        assert not run.healthy[:, ::7, 1][steps[:, ::7]].any() and run.healthy[:, 1::7, 1][steps[:, 1::7]].any()
        assert torch.isfinite(run.forecast[steps]).any() and torch.isnan(run.forecast[~steps]).all()
        state = run.state
