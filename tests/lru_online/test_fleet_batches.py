"""Many lines in one batch: right-padded to the longest, marked by a step mask, each line ends
exactly as it would have run alone, and one optimizer step learns from all of them."""

from __future__ import annotations

import pytest
import torch

from lru_online import LearnerConfig, LRUForecaster, ModelConfig, OnlineLearner, RecurrentState
from lru_online.learner import forecast_targets, masked_mse

LENGTHS = [25, 40, 31, 1, 38, 40]
INPUTS, TARGETS = 5, 3


def _model(seed: int = 0, **overrides) -> LRUForecaster:
    torch.manual_seed(seed)
    shape = {"d_model": 12, "d_state": 8, "n_layers": 2, "linear_state": 4, "horizon": 2} | overrides
    return LRUForecaster(ModelConfig(n_inputs=INPUTS, n_targets=TARGETS, **shape)).double()


def _lines(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for length in LENGTHS:
        u = torch.randn(1, length, INPUTS, generator=generator, dtype=torch.float64)
        y = torch.randn(1, length, TARGETS, generator=generator, dtype=torch.float64)
        y[0, torch.rand(length, generator=generator) < 0.2, 0] = float("nan")  # a sensor that did not report
        dt = torch.rand(1, length, generator=generator, dtype=torch.float64) * 2
        lines.append((u, y, dt))
    return lines


def _carried(model: LRUForecaster, count: int, seed: int = 2) -> list[RecurrentState | None]:
    """Carried states of earlier batches; the first line is new (carries nothing)."""
    generator = torch.Generator().manual_seed(seed)
    states: list[RecurrentState | None] = [None]
    for _ in range(count - 1):
        hidden = [
            torch.complex(torch.randn(1, n, generator=generator), torch.randn(1, n, generator=generator)).to(
                torch.complex128
            )
            * 0.3
            for n in model.state_sizes
        ]
        forecast = torch.randn(1, model.config.horizon, TARGETS, generator=generator, dtype=torch.float64)
        states.append(RecurrentState(hidden, forecast))
    return states


def _padded(lines, states: list[RecurrentState | None], model: LRUForecaster):
    longest = max(u.shape[1] for u, _, _ in lines)
    batch = len(lines)
    u = torch.zeros(batch, longest, INPUTS, dtype=torch.float64)
    y = torch.full((batch, longest, TARGETS), float("nan"), dtype=torch.float64)
    dt = torch.zeros(batch, longest, dtype=torch.float64)
    steps = torch.zeros(batch, longest, dtype=torch.bool)
    for row, (line_u, line_y, line_dt) in enumerate(lines):
        length = line_u.shape[1]
        u[row, :length], y[row, :length], dt[row, :length], steps[row, :length] = line_u, line_y, line_dt, True
    filled = [s if s is not None else _fresh(model) for s in states]
    return u, y, dt, steps, RecurrentState.cat(filled)


def _fresh(model: LRUForecaster) -> RecurrentState:
    zero = model.initial_state(1)
    forecast = torch.full((1, model.config.horizon, TARGETS), float("nan"), dtype=torch.float64)
    return RecurrentState(zero.hidden, forecast)


@pytest.mark.parametrize("overrides", [{}, {"n_layers": 0}, {"linear_state": 0}])
def test_a_padded_batch_scores_and_ends_like_each_line_alone(overrides):
    model = _model(**overrides)
    lines, states = _lines(), _carried(model, len(LENGTHS))
    u, y, dt, steps, state = _padded(lines, states, model)
    learner = OnlineLearner(model, LearnerConfig(learning_rate=0.0))
    together = learner.score(u, y, state, dt, steps)
    for row, ((line_u, line_y, line_dt), carried) in enumerate(zip(lines, states, strict=True)):
        alone = learner.score(line_u, line_y, carried, line_dt)
        length = line_u.shape[1]
        torch.testing.assert_close(together.forecast[row, :length], alone.forecast[0])
        torch.testing.assert_close(together.scores[row, :length], alone.scores[0], equal_nan=True)
        assert torch.isnan(together.scores[row, length:]).all()
        for mine, theirs in zip(together.state.hidden, alone.state.hidden, strict=True):
            torch.testing.assert_close(mine[row], theirs[0])
        torch.testing.assert_close(together.state.last_forecast[row], alone.state.last_forecast[0])


def test_a_line_with_no_events_keeps_what_it_carried():
    model = _model()
    state = _carried(model, 2)[1]
    u = torch.zeros(1, 4, INPUTS, dtype=torch.float64)
    forecast, after = model(u, state, torch.ones(1, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.bool))
    for before, now in zip(state.hidden, after.hidden, strict=True):
        torch.testing.assert_close(now, before)
    torch.testing.assert_close(after.last_forecast, state.last_forecast)


def test_the_padded_loss_and_its_gradient_are_the_lines_own():
    """Padding adds nothing to the loss: the batch's gradient is that of every line's squared
    errors pooled, computed line by line."""
    model = _model()
    lines, states = _lines(), _carried(model, len(LENGTHS))
    u, y, dt, steps, state = _padded(lines, states, model)
    future, mask = forecast_targets(y.masked_fill(~steps.unsqueeze(-1), float("nan")), model.config.horizon)
    forecast, _ = model(u, state, dt, steps)
    masked_mse(forecast, future, mask & steps[:, :, None, None]).backward()
    batched = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    squared, count = 0.0, 0
    for (line_u, line_y, line_dt), carried in zip(lines, states, strict=True):
        line_future, line_mask = forecast_targets(line_y, model.config.horizon)
        line_forecast, _ = model(line_u, carried if carried is not None else None, line_dt)
        squared = squared + ((line_forecast - line_future) ** 2 * line_mask).sum()
        count += int(line_mask.sum())
    (squared / count).backward()
    for mine, theirs in zip(batched, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_scores_do_not_depend_on_the_other_lines_or_their_order():
    model = _model()
    lines, states = _lines(), _carried(model, len(LENGTHS))
    learner = OnlineLearner(model)
    u, y, dt, steps, state = _padded(lines, states, model)
    reference = learner.score(u, y, state, dt, steps).scores

    order = [4, 0, 5, 2, 1, 3]
    shuffled = _padded([lines[i] for i in order], [states[i] for i in order], model)
    scores = learner.score(*shuffled[:2], shuffled[4], shuffled[2], shuffled[3]).scores
    for position, row in enumerate(order):
        torch.testing.assert_close(scores[position], reference[row], equal_nan=True)

    extra = _lines(seed=9)[:3]
    grown = _padded(lines + extra, states + [None] * 3, model)
    scores = learner.score(*grown[:2], grown[4], grown[2], grown[3]).scores
    torch.testing.assert_close(scores[: len(lines), : reference.shape[1]], reference, equal_nan=True)


def test_lines_per_step_sets_the_optimizer_steps_of_a_batch():
    model = _model()
    lines, states = _lines(), _carried(model, len(LENGTHS))
    u, y, dt, steps, state = _padded(lines, states, model)
    whole = OnlineLearner(_model(), LearnerConfig(window=64, replay_batch=0))
    assert whole.update(u, y, state, dt, steps)["windows"] == 1
    grouped = OnlineLearner(_model(), LearnerConfig(window=64, replay_batch=0, lines_per_step=4))
    assert grouped.update(u, y, state, dt, steps)["windows"] == 2  # 6 lines in groups of 4 and 2
    # The same seed and update count draw the same groups: two learners end with equal weights.
    again = OnlineLearner(_model(), LearnerConfig(window=64, replay_batch=0, lines_per_step=4))
    again.update(u, y, state, dt, steps)
    for mine, theirs in zip(grouped.model.parameters(), again.model.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_short_batches_reach_the_replay_reservoir():
    """Batches shorter than the training window still store (padded) windows to replay."""
    model = _model()
    lines, states = _lines(), _carried(model, len(LENGTHS))
    u, y, dt, steps, state = _padded(lines, states, model)
    learner = OnlineLearner(model, LearnerConfig(window=64, replay_capacity=100, replay_batch=2))
    learner.update(u, y, state, dt, steps)
    # Every line with a target to learn from (the one-event line has none) offered its window.
    assert len(learner.replay) == len(LENGTHS) - 1
    assert all(w["inputs"].shape[0] == 64 for w in learner.replay.windows)
    second = learner.update(u, y, state, dt, steps)
    assert second["replay_loss"] > 0 and len(learner.replay) == 2 * (len(LENGTHS) - 1)


def test_checkpoints_store_replay_stacked_and_read_the_older_layout(tmp_path):
    model = _model()
    lines, states = _lines(), _carried(model, len(LENGTHS))
    u, y, dt, steps, state = _padded(lines, states, model)
    learner = OnlineLearner(model, LearnerConfig(window=64, replay_capacity=100))
    learner.update(u, y, state, dt, steps)
    saved = learner.state_dict()["replay"]
    assert set(saved["stacked"]) >= {"inputs", "future", "mask", "hidden.0"}  # a dozen tensors, not hundreds
    learner.save_checkpoint(tmp_path / "new.pt")
    restored = OnlineLearner.load_checkpoint(tmp_path / "new.pt")
    assert len(restored.replay) == len(learner.replay)
    for mine, theirs in zip(learner.replay.windows, restored.replay.windows, strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(theirs[key], mine[key])
    # A checkpoint written before windows were stacked: a list of dicts.
    older = learner.state_dict()
    older["replay"] = {**{k: v for k, v in saved.items() if k != "stacked"}, "windows": learner.replay.windows}
    torch.save(older, tmp_path / "old.pt")
    assert len(OnlineLearner.load_checkpoint(tmp_path / "old.pt").replay) == len(learner.replay)
