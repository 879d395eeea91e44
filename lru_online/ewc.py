"""Online elastic weight consolidation (Kirkpatrick et al. 2017; Schwarz et al. 2018).

A diagonal Fisher estimate from squared gradients, decayed and accumulated at each
consolidation, anchors the weights that mattered for earlier data:
penalty = weight / 2 · Σ F_i (θ_i − θ*_i)².
Each fresh estimate is scaled to mean 1 over all weights: squared gradients of a model that
already fits are tiny and vary with the loss scale, and the normalised form keeps `weight`
meaningful across data sets while preserving which weights matter more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class EWCPenalty:
    def __init__(self, weight: float, decay: float = 0.9) -> None:
        if weight < 0 or not 0.0 <= decay <= 1.0:
            raise ValueError(f"EWC needs weight >= 0 and decay in [0, 1], got {weight}, {decay}")
        self.weight = weight
        self.decay = decay
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.weight > 0 and bool(self.anchor)

    def consolidate(self, model: nn.Module, losses: Iterable[Callable[[], torch.Tensor]]) -> None:
        """Accumulates the Fisher estimate over the given loss closures and re-anchors."""
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        estimate = {name: torch.zeros_like(p) for name, p in params.items()}
        count = 0
        for loss_fn in losses:
            model.zero_grad(set_to_none=True)
            loss_fn().backward()
            for name, p in params.items():
                if p.grad is not None:
                    estimate[name] += p.grad.detach() ** 2
            count += 1
        model.zero_grad(set_to_none=True)
        if count == 0:
            return
        total = sum(float(v.sum()) for v in estimate.values())
        size = sum(v.numel() for v in estimate.values())
        scale = size / total if total > 0 else 0.0
        for name, value in estimate.items():
            previous = self.fisher.get(name)
            fresh = value * scale
            self.fisher[name] = fresh if previous is None else self.decay * previous + fresh
            self.anchor[name] = params[name].detach().clone()

    def penalty(self, model: nn.Module) -> torch.Tensor:
        terms = [
            (self.fisher[name] * (p - self.anchor[name]) ** 2).sum()
            for name, p in model.named_parameters()
            if name in self.anchor
        ]
        if not terms:
            return torch.zeros(())
        return 0.5 * self.weight * torch.stack(terms).sum()

    def state_dict(self) -> dict:
        return {
            "weight": self.weight,
            "decay": self.decay,
            "fisher": dict(self.fisher),
            "anchor": dict(self.anchor),
        }

    def load_state_dict(self, state: dict) -> None:
        self.weight = float(state["weight"])
        self.decay = float(state["decay"])
        self.fisher = dict(state["fisher"])
        self.anchor = dict(state["anchor"])
