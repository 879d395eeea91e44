"""A linear state-space path from the inputs straight to the forecast, beside the LRU blocks.

h_t = Λ h_{t-1} + γ ⊙ (B v_t) over the chosen input columns v_t, and the forecast
W [Re h_t, Im h_t, v_t] + b: a linear filter of the whole input history, read out without a
norm or a nonlinearity. The blocks' forecast comes out of a LayerNorm, so its size cannot follow
a series that turns more volatile than it was in training; this path's can (the role of the
autoregressive "highway" in LSTNet, Lai et al. 2018). Its readout starts at zero, so adding the
path leaves a model's first forecasts as the blocks make them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lru_online.layer import LRU


class LinearPath(nn.Module):
    def __init__(
        self,
        columns: tuple[int, ...],
        d_state: int,
        n_outputs: int,
        r_min: float = 0.0,
        r_max: float = 1.0,
        max_phase: float = 2 * math.pi,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        self.columns = tuple(columns)
        self.recurrence = LRU(len(self.columns), d_state, r_min, r_max, max_phase, scan_backend, readout=False)
        self.readout = nn.Linear(2 * d_state + len(self.columns), n_outputs)
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)

    @property
    def d_state(self) -> int:
        return self.recurrence.d_state

    def zero_state(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        return self.recurrence.zero_state(batch, device)

    def _read(self, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.cat([h.real, h.imag, v], dim=-1))

    def forward(
        self,
        u: torch.Tensor,
        h0: torch.Tensor | None = None,
        dt: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """u: (B, T, n_inputs). Returns the path's output (B, T, n_outputs) and the last state."""
        v = u[..., list(self.columns)]
        h, h_last = self.recurrence.states(v, h0, dt, steps)
        return self._read(h, v), h_last

    def step(
        self, u_t: torch.Tensor, h: torch.Tensor, dt_t: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One event u_t (B, n_inputs). Returns the output (B, n_outputs) and the new state."""
        v = u_t[..., list(self.columns)]
        h_new = self.recurrence.next_state(v, h, dt_t)
        return self._read(h_new, v), h_new
