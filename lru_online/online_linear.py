"""An online linear forecaster per line and sensor: NLinear's map (Zeng et al. 2023) learnt by
normalised least mean squares, batched over lines, for the forecast mixture.

A sensor's forecast h rows ahead is its latest reading plus a linear map of its last `lookback`
readings minus that latest one, plus a bias: what NLinear forecasts, on changes from the last
value, so that a level the line never showed before is no extrapolation. With zero weights it
is persistence; each line learns its own weights per sensor and horizon step, online, from its
own rows, with no training before: a line that drifts, trends or oscillates gets a forecaster
that follows it within a few hundred rows, whatever the model learnt on the fleet.

Why normalised LMS: its step is scaled by the inputs' energy, w += μ·Σ e·z / (ε + Σ ‖z‖²), so it
stays stable for any 0 < μ < 2 whatever the readings' scale (a transformer load 50 standard
deviations outside its training months, a stuck sensor), with no learning rate to retune per
series. The rows of a block of BLOCK_ROWS are forecast with the weights as the block found
them and then learnt together (one normalised step over their summed gradient, which the same
bound keeps stable): a few tensor operations per block for every line at once, not per row.
Blocks are counted on each line's own rows, not on a file's: a line carries how far into its
current block it is and that block's gradient so far, so the files of a line give what one pass
over its rows gives, however they are cut (lines are shifted by their phase so that all their
blocks line up in a batch).

A reading that is missing is carried forward from the sensor's latest one (persistence's
convention); before a line's first reading of a sensor there is no forecast (NaN), as for
persistence, and a window reaching back before it reads that first reading. A target that is
missing teaches nothing. Everything a line carries between files is `OnlineLinearState`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from lru_online.line_tensors import LineTensors


@dataclass(frozen=True)
class OnlineLinearConfig:
    lookback: int = 96  # readings per window, the latest included
    step: float = 0.5  # μ of normalised LMS per block of BLOCK_ROWS rows, in (0, 2)

    def __post_init__(self) -> None:
        if self.lookback < 1:
            raise ValueError(f"OnlineLinearConfig.lookback must be >= 1, got {self.lookback}")
        if not 0 < self.step < 2:
            raise ValueError(
                f"OnlineLinearConfig.step must be in (0, 2), where normalised LMS is stable; got {self.step}"
            )


# Rows forecast with the same weights and then learnt together: a few tensor operations per
# block for every line at once. The step is per block, so about step / BLOCK_ROWS per row.
BLOCK_ROWS = 16
# Keeps the normalised step defined on a flat window (every change 0); small against the bias
# feature's own energy of 1 per row.
ENERGY_FLOOR = 1e-6


@dataclass
class OnlineLinearState(LineTensors):
    """What each of B lines carries: weights (B, S, H, lookback) over the window's changes from
    its latest reading (the latest's own slot is the bias); its last lookback + H readings (B,
    lookback + H, S), carried forward where missing, NaN before the first; how many of its rows
    its current block holds (B,) and their summed gradient (B, S, H, lookback) and input energy
    (B, S, H) so far. Float32, as the member computes (its forecasts are one of several the
    mixture weighs)."""

    DTYPE: ClassVar[torch.dtype] = torch.float32
    KIND: ClassVar[str] = "an online linear state"

    weights: torch.Tensor
    recent: torch.Tensor
    phase: torch.Tensor
    gradient: torch.Tensor
    energy: torch.Tensor

    @classmethod
    def fresh(cls, lines: int, sensors: int, horizon: int, config: OnlineLinearConfig) -> OnlineLinearState:
        return cls(
            torch.zeros(lines, sensors, horizon, config.lookback),
            torch.full((lines, config.lookback + horizon, sensors), math.nan),
            torch.zeros(lines),
            torch.zeros(lines, sensors, horizon, config.lookback),
            torch.zeros(lines, sensors, horizon),
        )

    def fits(self, sensors: int, horizon: int, config: OnlineLinearConfig) -> bool:
        """Whether the state is one of these shapes (a stored one may predate a changed config)."""
        weights = (sensors, horizon, config.lookback)
        return (
            self.weights.shape[1:] == weights
            and self.gradient.shape[1:] == weights
            and self.energy.shape[1:] == weights[:2]
            and self.recent.shape[1:] == (config.lookback + horizon, sensors)
        )


class LinearRun(NamedTuple):
    """The forecasts of a chunk and the state after it (`OnlineLinear.run`)."""

    forecast: torch.Tensor  # (B, T, H, S) made at each row for the next H
    state: OnlineLinearState


class BlockWindows:
    """The windows of one block's positions, used without building them. A window's changes
    from its latest reading x are its L - 1 earlier slots minus x, then the bias slot 1, so

        w · z = Σ w_l·P_l − x·Σ w_l + w_bias,    ‖z‖² = Σ P_l² − 2x·Σ P_l + (L − 1)·x² + 1,

    sums over the L - 1 earlier slots: one grouped convolution per block for every line,
    sensor and horizon step, and one per step for the gradient Σ_t e_t·z_t, instead of copying
    B·S·(H + R) windows of L values (2,000 lines × 5 sensors, L = 96: 3 ms per block against 54
    ms for the copy and its products). Each row's readings are first centred on its reading at
    the block's first position, so the terms above cancel only the windows' own spread, not a
    level far from zero."""

    def __init__(self, readings: torch.Tensor, weights: torch.Tensor) -> None:
        """`readings` (N, H + R + L - 1), float64: from the first window's first slot to the
        last position; `weights` (N, H, L)."""
        lookback = weights.shape[-1]
        self.lookback = lookback
        centred = readings - readings[:, lookback - 1 : lookback]
        self.segment = centred.float()
        self.own = self.segment[:, lookback - 1 :]  # (N, H + R): each window's latest reading
        positions = self.own.shape[1]
        slots, bias = weights[..., :-1], weights[..., -1:]
        # (N, H, H + R): the forecast of each position minus its latest reading.
        self.linear = self._products(slots) - self.own[:, None, :] * slots.sum(-1, keepdim=True) + bias
        sums = torch.nn.functional.pad(centred, (1, 0)).cumsum(-1)
        squares = torch.nn.functional.pad(centred.square(), (1, 0)).cumsum(-1)
        first_slots = slice(0, positions)
        after_slots = slice(lookback - 1, lookback - 1 + positions)
        window_sum = sums[:, after_slots] - sums[:, first_slots]
        window_squares = squares[:, after_slots] - squares[:, first_slots]
        own = centred[:, lookback - 1 :]
        self.energies = (window_squares - 2 * own * window_sum + (lookback - 1) * own.square() + 1.0).float()

    def _products(self, slots: torch.Tensor) -> torch.Tensor:
        """(N, H, H + R): Σ_l slots_l·P_l over each position's L - 1 earlier slots."""
        lines, horizon, width = slots.shape
        positions = self.own.shape[1]
        if width == 0:
            return self.segment.new_zeros(lines, horizon, positions)
        kernels = slots.reshape(lines * horizon, 1, width)
        products = torch.nn.functional.conv1d(self.segment[None], kernels, groups=lines)[0]
        return products.unflatten(0, (lines, horizon))[..., :positions]

    def correlate(self, error: torch.Tensor, made_at: slice) -> torch.Tensor:
        """(N, L): Σ_t error_t·z_t over the windows of positions `made_at` (error (N, R))."""
        rows = error.shape[1]
        earlier = self.segment.new_zeros(error.shape[0], 0)
        if self.lookback > 1:
            span = self.segment[:, made_at.start : made_at.start + rows + self.lookback - 2]
            earlier = torch.nn.functional.conv1d(span[None], error[:, None, :], groups=error.shape[0])[0]
        own = (error * self.own[:, made_at]).sum(-1, keepdim=True)
        return torch.cat([earlier - own, error.sum(-1, keepdim=True)], -1)


class OnlineLinear:
    def __init__(self, config: OnlineLinearConfig | None = None) -> None:
        self.config = config or OnlineLinearConfig()

    def run(self, state: OnlineLinearState, values: torch.Tensor, steps: torch.Tensor) -> LinearRun:
        """B right-padded lines' readings (B, T, S; NaN: missing) with `steps` (B, T) False at
        padding: each row's forecast of the next H rows, then learning from the rows whose
        values came, block by block, in the order a row-by-row learner would see them."""
        lines, length, sensors = values.shape
        lookback = self.config.lookback
        horizon = state.weights.shape[2]
        history = state.recent.shape[1]  # lookback + horizon rows before the chunk
        steps = steps.to(torch.bool)
        raw = torch.where(steps[..., None], values.to(torch.float64), math.nan)
        # Each line shifted right by its phase, so that block boundaries fall on multiples of
        # BLOCK_ROWS for all: its rows start at `history + phase`; the `phase` rows before them
        # are the last rows of `recent`, already learnt from (their targets are not in `truth`).
        phase = state.phase.long()
        span = history + BLOCK_ROWS - 1 + length
        source = torch.arange(span)[None, :] - phase[:, None]  # (B, span) position in recent + chunk
        inside = (source >= 0) & (source < history + length)
        pick = source.clamp(0, history + length - 1)[..., None].expand(-1, -1, sensors)
        sequence = torch.where(inside[..., None], torch.cat([state.recent.double(), raw], 1).gather(1, pick), math.nan)
        targets = torch.cat([torch.full_like(state.recent.double(), math.nan), raw], 1).gather(1, pick)
        truth = torch.where(inside[..., None], targets, math.nan).transpose(1, 2).float()

        found = torch.isfinite(sequence)
        positions = torch.arange(span)[None, :, None]
        index = torch.where(found, positions, -1).cummax(dim=1).values
        # Each position's latest reading per sensor (from before the chunk too); NaN before the first.
        filled = torch.where(index >= 0, sequence.gather(1, index.clamp(min=0)), math.nan)
        # The windows read the first reading in the slots before it (a window is then flat there),
        # and 0 for a sensor never read (its forecast is NaN through `latest` anyway).
        first = torch.where(found, positions, span).amin(dim=1, keepdim=True)
        first_value = sequence.gather(1, first.clamp(max=span - 1))
        padded = torch.where(index >= 0, filled, torch.nan_to_num(first_value, nan=0.0))
        # Sensor-major rows, one per line and sensor: (B·S, positions).
        # No NaN; the readings rounded to float32 first, as the carried ones are, so that a line's
        # chunks give what one pass gives (the float64 copy only centres them exactly).
        padded_of = padded.transpose(1, 2).flatten(0, 1).float().double()
        latest_of = filled.transpose(1, 2).float().flatten(0, 1)  # NaN before the first reading

        weights = state.weights.float().clone()  # (B, S, H, L)
        gradient = state.gradient.float().clone()
        energy = state.energy.float().clone()
        block_ends = phase + steps.sum(1)  # where each line's rows end, in shifted rows
        forecast = torch.full((lines, sensors, span - history, horizon), math.nan)
        for lo in range(0, int(block_ends.max()) if lines else 0, BLOCK_ROWS):
            # The block's rows (BLOCK_ROWS, or fewer at the end of the shifted rows) and the H
            # rows before them, whose forecasts the block's values judge: positions
            # [first_row, end_row), each forecast from the L - 1 readings before it.
            first_row, end_row = history + lo - horizon, min(history + lo + BLOCK_ROWS, span)
            rows = end_row - history - lo
            window = BlockWindows(padded_of[:, first_row - lookback + 1 : end_row], weights.flatten(0, 1))
            made = latest_of[:, None, first_row:end_row] + window.linear  # (B·S, H, H + rows)
            forecast[:, :, lo : lo + rows] = made[..., horizon:].transpose(1, 2).unflatten(0, (lines, sensors))
            # The gradient of the forecasts whose targets came in this block: made at row t for
            # t + h, t + h in [lo, lo + rows), with the weights the block found.
            target_rows = truth[:, :, history + lo : end_row].flatten(0, 1)  # (B·S, rows)
            for h in range(horizon):
                made_at = slice(horizon - h - 1, horizon - h - 1 + rows)
                guess = made[:, h, made_at]
                known = torch.isfinite(target_rows) & torch.isfinite(guess)
                error = torch.where(known, target_rows - torch.where(known, guess, 0.0), 0.0)
                step_gradient = window.correlate(error, made_at)
                gradient[:, :, h] += step_gradient.unflatten(0, (lines, sensors))
                energies = torch.where(known, window.energies[:, made_at], 0.0).sum(-1)
                energy[:, :, h] += energies.unflatten(0, (lines, sensors))
            # A line learns at the end of each block it completed; one whose rows end inside the
            # block carries its gradient so far to its next chunk.
            done = (lo + BLOCK_ROWS <= block_ends)[:, None, None]
            step = self.config.step * gradient / (ENERGY_FLOOR + energy)[..., None]
            weights = torch.where(done[..., None], weights + step, weights)
            gradient = torch.where(done[..., None], 0.0, gradient)
            energy = torch.where(done, 0.0, energy)
        # Each line's last lookback + H readings (its rows, shifted by its phase, end at history + block_ends).
        last = (block_ends[:, None] + torch.arange(history)[None, :])[..., None].expand(-1, -1, sensors)
        recent = filled.gather(1, last).float()
        # Each line's forecasts, from its shifted rows back to its own.
        own = (phase[:, None] + torch.arange(length)[None, :]).clamp(max=span - history - 1)
        forecast = forecast.gather(2, own[:, None, :, None].expand(-1, sensors, -1, horizon))
        forecast = forecast.permute(0, 2, 3, 1).double()  # (B, T, H, S)
        forecast = torch.where(steps[..., None, None], forecast, math.nan)
        new_phase = (state.phase + steps.sum(1)) % BLOCK_ROWS
        return LinearRun(forecast, OnlineLinearState(weights, recent, new_phase.float(), gradient, energy))
