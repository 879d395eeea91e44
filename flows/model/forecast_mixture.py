"""The forecast a line gets with `mixture.enabled`: the model's and its other members' forecasts
combined per line, horizon step and sensor by their recent losses (lru_online.mixture).

The members: `lru` (the model), `persistence` (the line's last reading) and `linear` (a linear
forecaster each line learns online on its own rows, lru_online.online_linear). They are computed
for every line of a part at once, and the combination runs over all its rows at once
(`LossMixture.run`). What a line carries between files goes into its forecaster state record
beside the model's hidden state (`RecurrentState.to_bytes(beside=...)`): the mixture's losses,
the range of values it has seen and the members' forecasts still to be judged, the linear
member's weights and last readings, and, as the record's last forecast, the combined forecast of
its last row, against which its next file's first row is scored. A line where the model's
forecast diverged at its last row (not finite, or a whole seen range beyond what the line has
seen) starts its next file from a fresh hidden state: the state that carried it there is no good
state to go on from, and the model forgets a line's context within a few rows; a line where the
linear member's did starts it with zero linear weights (persistence) for the same reason. A
retraining replays its window with the new model and stores its hidden states: the mixture of a
promoted model starts afresh (equal weights), while each line keeps its linear member's state
(`keep_linear_member`): that member learns from the line's readings alone, not from the model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from lru_online import codec
from lru_online.mixture import LossMixture, MixtureConfig, MixtureState
from lru_online.model import last_real_forecast, one_step_residuals
from lru_online.online_linear import LinearRun, OnlineLinear, OnlineLinearConfig, OnlineLinearState
from lru_online.state import RecurrentState

PREFIX = "mixture."  # where a line's mixture tensors sit in its forecaster state record
LINEAR_PREFIX = "linear."  # and the `linear` member's
# A one-step residual beyond this many of the line's standardised units is no forecast: real
# lines stay within tens (SKAB's wandering vibration ~10, a 50-sigma load shift on an ETT station).
BLOWN_RESIDUAL = 1e3


class MixtureSetup(NamedTuple):
    """What the pipeline and a registry version need to mix: the members, in order, the
    combination's settings and the `linear` member's (the `mixture:` section with `enabled: true`)."""

    members: tuple[str, ...]
    config: MixtureConfig
    linear: OnlineLinearConfig = OnlineLinearConfig()


class CarriedMixtures(NamedTuple):
    """What B lines carried into a chunk for the mixture: its state and the `linear` member's
    (None without that member)."""

    mixture: MixtureState
    linear: OnlineLinearState | None


class MixedLines(NamedTuple):
    forecast: torch.Tensor  # (B, T, H, S) the combined forecast made at each row
    residuals: torch.Tensor  # (B, T, S) each row's reading minus the combined forecast made for it
    scores: torch.Tensor  # (B, T) mean squared residual over the sensors read
    last_forecast: torch.Tensor  # (B, H, S) each line's combined forecast at its last row
    state: MixtureState
    weights: torch.Tensor  # (B, T, M) each member's weight, averaged over steps and sensors
    model_diverged: torch.Tensor  # (B,) the model's forecast at the line's last row diverged
    linear: OnlineLinearState | None  # the `linear` member's state after the chunk

    def record_tensors(self) -> dict[str, torch.Tensor]:
        """The lines' tensors to store beside their hidden states (each (B, ...))."""
        tensors = self.state.tensors(PREFIX)
        if self.linear is not None:
            tensors |= self.linear.tensors(LINEAR_PREFIX)
        return tensors


def carried_mixtures(
    stored: list[codec.LineGroup], lines: int, setup: MixtureSetup, horizon: int, sensors: int
) -> CarriedMixtures:
    """The mixture states (and `linear` member's) of `lines` lines from their stored forecaster
    records (as `codec.decode_lines` read them, grouped by layout); a line without one (new, a
    new run, or the mixture just turned on or reshaped) starts with equal weights (and zero
    linear weights: persistence)."""
    members = len(setup.members)
    mixture = MixtureState.fresh(lines, members, horizon, sensors)
    linear = OnlineLinearState.fresh(lines, sensors, horizon, setup.linear) if "linear" in setup.members else None
    for group in stored:
        kept = MixtureState.from_tensors(group.tensors, PREFIX)
        if kept is not None and kept.losses.shape[1:] == (members, horizon, sensors):
            mixture = mixture.place(group.lines, kept)
        if linear is not None:
            kept_linear = OnlineLinearState.from_tensors(group.tensors, LINEAR_PREFIX)
            if kept_linear is not None and kept_linear.fits(sensors, horizon, setup.linear):
                linear = linear.place(group.lines, kept_linear)
    return CarriedMixtures(mixture, linear)


def persistence_forecasts(
    targets: torch.Tensor, steps: torch.Tensor, carried: MixtureState, member: int, horizon: int
) -> torch.Tensor:
    """(B, T, H, S): each row's latest reading per sensor, repeated over the horizon; before a
    line's first reading of a sensor in this chunk, the reading persistence forecast last (the
    member's pending forecast of the line's last row, where it is a value the line has seen)."""
    lines, length, _ = targets.shape
    finite = torch.isfinite(targets) & steps[..., None]
    index = torch.where(finite, torch.arange(length)[None, :, None], -1).cummax(dim=1).values
    filled = targets.gather(1, index.clamp(min=0))
    before = carried.pending[:, -1, member, 0, :]  # (B, S)
    real = torch.isfinite(before) & (before >= carried.low) & (before <= carried.high)
    before = torch.where(real, before, math.nan).to(targets.dtype)
    filled = torch.where(index >= 0, filled, before[:, None, :])
    return filled[:, :, None, :].expand(-1, -1, horizon, -1)


def mix_lines(
    setup: MixtureSetup,
    model_forecast: torch.Tensor,
    targets: torch.Tensor,
    steps: torch.Tensor,
    carried: CarriedMixtures,
    carried_forecast: torch.Tensor | None,
    linear: LinearRun | None = None,
) -> MixedLines:
    """The combined forecasts of B right-padded lines (the model's `model_forecast` (B, T, H,
    S), `targets` (B, T, S), `steps` (B, T)), their residuals and scores, from what each line
    carried (its mixture state and last combined forecast, (B, H, S) or None). `linear`: the
    `linear` member's run over these rows when the caller made it already (`run_linear_member`)."""
    members = setup.members
    horizon = model_forecast.shape[2]
    targets = targets.to(torch.float64)
    if linear is None:
        linear = run_linear_member(setup, carried, targets, steps)
    built = {
        "lru": lambda: model_forecast.to(torch.float64),
        "persistence": lambda: persistence_forecasts(
            targets, steps, carried.mixture, members.index("persistence"), horizon
        ),
        "linear": lambda: linear.forecast,
    }
    forecasts = torch.stack([built[name]() for name in members], dim=2)
    run = LossMixture(setup.config).run(carried.mixture, forecasts, targets, steps)
    previous = carried_forecast.to(torch.float64) if carried_forecast is not None else None
    residuals = one_step_residuals(run.forecast, targets, previous)
    residuals = residuals.masked_fill(~steps[..., None], math.nan)
    return MixedLines(
        run.forecast,
        residuals,
        residuals.pow(2).nanmean(-1),
        last_real_forecast(run.forecast, steps, previous),
        run.state,
        run.weights.mean(dim=(-2, -1)),
        _diverged_at_last_row(run.healthy[..., members.index("lru")], steps),
        _reset_where_diverged(linear.state, run.healthy[..., members.index("linear")], steps) if linear else None,
    )


def run_linear_member(
    setup: MixtureSetup, carried: CarriedMixtures, targets: torch.Tensor, steps: torch.Tensor
) -> LinearRun | None:
    """The `linear` member over B lines' rows (None without it): it reads the readings alone,
    not the model's forecasts, so it can run while the model does."""
    if "linear" not in setup.members:
        return None
    return OnlineLinear(setup.linear).run(carried.linear, targets.to(torch.float64), steps)


def residuals_from_a_fresh_mixture(
    setup: MixtureSetup, model_forecast: torch.Tensor, targets: torch.Tensor, steps: torch.Tensor
) -> torch.Tensor:
    """(B, T, S) the one-step residuals of B lines whose model forecasts (B, T, H, S) go through
    a mixture started afresh (equal weights) at each line's first row: how a model would have
    forecast those rows as a line's forecaster, for a frozen or a new model replayed over them."""
    lines, _, horizon, sensors = model_forecast.shape
    fresh = carried_mixtures([], lines, setup, horizon, sensors)
    return mix_lines(setup, model_forecast, targets, steps, fresh, None).residuals


def latest_readings(targets: torch.Tensor) -> torch.Tensor:
    """(B, T, S) each row's latest finite reading per sensor, up to and including the row; NaN
    before a line's first reading of the sensor."""
    finite = torch.isfinite(targets)
    index = torch.where(finite, torch.arange(targets.shape[1])[None, :, None], -1).cummax(dim=1).values
    return torch.where(index >= 0, targets.gather(1, index.clamp(min=0)), math.nan)


def forecasts_from_residuals(targets: torch.Tensor, model_residuals: torch.Tensor) -> torch.Tensor:
    """(B, T, 1, S) the one-step forecast a model made at each row of B right-padded lines, read
    back from the readings `targets` (B, T, S) and the model's one-step residuals there
    (`alarm_residual_*`, (B, T, S)): the forecast made at row t is row t+1's reading minus its
    residual. Where row t+1's reading is missing the output holds no residual, though the model
    made a finite forecast, and a missing member forecast would count as a diverged member for
    the whole line; no loss is charged against a missing reading, so any finite value stands in:
    the line's latest reading (0, the standardised mean, before its first)."""
    targets = targets.to(torch.float64)
    forecast_of_row = targets - model_residuals.to(torch.float64)
    made_at = torch.cat([forecast_of_row[:, 1:], torch.full_like(forecast_of_row[:, :1], math.nan)], 1)
    next_missing = torch.cat([~torch.isfinite(targets[:, 1:]), torch.ones_like(targets[:, :1], dtype=torch.bool)], 1)
    stand_in = latest_readings(targets).nan_to_num(0.0)
    return torch.where(next_missing & ~torch.isfinite(made_at), stand_in, made_at)[:, :, None, :]


def keep_linear_member(stored: bytes | None, promoted: bytes) -> bytes:
    """A line's record for a promoted model: the promoted model's hidden state (`promoted`, a
    bare `RecurrentState` record) beside the linear member's tensors of the line's stored
    record, where it has them. Both must stand at the same row of the line (the newest one
    committed), as they do when a retraining swaps its model in."""
    if not stored:
        return promoted
    tensors, _ = codec.decode(stored)
    linear = {name: tensor for name, tensor in tensors.items() if name.startswith(LINEAR_PREFIX)}
    return RecurrentState.from_bytes(promoted).to_bytes(beside=linear) if linear else promoted


def alarm_residuals(model_residuals: torch.Tensor, mixed: MixedLines, steps: torch.Tensor) -> torch.Tensor:
    """(B, T, S) what the alarms judge with the mixture on: each row's residual against the
    model's own forecast, unless that forecast blew up (a residual not finite or beyond
    BLOWN_RESIDUAL of the line's standardised scale on a sensor), where the combined one.
    Why not the combined forecast everywhere: persistence, a member, follows a sustained fault
    within a row and takes the mixture over there (SKAB's valve faults: recall 0.61 -> 0.02). Why
    not the mixture's own health test (a forecast far outside the range seen): at a run's start
    the range is a few rows wide and the model's first forecasts fail it, so the alarms would
    switch from persistence's residuals to the model's mid-run and judge the model's by a scale
    learnt on persistence's (SKAB's anomaly-free run, model seed 2: 21.5 alpha against 4.3)."""
    model_residuals = model_residuals.to(mixed.residuals.dtype)
    blown = (~torch.isfinite(model_residuals) | (model_residuals.abs() > BLOWN_RESIDUAL)) & torch.isfinite(
        mixed.residuals
    )
    chosen = torch.where(blown.any(-1, keepdim=True), mixed.residuals, model_residuals)
    return chosen.masked_fill(~steps[..., None], math.nan)


def _reset_where_diverged(state: OnlineLinearState, healthy: torch.Tensor, steps: torch.Tensor) -> OnlineLinearState:
    """The `linear` member's state with zero weights (persistence) on lines where its forecast
    at the last row diverged or its weights are no longer finite: weights that took it there
    are no good state to go on from, and it relearns a line within a few hundred rows."""
    broken = _diverged_at_last_row(healthy, steps) | ~torch.isfinite(state.weights).flatten(1).all(dim=1)
    broken |= ~torch.isfinite(state.gradient).flatten(1).all(dim=1)
    reset = broken[:, None, None, None]
    return dataclasses.replace(
        state,
        weights=torch.where(reset, 0.0, state.weights),
        gradient=torch.where(reset, 0.0, state.gradient),
        energy=torch.where(reset[..., 0], 0.0, state.energy),
    )


def _diverged_at_last_row(healthy: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    rows = steps.sum(1)
    last = healthy.gather(1, (rows - 1).clamp(min=0)[:, None])[:, 0]
    return (rows > 0) & ~last
