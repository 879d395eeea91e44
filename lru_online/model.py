"""The streaming forecaster: input projection → LRU blocks → forecast head, with carried state.

At each event t it forecasts the next `horizon` target vectors. The anomaly score of event t
is the mean squared residual between what arrived and the one-step forecast made at t-1; the
last forecast is part of the carried state, so scores stream exactly across batches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lru_online.block import LRUBlock
from lru_online.state import RecurrentState


@dataclass(frozen=True)
class ModelConfig:
    n_inputs: int
    n_targets: int
    d_model: int = 64
    d_state: int = 64
    n_layers: int = 2
    horizon: int = 1
    dropout: float = 0.0
    r_min: float = 0.5
    r_max: float = 0.99
    max_phase: float = math.pi
    scan_backend: str | None = None

    def __post_init__(self) -> None:
        for name in ("n_inputs", "n_targets", "d_model", "d_state", "n_layers", "horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScoredSequence:
    forecast: torch.Tensor  # (B, T, horizon, targets): made at t for t+1 .. t+horizon
    residuals: torch.Tensor  # (B, T, targets): target_t - forecast made at t-1 (NaN if none)
    scores: torch.Tensor  # (B, T): mean squared residual over the targets present, else NaN
    state: RecurrentState


def one_step_residuals(
    forecast: torch.Tensor, targets: torch.Tensor, previous_forecast: torch.Tensor | None
) -> torch.Tensor:
    """target_t minus the one-step forecast made at t-1 (for t = 0: the carried forecast)."""
    batch, _, n_targets = targets.shape
    if previous_forecast is None:
        first = targets.new_full((batch, 1, n_targets), float("nan"))
    else:
        first = previous_forecast[:, None, 0, :].to(targets.dtype)
    predicted = torch.cat([first, forecast[:, :-1, 0, :]], dim=1)
    return targets - predicted


class LRUForecaster(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = nn.Linear(config.n_inputs, config.d_model)
        self.blocks = nn.ModuleList(
            LRUBlock(
                config.d_model,
                config.d_state,
                config.dropout,
                config.r_min,
                config.r_max,
                config.max_phase,
                config.scan_backend,
            )
            for _ in range(config.n_layers)
        )
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.horizon * config.n_targets)

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> RecurrentState:
        return RecurrentState([block.lru.zero_state(batch, device) for block in self.blocks])

    def _check_state(self, state: RecurrentState, batch: int) -> None:
        if len(state.hidden) != len(self.blocks):
            raise ValueError(f"state has {len(state.hidden)} layers, the model {len(self.blocks)}")
        for index, (h, block) in enumerate(zip(state.hidden, self.blocks, strict=True)):
            if tuple(h.shape) != (batch, block.lru.d_state):
                raise ValueError(
                    f"state layer {index} has shape {tuple(h.shape)}, expected {(batch, block.lru.d_state)}"
                )

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.norm(x))
        return out.unflatten(-1, (self.config.horizon, self.config.n_targets))

    def forward(
        self,
        u: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RecurrentState]:
        """u: (B, T, n_inputs); dt: optional (B, T). Returns forecasts (B, T, horizon, n_targets)."""
        if u.dim() != 3 or u.shape[-1] != self.config.n_inputs:
            raise ValueError(f"model input must be (B, T, {self.config.n_inputs}), got {tuple(u.shape)}")
        state = state if state is not None else self.initial_state(u.shape[0], u.device)
        self._check_state(state, u.shape[0])
        x = self.encoder(u)
        hidden = []
        for block, h0 in zip(self.blocks, state.hidden, strict=True):
            x, h_last = block(x, h0, dt)
            hidden.append(h_last)
        forecast = self._head(x)
        return forecast, RecurrentState(hidden, forecast[:, -1])

    def step(
        self,
        u_t: torch.Tensor,
        state: RecurrentState | None = None,
        dt_t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RecurrentState]:
        """One event u_t (B, n_inputs), dt_t optional (B,). Returns (B, horizon, n_targets)."""
        state = state if state is not None else self.initial_state(u_t.shape[0], u_t.device)
        self._check_state(state, u_t.shape[0])
        x = self.encoder(u_t)
        hidden = []
        for block, h in zip(self.blocks, state.hidden, strict=True):
            x, h_new = block.step(x, h, dt_t)
            hidden.append(h_new)
        forecast = self._head(x)
        return forecast, RecurrentState(hidden, forecast)

    def score(
        self,
        u: torch.Tensor,
        targets: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
    ) -> ScoredSequence:
        """Forecasts and anomaly scores of a sequence; targets: (B, T, n_targets)."""
        previous = state.last_forecast if state is not None else None
        forecast, new_state = self(u, state, dt)
        residuals = one_step_residuals(forecast, targets, previous)
        # Sensors that did not report at an event (NaN target) do not count towards its score.
        return ScoredSequence(forecast, residuals, residuals.pow(2).nanmean(-1), new_state)
