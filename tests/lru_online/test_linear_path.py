"""The linear path beside the LRU blocks, and models that carry it."""

import numpy as np
import pytest
import torch

from lru_online import LearnerConfig, LRUForecaster, ModelConfig, OnlineLearner, RecurrentState
from lru_online.linear_path import LinearPath
from tests.lru_online.reference import numpy_scan


def _randomise_readout(module: torch.nn.Module, seed: int) -> None:
    """The readouts start at zero; tests give them weights so that every term shows."""
    gen = torch.Generator().manual_seed(seed)
    for path in [m for m in module.modules() if isinstance(m, LinearPath)]:
        with torch.no_grad():
            path.readout.weight.copy_(torch.randn(path.readout.weight.shape, generator=gen, dtype=torch.float64))
            path.readout.bias.copy_(torch.randn(path.readout.bias.shape, generator=gen, dtype=torch.float64))


def _model(n_layers: int, linear_state: int, linear_inputs=None, horizon: int = 2) -> LRUForecaster:
    torch.manual_seed(11)
    config = ModelConfig(
        n_inputs=4,
        n_targets=3,
        d_model=12,
        d_state=10,
        n_layers=n_layers,
        horizon=horizon,
        linear_state=linear_state,
        linear_inputs=linear_inputs,
    )
    model = LRUForecaster(config).double().eval()
    _randomise_readout(model, 12)
    return model


def test_linear_path_matches_its_equations():
    torch.manual_seed(1)
    path = LinearPath((2, 0), d_state=6, n_outputs=5, r_min=0.3, r_max=0.95).double()
    _randomise_readout(path, 2)
    u = torch.randn(2, 30, 4, dtype=torch.float64)
    h0 = torch.randn(2, 6, dtype=torch.complex128)
    out, h_last = path(u, h0)

    lru = path.recurrence
    v = u[..., [2, 0]].numpy()  # the chosen columns, in the order given
    gain = (lru.B_re + 1j * lru.B_im).detach().numpy() * np.exp(lru.gamma_log.detach().numpy())[:, None]
    drive = torch.from_numpy(np.einsum("nk,btk->btn", gain, v))
    h = numpy_scan(lru.decay().detach(), drive, h0)
    features = np.concatenate([h.real, h.imag, v], axis=-1)
    expected = features @ path.readout.weight.detach().numpy().T + path.readout.bias.detach().numpy()
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(h_last.detach().numpy(), h[:, -1], rtol=1e-10, atol=1e-10)


def test_a_new_path_leaves_the_blocks_forecast_as_it_was():
    u = torch.randn(2, 20, 4, dtype=torch.float64)
    torch.manual_seed(11)
    blocks_only = LRUForecaster(ModelConfig(n_inputs=4, n_targets=3, d_model=12, d_state=10)).double()
    torch.manual_seed(11)
    with_path = LRUForecaster(ModelConfig(n_inputs=4, n_targets=3, d_model=12, d_state=10, linear_state=5)).double()
    # Same seed, same block weights (the path is built last); its zero readout adds nothing.
    torch.testing.assert_close(with_path(u)[0], blocks_only(u)[0])
    assert [tuple(h.shape) for h in with_path(u)[1].hidden] == [(2, 10), (2, 10), (2, 5)]


def test_a_linear_only_model_is_linear_in_its_inputs():
    model = _model(n_layers=0, linear_state=8)
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randn(2, 25, 4, dtype=torch.float64, generator=gen) for _ in range(2))
    bias = model(torch.zeros_like(a))[0]  # the readout's bias, at every event
    torch.testing.assert_close(model(3 * a - 2 * b)[0] - bias, 3 * (model(a)[0] - bias) - 2 * (model(b)[0] - bias))
    # The blocks are not: the same check fails for a model that has them.
    blocks = _model(n_layers=1, linear_state=8)
    bias = blocks(torch.zeros_like(a))[0]
    assert not torch.allclose(blocks(3 * a)[0] - bias, 3 * (blocks(a)[0] - bias))


def test_the_path_reads_only_its_columns():
    model = _model(n_layers=0, linear_state=8, linear_inputs=[1, 3])
    assert model.config.linear_inputs == (1, 3)  # a list (as from a checkpoint) becomes a tuple
    u = torch.randn(2, 15, 4, dtype=torch.float64)
    other = u.clone()
    other[..., [0, 2]] = torch.randn(2, 15, 2, dtype=torch.float64)
    torch.testing.assert_close(model(other)[0], model(u)[0])
    other[..., 3] += 1.0
    assert not torch.allclose(model(other)[0], model(u)[0])


@pytest.mark.parametrize("n_layers", [0, 2])
def test_state_streams_across_cuts_and_steps(n_layers):
    model = _model(n_layers=n_layers, linear_state=7)
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(2, 50, 4, dtype=torch.float64, generator=gen)
    dt = torch.rand(2, 50, dtype=torch.float64, generator=gen) + 0.2
    whole, whole_state = model(u, None, dt)
    pieces, state = [], None
    for lo, hi in [(0, 13), (13, 14), (14, 50)]:
        out, state = model(u[:, lo:hi], state, dt[:, lo:hi])
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-10, atol=1e-10)
    stepped, state = [], model.initial_state(2)
    for t in range(50):
        out, state = model.step(u[:, t], state, dt[:, t])
        stepped.append(out)
    torch.testing.assert_close(torch.stack(stepped, 1), whole, rtol=1e-10, atol=1e-10)
    for a, b in zip(state.hidden, whole_state.hidden, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    restored = RecurrentState.from_bytes(whole_state.to_bytes())
    torch.testing.assert_close(model(u[:, :5], restored)[0], model(u[:, :5], whole_state)[0])


def test_a_state_without_the_path_is_refused():
    model = _model(n_layers=1, linear_state=7)
    blocks_state = RecurrentState([torch.zeros(2, 10, dtype=torch.complex128)])
    with pytest.raises(ValueError, match="state has 1 layers, the model 2"):
        model(torch.randn(2, 5, 4, dtype=torch.float64), blocks_state)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_layers": 0}, "n_layers >= 1 or a linear path"),
        ({"linear_state": -1}, "linear_state must be >= 0"),
        ({"linear_state": 4, "linear_inputs": [0, 4]}, r"linear_inputs must be distinct input columns in \[0, 4\)"),
        ({"linear_state": 4, "linear_inputs": [1, 1]}, "linear_inputs must be distinct"),
        ({"linear_state": 4, "linear_inputs": []}, "linear_inputs must be distinct"),
    ],
)
def test_bad_linear_path_settings_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(n_inputs=4, n_targets=3, **fields)


def test_checkpoint_and_replay_carry_the_path(tmp_path):
    torch.manual_seed(2)
    model = LRUForecaster(
        ModelConfig(n_inputs=3, n_targets=3, d_model=8, d_state=6, n_layers=1, linear_state=5, linear_inputs=(0, 2))
    )
    learner = OnlineLearner(model, LearnerConfig(window=10, replay_batch=2, replay_capacity=16, learning_rate=1e-2))
    x = torch.randn(1, 40, 3)
    learner.update(x, x)
    learner.update(x, x)
    # Every replayed window holds the states of both the block and the path where it began.
    assert len(learner.replay) > 0
    assert all({k for k in w if k.startswith("hidden.")} == {"hidden.0", "hidden.1"} for w in learner.replay.windows)
    window = learner.replay.windows[0]
    stored = RecurrentState([window["hidden.0"][None], window["hidden.1"][None]])
    assert stored.hidden[1].shape == (1, 5)

    path = tmp_path / "learner.pt"
    learner.save_checkpoint(path)
    restored = OnlineLearner.load_checkpoint(path)
    assert restored.model.config == model.config
    probe = torch.randn(1, 12, 3)
    torch.testing.assert_close(restored.model(probe)[0], model(probe)[0])
    # The path learned: its readout is no longer the zero it started from.
    assert restored.model.linear_path.readout.weight.abs().sum() > 0
