"""BLUR multi-source fusion (Liu et al. 2025, arXiv 2504.08964) over closed windows.

Per-source encoders map each source to a shared width; a forward LRU and a backward LRU read
the same window in opposite directions; a combination module (concat → projection → GELU)
merges them into per-step fused features, mean-pooled into a sequence-level output. The
backward direction sees the future of the window, so this is for sequence-level tasks, never
for the causal online path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from lru_online.layer import LRU


@dataclass
class FusionOutput:
    features: torch.Tensor  # (B, T, d_model) fused per-step features
    pooled: torch.Tensor  # (B, d_model) mean over time
    output: torch.Tensor  # (B, n_outputs) sequence-level head


class BLURFusion(nn.Module):
    def __init__(
        self,
        source_dims: dict[str, int],
        d_model: int,
        d_state: int,
        n_outputs: int,
        r_min: float = 0.0,
        r_max: float = 1.0,
        max_phase: float = 2 * math.pi,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        if not source_dims:
            raise ValueError("BLURFusion needs at least one source")
        self.encoders = nn.ModuleDict({name: nn.Linear(dim, d_model) for name, dim in source_dims.items()})
        self.norm = nn.LayerNorm(d_model)
        self.forward_lru = LRU(d_model, d_state, r_min, r_max, max_phase, scan_backend)
        self.backward_lru = LRU(d_model, d_state, r_min, r_max, max_phase, scan_backend)
        self.combine = nn.Linear(2 * d_model, d_model)
        self.head = nn.Linear(d_model, n_outputs)

    def encode(self, sources: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the per-source encodings on the common time grid, (B, T, d_model)."""
        missing = set(self.encoders) - set(sources)
        extra = set(sources) - set(self.encoders)
        if missing or extra:
            raise ValueError(f"BLURFusion sources mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}")
        shapes = {name: tuple(t.shape[:2]) for name, t in sources.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"BLURFusion sources must share (B, T); got {shapes}")
        return sum(self.encoders[name](sources[name]) for name in self.encoders)

    def directions(self, sources: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward-in-time and backward-in-time LRU outputs, both (B, T, d_model)."""
        x = self.norm(self.encode(sources))
        forward_out, _ = self.forward_lru(x)
        backward_out, _ = self.backward_lru(x.flip(1))
        return forward_out, backward_out.flip(1)

    def forward(self, sources: dict[str, torch.Tensor]) -> FusionOutput:
        forward_out, backward_out = self.directions(sources)
        features = F.gelu(self.combine(torch.cat([forward_out, backward_out], dim=-1)))
        pooled = features.mean(dim=1)
        return FusionOutput(features, pooled, self.head(pooled))
