"""lru_online.adamw.AdamW against torch.optim.AdamW, the independent reference: the same
parameters after the same gradients, and each one's state dict continued by the other."""

import io
import subprocess
import sys

import pytest
import torch

from lru_online import LRUForecaster, ModelConfig
from lru_online.adamw import AdamW


def _model(seed: int = 0) -> LRUForecaster:
    torch.manual_seed(seed)
    return LRUForecaster(ModelConfig(n_inputs=3, n_targets=2, d_model=8, d_state=8, n_layers=2, horizon=2))


def _gradients(model: LRUForecaster, steps: int, seed: int) -> list[list[torch.Tensor | None]]:
    """Random gradients per step; every third step one parameter has none (it is skipped)."""
    generator = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    return [
        [
            None if (step % 3 == 2 and i == 1) else torch.randn(p.shape, generator=generator, dtype=p.dtype)
            for i, p in enumerate(params)
        ]
        for step in range(steps)
    ]


def _run(model: LRUForecaster, optimizer, gradients) -> None:
    for grads in gradients:
        optimizer.zero_grad(set_to_none=True)
        for param, grad in zip(model.parameters(), grads, strict=True):
            param.grad = None if grad is None else grad.clone()
        optimizer.step()


def _through_a_checkpoint(state: dict) -> dict:
    """As the learner's checkpoints store it: torch.save, then a load of plain data only."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _same(a: LRUForecaster, b: LRUForecaster) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_the_same_steps_as_torch_optim_adamw():
    ours, reference = _model(), _model()
    gradients = _gradients(ours, 25, seed=1)
    _run(ours, AdamW(ours.parameters(), lr=1e-2, weight_decay=0.05), gradients)
    _run(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.05), gradients)
    _same(ours, reference)
    assert not torch.equal(next(ours.parameters()), next(_model().parameters()))  # it did move


@pytest.mark.parametrize("first", ["ours", "torch"])
def test_a_state_dict_continues_in_the_other(first):
    """Checkpoints written before this class (torch.optim's) load into it, and back."""
    kinds = {"ours": AdamW, "torch": torch.optim.AdamW}
    second = "torch" if first == "ours" else "ours"
    a, b = _model(), _model()
    gradients = _gradients(a, 20, seed=2)
    opt_a = kinds[first](a.parameters(), lr=3e-3, weight_decay=0.01)
    _run(a, opt_a, gradients[:10])
    b.load_state_dict(a.state_dict())
    opt_b = kinds[second](b.parameters(), lr=1.0, weight_decay=0.5)  # the state dict's settings win
    opt_b.load_state_dict(_through_a_checkpoint(opt_a.state_dict()))
    assert opt_b.param_groups[0]["lr"] == 3e-3 and opt_b.param_groups[0]["weight_decay"] == 0.01
    _run(a, opt_a, gradients[10:])
    _run(b, opt_b, gradients[10:])
    _same(a, b)


def test_a_state_dict_with_a_flag_it_does_not_implement_is_refused():
    model = _model()
    reference = torch.optim.AdamW(model.parameters(), amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW(model.parameters()).load_state_dict(reference.state_dict())


def test_a_learner_does_not_import_torch_dynamo():
    """The reason for the class: torch.optim's optimizers import torch._dynamo (over a second)."""
    code = (
        "import sys, torch\n"
        "from lru_online import LRUForecaster, ModelConfig, OnlineLearner\n"
        "learner = OnlineLearner(LRUForecaster(ModelConfig(n_inputs=2, n_targets=1, d_model=4, d_state=4)))\n"
        "u, y = torch.randn(2, 12, 2), torch.randn(2, 12, 1)\n"
        "learner.update(u, y, learner.model.initial_state(2))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
