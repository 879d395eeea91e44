"""Hindsight: each row's readings predicted from the rows on both sides of it, never from itself.

The online forecaster judges a row from the rows before it; once the rows after it have landed,
the row can be judged from both sides (the job issue 39 gives BLUR). For row t of a window:
- a forward LRU reads rows 0 … t−1; its state after row t−1, decayed over the gap to row t
  (Λ^Δt), is what the past says about row t;
- a backward LRU reads rows T−1 … t+1 in reverse; its state after row t+1, decayed over the
  gap from t to t+1, is what the future says;
- a head maps both to row t's readings (on the forecaster's standardised scale).
Neither state has seen row t, so a reading cannot be copied into its own prediction.

Sources: each source's sensors (a line's vibration, its hydraulics …) have an encoder of their
own (a two-layer MLP over the readings and their present flags), and a source that did not
report at a row (none of its readings present) adds nothing there. The encoders are nonlinear,
so they do not collapse into one linear map over the concatenated sensors.

Batches are B lines right-padded to T rows with a step mask: padding carries each direction's
state unchanged (Λ^0, no input), so a line's predictions do not depend on the padding or on the
other lines in the batch. Δt (the gap before each row, in the time scale's units) sets the decay
in both directions.

This module is the model only; scoring closed windows, verdicts on alarm episodes and the
pipeline's use of them are not built yet (see the issue's notes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lru_online.layer import LRU


@dataclass(frozen=True)
class HindsightConfig:
    d_model: int = 16  # width of the source encodings the LRUs read
    d_state: int = 32  # complex state of each direction
    r_min: float = 0.5  # eigenvalue moduli of both LRUs: memories of ~2 to ~100 rows
    r_max: float = 0.99


class HindsightModel(nn.Module):
    def __init__(self, sources: dict[str, list[int]], config: HindsightConfig | None = None) -> None:
        """sources: each source's name and its sensors' columns in the readings (together,
        each column once)."""
        super().__init__()
        config = config or HindsightConfig()
        columns = sorted(c for cs in sources.values() for c in cs)
        if not sources or columns != list(range(len(columns))):
            raise ValueError(f"HindsightModel sources must cover columns 0..S-1 once each, got {sources}")
        self.config = config
        self.sensors = len(columns)
        self.sources = {name: list(cs) for name, cs in sources.items()}
        self.encoders = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Linear(2 * len(cs), config.d_model), nn.GELU(), nn.Linear(config.d_model, config.d_model)
                )
                for name, cs in self.sources.items()
            }
        )
        self.forward_lru = LRU(config.d_model, config.d_state, config.r_min, config.r_max, readout=False)
        self.backward_lru = LRU(config.d_model, config.d_state, config.r_min, config.r_max, readout=False)
        self.head = nn.Sequential(
            nn.Linear(4 * config.d_state, config.d_model), nn.GELU(), nn.Linear(config.d_model, self.sensors)
        )

    def encode(self, readings: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model): the sum of the sources' encodings; a source contributes at a row only
        where one of its readings is present."""
        filled = torch.where(present, readings, 0.0)
        total = 0.0
        for name, columns in self.sources.items():
            own = present[..., columns]
            encoded = self.encoders[name](torch.cat([filled[..., columns], own.to(filled.dtype)], -1))
            total = total + encoded * own.any(-1, keepdim=True).to(encoded.dtype)
        return total

    def priors(
        self, readings: torch.Tensor, present: torch.Tensor, dt: torch.Tensor, steps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the rows before and after each row say about it: the forward state after row
        t−1 decayed by Δt_t, and the backward state after row t+1 decayed by Δt_{t+1}; complex
        (B, T, N) each, zero where a side has no rows."""
        encoded = self.encode(readings, present)
        dt = dt.to(readings.dtype)
        forward, _ = self.forward_lru.states(encoded, dt=dt, steps=steps)
        before = torch.cat([torch.zeros_like(forward[:, :1]), forward[:, :-1]], 1)
        past = self.forward_lru.decay(dt.masked_fill(~steps, 0)) * before
        # Backwards, the gap absorbed before row t is the one from t to t+1: row t+1's Δt.
        gap_after = torch.cat([dt[:, 1:], torch.zeros_like(dt[:, :1])], 1)
        reversed_steps = steps.flip(1)
        backward, _ = self.backward_lru.states(encoded.flip(1), dt=gap_after.flip(1), steps=reversed_steps)
        after = torch.cat([torch.zeros_like(backward[:, :1]), backward[:, :-1]], 1)
        future = self.backward_lru.decay(gap_after.flip(1).masked_fill(~reversed_steps, 0)) * after
        return past, future.flip(1)

    def forward(
        self, readings: torch.Tensor, present: torch.Tensor, dt: torch.Tensor, steps: torch.Tensor
    ) -> torch.Tensor:
        """readings (B, T, S) standardised (NaN or anything where absent), present (B, T, S)
        bool, dt (B, T) the gap before each row, steps (B, T) False at padding. Returns each
        row's predicted readings (B, T, S)."""
        past, future = self.priors(readings, present, dt, steps)
        both = torch.cat([past.real, past.imag, future.real, future.imag], -1)
        return self.head(both)

    def residuals(
        self, readings: torch.Tensor, present: torch.Tensor, dt: torch.Tensor, steps: torch.Tensor
    ) -> torch.Tensor:
        """Reading minus its hindsight prediction, (B, T, S); NaN where absent or padding."""
        residual = readings - self(readings, present, dt, steps)
        return torch.where(present & steps[..., None], residual, torch.nan)

    def loss(
        self, readings: torch.Tensor, present: torch.Tensor, dt: torch.Tensor, steps: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared residual over the present readings of real rows."""
        used = present & steps[..., None]
        error = torch.where(used, readings - self(readings, present, dt, steps), 0.0)
        return (error**2).sum() / used.sum().clamp(min=1)


def train_hindsight(
    model: HindsightModel,
    readings: torch.Tensor,
    present: torch.Tensor,
    dt: torch.Tensor,
    steps: torch.Tensor,
    epochs: int,
    learning_rate: float = 3e-3,
) -> list[float]:
    """Full-batch Adam on the windows given (B lines at once); the loss of each epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    losses = []
    for _ in range(epochs):
        loss = model.loss(readings, present, dt, steps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
