"""Residual LRU block: norm → LRU → GELU → GLU → dropout → residual.

LayerNorm acts on each time step alone, so the block stays causal and streams exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lru_online.layer import LRU


class LRUBlock(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int,
        dropout: float = 0.0,
        r_min: float = 0.0,
        r_max: float = 1.0,
        max_phase: float = 2 * math.pi,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.lru = LRU(d_model, d_state, r_min, r_max, max_phase, scan_backend)
        self.gate = nn.Linear(d_model, 2 * d_model)
        self.dropout = nn.Dropout(dropout)

    def _mix(self, y: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.glu(self.gate(F.gelu(y)), dim=-1))

    def forward(
        self,
        x: torch.Tensor,
        h0: torch.Tensor | None = None,
        dt: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Outputs at padded steps are computed but never reach a state: the next block masks
        # them out as well (a zero input would not be enough, LayerNorm maps it elsewhere).
        y, h_last = self.lru(self.norm(x), h0, dt, steps)
        return x + self._mix(y), h_last

    def step(
        self, x_t: torch.Tensor, h: torch.Tensor, dt_t: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, h_new = self.lru.step(self.norm(x_t), h, dt_t)
        return x_t + self._mix(y), h_new
