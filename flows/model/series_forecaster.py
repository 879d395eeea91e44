"""Forecasters of one multivariate series under an online protocol: what the series ensemble
(flows.model.series_ensemble) combines, and persistence, the floor every member must beat.

A series forecaster is fitted once on the rows before the stream, then, window by window, it
forecasts the next H rows from the rows it has been handed and learns a window once that
window's whole target is among them (test-then-train). Which rows it is handed, and when, is the
protocol's business (`bench/ett.py`'s fsnet and delayed): a forecaster only ever sees `history`,
the series cut at the last row it may see. Windows are named by the row of their first target
step; values are standardised rows, shape (rows, columns).
"""

from __future__ import annotations

import numpy as np


class SeriesForecaster:
    """Forecasts H rows ahead and, when `learns`, learns from each window handed to it."""

    learns = False

    def fit(self, series: np.ndarray, horizon: int, train_rows: int) -> None:
        """Before the stream: train on rows [0, train_rows), validate on the rest of `series`."""

    def forecast(self, history: np.ndarray, horizon: int) -> np.ndarray:
        """Rows len(history) … len(history)+H-1, shape (H, columns)."""
        raise NotImplementedError

    def learn(self, history: np.ndarray, window: int, horizon: int) -> None:
        """Learn the window starting at `window`; its whole target lies inside `history`."""

    def rescore(self, series: np.ndarray, starts: range, horizon: int) -> np.ndarray:
        """Forecasts of the given windows as the forecaster stands now (frozen), (len(starts), H, columns)."""
        return np.stack([self.forecast(series[:s], horizon) for s in starts])


class Persistence(SeriesForecaster):
    """The last row repeated over the horizon."""

    def forecast(self, history: np.ndarray, horizon: int) -> np.ndarray:
        return np.repeat(history[-1:], horizon, axis=0)


class SeasonalPersistence(SeriesForecaster):
    """Each step's row one period earlier: the latest row at the same phase of the period (the
    same hour yesterday, for a daily period), repeated a period back as often as the horizon needs.
    Why beside the learned members: it needs no fit, so a series that wanders far from its
    training range (a load 50 deviations out) leaves it as good as ever wherever the period
    repeats, while a learned member is still catching up."""

    def __init__(self, period: int) -> None:
        if period < 1:
            raise ValueError(f"period must be >= 1 row, got {period}")
        self.period = period

    def forecast(self, history: np.ndarray, horizon: int) -> np.ndarray:
        steps = np.arange(horizon)
        back = self.period * (steps // self.period + 1) - steps  # rows before len(history)
        rows = len(history) - back
        # Before a whole period has passed, the latest row stands in (persistence).
        return history[np.where(rows >= 0, rows, len(history) - 1)]


def target_windows(series: np.ndarray, starts: range, horizon: int) -> np.ndarray:
    """The rows each window forecasts, (len(starts), H, columns)."""
    return np.stack([series[s : s + horizon] for s in starts])
