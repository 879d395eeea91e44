"""Members combined at several paces at once, the paces weighed by how they have just done.

A `LossMixture` follows its members' recent losses at one pace, its half-life: short, it moves
to whichever member did best in the last few forecasts (right where the best member changes
often, as on ETT's loads); long, it holds the member that does best on average (right where
recent losses are mostly noise, as on spiky server metrics). Which pace carries over depends on
the stream, and a pace chosen on some streams is a bet on the next. So the same members are
combined by several `LossMixture`s (the levels), each at its own half-life and temperature, and
the levels' combined forecasts are combined once more by a `LossMixture` of their own recent
losses (`between`): the pace is chosen online too, per line, horizon step and sensor, the way
the members are.

Nothing new can poison it: every level weighs the same clipped member forecasts (a diverged
member has weight 0 in each), so each level's forecast is a convex combination of bounded
forecasts (or the caller's fallback), and so is their combination.

With one level and no `between` it is that level's `LossMixture`, forecast for forecast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from lru_online.mixture import LossMixture, MixtureConfig, MixtureState


@dataclass(frozen=True)
class PacedMixtureConfig:
    levels: tuple[MixtureConfig, ...]  # each combines every member at its own pace
    between: MixtureConfig | None = None  # weighs the levels' forecasts; needed with two or more

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("PacedMixtureConfig needs at least one level")
        if len(self.levels) > 1 and self.between is None:
            raise ValueError("PacedMixtureConfig: several levels need `between` to weigh them")
        if len(self.levels) == 1 and self.between is not None:
            raise ValueError("PacedMixtureConfig: `between` weighs two or more levels; one level has none")

    @classmethod
    def single(cls, half_life: float, temperature: float) -> PacedMixtureConfig:
        return cls((MixtureConfig(half_life, temperature),))

    @classmethod
    def of(cls, combine: MixtureConfig | PacedMixtureConfig) -> PacedMixtureConfig:
        """One `MixtureConfig` is a paced mixture of one level."""
        return cls((combine,)) if isinstance(combine, MixtureConfig) else combine

    def describe(self) -> str:
        levels = ", ".join(f"{c.half_life:g}/{c.temperature:g}" for c in self.levels)
        if self.between is None:
            return f"half_life/temperature {levels}"
        return f"levels {levels} between {self.between.half_life:g}/{self.between.temperature:g}"


@dataclass
class PacedMixtureState:
    levels: list[MixtureState]  # one per level, over the members
    between: MixtureState | None  # over the levels (None with one level)


class PacedCombination(NamedTuple):
    forecast: torch.Tensor  # (B, H, S)
    members: torch.Tensor  # (B, M, H, S) the members' forecasts, clipped to the bound
    levels: torch.Tensor  # (B, L, H, S) each level's combined forecast (to be judged with the members')
    weights: torch.Tensor  # (B, M, H, S) each member's weight in the forecast, summing to 1 over M (or 0)
    healthy: torch.Tensor  # (B, M)


class PacedMixture:
    def __init__(self, config: PacedMixtureConfig) -> None:
        self.config = config
        self.levels = [LossMixture(c) for c in config.levels]
        self.between = LossMixture(config.between) if config.between is not None else None

    def fresh(self, lines: int, starting_losses: torch.Tensor) -> PacedMixtureState:
        """No values seen; every member's loss in every level `starting_losses` (M, H, S). The
        levels start equal: none has a record yet."""
        members, horizon, sensors = starting_losses.shape
        levels = [MixtureState.fresh(lines, members, horizon, sensors, starting_losses) for _ in self.levels]
        between = MixtureState.fresh(lines, len(self.levels), horizon, sensors) if self.between else None
        return PacedMixtureState(levels, between)

    def seen(self, state: PacedMixtureState, values: torch.Tensor) -> PacedMixtureState:
        """The values (B, T, S) widen each line's range (the bound every level clips by)."""
        return PacedMixtureState([LossMixture.seen(s, values) for s in state.levels], state.between)

    def combine(self, state: PacedMixtureState, forecasts: torch.Tensor, fallback: torch.Tensor) -> PacedCombination:
        """The members' forecasts (B, M, H, S) combined by every level, and the levels' by
        `between`; `fallback` (B, H, S) where every member diverged."""
        clipped, healthy = self.levels[0].bound(state.levels[0], forecasts)
        return self.combine_bounded(state, clipped, healthy, fallback)

    def combine_bounded(
        self, state: PacedMixtureState, clipped: torch.Tensor, healthy: torch.Tensor, fallback: torch.Tensor
    ) -> PacedCombination:
        """`combine` of forecasts already clipped to the bound, with their (B, M) health (a
        replay of recorded members combines as the stream did)."""
        by_level = [
            m.combine_bounded(s, clipped, healthy, fallback) for m, s in zip(self.levels, state.levels, strict=True)
        ]
        if self.between is None:
            only = by_level[0]
            return PacedCombination(only.forecast, only.members, only.forecast[:, None], only.weights, only.healthy)
        levels = torch.stack([c.forecast for c in by_level], dim=1)  # (B, L, H, S)
        # Every level's forecast is a convex combination of bounded forecasts or the fallback:
        # each is healthy.
        over = self.between.combine_bounded(
            state.between, levels, torch.ones(levels.shape[:2], dtype=torch.bool), fallback
        )
        weights = (over.weights[:, :, None] * torch.stack([c.weights for c in by_level], dim=1)).sum(dim=1)
        return PacedCombination(over.forecast, clipped, levels, weights, healthy)

    def observe(
        self, state: PacedMixtureState, members: torch.Tensor, levels: torch.Tensor, truth: torch.Tensor
    ) -> PacedMixtureState:
        """The state after one judged forecast per line: the members' clipped forecasts (B, M, H,
        S) and the levels' (B, L, H, S) that `combine` returned for it, the values that came (B,
        H, S)."""
        updated = [m.observe(s, members, truth) for m, s in zip(self.levels, state.levels, strict=True)]
        between = self.between.observe(state.between, levels, truth) if self.between else None
        return PacedMixtureState(updated, between)

    def weights(self, state: PacedMixtureState) -> torch.Tensor:
        """Each member's weight (B, M, H, S) in a forecast made now, every member healthy."""
        by_level = torch.stack([m.weights(s) for m, s in zip(self.levels, state.levels, strict=True)], dim=1)
        if self.between is None:
            return by_level[:, 0]
        over = self.between.weights(state.between)  # (B, L, H, S)
        return (over[:, :, None] * by_level).sum(dim=1)


def paced_config(settings: dict) -> PacedMixtureConfig:
    """From a config's `ensemble` mapping: `half_life` and `temperature` (one level), or `levels`
    (a list of such mappings) with `between` (one such mapping)."""
    if "levels" in settings:
        levels = tuple(MixtureConfig(float(c["half_life"]), float(c["temperature"])) for c in settings["levels"])
        between = settings.get("between")
        return PacedMixtureConfig(
            levels, MixtureConfig(float(between["half_life"]), float(between["temperature"])) if between else None
        )
    return PacedMixtureConfig.single(float(settings["half_life"]), float(settings["temperature"]))
