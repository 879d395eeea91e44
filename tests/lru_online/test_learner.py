import math
import pickle

import pytest
import torch

from lru_online import LearnerConfig, LRUForecaster, ModelConfig, OnlineLearner, forecast_targets


def _pattern(kind: str, length: int, start: int) -> torch.Tensor:
    t = torch.arange(start, start + length, dtype=torch.float32)
    if kind == "A":
        series = [torch.sin(2 * math.pi * t / 16), 0.5 * torch.cos(2 * math.pi * t / 16) + 1.0]
    else:
        series = [
            0.8 * torch.sign(torch.sin(2 * math.pi * t / 10)) - 1.0,
            torch.sin(2 * math.pi * t / 5),
        ]
    return torch.stack(series, -1)[None]


def _learner(seed=0, **overrides):
    torch.manual_seed(seed)
    model = LRUForecaster(ModelConfig(n_inputs=2, n_targets=2, d_model=32, d_state=32, n_layers=1))
    settings = {"learning_rate": 3e-3, "window": 32, "replay_capacity": 0, "seed": seed} | overrides
    return OnlineLearner(model, LearnerConfig(**settings))


def _stream(learner, regimes, batches, batch_len=128):
    state, errors, position = None, [], 0
    for kind in regimes:
        for _ in range(batches):
            x = _pattern(kind, batch_len, position)
            position += batch_len
            step = learner.learn(x, x, state)
            state = step.scored.state
            errors.append(step.metrics["mae_before"])
    return errors, position


def test_forecast_targets_shift_and_mask():
    targets = torch.arange(10.0).reshape(1, 5, 2)
    future, mask = forecast_targets(targets, horizon=2)
    assert future.shape == (1, 5, 2, 2)
    assert torch.equal(future[0, 1, 0], targets[0, 2]) and torch.equal(future[0, 1, 1], targets[0, 3])
    assert mask[0, 3].tolist() == [[True, True], [False, False]]
    assert not mask[0, 4].any()


def test_learning_reduces_forecast_error():
    learning, _ = _stream(_learner(), ["A"], 20)
    frozen, _ = _stream(_learner(learning_rate=0.0), ["A"], 20)
    late = sum(learning[-5:]) / 5
    assert late < 0.2 * sum(learning[1:4]) / 3
    # With a zero learning rate nothing is learned: the update is what reduced the error.
    assert late < 0.2 * sum(frozen[-5:]) / 5


def test_replay_reduces_forgetting():
    def error_on_a_after_b(capacity):
        learner = _learner(seed=1, replay_capacity=capacity, replay_batch=8)
        _, position = _stream(learner, ["A", "B"], 25)
        x = _pattern("A", 512, position)
        scored = learner.score(x, x)
        return float(scored.residuals[:, 64:].abs().mean())

    without, with_replay = error_on_a_after_b(0), error_on_a_after_b(256)
    assert with_replay < 0.5 * without


def test_ewc_holds_weights_near_the_anchor_and_reduces_forgetting():
    def after_b(ewc_weight):
        learner = _learner(seed=2, ewc_weight=ewc_weight)
        _stream(learner, ["A"], 10)
        x = _pattern("A", 256, 0)
        learner.consolidate(x, x)
        anchor = [p.detach().clone() for p in learner.model.parameters()]
        _, position = _stream(learner, ["B"], 5)
        drift = sum(
            float((p.detach() - a).pow(2).sum()) for p, a in zip(learner.model.parameters(), anchor, strict=True)
        )
        x = _pattern("A", 512, position)
        return drift, float(learner.score(x, x).residuals[:, 64:].abs().mean())

    (drift_plain, error_plain), (drift_ewc, error_ewc) = after_b(0.0), after_b(100.0)
    assert drift_ewc < 0.5 * drift_plain
    assert error_ewc < 0.5 * error_plain


def test_scores_are_made_before_the_update():
    learner = _learner()
    x = _pattern("A", 128, 0)
    expected = learner.score(x, x).scores
    step = learner.learn(x, x)
    torch.testing.assert_close(step.scored.scores, expected, equal_nan=True)
    assert not torch.allclose(learner.score(x, x).scores[:, 1:], expected[:, 1:])


def test_checkpoint_round_trip(tmp_path):
    learner = _learner(replay_capacity=16, ewc_weight=1.0)
    _, position = _stream(learner, ["A"], 3)
    x = _pattern("A", 64, position)
    learner.consolidate(x, x)
    path = tmp_path / "learner.pt"
    learner.save_checkpoint(path)
    restored = OnlineLearner.load_checkpoint(path)
    assert restored.updates == learner.updates and len(restored.replay) == len(learner.replay)
    torch.testing.assert_close(restored.score(x, x).forecast, learner.score(x, x).forecast)
    # Continuing from the checkpoint is the same as continuing without it.
    a, b = learner.update(x, x), restored.update(x, x)
    assert a == pytest.approx(b)


class _Exploit:
    def __reduce__(self):
        return (exec, ("import sys; sys.exit('pickle payload executed')",))


def test_malicious_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _Exploit()}, path)
    with pytest.raises(pickle.UnpicklingError):
        OnlineLearner.load_checkpoint(path)


def test_update_forecasts_with_derived_targets_matches_update():
    x = _pattern("A", 96, 0)
    by_sequence, explicit = _learner(seed=3), _learner(seed=3)
    by_sequence.update(x, x)
    future, mask = forecast_targets(x, horizon=1)
    explicit.update_forecasts(x, future, mask)
    for a, b in zip(by_sequence.model.parameters(), explicit.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_update_forecasts_never_learns_from_masked_targets():
    x = _pattern("A", 64, 0)
    future, mask = forecast_targets(x, horizon=1)
    mask[:, 40:] = False
    poisoned = future.clone()
    poisoned[:, 40:] = 1e6  # values a delayed target has not delivered yet
    clean_learner, poisoned_learner = _learner(seed=4), _learner(seed=4)
    clean_learner.update_forecasts(x, future, mask)
    poisoned_learner.update_forecasts(x, poisoned, mask)
    for a, b in zip(clean_learner.model.parameters(), poisoned_learner.model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="future and mask must be"):
        poisoned_learner.update_forecasts(x, future[:, :10], mask[:, :10])


def _fleet_file(lines: int, length: int, inputs: int, targets: int, generator: torch.Generator):
    """A plant file's batch: right-padded lines of random lengths, irregular Δt."""
    u = torch.randn(lines, length, inputs, generator=generator)
    y = torch.randn(lines, length, targets, generator=generator)
    dt = torch.rand(lines, length, generator=generator) + 0.5
    steps = torch.arange(length)[None] < torch.randint(1, length + 1, (lines, 1), generator=generator)
    return u, y, dt, steps


def _fleet_learner(**overrides) -> OnlineLearner:
    torch.manual_seed(5)
    model = LRUForecaster(ModelConfig(n_inputs=5, n_targets=3, d_model=8, d_state=8, **overrides.pop("model", {})))
    settings = {"learning_rate": 1e-2, "window": 32, "replay_capacity": 64, "replay_batch": 4} | overrides
    return OnlineLearner(model, LearnerConfig(**settings))


def test_an_update_learning_from_the_scoring_forward_equals_one_that_runs_it_again():
    """A plant file of short lines (one window, one step): the update that takes the scoring
    pass's forecast and graph moves the weights, the replay and the figures exactly as the update
    that runs the same forward itself, file after file, from the states carried between them."""
    again, reused = _fleet_learner(), _fleet_learner()
    forwards = {"again": 0, "reused": 0}
    for name, learner in (("again", again), ("reused", reused)):
        learner.model.register_forward_hook(lambda *_, name=name: forwards.__setitem__(name, forwards[name] + 1))
    generator = torch.Generator().manual_seed(11)
    carried_again = carried_reused = None
    for _ in range(3):
        u, y, dt, steps = _fleet_file(40, 24, 5, 3, generator)
        scored_again = again.score(u, y, carried_again, dt, steps)
        scored_reused, scoring = reused.score_for_update(u, y, carried_reused, dt, steps)
        assert scoring is not None and scoring.forecast.requires_grad
        assert not scored_reused.forecast.requires_grad  # what the alarms and output read is plain
        before = dict(forwards)
        figures_again = again.update(u, y, carried_again, dt, steps)
        figures_reused = reused.update(u, y, carried_reused, dt, steps, scoring=scoring)
        # The update's own forward (replayed windows aside) ran in one learner only.
        assert forwards["reused"] - before["reused"] == forwards["again"] - before["again"] - 1
        assert figures_reused == figures_again
        assert torch.equal(scored_reused.scores.nan_to_num(-1.0), scored_again.scores.nan_to_num(-1.0))
        for a, b in zip(again.model.parameters(), reused.model.parameters(), strict=True):
            assert torch.equal(a, b)
        carried_again, carried_reused = scored_again.state, scored_reused.state
    assert len(again.replay) == len(reused.replay) > 0


@pytest.mark.parametrize(
    ("overrides", "length"),
    [({}, 40), ({"lines_per_step": 10}, 24), ({"model": {"dropout": 0.1}}, 24)],
    ids=["longer-than-a-window", "several-steps", "dropout"],
)
def test_no_scoring_graph_where_the_update_runs_another_forward(overrides, length):
    learner = _fleet_learner(**overrides)
    u, y, dt, steps = _fleet_file(40, length, 5, 3, torch.Generator().manual_seed(1))
    scored, scoring = learner.score_for_update(u, y, None, dt, steps)
    assert scoring is None
    assert torch.equal(scored.scores.nan_to_num(-1.0), learner.score(u, y, None, dt, steps).scores.nan_to_num(-1.0))


def test_a_scoring_graph_of_other_weights_or_another_batch_is_refused():
    learner = _fleet_learner()
    generator = torch.Generator().manual_seed(2)
    u, y, dt, steps = _fleet_file(40, 24, 5, 3, generator)
    _, scoring = learner.score_for_update(u, y, None, dt, steps)
    learner.update(u, y, None, dt, steps)  # the weights move after the graph was made
    with pytest.raises(ValueError, match="changed since"):
        learner.update(u, y, None, dt, steps, scoring=scoring)
    _, fresh = learner.score_for_update(u, y, None, dt, steps)
    with pytest.raises(ValueError, match="another batch"):
        learner.update(u[:20], y[:20], None, dt[:20], steps[:20], scoring=fresh)
    with pytest.raises(ValueError, match="one window and one step"):
        learner.update(u, y, None, dt, steps, lines_per_step=5, scoring=fresh)
