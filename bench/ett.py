"""Online forecasting on an ETT file (ETTh1, ETTh2, …) under the published online protocol.

    python bench/ett.py --data FILE --protocol fsnet|delayed [--horizons 1,24,48] --out DIR
                        [--methods lru,linear,persistence,snarimax] [--json FILE] [--plots DIR]

Rows [0, 2880) train, [2880, 3600) validate (early stopping), then the stream [3600, 14400) runs
one step at a time: at step s every method forecasts rows s … s+H-1 from the rows before s, is
scored, then learns (test-then-train). Every column is standardised with the mean and std of the
training rows; errors are on standardised values.

- fsnet: the FSNet/OneNet protocol — right after forecasting window s a method may learn from
  its whole H-step target, rows up to s+H-1, before most of them have happened.
- delayed: the honest one — after forecasting window s only row s has arrived, so a method learns
  from the window whose whole target has just been observed, the one starting at s-H+1.

The driver enforces the protocol: a method is handed the series cut at the last row it may see,
for forecasting and for learning alike.

Methods: `lru` — one configuration for every series and both protocols (configs/ett.yaml): an
online ensemble, as OneNet does, of the lru_online forecaster with LRU blocks (`lru-blocks`),
the forecaster's linear path alone (`lru-linear`), the online NLinear and persistence, combined
per horizon step and column by their recent losses (lru_online.mixture), each LRU carrying
its state through the whole series; `linear` — NLinear on the last 60 rows, updated by SGD every
step; `persistence` — the last row repeated; `snarimax` — river's SNARIMAX on `OT` alone
(reported on `OT`); `lru-blocks`, `lru-linear` — one member alone; `lru-replay`, `lru-ewc` —
the lru with the learner's replay or EWC, for the forgetting comparison (not run by default).

Splits: the combination's two settings were chosen on the first 20 % of the stream (windows
starting at rows 3600–5759, `python bench/ett_tune.py`); the report split is the rest. The table
prints the report split, the whole stream (the published protocol, comparable with the papers)
and the tuning split (not a result) apart.

Forgetting (backward transfer): after the stream, each learning method is frozen and re-scores
the first fifth of the online windows; the table gives the MSE it had there while streaming and
the MSE of the frozen final model (lower frozen = it kept or improved what it knew).

Writes `--out/METHOD/h{H}.npz` (`pred`, `true` (n, H, 7), `start` (n,), `mean`, `std` (7,)),
prints one table, `--json` the same figures, `--plots` forecast and cumulative-error charts.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.common import load_config, pyplot, set_learning_rate
from lru_online.mixture import LossMixture, MixtureConfig, MixtureState

TRAIN_END, VALID_END, STREAM_END = 2880, 3600, 14400
# Windows starting before this row are the tuning split (the first 20 % of the stream).
TUNING_END = VALID_END + (STREAM_END - VALID_END) // 5
LOOKBACK = 60
TARGET_COLUMN = "OT"
# Cumulative MSE on ETTh2 at H = 1 / 24 / 48 (ett/README.md; FSNet and OneNet papers).
PUBLISHED_ETTH2 = {
    "FSNet": {1: 0.466, 24: 0.687, 48: 0.846},
    "OneNet": {1: 0.380, 24: 0.532, 48: 0.609},
}


# --- data and protocol ----------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    values: np.ndarray  # (rows, columns), standardised
    columns: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray


def load_series(path: Path) -> Series:
    frame = pd.read_csv(path)
    if "date" in frame:
        frame = frame.drop(columns="date")
    if TARGET_COLUMN not in frame:
        raise SystemExit(f"{path}: no '{TARGET_COLUMN}' column; not an ETT file")
    non_numeric = [c for c in frame if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        raise SystemExit(f"{path}: columns {non_numeric} are not numeric")
    if len(frame) < STREAM_END:
        raise SystemExit(f"{path}: {len(frame)} rows, the online protocol needs {STREAM_END}")
    raw = frame.to_numpy(dtype=np.float64)[:STREAM_END]
    if not np.isfinite(raw).all():
        row = int(np.argwhere(~np.isfinite(raw))[0, 0])
        raise SystemExit(f"{path}: row {row + 2} (line) holds a missing or non-finite value")
    mean, std = raw[:TRAIN_END].mean(axis=0), raw[:TRAIN_END].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return Series(((raw - mean) / std).astype(np.float32), tuple(frame.columns), mean, std)


@dataclass(frozen=True)
class Protocol:
    name: str  # fsnet | delayed
    horizon: int

    def __post_init__(self) -> None:
        if self.name not in ("fsnet", "delayed"):
            raise ValueError(f"protocol must be fsnet or delayed, got {self.name!r}")
        if not 1 <= self.horizon <= STREAM_END - VALID_END:
            raise ValueError(f"horizon must be in [1, {STREAM_END - VALID_END}], got {self.horizon}")

    def starts(self) -> range:
        """Row of each online window's first target step: 3600, 3601, …, 14400 - H."""
        return range(VALID_END, STREAM_END - self.horizon + 1)

    def visible_after_forecast(self, start: int) -> int:
        """How many rows a method may learn from once it has forecast the window at `start`."""
        return start + self.horizon if self.name == "fsnet" else start + 1

    def window_to_learn(self, start: int) -> int:
        """The window whose whole target has become learnable after forecasting `start`."""
        return self.visible_after_forecast(start) - self.horizon


class Method:
    """A forecaster under the online protocol. `history` is always the series cut at the last
    row the method may see; windows are named by the row of their first target step."""

    learns = False

    def fit(self, series: np.ndarray, horizon: int) -> None:
        """Rows [0, 3600): train on [0, 2880), validate on [2880, 3600)."""

    def forecast(self, history: np.ndarray, horizon: int) -> np.ndarray:
        """Rows len(history) … len(history)+H-1, shape (H, columns)."""
        raise NotImplementedError

    def learn(self, history: np.ndarray, window: int, horizon: int) -> None:
        """Learn the window starting at `window`; its target lies inside `history`."""

    def rescore(self, series: np.ndarray, starts: range, horizon: int) -> np.ndarray:
        """Frozen forecasts of the given windows, (len(starts), H, columns)."""
        return np.stack([self.forecast(series[:s], horizon) for s in starts])


@dataclass
class StreamResult:
    pred: np.ndarray
    true: np.ndarray
    start: np.ndarray
    seconds: float
    frozen_first_fifth: np.ndarray | None = None


def true_windows(series: np.ndarray, starts: range, horizon: int) -> np.ndarray:
    return np.stack([series[s : s + horizon] for s in starts])


def run_stream(
    method: Method, series: np.ndarray, protocol: Protocol, forgetting: bool = True, until: int | None = None
) -> StreamResult:
    """The protocol's windows (those starting before `until`, when given), test then train."""
    horizon, starts = protocol.horizon, protocol.starts()
    if until is not None:
        starts = range(starts.start, min(starts.stop, until))
    method.fit(series[:VALID_END], horizon)
    pred = np.empty((len(starts), horizon, series.shape[1]), dtype=np.float32)
    started = time.perf_counter()
    for i, start in enumerate(starts):
        pred[i] = method.forecast(series[:start], horizon)
        if method.learns:
            method.learn(series[: protocol.visible_after_forecast(start)], protocol.window_to_learn(start), horizon)
    seconds = time.perf_counter() - started
    frozen = None
    if forgetting and method.learns:
        frozen = method.rescore(series, first_fifth(starts), horizon)
    return StreamResult(pred, true_windows(series, starts, horizon), np.asarray(starts), seconds, frozen)


def first_fifth(starts: range) -> range:
    return starts[: len(starts) // 5]


# --- methods --------------------------------------------------------------------------------
class Persistence(Method):
    def forecast(self, history: np.ndarray, horizon: int) -> np.ndarray:
        return np.repeat(history[-1:], horizon, axis=0)


@dataclass
class LinearConfig:
    lookback: int = LOOKBACK
    fit_epochs: int = 30
    fit_learning_rate: float = 1e-3
    online_learning_rate: float = 1e-3
    seed: int = 0


class OnlineNLinear(Method):
    """NLinear (Zeng et al. 2023): one linear map from the last `lookback` rows to the next H,
    shared by every column, on values minus the last row; SGD on each newly learnable window."""

    learns = True

    def __init__(self, config: LinearConfig | None = None) -> None:
        self.config = config or LinearConfig(**load_config("ett").get("linear", {}))

    def _inputs(self, series: np.ndarray, starts) -> tuple:
        import torch

        lookback = self.config.lookback
        windows = np.stack([series[s - lookback : s] for s in starts])  # (n, lookback, C)
        return torch.from_numpy(windows).transpose(1, 2)  # (n, C, lookback)

    def _predict(self, inputs):
        last = inputs[..., -1:]
        return (self.linear(inputs - last) + last).transpose(-1, -2)  # (n, H, C)

    def fit(self, series: np.ndarray, horizon: int) -> None:
        import torch

        torch.manual_seed(self.config.seed)
        c = self.config
        self.linear = torch.nn.Linear(c.lookback, horizon)
        train = range(c.lookback, TRAIN_END - horizon + 1)
        valid = range(TRAIN_END, VALID_END - horizon + 1)
        x_train, y_train = self._inputs(series, train), torch.from_numpy(true_windows(series, train, horizon))
        x_valid, y_valid = self._inputs(series, valid), torch.from_numpy(true_windows(series, valid, horizon))
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
        import torch

        with torch.no_grad():
            return self._predict(self._inputs(history, [len(history)]))[0].numpy()

    def learn(self, history: np.ndarray, window: int, horizon: int) -> None:
        import torch

        target = torch.from_numpy(history[window : window + horizon])[None]
        loss = torch.nn.functional.mse_loss(self._predict(self._inputs(history, [window])), target)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


@dataclass
class SnarimaxConfig:
    p: int = 2
    d: int = 0
    q: int = 0
    m: int = 24
    sp: int = 1
    sd: int = 1
    sq: int = 0
    learning_rate: float = 0.001


class RiverSnarimax(Method):
    """river's SNARIMAX on the target column alone, learning each value once it has arrived
    (under both protocols: an ARIMA cannot learn a value before the ones that precede it)."""

    def __init__(self, target: int, config: SnarimaxConfig | None = None) -> None:
        self.config = config or SnarimaxConfig(**load_config("ett").get("snarimax", {}))
        self.target = target

    def fit(self, series: np.ndarray, horizon: int) -> None:
        from river import linear_model, optim, time_series

        c = self.config
        self.model = time_series.SNARIMAX(
            p=c.p,
            d=c.d,
            q=c.q,
            m=c.m,
            sp=c.sp,
            sd=c.sd,
            sq=c.sq,
            regressor=linear_model.LinearRegression(optimizer=optim.SGD(c.learning_rate), intercept_lr=0.0),
        )
        self.seen = 0

    def forecast(self, history: np.ndarray, horizon: int) -> np.ndarray:
        for value in history[self.seen :, self.target]:
            self.model.learn_one(float(value))
        self.seen = len(history)
        out = np.full((horizon, history.shape[1]), np.nan, dtype=np.float32)
        out[:, self.target] = self.model.forecast(horizon=horizon)
        return out


@dataclass
class LruConfig:
    """Set on ETTh1 (configs/ett.yaml holds the values used)."""

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
    linear_path: dict = field(default_factory=dict)  # fields the `lru-linear` member changes
    variants: dict = field(default_factory=dict)  # method name → fields it changes


class LruStreamMethod(Method):
    """The lru_online forecaster and online learner: at each event it forecasts the next H rows;
    the state is carried through every row of the series. Online, each step backpropagates the
    newly learnable window's loss through the `window` rows before it, starting from the carried
    state there; replay and EWC are the learner's own.

    member "blocks": the configured LRU blocks; "linear": the model's linear path alone (the
    config's `linear_path` fields). `variant` names a `variants` entry (lru-replay, lru-ewc)."""

    learns = True

    def __init__(self, config: LruConfig | None = None, member: str = "blocks", variant: str | None = None) -> None:
        if member not in ("blocks", "linear"):
            raise ValueError(f"member must be blocks or linear, got {member!r}")
        base = config or LruConfig(**load_config("ett").get("lru", {}))
        shaped = replace(base, **base.linear_path) if member == "linear" else base
        self.config = replace(shaped, **base.variants.get(variant, {})) if variant else shaped

    def fit(self, series: np.ndarray, horizon: int) -> None:
        import torch

        from lru_online import LearnerConfig, LRUForecaster, ModelConfig, OnlineLearner

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
                linear_inputs=self._change_columns(columns) if c.linear_state else None,
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
        train = self._inputs(series, 0, TRAIN_END)
        future, mask = self._targets(series[:TRAIN_END], 0, TRAIN_END, horizon)
        valid = range(TRAIN_END, VALID_END - horizon + 1)
        best = (math.inf, None)
        for _ in range(c.fit_epochs):
            self.learner.update_forecasts(train, future, mask)
            error = float(np.mean((self._frozen(series, valid, horizon) - true_windows(series, valid, horizon)) ** 2))
            if error < best[0]:
                best = (error, {k: v.clone() for k, v in model.state_dict().items()})
        model.load_state_dict(best[1])
        # The fit's reservoir holds training windows only; the online phase starts with it.
        set_learning_rate(self.learner, c.online_learning_rate)
        if c.ewc_weight > 0:
            self.learner.consolidate_forecasts(train, future, mask)
        self.states: deque = deque(maxlen=c.window + horizon + 2)  # (rows consumed, state)
        self.state = None
        self.consumed = 0
        self.online_steps = 0

    # Layout: one sequence of all columns, or (channel_independent) each column its own sequence
    # in the batch, sharing the weights, as PatchTST and NLinear treat multivariate series.
    def _inputs(self, history: np.ndarray, first: int, end: int):
        """Model inputs for rows [first, end): the rows, their changes from the row before (which
        stay in range when the levels drift away from the training months), or both."""
        import torch

        rows = history[first:end]
        before = history[first - 1 : end - 1] if first > 0 else np.concatenate([history[:1], history[: end - 1]])
        parts = {"levels": [rows], "changes": [rows - before], "both": [rows, rows - before]}[self.config.inputs]
        stacked = np.stack(parts, axis=-1)  # (T, columns, features)
        if self.config.channel_independent:
            return torch.from_numpy(np.ascontiguousarray(stacked.transpose(1, 0, 2)))
        return torch.from_numpy(np.ascontiguousarray(stacked.reshape(len(rows), -1)))[None]

    def _change_columns(self, columns: int) -> tuple[int, ...]:
        """Where the rows' changes lie among the model inputs (see `_inputs`): the linear path
        reads them alone, so that its forecast of the next changes does not hang on the levels,
        which drift away from the training months."""
        if self.config.inputs == "levels":
            raise ValueError("LruConfig.linear_state needs inputs 'changes' or 'both'")
        features = 2 if self.config.inputs == "both" else 1
        per_sequence = 1 if self.config.channel_independent else columns
        return tuple(column * features + features - 1 for column in range(per_sequence))

    def _targets(self, history: np.ndarray, first: int, end: int, horizon: int):
        future, mask = change_targets(history, first, end, horizon)  # (1, T, H, columns)
        if self.config.channel_independent:
            return future.permute(3, 1, 2, 0).contiguous(), mask.permute(3, 1, 2, 0).contiguous()
        return future, mask

    def _rows(self, forecast) -> np.ndarray:
        """Model forecasts (B, …, H, n) as (…, H, columns)."""
        if self.config.channel_independent:
            return np.moveaxis(forecast[..., 0].numpy(), 0, -1)
        return forecast[0].numpy()

    def _frozen(self, series: np.ndarray, starts: range, horizon: int) -> np.ndarray:
        """Forecasts of the given windows by the current weights, state from row 0."""
        import torch

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
        import torch

        with torch.no_grad():
            self._advance(history)
        return history[-1] + self._rows(self.state.last_forecast)

    def _state_before(self, row: int):
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


def change_targets(history: np.ndarray, first: int, end: int, horizon: int):
    """What the forecaster learns at events [first, end): the next H rows minus the event's own
    row (as NLinear subtracts the last value: the model learns changes, not levels), and a mask
    that is false where a target row lies beyond `history`."""
    import torch

    events = np.arange(first, end)
    rows = events[:, None] + 1 + np.arange(horizon)[None]  # (T, H)
    inside = rows < len(history)
    values = history[np.minimum(rows, len(history) - 1)] - history[events][:, None]
    mask = np.broadcast_to(inside[..., None], values.shape)
    return torch.from_numpy(np.where(mask, values, 0.0).astype(np.float32))[None], torch.from_numpy(mask.copy())[None]


@dataclass
class EnsembleConfig:
    """configs/ett.yaml `ensemble`: the members of the `lru` method and how they are combined."""

    members: tuple[str, ...] = ("lru-blocks", "lru-linear", "linear", "persistence")
    half_life: float = 12.0
    temperature: float = 8.0


class OnlineEnsemble(Method):
    """Forecasters side by side, combined per horizon step and column by their recent losses
    (the product's `lru_online.mixture`, one line). Each member forecasts and learns under the
    protocol as if alone; a window's forecasts are judged when the window is learned, so under
    `delayed` the weights use only targets that have arrived. The losses start from each
    member's error on the validation rows.

    No member can poison the combination: the mixture gives a member whose forecast is not
    finite or leaves the bound of the values seen weight 0 and charges its loss clipped (see
    lru_online.mixture); after the window is learned the member is reset to its last snapshot,
    taken every `SNAPSHOT_WINDOWS` windows over which it stayed healthy."""

    learns = True
    SNAPSHOT_WINDOWS = 96

    def __init__(self, members: dict[str, Method], combine: MixtureConfig, record: bool = False) -> None:
        self.members = members
        self.mixture = LossMixture(combine)
        self.record = record  # keep every window's member forecasts (for bench/ett_tune.py)

    def fit(self, series: np.ndarray, horizon: int) -> None:
        valid = range(TRAIN_END, VALID_END - horizon + 1)
        truth = true_windows(series, valid, horizon)
        losses = []
        for member in self.members.values():
            member.fit(series, horizon)
            losses.append(np.mean((member.rescore(series, valid, horizon) - truth) ** 2, axis=0))
        self.starting_losses = np.stack(losses)
        self.state = MixtureState.fresh(1, *self.starting_losses.shape, torch.from_numpy(self.starting_losses))
        self.state = self.mixture.seen(self.state, torch.from_numpy(series[None, :VALID_END]))
        self.seen = VALID_END
        self.pending: dict[int, np.ndarray] = {}  # window start → member forecasts (K, H, C)
        self.recorded: list[tuple[int, np.ndarray]] = []
        self.report_weights = np.zeros(len(self.members))
        self.report_windows = 0
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
        self.pending[len(history)] = mixed.members[0].numpy()
        if self.record:
            self.recorded.append((len(history), self.pending[len(history)]))
        if len(history) >= TUNING_END and healthy.any():
            self.report_weights += mixed.weights[0].mean(dim=(1, 2)).numpy()
            self.report_windows += 1
        return mixed.forecast[0].numpy().astype(np.float32)

    def learn(self, history: np.ndarray, window: int, horizon: int) -> None:
        for member in self.members.values():
            if member.learns:
                member.learn(history, window, horizon)
        forecasts = self.pending.pop(window, None)
        if forecasts is not None:  # None: a window from before the stream began
            truth = torch.from_numpy(history[window : window + horizon])[None]
            self.state = self.mixture.observe(self.state, torch.from_numpy(forecasts)[None], truth)
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

    def mean_report_weights(self) -> dict[str, float]:
        """Each member's weight, averaged over horizon steps, columns and report windows."""
        share = self.report_weights / max(self.report_windows, 1)
        return {name: float(w) for name, w in zip(self.members, share, strict=True)}


def replay_combination(
    recorded: list[tuple[int, np.ndarray]],
    starting_losses: np.ndarray,
    series: np.ndarray,
    protocol: Protocol,
    combine: MixtureConfig,
) -> np.ndarray:
    """The ensemble's forecasts (n, H, C) for recorded member forecasts (already clipped to the
    bound) under other combination settings: the members do not depend on them, so tuning
    needs no second stream."""
    mixture = LossMixture(combine)
    state = MixtureState.fresh(1, *starting_losses.shape, torch.from_numpy(starting_losses))
    by_start = {start: torch.from_numpy(forecasts)[None] for start, forecasts in recorded}
    out = []
    for start, _ in recorded:
        out.append(torch.einsum("bmhs,bmhs->bhs", mixture.weights(state), by_start[start])[0].numpy())
        window = protocol.window_to_learn(start)
        if window in by_start:
            truth = torch.from_numpy(series[window : window + protocol.horizon])[None]
            state = mixture.observe(state, by_start[window], truth)
    return np.stack(out).astype(np.float32)


MEMBERS: dict[str, Callable[[str | None], Method]] = {
    "lru-blocks": lambda variant: LruStreamMethod(member="blocks", variant=variant),
    "lru-linear": lambda variant: LruStreamMethod(member="linear", variant=variant),
    "linear": lambda variant: OnlineNLinear(),
    "persistence": lambda variant: Persistence(),
}


def ensemble(variant: str | None = None, record: bool = False) -> OnlineEnsemble:
    """The configured `lru` method (configs/ett.yaml `ensemble`), its LRU members with a variant."""
    data = load_config("ett").get("ensemble", {})
    config = EnsembleConfig(**{**data, "members": tuple(data.get("members", EnsembleConfig.members))})
    unknown = set(config.members) - set(MEMBERS)
    if unknown:
        raise ValueError(f"configs/ett.yaml ensemble.members: unknown {sorted(unknown)}; known: {sorted(MEMBERS)}")
    members = {name: MEMBERS[name](variant) for name in config.members}
    return OnlineEnsemble(members, MixtureConfig(config.half_life, config.temperature), record)


# Each builds a fresh method, given the index of the target column and the protocol's name (the
# same configuration serves both protocols).
METHODS: dict[str, Callable[[int, str], Method]] = {
    "lru": lambda target, protocol: ensemble(),
    "linear": lambda target, protocol: OnlineNLinear(),
    "persistence": lambda target, protocol: Persistence(),
    "snarimax": lambda target, protocol: RiverSnarimax(target),
    "lru-blocks": lambda target, protocol: LruStreamMethod(member="blocks"),
    "lru-linear": lambda target, protocol: LruStreamMethod(member="linear"),
    "lru-replay": lambda target, protocol: ensemble(variant="lru-replay"),
    "lru-ewc": lambda target, protocol: ensemble(variant="lru-ewc"),
}
DEFAULT_METHODS = "lru,linear,persistence,snarimax"


# --- figures --------------------------------------------------------------------------------
SPLITS = {"report": lambda start: start >= TUNING_END, "tuning": lambda start: start < TUNING_END}


def figures(result: StreamResult, target: int) -> dict[str, float]:
    """Errors over the whole stream (the published protocol) and over each split."""
    error = result.pred - result.true
    out = {
        "mse": float(np.mean(error**2)),
        "mae": float(np.mean(np.abs(error))),
        "ot_mse": float(np.mean(error[..., target] ** 2)),
        "ot_mae": float(np.mean(np.abs(error[..., target]))),
        "ms_per_step": 1000 * result.seconds / len(result.start),
    }
    for split, inside in SPLITS.items():
        part = error[inside(result.start)]
        out[f"{split}_mse"] = float(np.mean(part**2))
        out[f"{split}_mae"] = float(np.mean(np.abs(part)))
        out[f"{split}_ot_mse"] = float(np.mean(part[..., target] ** 2))
        out[f"{split}_ot_mae"] = float(np.mean(np.abs(part[..., target])))
    if result.frozen_first_fifth is not None:
        fifth = len(result.frozen_first_fifth)
        out["first_fifth_streaming_mse"] = float(np.mean(error[:fifth] ** 2))
        out["first_fifth_frozen_mse"] = float(np.mean((result.frozen_first_fifth - result.true[:fifth]) ** 2))
    return out


def print_table(results: dict[str, dict[int, dict]], horizons: list[int], etth2: bool) -> None:
    """The report split, the whole stream (with the published rows) and the tuning split apart."""
    sections = (
        ("report", f"report split: windows starting at rows {TUNING_END} to {STREAM_END} - H (the last 80 %)"),
        ("", "whole stream, the published protocol (its first 20 % is the tuning split)"),
        (
            "tuning",
            f"tuning split: windows starting at rows {VALID_END} to {TUNING_END - 1}, where configs/ett.yaml's "
            "combination was chosen — not a result",
        ),
    )
    for prefix, title in sections:
        key = f"{prefix}_" if prefix else ""
        print(f"\n{title}")
        header = ["method", "H", "MSE", "MAE", "÷persist", "OT MSE", "OT MAE"]
        if not prefix:
            header += ["ms/step", "fifth:stream", "fifth:frozen"]
        print(f"{header[0]:<14}{header[1]:>4}" + "".join(f"{h:>13}" for h in header[2:]))
        for horizon in horizons:
            persistence = results.get("persistence", {}).get(horizon, {}).get(f"{key}mse")
            for name, by_horizon in results.items():
                f = by_horizon[horizon]
                mse = f[f"{key}mse"]
                ratio = mse / persistence if persistence and not math.isnan(mse) else math.nan
                cells = [mse, f[f"{key}mae"], ratio, f[f"{key}ot_mse"], f[f"{key}ot_mae"]]
                if not prefix:
                    cells += [
                        f["ms_per_step"],
                        f.get("first_fifth_streaming_mse", math.nan),
                        f.get("first_fifth_frozen_mse", math.nan),
                    ]
                print(f"{name:<14}{horizon:>4}" + "".join(f"{v:>13.3f}" for v in cells))
            if etth2 and not prefix:
                for name, row in PUBLISHED_ETTH2.items():
                    if horizon in row:
                        print(f"  {name + ' (paper)':<12}{horizon:>4}{row[horizon]:>13.3f}")
    if any("member_weights" in f for by_horizon in results.values() for f in by_horizon.values()):
        print("\nmember weights of the ensembles, mean over horizon steps, columns and report windows")
        for name, by_horizon in results.items():
            for horizon in horizons:
                shares = by_horizon[horizon].get("member_weights")
                if shares:
                    print(f"{name:<14}{horizon:>4}  " + "  ".join(f"{m} {w:.2f}" for m, w in shares.items()))


def save_plots(folder: Path, results: dict[str, dict[int, StreamResult]], columns: tuple[str, ...], label: str) -> None:
    plt = pyplot()

    folder.mkdir(parents=True, exist_ok=True)
    target = columns.index(TARGET_COLUMN)
    horizons = sorted(next(iter(results.values())))
    for horizon in horizons:
        fig, (stretch, cumulative) = plt.subplots(2, 1, figsize=(11, 7))
        any_result = next(iter(results.values()))[horizon]
        span = slice(0, 24 * 14)  # two weeks from the start of the stream
        stretch.plot(any_result.start[span], any_result.true[span, -1, target], color="black", label="truth")
        for name, by_horizon in results.items():
            r = by_horizon[horizon]
            stretch.plot(r.start[span], r.pred[span, -1, target], label=name, linewidth=1)
            squared = (
                np.mean((r.pred - r.true) ** 2, axis=(1, 2))
                if name != "snarimax"
                else np.mean((r.pred[..., target] - r.true[..., target]) ** 2, axis=1)
            )
            cumulative.plot(r.start, np.cumsum(squared) / np.arange(1, len(squared) + 1), label=name)
        stretch.set_title(f"{label}: {TARGET_COLUMN}, the forecast {horizon} step(s) ahead (standardised)")
        stretch.set_xlabel("row of the forecast window's first target step")
        cumulative.set_title("cumulative MSE over the stream (snarimax: OT only)")
        cumulative.set_xlabel("row")
        cumulative.set_yscale("log")
        for axis in (stretch, cumulative):
            axis.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / f"h{horizon}.png", dpi=110)
        plt.close(fig)


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--protocol", choices=("fsnet", "delayed"), required=True)
    parser.add_argument("--horizons", default="1,24,48")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plots", type=Path, default=None)
    args = parser.parse_args()
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = set(names) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {sorted(METHODS)}")
    horizons = [int(h) for h in args.horizons.split(",")]
    series = load_series(args.data)
    target = series.columns.index(TARGET_COLUMN)
    import torch

    print(
        f"{args.data.name}: {len(series.values)} rows used, columns {', '.join(series.columns)}, "
        f"protocol {args.protocol}, horizons {horizons}; python {sys.version.split()[0]}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    streams: dict[str, dict[int, StreamResult]] = {}
    results: dict[str, dict[int, dict]] = {}
    for name in names:
        for horizon in horizons:
            method = METHODS[name](target, args.protocol)
            result = run_stream(method, series.values, Protocol(args.protocol, horizon))
            streams.setdefault(name, {})[horizon] = result
            results.setdefault(name, {})[horizon] = figures(result, target)
            if isinstance(method, OnlineEnsemble):
                results[name][horizon]["member_weights"] = method.mean_report_weights()
            folder = args.out / name
            folder.mkdir(parents=True, exist_ok=True)
            np.savez(
                folder / f"h{horizon}.npz",
                pred=result.pred,
                true=result.true,
                start=result.start,
                mean=series.mean,
                std=series.std,
            )
    print_table(results, horizons, etth2="etth2" in args.data.name.lower())
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "data": args.data.name,
                    "protocol": args.protocol,
                    # NaN (snarimax has no all-column error) as null: strict JSON readers refuse NaN.
                    "splits": {
                        "tuning": f"windows starting at rows {VALID_END} to {TUNING_END - 1}",
                        "report": f"windows starting at rows {TUNING_END} to {STREAM_END} - H",
                    },
                    "methods": {
                        name: {str(h): {k: _json_safe(v) for k, v in f.items()} for h, f in by_h.items()}
                        for name, by_h in results.items()
                    },
                },
                indent=2,
            )
        )
    if args.plots:
        save_plots(args.plots, streams, series.columns, f"{args.data.name}, {args.protocol}")


if __name__ == "__main__":
    main()
