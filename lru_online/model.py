"""The streaming forecaster: input projection → LRU blocks → forecast head, and optionally a
linear state-space path beside them (lru_online.linear_path), with carried state.

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
from lru_online.linear_path import LinearPath
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
    # The linear path beside the blocks (lru_online.linear_path): its state size (0: none) and
    # the input columns it reads (None: all). With it, n_layers may be 0: a linear forecaster.
    linear_state: int = 0
    linear_inputs: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("n_inputs", "n_targets", "d_model", "d_state", "horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_layers", "linear_state"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.n_layers == 0 and self.linear_state == 0:
            raise ValueError("ModelConfig needs n_layers >= 1 or a linear path (linear_state >= 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.r_min < self.r_max <= 1.0:
            raise ValueError(f"ModelConfig needs 0 <= r_min < r_max <= 1, got r_min={self.r_min}, r_max={self.r_max}")
        if self.max_phase <= 0:
            raise ValueError(f"ModelConfig.max_phase must be positive, got {self.max_phase}")
        if self.linear_inputs is not None:
            columns = tuple(int(c) for c in self.linear_inputs)  # a checkpoint may hold a list
            if not columns or len(set(columns)) != len(columns) or not all(0 <= c < self.n_inputs for c in columns):
                raise ValueError(
                    f"ModelConfig.linear_inputs must be distinct input columns in [0, {self.n_inputs}), got {columns}"
                )
            object.__setattr__(self, "linear_inputs", columns)

    @property
    def linear_columns(self) -> tuple[int, ...]:
        return self.linear_inputs if self.linear_inputs is not None else tuple(range(self.n_inputs))

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
    """Encoder → LRU blocks → LayerNorm → head, plus the optional linear path; the forecast is
    the sum of the two. The carried state holds one hidden state per block, then the path's."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        outputs = config.horizon * config.n_targets
        # Built in this order so that a seed gives the weights it gave before the linear path.
        if config.n_layers:
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
        if config.n_layers:
            self.norm = nn.LayerNorm(config.d_model)
            self.head = nn.Linear(config.d_model, outputs)
        self.linear_path = (
            LinearPath(
                config.linear_columns,
                config.linear_state,
                outputs,
                config.r_min,
                config.r_max,
                config.max_phase,
                config.scan_backend,
            )
            if config.linear_state
            else None
        )

    @property
    def state_sizes(self) -> list[int]:
        """The size of each hidden state the model carries, in the order of RecurrentState.hidden."""
        sizes = [block.lru.d_state for block in self.blocks]
        return sizes + ([self.linear_path.d_state] if self.linear_path is not None else [])

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> RecurrentState:
        hidden = [block.lru.zero_state(batch, device) for block in self.blocks]
        if self.linear_path is not None:
            hidden.append(self.linear_path.zero_state(batch, device))
        return RecurrentState(hidden)

    def _check_state(self, state: RecurrentState, batch: int) -> None:
        sizes = self.state_sizes
        if len(state.hidden) != len(sizes):
            raise ValueError(f"state has {len(state.hidden)} layers, the model {len(sizes)}")
        for index, (h, size) in enumerate(zip(state.hidden, sizes, strict=True)):
            if tuple(h.shape) != (batch, size):
                raise ValueError(f"state layer {index} has shape {tuple(h.shape)}, expected {(batch, size)}")

    def _forecast_shape(self, out: torch.Tensor) -> torch.Tensor:
        return out.unflatten(-1, (self.config.horizon, self.config.n_targets))

    def forward(
        self,
        u: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RecurrentState]:
        """u: (B, T, n_inputs); dt: optional (B, T). Returns forecasts (B, T, horizon, n_targets).

        steps: optional (B, T) bool for right-padded sequences of different lengths, False at
        padding. Every layer carries its state unchanged through padded steps, and the carried
        forecast is each row's at its own last real step (the one carried in, for a row without
        any), so each row ends exactly as it would have run alone.
        """
        if u.dim() != 3 or u.shape[-1] != self.config.n_inputs:
            raise ValueError(f"model input must be (B, T, {self.config.n_inputs}), got {tuple(u.shape)}")
        if steps is not None and tuple(steps.shape) != tuple(u.shape[:2]):
            raise ValueError(f"steps must be {tuple(u.shape[:2])}, got {tuple(steps.shape)}")
        state = state if state is not None else self.initial_state(u.shape[0], u.device)
        self._check_state(state, u.shape[0])
        hidden, outputs = [], []
        if self.blocks:
            x = self.encoder(u)
            for block, h0 in zip(self.blocks, state.hidden, strict=False):
                x, h_last = block(x, h0, dt, steps)
                hidden.append(h_last)
            outputs.append(self.head(self.norm(x)))
        if self.linear_path is not None:
            out, h_last = self.linear_path(u, state.hidden[-1], dt, steps)
            hidden.append(h_last)
            outputs.append(out)
        forecast = self._forecast_shape(sum(outputs))
        return forecast, RecurrentState(hidden, last_real_forecast(forecast, steps, state.last_forecast))

    def step(
        self,
        u_t: torch.Tensor,
        state: RecurrentState | None = None,
        dt_t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RecurrentState]:
        """One event u_t (B, n_inputs), dt_t optional (B,). Returns (B, horizon, n_targets)."""
        state = state if state is not None else self.initial_state(u_t.shape[0], u_t.device)
        self._check_state(state, u_t.shape[0])
        hidden, outputs = [], []
        if self.blocks:
            x = self.encoder(u_t)
            for block, h in zip(self.blocks, state.hidden, strict=False):
                x, h_new = block.step(x, h, dt_t)
                hidden.append(h_new)
            outputs.append(self.head(self.norm(x)))
        if self.linear_path is not None:
            out, h_new = self.linear_path.step(u_t, state.hidden[-1], dt_t)
            hidden.append(h_new)
            outputs.append(out)
        forecast = self._forecast_shape(sum(outputs))
        return forecast, RecurrentState(hidden, forecast)

    def score(
        self,
        u: torch.Tensor,
        targets: torch.Tensor,
        state: RecurrentState | None = None,
        dt: torch.Tensor | None = None,
        steps: torch.Tensor | None = None,
    ) -> ScoredSequence:
        """Forecasts and anomaly scores of a sequence; targets: (B, T, n_targets). Residuals
        and scores are NaN at padded steps."""
        previous = state.last_forecast if state is not None else None
        forecast, new_state = self(u, state, dt, steps)
        residuals = one_step_residuals(forecast, targets, previous)
        if steps is not None:
            residuals = residuals.masked_fill(~steps.unsqueeze(-1), float("nan"))
        # Sensors that did not report at an event (NaN target) do not count towards its score.
        return ScoredSequence(forecast, residuals, residuals.pow(2).nanmean(-1), new_state)


def last_real_forecast(
    forecast: torch.Tensor, steps: torch.Tensor | None, carried: torch.Tensor | None
) -> torch.Tensor:
    """Each row's forecast at its last real step; a row without one keeps what it carried in
    (NaN when nothing was carried: no forecast to score its next event against)."""
    if steps is None:
        return forecast[:, -1]
    length = steps.shape[1]
    # Index of the last True per row (0 for a row with none, replaced below).
    last = (length - 1) - steps.flip(1).to(torch.int8).argmax(1)
    picked = forecast[torch.arange(forecast.shape[0], device=forecast.device), last]
    empty = ~steps.any(1)
    if not bool(empty.any()):
        return picked
    kept = carried.to(picked.dtype) if carried is not None else torch.full_like(picked, float("nan"))
    return torch.where(empty[:, None, None], kept, picked)
