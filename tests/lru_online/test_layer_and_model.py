import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lru_online import LRU, LRUBlock, LRUForecaster, ModelConfig, RecurrentState
from tests.lru_online.reference import numpy_scan


def _double(module):
    return module.double().eval()


def test_ring_initialisation_and_stability():
    torch.manual_seed(0)
    layer = LRU(8, 4096, r_min=0.4, r_max=0.9, max_phase=math.pi / 3)
    lam = layer.decay()
    modulus, phase = lam.abs(), lam.angle()
    assert modulus.min() >= 0.4 - 1e-6 and modulus.max() <= 0.9 + 1e-6
    assert phase.min() >= 0 and phase.max() <= math.pi / 3 + 1e-6
    # |λ|² is uniform on [r_min², r_max²]: its mean sits at the midpoint.
    assert abs(float((modulus.detach() ** 2).mean()) - (0.16 + 0.81) / 2) < 0.02
    torch.testing.assert_close(torch.exp(layer.gamma_log), torch.sqrt(1 - modulus**2))
    # |λ| < 1 for any parameter value, by construction.
    with torch.no_grad():
        layer.nu_log.fill_(-30.0)
    assert layer.decay().abs().max() <= 1.0


def test_lru_layer_matches_its_equations():
    torch.manual_seed(1)
    layer = _double(LRU(5, 7))
    u = torch.randn(2, 40, 5, dtype=torch.float64)
    h0 = torch.randn(2, 7, dtype=torch.complex128)
    y, h_last = layer(u, h0)
    B = (layer.B_re + 1j * layer.B_im).detach() * torch.exp(layer.gamma_log).detach()[:, None]
    C = (layer.C_re + 1j * layer.C_im).detach()
    drive = torch.einsum("nh,bth->btn", B, u.to(torch.complex128))
    h = numpy_scan(layer.decay().detach(), drive, h0)
    expected = np.einsum("hn,btn->bth", C.numpy(), h).real + layer.D.detach().numpy() * u.numpy()
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(h_last.detach().numpy(), h[:, -1], rtol=1e-10, atol=1e-10)


def test_continuous_time_decay():
    torch.manual_seed(2)
    layer = _double(LRU(3, 6))
    u = torch.randn(2, 30, 3, dtype=torch.float64)
    # Unit steps reproduce the discrete layer.
    y_discrete, h_discrete = layer(u)
    y_unit, h_unit = layer(u, dt=torch.ones(2, 30, dtype=torch.float64))
    torch.testing.assert_close(y_unit, y_discrete)
    torch.testing.assert_close(h_unit, h_discrete)
    # Irregular steps decay by λ^Δt, checked against the loop with explicit powers.
    dt = torch.rand(2, 30, dtype=torch.float64) * 3
    _, h_last = layer(u, dt=dt)
    # λ^Δt on the parameter's own phase θ (not the principal branch of log λ):
    # |λ|^Δt · exp(i Δt θ).
    modulus = layer.decay().detach().abs()
    theta = torch.exp(layer.theta_log.detach())
    per_step = torch.polar(modulus ** dt[..., None], dt[..., None] * theta)
    drive = layer.input_drive(u).detach()
    np.testing.assert_allclose(h_last.detach().numpy(), numpy_scan(per_step, drive)[:, -1], rtol=1e-10)


def test_rounded_spacings_give_the_powers_and_gradients_of_each_step():
    # A plant file: 300 lines x 40 rows whose times are rounded to 0.1 s, so a few hundred
    # spacings repeat over 12,000 steps (the layer takes Λ^Δt once per distinct spacing).
    torch.manual_seed(4)
    layer = _double(LRU(3, 6))
    u = torch.randn(300, 40, 3, dtype=torch.float64)
    gaps = torch.distributions.Exponential(0.1).sample((300, 40)).clamp(min=0.5)
    dt = (gaps.round(decimals=1) / 10).to(torch.float64)
    assert torch.unique(dt).numel() * 8 <= dt.numel()
    y, h_last = layer(u, dt=dt)
    (y.sum() + h_last.abs().sum()).backward()
    computed = [p.grad.clone() for p in (layer.nu_log, layer.theta_log)]
    layer.zero_grad()
    # The reference: every step's own power, |λ|^Δt · exp(i Δt θ), through the same scan.
    modulus = torch.exp(-torch.exp(layer.nu_log))
    theta = torch.exp(layer.theta_log)
    per_step = torch.polar(modulus ** dt[..., None], dt[..., None] * theta)
    drive = layer.input_drive(u)
    states = torch.zeros(300, 6, dtype=torch.complex128)
    every = []
    for t in range(40):
        states = per_step[:, t] * states + drive[:, t]
        every.append(states)
    expected = layer.readout(torch.stack(every, 1), u)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_last, states, rtol=1e-12, atol=1e-12)
    (expected.sum() + states.abs().sum()).backward()
    for got, want in zip(computed, (layer.nu_log.grad, layer.theta_log.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _model(horizon=2, layers=3, n_inputs=4, n_targets=3, dropout=0.0):
    torch.manual_seed(3)
    config = ModelConfig(
        n_inputs=n_inputs,
        n_targets=n_targets,
        d_model=12,
        d_state=10,
        n_layers=layers,
        horizon=horizon,
        dropout=dropout,
    )
    return _double(LRUForecaster(config))


@settings(max_examples=20, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=119), max_size=5, unique=True),
    use_dt=st.booleans(),
)
def test_chunk_invariance_layer_block_stack_model(cuts, use_dt):
    gen = torch.Generator().manual_seed(len(cuts))
    u = torch.randn(2, 120, 4, dtype=torch.float64, generator=gen)
    dt = torch.rand(2, 120, dtype=torch.float64, generator=gen) * 2 if use_dt else None
    bounds = [0, *sorted(cuts), 120]
    model = _model()

    def pieces(run, first_state):
        outputs, state = [], first_state
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            out, state = run(u[:, lo:hi], state, None if dt is None else dt[:, lo:hi])
            outputs.append(out)
        return torch.cat(outputs, dim=1), state

    layer = model.blocks[0].lru
    encoded = model.encoder(u)
    whole, last = layer(encoded, None, dt)
    split, split_last = pieces(lambda x, h, d: layer(model.encoder(x), h, d), None)
    torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(split_last, last, rtol=1e-10, atol=1e-10)

    def stack(x, hidden, d):
        x = model.encoder(x)
        hidden = hidden or [None] * len(model.blocks)
        new = []
        for block, h in zip(model.blocks, hidden, strict=True):
            x, h = block(x, h, d)
            new.append(h)
        return x, new

    whole_stack, whole_hidden = stack(u, None, dt)
    split_stack, split_hidden = pieces(stack, None)
    torch.testing.assert_close(split_stack, whole_stack, rtol=1e-10, atol=1e-10)
    for a, b in zip(split_hidden, whole_hidden, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

    whole_forecast, whole_state = model(u, None, dt)
    split_forecast, split_state = pieces(model, None)
    torch.testing.assert_close(split_forecast, whole_forecast, rtol=1e-10, atol=1e-10)
    for a, b in zip(split_state.hidden, whole_state.hidden, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_scores_stream_across_batches():
    model = _model()
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(2, 60, 4, dtype=torch.float64, generator=gen)
    targets = u[..., :3]
    whole = model.score(u, targets)
    first = model.score(u[:, :25], targets[:, :25])
    second = model.score(u[:, 25:], targets[:, 25:], first.state)
    assert torch.isnan(whole.scores[:, 0]).all()  # no forecast exists for the very first event
    torch.testing.assert_close(torch.cat([first.scores, second.scores], 1), whole.scores, equal_nan=True)
    manual = ((targets[:, 25] - first.forecast[:, -1, 0]) ** 2).mean(-1)
    torch.testing.assert_close(second.scores[:, 0], manual)


@pytest.mark.parametrize("use_dt", [False, True])
def test_step_equals_forward(use_dt):
    model = _model()
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(3, 40, 4, dtype=torch.float64, generator=gen)
    dt = torch.rand(3, 40, dtype=torch.float64, generator=gen) + 0.1 if use_dt else None
    forecast, final = model(u, None, dt)
    state, outputs = model.initial_state(3), []
    for t in range(40):
        out, state = model.step(u[:, t], state, None if dt is None else dt[:, t])
        outputs.append(out)
    torch.testing.assert_close(torch.stack(outputs, 1), forecast, rtol=1e-10, atol=1e-10)
    for a, b in zip(state.hidden, final.hidden, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    single, _ = model(u[:, :1], None, None if dt is None else dt[:, :1])
    step_out, _ = model.step(u[:, 0], None, None if dt is None else dt[:, 0])
    torch.testing.assert_close(step_out, single[:, 0])


def test_block_is_residual_with_glu():
    torch.manual_seed(6)
    block = _double(LRUBlock(6, 5))
    x = torch.randn(2, 10, 6, dtype=torch.float64)
    out, _ = block(x)
    y, _ = block.lru(block.norm(x))
    gate = block.gate(torch.nn.functional.gelu(y))
    expected = x + gate[..., :6] * torch.sigmoid(gate[..., 6:])
    torch.testing.assert_close(out, expected)


def test_state_serialises_without_pickle_and_moves():
    model = _model()
    _, state = model(torch.randn(2, 9, 4, dtype=torch.float64))
    restored = RecurrentState.from_bytes(state.to_bytes())
    for a, b in zip(restored.hidden, state.hidden, strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype
    assert torch.equal(restored.last_forecast, state.last_forecast)
    moved = state.to("meta")
    assert all(h.device.type == "meta" for h in moved.hidden)
    assert not any(h.requires_grad for h in state.detach().hidden)
    rows = state.unbind()
    assert len(rows) == 2 and rows[1].hidden[0].shape == (1, 10)
    rejoined = RecurrentState.cat(rows)
    assert all(torch.equal(a, b) for a, b in zip(rejoined.hidden, state.hidden, strict=True))


def test_wrong_state_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="state layer 0 has shape"):
        model(
            torch.randn(2, 5, 4, dtype=torch.float64),
            RecurrentState([torch.zeros(2, 3, dtype=torch.complex128)] * 3),
        )
    with pytest.raises(ValueError, match="model input must be"):
        model(torch.randn(2, 5, 7, dtype=torch.float64))
