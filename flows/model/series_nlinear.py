"""NLinear (Zeng et al. 2023) for one series, fitted before the stream and updated by SGD on each
window it is handed: one linear map from the last `lookback` rows to the next H, shared by every
column, on values minus the last row (changes, so that a level the training rows never showed
is no extrapolation).

It is the ETT ensemble's linear member (flows.model.series_ensemble). The pipeline's per-line
linear member is lru_online.online_linear: learnt from zero weights by normalised LMS, batched
over lines, with no fit and no learning rate; this one is fitted with Adam and early stopping
on the rows before the stream, as the published online protocols allow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from flows.model.series_forecaster import SeriesForecaster, target_windows


@dataclass(frozen=True)
class NLinearConfig:
    lookback: int = 60
    fit_epochs: int = 30
    fit_learning_rate: float = 1e-3
    online_learning_rate: float = 1e-3
    seed: int = 0


class OnlineNLinear(SeriesForecaster):
    learns = True

    def __init__(self, config: NLinearConfig | None = None) -> None:
        self.config = config or NLinearConfig()

    def _inputs(self, series: np.ndarray, starts) -> torch.Tensor:
        lookback = self.config.lookback
        windows = np.stack([series[s - lookback : s] for s in starts])  # (n, lookback, C)
        return torch.from_numpy(windows).transpose(1, 2)  # (n, C, lookback)

    def _predict(self, inputs: torch.Tensor) -> torch.Tensor:
        last = inputs[..., -1:]
        return (self.linear(inputs - last) + last).transpose(-1, -2)  # (n, H, C)

    def fit(self, series: np.ndarray, horizon: int, train_rows: int) -> None:
        torch.manual_seed(self.config.seed)
        c = self.config
        self.linear = torch.nn.Linear(c.lookback, horizon)
        train = range(c.lookback, train_rows - horizon + 1)
        valid = range(train_rows, len(series) - horizon + 1)
        x_train, y_train = self._inputs(series, train), torch.from_numpy(target_windows(series, train, horizon))
        x_valid, y_valid = self._inputs(series, valid), torch.from_numpy(target_windows(series, valid, horizon))
        optimizer = torch.optim.Adam(self.linear.parameters(), lr=c.fit_learning_rate)
        generator = torch.Generator().manual_seed(c.seed)
        best = (math.inf, None)
        for _ in range(c.fit_epochs):
            for batch in torch.randperm(len(train), generator=generator).split(32):
                loss = torch.nn.functional.mse_loss(self._predict(x_train[batch]), y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                valid_loss = float(torch.nn.functional.mse_loss(self._predict(x_valid), y_valid))
            if valid_loss < best[0]:
                best = (valid_loss, {k: v.clone() for k, v in self.linear.state_dict().items()})
        self.linear.load_state_dict(best[1])
        self.optimizer = torch.optim.SGD(self.linear.parameters(), lr=c.online_learning_rate)

    def forecast(self, history: np.ndarray, horizon: int) -> np.ndarray:
        with torch.no_grad():
            return self._predict(self._inputs(history, [len(history)]))[0].numpy()

    def learn(self, history: np.ndarray, window: int, horizon: int) -> None:
        target = torch.from_numpy(history[window : window + horizon])[None]
        loss = torch.nn.functional.mse_loss(self._predict(self._inputs(history, [window])), target)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
