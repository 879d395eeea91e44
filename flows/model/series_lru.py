"""The LRU forecaster and its online learner on one series, window by window: at each event it
forecasts the next H rows as changes from the event's row, the recurrent state carried through
every row of the series. Online, each learned window backpropagates its loss through the
`window` rows before it, starting from the state carried there (truncated BPTT); replay and EWC
are the learner's own.

It is the ETT ensemble's LRU member (flows.model.series_ensemble), with LRU blocks or with the
model's linear path alone. The pipeline runs the same model and learner batched over lines
(flows.model.fleet); this one serves a single series under a protocol that hands it windows.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from flows.model.series_forecaster import SeriesForecaster, target_windows
from lru_online.learner import LearnerConfig, OnlineLearner
from lru_online.model import LRUForecaster, ModelConfig
from lru_online.state import RecurrentState


@dataclass(frozen=True)
class SeriesLruConfig:
    d_model: int = 64
    d_state: int = 64
    n_layers: int = 2
    r_min: float = 0.5  # eigenvalue moduli at initialisation: how long the state remembers
    r_max: float = 0.99
    window: int = 48  # rows of truncated BPTT behind each learned window
    fit_learning_rate: float = 1e-3
    fit_epochs: int = 20
    online_learning_rate: float = 1e-4
    grad_clip: float | None = 1.0
    dropout: float = 0.0
    inputs: str = "levels"  # levels | changes | both
    linear_state: int = 0  # the model's linear path (0: none); it reads the inputs' changes
    channel_independent: bool = False
    newest_events: int = 1  # events of the BPTT window that carry loss at each online step
    replay_batch: int = 0
    replay_capacity: int = 512
    ewc_weight: float = 0.0
    ewc_every: int = 720  # online steps between EWC consolidations
    seed: int = 0

    def __post_init__(self) -> None:
        if self.inputs not in ("levels", "changes", "both"):
            raise ValueError(f"SeriesLruConfig.inputs must be levels, changes or both, got {self.inputs!r}")
        if self.linear_state and self.inputs == "levels":
            raise ValueError("SeriesLruConfig.linear_state needs inputs 'changes' or 'both'")


def change_targets(history: np.ndarray, first: int, end: int, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the forecaster learns at events [first, end): the next H rows minus the event's own
    row (as NLinear subtracts the last value: the model learns changes, not levels), and a mask
    that is false where a target row lies beyond `history`. Both (1, T, H, columns)."""
    events = np.arange(first, end)
    rows = events[:, None] + 1 + np.arange(horizon)[None]  # (T, H)
    inside = rows < len(history)
    values = history[np.minimum(rows, len(history) - 1)] - history[events][:, None]
    mask = np.broadcast_to(inside[..., None], values.shape)
    return torch.from_numpy(np.where(mask, values, 0.0).astype(np.float32))[None], torch.from_numpy(mask.copy())[None]


class LruSeriesForecaster(SeriesForecaster):
    learns = True

    def __init__(self, config: SeriesLruConfig | None = None) -> None:
        self.config = config or SeriesLruConfig()

    def fit(self, series: np.ndarray, horizon: int, train_rows: int) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        columns = series.shape[1]
        features = 2 if c.inputs == "both" else 1
        model = LRUForecaster(
            ModelConfig(
                n_inputs=features if c.channel_independent else features * columns,
                n_targets=1 if c.channel_independent else columns,
                d_model=c.d_model,
                d_state=c.d_state,
                n_layers=c.n_layers,
                horizon=horizon,
                r_min=c.r_min,
                r_max=c.r_max,
                dropout=c.dropout,
                linear_state=c.linear_state,
                linear_inputs=self.change_columns(columns) if c.linear_state else None,
            )
        )
        self.learner = OnlineLearner(
            model,
            LearnerConfig(
                learning_rate=c.fit_learning_rate,
                window=c.window,
                replay_batch=c.replay_batch,
                replay_capacity=c.replay_capacity,
                replay_weight=1.0 if c.replay_batch else 0.0,
                ewc_weight=c.ewc_weight,
                grad_clip=c.grad_clip,
                seed=c.seed,
            ),
        )
        train = self._inputs(series, 0, train_rows)
        future, mask = self._targets(series[:train_rows], 0, train_rows, horizon)
        valid = range(train_rows, len(series) - horizon + 1)
        best = (math.inf, None)
        for _ in range(c.fit_epochs):
            self.learner.update_forecasts(train, future, mask)
            error = float(np.mean((self._frozen(series, valid, horizon) - target_windows(series, valid, horizon)) ** 2))
            if error < best[0]:
                best = (error, {k: v.clone() for k, v in model.state_dict().items()})
        model.load_state_dict(best[1])
        # The fit's reservoir holds training windows only; the online phase starts with it.
        self.learner.set_learning_rate(c.online_learning_rate)
        if c.ewc_weight > 0:
            self.learner.consolidate_forecasts(train, future, mask)
        self.states: deque[tuple[int, RecurrentState | None]] = deque(maxlen=c.window + horizon + 2)
        self.state: RecurrentState | None = None
        self.consumed = 0
        self.online_steps = 0

    # Layout: one sequence of all columns, or (channel_independent) each column its own sequence
    # in the batch, sharing the weights, as PatchTST and NLinear treat multivariate series.
    def _inputs(self, history: np.ndarray, first: int, end: int) -> torch.Tensor:
        """Model inputs for rows [first, end): the rows, their changes from the row before (which
        stay in range when the levels drift away from the training months), or both."""
        rows = history[first:end]
        before = history[first - 1 : end - 1] if first > 0 else np.concatenate([history[:1], history[: end - 1]])
        parts = {"levels": [rows], "changes": [rows - before], "both": [rows, rows - before]}[self.config.inputs]
        stacked = np.stack(parts, axis=-1)  # (T, columns, features)
        if self.config.channel_independent:
            return torch.from_numpy(np.ascontiguousarray(stacked.transpose(1, 0, 2)))
        return torch.from_numpy(np.ascontiguousarray(stacked.reshape(len(rows), -1)))[None]

    def change_columns(self, columns: int) -> tuple[int, ...]:
        """Where the rows' changes lie among the model inputs (see `_inputs`): the linear path
        reads them alone, so that its forecast of the next changes does not hang on the levels,
        which drift away from the training months."""
        features = 2 if self.config.inputs == "both" else 1
        per_sequence = 1 if self.config.channel_independent else columns
        return tuple(column * features + features - 1 for column in range(per_sequence))

    def _targets(self, history: np.ndarray, first: int, end: int, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
        future, mask = change_targets(history, first, end, horizon)  # (1, T, H, columns)
        if self.config.channel_independent:
            return future.permute(3, 1, 2, 0).contiguous(), mask.permute(3, 1, 2, 0).contiguous()
        return future, mask

    def _rows(self, forecast: torch.Tensor) -> np.ndarray:
        """Model forecasts (B, …, H, n) as (…, H, columns)."""
        if self.config.channel_independent:
            return np.moveaxis(forecast[..., 0].numpy(), 0, -1)
        return forecast[0].numpy()

    def _frozen(self, series: np.ndarray, starts: range, horizon: int) -> np.ndarray:
        """Forecasts of the given windows by the current weights, state from row 0."""
        end = starts[-1]
        inputs = self._inputs(series, 0, end)
        scored = self.learner.score(inputs, torch.zeros((*inputs.shape[:2], self.learner.model.config.n_targets)))
        events = np.asarray(starts) - 1  # event t forecasts rows t+1 …, as changes from row t
        return self._rows(scored.forecast)[events] + series[events][:, None]

    def _advance(self, history: np.ndarray) -> None:
        """Carries the state through the rows not yet consumed, keeping recent states by row."""
        keep = self.states.maxlen
        bulk_end = len(history) - keep
        if bulk_end > self.consumed:
            self.state = self.learner.model(self._inputs(history, self.consumed, bulk_end), self.state)[1]
            self.consumed = bulk_end
        while self.consumed < len(history):
            self.states.append((self.consumed, self.state))
            self.state = self.learner.model(self._inputs(history, self.consumed, self.consumed + 1), self.state)[1]
            self.consumed += 1

    def forecast(self, history: np.ndarray, horizon: int) -> np.ndarray:
        with torch.no_grad():
            self._advance(history)
        return history[-1] + self._rows(self.state.last_forecast)

    def _state_before(self, row: int) -> RecurrentState | None:
        for consumed, state in self.states:
            if consumed == row:
                return state
        return None

    def learn(self, history: np.ndarray, window: int, horizon: int) -> None:
        c = self.config
        first = window - c.window  # BPTT over the rows [first, window): event window-1 forecasts `window`
        state = self._state_before(first)
        if first < 0 or state is None:
            return
        future, mask = self._targets(history, first, window, horizon)
        mask[:, : c.window - c.newest_events] = False
        self.learner.update_forecasts(self._inputs(history, first, window), future, mask, state)
        self.online_steps += 1
        if c.ewc_weight > 0 and self.online_steps % c.ewc_every == 0:
            # From a zero state: the states kept reach back one window only, and the recurrence
            # forgets its start within a few hundred rows.
            recent = history[-c.ewc_every :]
            future, mask = self._targets(recent, 0, len(recent), horizon)
            self.learner.consolidate_forecasts(self._inputs(recent, 0, len(recent)), future, mask)

    def rescore(self, series: np.ndarray, starts: range, horizon: int) -> np.ndarray:
        return self._frozen(series, starts, horizon)
