"""Online combination of forecasters by their recent losses, per line, horizon step and sensor.

Several forecasters (members) run side by side and are weighted online by how they have just
done, so the combination follows whichever carries over to the stream at hand (the idea of
OneNet, Wen et al., NeurIPS 2023). For each line, horizon step h and sensor s, member k's
recent loss L is the exponentially weighted mean of its squared errors (`half_life` in
observations), and its weight is softmax(−temperature · L_k / mean_j L_j): scale-free, uniform
at temperature 0, following the leader as it grows.

No member can poison the combination. Each line keeps the range of the values it has seen per
sensor; a forecast that is not finite, or lies further outside that range than the range is
wide (`diverged_ranges` widths), marks its member diverged for that line: weight 0 there, and
its forecast is clipped to the bound before its loss is charged, so the loss is large but
finite and the other members' weights stay defined. Why that bound: a series may reach new
extremes (a transformer load at 50 standard deviations of its training months), but a forecast
a whole observed range beyond everything seen is no forecast, and persistence never leaves the
range. Where every member diverged, the caller's fallback (the last reading) is returned.
Resetting a diverged member to its last good state is the member holder's job: `combine` says
which members diverged.

A loss can explode too, and a member need not leave the bound for it (it lags a level shift of
50 standard deviations, or comes back from a reset with the loss it left with). Where a
member's recent loss is more than `exploded_loss_ratio` (1,000) times the best member's, it
gets weight 0 there and is left out of the mean that scales the losses: otherwise its huge loss
would shrink every other member's relative loss toward 0 and flatten their weights toward
uniform, so a bad member would still be weighed in through the others. Why 1,000: at that ratio
its own weight is negligible anyway (scaled by a mean it dominates, its logit stands about τ·M
below the best member's: e^−32 for 4 members at τ = 8), so the rule only changes which members
set the scale, while honest members stay within far smaller ratios (persistence against the
best forecaster on ETTh1 at 48 hours ahead: about 5). The loss keeps
decaying as usual, so the member comes back once it forecasts well again.

The weights lag a jump nobody foresaw by one forecast: on the forecast after it they still weigh
the members by their misses on the jump itself, which every member shared, so a slow member (a
long mean) can get half the weight just as it starts to be wrong for many rows. Two ways to
keep the ranking across such a jump were tried and dropped: capping every miss at 100 times
the member's recent loss, and capping only misses every member shared. Both kept a member that
went wrong on its own after the jump weighted for longer: on a 50σ shift under the delayed
protocol (tests/bench/test_ett_protocol.py) the mixture went from 1.08x its best member to
1.16-1.18x. The ranking before a jump is not always the right one after it.

Everything is batched over B lines (B = 1 for one series) and carried per line (`MixtureState`:
`select`, `cat`, `to_bytes`, `from_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from lru_online import codec
from lru_online.line_tensors import LineTensors

# A loss no finite forecast needs to pass; M of them still sum to a float64, and so do 4,096 of
# them over the products down to 1e-8 that `LossMixture.run` divides by.
LOSS_CAP = 1e290


@dataclass(frozen=True)
class MixtureConfig:
    half_life: float = 12.0  # observations after which a loss counts half
    temperature: float = 8.0  # 0: uniform weights; large: the member with the lowest loss
    diverged_ranges: float = 1.0  # how many observed ranges beyond the seen values is divergence
    exploded_loss_ratio: float = 1000.0  # a loss this many times the best member's gets weight 0

    def __post_init__(self) -> None:
        if not (self.half_life > 0 and math.isfinite(self.half_life)):
            raise ValueError(f"MixtureConfig.half_life must be a finite number > 0, got {self.half_life}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"MixtureConfig.temperature must be a finite number >= 0, got {self.temperature}")
        if not (self.diverged_ranges > 0 and math.isfinite(self.diverged_ranges)):
            raise ValueError(f"MixtureConfig.diverged_ranges must be a finite number > 0, got {self.diverged_ranges}")
        if not self.exploded_loss_ratio > 1:
            raise ValueError(f"MixtureConfig.exploded_loss_ratio must be > 1, got {self.exploded_loss_ratio}")

    @property
    def decay(self) -> float:
        """What an old loss keeps per observation."""
        return 0.5 ** (1.0 / self.half_life)


@dataclass
class MixtureState(LineTensors):
    """What each of B lines carries: its members' recent losses, the range of its values and
    the members' (clipped) forecasts made at its last H rows, whose values are still to come
    (`LossMixture.run`)."""

    DTYPE: ClassVar[torch.dtype] = torch.float64
    KIND: ClassVar[str] = "a mixture state"

    losses: torch.Tensor  # (B, M, H, S) float64
    low: torch.Tensor  # (B, S) smallest value seen per sensor (+inf: none yet)
    high: torch.Tensor  # (B, S) largest (−inf: none yet)
    pending: torch.Tensor  # (B, H, M, H, S) forecasts of the last H rows, oldest first (NaN: none)

    @classmethod
    def fresh(
        cls, lines: int, members: int, horizon: int, sensors: int, starting_losses: torch.Tensor | None = None
    ) -> MixtureState:
        """No values seen; every member's loss `starting_losses` (M, H, S), e.g. its error on
        validation rows, or 1 (equal weights) without them."""
        shape = (lines, members, horizon, sensors)
        if starting_losses is None:
            losses = torch.ones(shape, dtype=torch.float64)
        else:
            given = torch.as_tensor(starting_losses, dtype=torch.float64)
            if given.shape != shape[1:]:
                raise ValueError(f"MixtureState.fresh: starting_losses of shape {tuple(given.shape)}, need {shape[1:]}")
            if not torch.isfinite(given).all() or (given < 0).any():
                raise ValueError("MixtureState.fresh: starting_losses must be finite and >= 0")
            losses = given.expand(shape).clone()
        return cls(
            losses,
            torch.full((lines, sensors), math.inf, dtype=torch.float64),
            torch.full((lines, sensors), -math.inf, dtype=torch.float64),
            torch.full((lines, horizon, members, horizon, sensors), math.nan, dtype=torch.float64),
        )

    @property
    def lines(self) -> int:
        return self.losses.shape[0]

    def to_bytes(self) -> bytes:
        """One line's state (B = 1)."""
        if self.lines != 1:
            raise ValueError("MixtureState.to_bytes stores one line; select it first")
        return codec.encode(self._tensors(), {"kind": "mixture"})

    @classmethod
    def from_bytes(cls, data: bytes) -> MixtureState:
        tensors, meta = codec.decode(data)
        if meta.get("kind") != "mixture" or set(tensors) != {"losses", "low", "high", "pending"}:
            raise codec.CodecError("not a stored mixture state")
        losses, low, high, pending = (tensors[k].double() for k in ("losses", "low", "high", "pending"))
        if (
            losses.dim() != 4
            or losses.shape[0] != 1
            or low.shape != (1, losses.shape[3])
            or high.shape != low.shape
            or pending.shape != (1, losses.shape[2], *losses.shape[1:])
        ):
            raise codec.CodecError(
                f"mixture state of inconsistent shapes {tuple(losses.shape)}, {tuple(low.shape)}, "
                f"{tuple(high.shape)}, {tuple(pending.shape)}"
            )
        return cls(losses, low, high, pending)


class Combination(NamedTuple):
    forecast: torch.Tensor  # (B, H, S) the combined forecast
    members: torch.Tensor  # (B, M, H, S) the members' forecasts, clipped to the bound
    weights: torch.Tensor  # (B, M, H, S) the weights used (0 for a diverged member), summing to 1 over M
    healthy: torch.Tensor  # (B, M) bool: the member stayed finite and inside the bound on every step and sensor


class LossMixture:
    def __init__(self, config: MixtureConfig | None = None) -> None:
        self.config = config or MixtureConfig()

    def weights(self, state: MixtureState, healthy: torch.Tensor | None = None) -> torch.Tensor:
        """(B, M, H, S), summing to 1 over the members; 0 where a member's loss exploded or,
        with `healthy` (B, M) given, where its forecast diverged (a line with no healthy member:
        all 0)."""
        # Losses are finite (capped at LOSS_CAP): masks enter as sums and products, which cost
        # a fraction of a full-size torch.where on CPU.
        losses = state.losses
        if healthy is None:
            best = losses.amin(dim=1, keepdim=True)
            kept = losses <= self.config.exploded_loss_ratio * best
        else:
            healthy = healthy.to(torch.bool)
            unhealthy = torch.where(healthy, 0.0, math.inf).to(losses.dtype)[:, :, None, None]  # (B, M, 1, 1)
            best = (losses + unhealthy).amin(dim=1, keepdim=True)
            kept = healthy[:, :, None, None] & (losses <= self.config.exploded_loss_ratio * best)
        share = kept.to(losses.dtype)
        scale = (losses * share).sum(dim=1, keepdim=True) / share.sum(dim=1, keepdim=True)
        relative = losses / scale.clamp(min=1e-12)
        logits = torch.log(share) - self.config.temperature * relative  # −inf where not kept
        # A step and sensor with no member kept: softmax of all −inf is NaN; no weight at all.
        return torch.nan_to_num(torch.softmax(logits, dim=1), nan=0.0)

    @staticmethod
    def seen(state: MixtureState, values: torch.Tensor, steps: torch.Tensor | None = None) -> MixtureState:
        """The state with the values (B, T, S) widening each line's range (NaN, inf and padding,
        `steps` (B, T) False, are not values)."""
        usable = torch.isfinite(values)
        if steps is not None:
            usable &= steps.to(torch.bool)[..., None]
        values = values.to(torch.float64)
        low = torch.where(usable, values, math.inf).amin(dim=1)
        high = torch.where(usable, values, -math.inf).amax(dim=1)
        return MixtureState(state.losses, torch.minimum(state.low, low), torch.maximum(state.high, high), state.pending)

    def bound(self, state: MixtureState, forecasts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' forecasts (B, M, H, S) clipped to each line's bound, and (B, M) which
        members stayed finite and inside it. A sensor with no value seen has no bound: any
        finite forecast of it is healthy."""
        return self._clip(state.low, state.high, forecasts)

    def _clip(
        self, seen_low: torch.Tensor, seen_high: torch.Tensor, forecasts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`bound` for forecasts (..., M, H, S) and ranges seen (..., S)."""
        forecasts = forecasts.to(torch.float64)
        known = seen_high >= seen_low
        reach = self.config.diverged_ranges * (seen_high - seen_low).clamp(min=1e-6)
        low = torch.where(known, seen_low - reach, -math.inf)[..., None, None, :]
        high = torch.where(known, seen_high + reach, math.inf)[..., None, None, :]
        inside = torch.isfinite(forecasts) & (forecasts >= low) & (forecasts <= high)
        healthy = inside.flatten(-2).all(dim=-1)
        # Clipped into [low, high], NaN to the far side of the bound (high; without a bound the
        # largest finite value): its loss is then charged as large, not as none. fmax and fmin
        # pass NaN over, so on the negated forecasts NaN lands on −high, then back on high.
        largest = torch.finfo(torch.float64).max / 4
        clipped = -torch.fmin(torch.fmax(-forecasts, -high), -low)
        return clipped.clamp(-largest, largest), healthy

    def combine(self, state: MixtureState, forecasts: torch.Tensor, fallback: torch.Tensor) -> Combination:
        """The combined forecast of the members' forecasts (B, M, H, S) by the current weights,
        diverged members left out; `fallback` (B, H, S) where every member diverged."""
        clipped, healthy = self.bound(state, forecasts)
        return self.combine_bounded(state, clipped, healthy, fallback)

    def combine_bounded(
        self, state: MixtureState, clipped: torch.Tensor, healthy: torch.Tensor, fallback: torch.Tensor
    ) -> Combination:
        """`combine` of forecasts `bound` has already clipped, with its (B, M) healthy flags: a
        replay of recorded members (bench/ett_tune.py) combines exactly as the stream did."""
        weights = self.weights(state, healthy)
        total = weights.sum(dim=1, keepdim=True)
        combined = (weights * clipped).sum(dim=1)
        combined = torch.where(total[:, 0] > 0, combined, fallback.to(torch.float64))
        return Combination(combined, clipped, weights, healthy)

    def observe(
        self, state: MixtureState, forecasts: torch.Tensor, truth: torch.Tensor, observed: torch.Tensor | None = None
    ) -> MixtureState:
        """The state after one judged forecast per line: the members' forecasts (B, M, H, S)
        as `combine` clipped them, and the values that came (B, H, S; NaN: not known, that
        loss stays as it was). `observed` (B,) False: the line had nothing to judge."""
        truth = truth.to(torch.float64)[:, None]
        known = torch.isfinite(truth) & torch.isfinite(forecasts)
        if observed is not None:
            known &= observed.to(torch.bool)[:, None, None, None]
        error = forecasts.to(torch.float64) - torch.where(known, truth, 0.0)
        # A forecast of a sensor with no bound yet may be huge: its loss stays finite.
        squared = torch.where(known, error**2, 0.0).clamp(max=LOSS_CAP)

        decay = self.config.decay
        losses = torch.where(known, decay * state.losses + (1.0 - decay) * squared, state.losses)
        return MixtureState(losses, state.low, state.high, state.pending)

    def run(
        self, state: MixtureState, forecasts: torch.Tensor, values: torch.Tensor, steps: torch.Tensor | None = None
    ) -> Run:
        """A chunk of rows of B lines at once: the members' forecasts made at each row (B, T, M,
        H, S; step h for row t + h), the values read at each row (B, T, S; NaN: missing),
        `steps` (B, T) False at right padding. At each row, first the forecasts whose values
        came with it are judged (step h of the forecast made h rows before, from the chunk or
        from `state.pending`), then the row's value widens the range and the row's forecasts
        are combined: the same order as `seen`, `observe` and `combine` called row by row, in
        a few tensor operations per block of rows instead of per row. Where every member
        diverged the fallback is the row's own reading (persistence)."""
        lines, length, members, horizon, sensors = forecasts.shape
        if state.losses.shape != (lines, members, horizon, sensors) or values.shape != (lines, length, sensors):
            raise ValueError(
                f"LossMixture.run: forecasts {tuple(forecasts.shape)}, values {tuple(values.shape)} do not fit "
                f"a state of losses {tuple(state.losses.shape)}"
            )
        if length == 0:
            return Run(
                torch.empty(lines, 0, horizon, sensors, dtype=torch.float64),
                torch.empty(lines, 0, members, horizon, sensors, dtype=torch.float64),
                torch.empty(lines, 0, members, dtype=torch.bool),
                state,
            )
        steps = torch.ones(lines, length, dtype=torch.bool) if steps is None else steps.to(torch.bool)
        values = torch.where(steps[..., None], values.to(torch.float64), math.nan)
        usable = torch.isfinite(values)
        seen_low = torch.minimum(state.low[:, None], torch.where(usable, values, math.inf).cummin(dim=1).values)
        seen_high = torch.maximum(state.high[:, None], torch.where(usable, values, -math.inf).cummax(dim=1).values)
        clipped, healthy = self._clip(seen_low, seen_high, forecasts)
        if not bool(steps.all()):
            clipped = torch.where(steps[..., None, None, None], clipped, math.nan)  # padding forecasts nothing

        # Step h (index k) of the forecast made at row t is judged at row t + k + 1: at row τ,
        # the forecast of row τ − k − 1, which lies in the pending rows before the chunk when
        # τ < k + 1. Gathered per step, everything below is per row.
        history = torch.cat([state.pending, clipped], dim=1)  # (B, H + T, M, H, S)
        judged = torch.stack(
            [history[:, horizon - k - 1 : horizon - k - 1 + length, :, k] for k in range(horizon)], dim=-2
        )  # (B, T, M, H, S): at row τ, step k of the forecast it judges
        truth = values[:, :, None, None, :]
        known = torch.isfinite(judged) & torch.isfinite(truth)
        # Judged forecasts are clipped (finite) or NaN: the difference is not finite exactly where
        # a forecast or its value is not known.
        squared = torch.nan_to_num(judged - truth, nan=0.0, posinf=0.0, neginf=0.0) ** 2
        decay = self.config.decay
        keep = torch.where(known, decay, 1.0)
        losses = _linear_recurrence(keep, (1.0 - decay) * squared.clamp(max=LOSS_CAP), state.losses, decay)

        flat = MixtureState(losses.flatten(0, 1), seen_low.flatten(0, 1), seen_high.flatten(0, 1), state.pending)
        weights = self.weights(flat, healthy.flatten(0, 1)).unflatten(0, (lines, length))
        combined = (weights * clipped).sum(dim=2)
        fallback = values[:, :, None, :].expand(-1, -1, horizon, -1)
        combined = torch.where(weights.sum(dim=2) > 0, combined, fallback)
        combined = torch.where(steps[..., None, None], combined, math.nan)

        rows = steps.sum(1)
        # Each line's last H real rows (its rows are left-aligned): history positions rows … rows + H − 1.
        last = (rows[:, None] + torch.arange(horizon)[None, :])[..., None, None, None]
        pending = history.gather(1, last.expand(-1, -1, members, horizon, sensors))
        new_state = MixtureState(losses[:, -1], seen_low[:, -1], seen_high[:, -1], pending)
        return Run(combined, weights, healthy & steps[..., None], new_state)


class Run(NamedTuple):
    forecast: torch.Tensor  # (B, T, H, S) the combined forecast made at each row (NaN at padding)
    weights: torch.Tensor  # (B, T, M, H, S) the weights it used
    healthy: torch.Tensor  # (B, T, M) the member stayed finite and inside the bound at that row
    state: MixtureState


def _linear_recurrence(keep: torch.Tensor, added: torch.Tensor, start: torch.Tensor, decay: float) -> torch.Tensor:
    """x_t = keep_t · x_{t−1} + added_t along dim 1, from x_{−1} = `start`, for every t, keep_t in
    [decay, 1]. Within a block x_t = P_t · (x_start + Σ_{i ≤ t} added_i / P_i), P the running
    product of `keep`; blocks are short enough that P stays above 1e-8 (decay^rows), so neither
    the division nor the sum leaves float64's range."""
    rows = max(1, min(4096, int(8 / max(-math.log10(decay), 1e-9))))
    out = torch.empty_like(added)
    carried = start
    for lo in range(0, keep.shape[1], rows):
        products = torch.cumprod(keep[:, lo : lo + rows], dim=1)
        block = products * (carried[:, None] + torch.cumsum(added[:, lo : lo + rows] / products, dim=1))
        out[:, lo : lo + rows] = block
        carried = block[:, -1]
    return out
