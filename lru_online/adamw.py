"""AdamW (decoupled weight decay) for the online learner, without torch.optim.

Why not `torch.optim.AdamW`: constructing any torch.optim optimizer imports `torch._dynamo`
(torch's `_disable_dynamo` wrapper on the optimizer's methods), 1.1-1.4 s on 2 cores, paid by
every process that loads a learner: each `lru-online run`, `backfill` and retraining, before its
first row. Nothing else on the pipeline's path imports it. The update below is the one
`torch.optim.AdamW` makes by default on CPU (its single-tensor path: no AMSGrad, no maximise),
operation for operation (on CUDA torch's default is its multi-tensor path: the same update, not
checked bit for bit there), and `state_dict` / `load_state_dict` read and write torch.optim's
layout, so checkpoints written by either load into the other
(tests/lru_online/test_adamw.py checks both against torch.optim.AdamW).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# torch.optim's flags that this update does not implement: a state dict that sets one is refused.
_UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable")
# What torch.optim.AdamW writes beside the settings of a group, for a state dict it can read.
_TORCH_GROUP_FLAGS = dict.fromkeys(_UNSUPPORTED, False) | {
    "foreach": None,
    "fused": None,
    "decoupled_weight_decay": True,
}


class AdamW:
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        params = list(params)
        if not params:
            raise ValueError("AdamW got an empty parameter list")
        self.param_groups: list[dict] = [
            {"params": params, "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        ]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state.get(param)
                if state is None:  # as torch.optim: a step counter, zero moments
                    state = self.state[param] = {
                        "step": torch.tensor(0.0, dtype=torch.float32),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                    }
                grad, exp_avg, exp_avg_sq, value = param.grad, state["exp_avg"], state["exp_avg_sq"], param
                if torch.is_complex(param):
                    grad, exp_avg = torch.view_as_real(grad), torch.view_as_real(exp_avg)
                    exp_avg_sq, value = torch.view_as_real(exp_avg_sq), torch.view_as_real(param)
                state["step"] += 1
                if decay != 0:
                    value.mul_(1 - lr * decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = state["step"].item()
                step_size = lr / (1 - beta1**step)
                denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
                value.addcdiv_(exp_avg, denom, value=-step_size)

    def state_dict(self) -> dict:
        """torch.optim's layout: per-parameter state keyed by the parameter's index, the groups
        with their parameters as indices."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [
            {k: v for k, v in g.items() if k != "params"}
            | _TORCH_GROUP_FLAGS
            | {"params": [index[id(p)] for p in g["params"]]}
            for g in self.param_groups
        ]
        state = {index[id(p)]: dict(s) for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Reads a state dict of this class or of torch.optim.Adam(W) with the same parameters."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(own["params"]) for saved, own in zip(groups, self.param_groups, strict=True)
        ):
            raise ValueError("AdamW.load_state_dict: the saved parameter groups do not match this model's")
        for saved in groups:
            flags = [flag for flag in _UNSUPPORTED if saved.get(flag)]
            if flags or saved.get("decoupled_weight_decay") is False:
                raise ValueError(f"AdamW.load_state_dict: saved optimizer uses {flags or 'coupled weight decay'}")
        params = {}
        for saved, own in zip(groups, self.param_groups, strict=True):
            for key in ("lr", "betas", "eps", "weight_decay"):
                own[key] = tuple(saved[key]) if key == "betas" else saved[key]
            params.update(zip(saved["params"], own["params"], strict=True))
        self.state = {}
        for key, saved_state in state_dict["state"].items():
            param = params[int(key)]
            self.state[param] = {
                "step": torch.as_tensor(saved_state["step"], dtype=torch.float32).detach().clone().cpu(),
                "exp_avg": saved_state["exp_avg"].detach().to(param.device, param.dtype).clone(),
                "exp_avg_sq": saved_state["exp_avg_sq"].detach().to(param.device, param.dtype).clone(),
            }
