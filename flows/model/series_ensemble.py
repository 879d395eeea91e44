"""Series forecasters side by side on one series, combined per horizon step and column by their
recent losses (lru_online.mixture, one line), as OneNet does: the ETT bench's `lru` method.

Each member forecasts and learns under the protocol as if alone; a window's member forecasts
are judged when the window is learned, so under a delayed protocol the weights use only
targets that have arrived. The losses start from each member's error on the validation rows of
its fit.

No member can poison the combination: the mixture gives a member whose forecast is not finite
or leaves the bound of the values seen weight 0 and charges its loss clipped (see
lru_online.mixture); after the window is learned such a member is reset to its last snapshot,
taken every `SNAPSHOT_WINDOWS` windows over which it stayed healthy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch

from flows.model.series_forecaster import SeriesForecaster, target_windows
from lru_online.mixture import MixtureConfig
from lru_online.paced_mixture import PacedMixture, PacedMixtureConfig


class SeriesEnsemble(SeriesForecaster):
    learns = True
    SNAPSHOT_WINDOWS = 96  # healthy windows between snapshots (four days of an hourly series)

    def __init__(
        self,
        members: dict[str, SeriesForecaster],
        combine: MixtureConfig | PacedMixtureConfig,
        record: bool = False,
        weights_counted_from: int = 0,
    ) -> None:
        self.members = members
        self.mixture = PacedMixture(PacedMixtureConfig.of(combine))
        self.record = record  # keep every window's member forecasts (to replay other settings)
        self.weights_counted_from = weights_counted_from  # first window start `mean_weights` averages

    def fit(self, series: np.ndarray, horizon: int, train_rows: int) -> None:
        valid = range(train_rows, len(series) - horizon + 1)
        truth = target_windows(series, valid, horizon)
        losses = []
        for member in self.members.values():
            member.fit(series, horizon, train_rows)
            losses.append(np.mean((member.rescore(series, valid, horizon) - truth) ** 2, axis=0))
        self.starting_losses = np.stack(losses)
        self.state = self.mixture.fresh(1, torch.from_numpy(self.starting_losses))
        self.state = self.mixture.seen(self.state, torch.from_numpy(series[None]))
        self.seen = len(series)
        # window start → the members' clipped forecasts (1, K, H, C) and the levels' (1, L, H, C)
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # (window start, the members' clipped forecasts (K, H, C), which of them were healthy (K,))
        self.recorded: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.weight_sums = np.zeros(len(self.members))
        self.weighted_windows = 0
        self.snapshots = {name: copy.deepcopy(member) for name, member in self.members.items()}
        self.healthy_windows = dict.fromkeys(self.members, 0)
        self.diverged: set[str] = set()
        self.resets = dict.fromkeys(self.members, 0)

    def forecast(self, history: np.ndarray, horizon: int) -> np.ndarray:
        if len(history) > self.seen:
            self.state = self.mixture.seen(self.state, torch.from_numpy(history[None, self.seen :]))
            self.seen = len(history)
        forecasts = np.stack([member.forecast(history, horizon) for member in self.members.values()])
        last = torch.from_numpy(np.repeat(history[-1:], horizon, axis=0))[None]
        mixed = self.mixture.combine(self.state, torch.from_numpy(forecasts)[None], fallback=last)
        healthy = mixed.healthy[0].numpy()
        self.diverged |= {name for name, ok in zip(self.members, healthy, strict=True) if not ok}
        self.pending[len(history)] = (mixed.members, mixed.levels)
        if self.record:
            self.recorded.append((len(history), mixed.members[0].numpy(), healthy))
        if len(history) >= self.weights_counted_from and healthy.any():
            self.weight_sums += mixed.weights[0].mean(dim=(1, 2)).numpy()
            self.weighted_windows += 1
        return mixed.forecast[0].numpy().astype(np.float32)

    def learn(self, history: np.ndarray, window: int, horizon: int) -> None:
        for member in self.members.values():
            if member.learns:
                member.learn(history, window, horizon)
        forecasts = self.pending.pop(window, None)
        if forecasts is not None:  # None: a window from before the stream began
            truth = torch.from_numpy(history[window : window + horizon])[None]
            self.state = self.mixture.observe(self.state, *forecasts, truth)
        for name in self.members:
            if name in self.diverged:
                self.members[name] = copy.deepcopy(self.snapshots[name])
                self.healthy_windows[name] = 0
                self.resets[name] += 1
            else:
                self.healthy_windows[name] += 1
                if self.healthy_windows[name] >= self.SNAPSHOT_WINDOWS:
                    self.snapshots[name] = copy.deepcopy(self.members[name])
                    self.healthy_windows[name] = 0
        self.diverged.clear()

    def rescore(self, series: np.ndarray, starts: range, horizon: int) -> np.ndarray:
        forecasts = np.stack([member.rescore(series, starts, horizon) for member in self.members.values()])
        return np.einsum("khc,knhc->nhc", self.mixture.weights(self.state)[0].numpy(), forecasts)

    def mean_weights(self) -> dict[str, float]:
        """Each member's weight, averaged over horizon steps, columns and the windows from
        `weights_counted_from` on."""
        share = self.weight_sums / max(self.weighted_windows, 1)
        return {name: float(w) for name, w in zip(self.members, share, strict=True)}


def replay_combination(
    recorded: list[tuple[int, np.ndarray, np.ndarray]],
    starting_losses: np.ndarray,
    series: np.ndarray,
    horizon: int,
    window_to_learn: Callable[[int], int],
    combine: MixtureConfig | PacedMixtureConfig,
) -> np.ndarray:
    """The ensemble's forecasts (n, H, C) for recorded member forecasts (already clipped to the
    bound, with each member's health) under other combination settings, `window_to_learn(start)`
    being the window the protocol lets it learn after forecasting `start`: the members do not
    depend on the combination (nor a member's health on the others), so trying its settings
    needs no second stream. Where no member was healthy the fallback is the last row, as live."""
    mixture = PacedMixture(PacedMixtureConfig.of(combine))
    state = mixture.fresh(1, torch.from_numpy(starting_losses))
    by_start = {start: torch.from_numpy(forecasts)[None] for start, forecasts, _ in recorded}
    levels_at: dict[int, torch.Tensor] = {}  # window start → the levels' forecasts, until judged
    out = []
    for start, _, healthy in recorded:
        last = torch.from_numpy(np.repeat(series[start - 1 : start], horizon, axis=0))[None]
        mixed = mixture.combine_bounded(state, by_start[start], torch.from_numpy(healthy)[None], last)
        out.append(mixed.forecast[0].numpy())
        levels_at[start] = mixed.levels
        window = window_to_learn(start)
        if window in levels_at:
            truth = torch.from_numpy(series[window : window + horizon])[None]
            state = mixture.observe(state, by_start[window], levels_at.pop(window), truth)
    return np.stack(out).astype(np.float32)
