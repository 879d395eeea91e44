import numpy as np
import pytest
import torch

from lru_online import BLURFusion
from tests.lru_online.reference import numpy_scan


def _fusion():
    torch.manual_seed(0)
    return BLURFusion({"temperature": 2, "vibration": 3, "current": 1}, d_model=8, d_state=6, n_outputs=4).double()


def _sources(batch=2, length=25):
    gen = torch.Generator().manual_seed(1)
    return {
        "temperature": torch.randn(batch, length, 2, dtype=torch.float64, generator=gen),
        "vibration": torch.randn(batch, length, 3, dtype=torch.float64, generator=gen),
        "current": torch.randn(batch, length, 1, dtype=torch.float64, generator=gen),
    }


def test_backward_direction_is_a_reverse_time_recurrence():
    fusion, sources = _fusion(), _sources()
    _, backward_out = fusion.directions(sources)
    x = fusion.norm(fusion.encode(sources)).detach()
    lru = fusion.backward_lru
    drive = lru.input_drive(x).detach()
    # Independent loop running from the end of the window to its start: h_t = λ h_{t+1} + drive_t.
    h = numpy_scan(lru.decay().detach(), drive.flip(1))[:, ::-1]
    C = (lru.C_re + 1j * lru.C_im).detach().numpy()
    expected = np.einsum("hn,btn->bth", C, h).real + lru.D.detach().numpy() * x.numpy()
    np.testing.assert_allclose(backward_out.detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    # The last step of the backward direction sees only the last input.
    changed = {k: v.clone() for k, v in sources.items()}
    changed["vibration"][:, 0] += 5.0
    _, backward_changed = fusion.directions(changed)
    torch.testing.assert_close(backward_changed[:, -1], backward_out[:, -1])
    assert not torch.allclose(backward_changed[:, 0], backward_out[:, 0])


def test_forward_direction_is_causal():
    fusion, sources = _fusion(), _sources()
    forward_out, _ = fusion.directions(sources)
    changed = {k: v.clone() for k, v in sources.items()}
    changed["current"][:, -1] += 5.0
    forward_changed, _ = fusion.directions(changed)
    torch.testing.assert_close(forward_changed[:, :-1], forward_out[:, :-1])


def test_every_source_contributes_gradient():
    fusion, sources = _fusion(), _sources()
    out = fusion(sources)
    assert out.features.shape == (2, 25, 8) and out.pooled.shape == (2, 8) and out.output.shape == (2, 4)
    out.output.pow(2).sum().backward()
    for name, encoder in fusion.encoders.items():
        assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0, name
    for lru in (fusion.forward_lru, fusion.backward_lru):
        assert lru.nu_log.grad.abs().sum() > 0


def test_sources_must_match():
    fusion, sources = _fusion(), _sources()
    with pytest.raises(ValueError, match="missing \\['current'\\]"):
        fusion({k: v for k, v in sources.items() if k != "current"})
    sources["current"] = sources["current"][:, :10]
    with pytest.raises(ValueError, match="must share"):
        fusion(sources)
