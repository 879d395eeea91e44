"""Step-loop reference scan: one time step at a time, autograd through plain torch ops.

It is slow and exists so that every fast backend can be checked against something obviously
right; production code never selects it implicitly.
"""

from __future__ import annotations

import torch


def reference_scan(lam: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    batch, _, channels = x.shape
    h = h0 if h0 is not None else x.new_zeros(batch, channels)
    # unbind, not x[:, t]: indexing one step at a time makes autograd build a full-size
    # gradient per step, which turns the backward pass quadratic in T.
    steps = x.unbind(1)
    decays = lam.unbind(1) if lam.dim() == 3 else [lam] * len(steps)
    states = []
    for decay, x_t in zip(decays, steps, strict=True):
        h = decay * h + x_t
        states.append(h)
    return torch.stack(states, dim=1), h
