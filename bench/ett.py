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

Methods: `lru` — one configuration for every series and both protocols (configs/ett.yaml): the
product's series ensemble (flows.model.series_ensemble), as OneNet does, of the members
configs/ett.yaml names among the lru_online forecaster with LRU blocks (`lru-blocks`), the
forecaster's linear path alone (`lru-linear`), the online NLinear, persistence and the rows a
day and a week back (`seasonal-day`, `seasonal-week`, periods in rows from the `date` column's
spacing), combined per horizon step and column by their recent losses (lru_online.mixture),
each LRU carrying its state through the whole series; `linear` — NLinear on the last 60 rows,
updated by SGD every step (flows.model.series_nlinear); `persistence` — the last row repeated; `snarimax` — river's
SNARIMAX on `OT` alone (reported on `OT`), the one forecaster of this file, a baseline;
`lru-blocks`, `lru-linear` — one member alone;
`lru-replay`, `lru-ewc` — the lru with the learner's replay or EWC, for the forgetting
comparison (not run by default).

Splits: the ensemble's members and settings were chosen on the first 20 % of the stream
(windows starting at rows 3600–5759) of ETTh1, of its time-reversed copy and of its rows after
14,400, and of the 17 nab-aws streams and SKAB's anomaly-free run cut in the same shares
(`python bench/ett_tune.py`); the report split is the rest. The table prints the report split,
the whole stream (the published protocol, comparable with the papers) and the tuning split (not
a result) apart.

Forgetting (backward transfer): after the stream, each learning method is frozen and re-scores
the first fifth of the online windows; the table gives the MSE it had there while streaming and
the MSE of the frozen final model (lower frozen = it kept or improved what it knew).

Writes `--out/METHOD/h{H}.npz` (`pred`, `true` (n, H, 7), `start` (n,), `mean`, `std` (7,)),
prints one table, `--json` the same figures, `--plots` forecast and cumulative-error charts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import load_config, pyplot
from flows.model.series_ensemble import SeriesEnsemble
from flows.model.series_forecaster import Persistence, SeasonalPersistence, SeriesForecaster, target_windows
from flows.model.series_lru import LruSeriesForecaster, SeriesLruConfig
from flows.model.series_nlinear import NLinearConfig, OnlineNLinear
from lru_online.mixture import MixtureConfig
from lru_online.paced_mixture import PacedMixtureConfig, paced_config


@dataclass(frozen=True)
class Cuts:
    """Where a series' rows divide: training [0, train_end), validation [train_end, valid_end),
    then the online windows, starting at valid_end, up to stream_end. Windows starting before
    `tuning_end` (the first 20 % of the stream) are the tuning split."""

    train_end: int = 2880
    valid_end: int = 3600
    stream_end: int = 14400

    @property
    def tuning_end(self) -> int:
        return self.valid_end + (self.stream_end - self.valid_end) // 5

    @classmethod
    def proportional(cls, rows: int) -> Cuts:
        """ETT's shares (20 % training, 5 % validation, 75 % stream) of a series of `rows` rows."""
        ett = cls()
        return cls(round(rows * ett.train_end / ett.stream_end), round(rows * ett.valid_end / ett.stream_end), rows)


ETT_CUTS = Cuts()
TRAIN_END, VALID_END, STREAM_END = ETT_CUTS.train_end, ETT_CUTS.valid_end, ETT_CUTS.stream_end
TUNING_END = ETT_CUTS.tuning_end
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
    rows_per_day: int = 24  # from the `date` column's spacing (ETTh: hourly, ETTm: 15 minutes)
    cuts: Cuts = ETT_CUTS


def load_series(path: Path) -> Series:
    frame = pd.read_csv(path)
    rows_per_day = 24
    if "date" in frame:
        spacing = pd.to_datetime(frame["date"]).diff().median()
        if not pd.isna(spacing) and spacing > pd.Timedelta(0):
            rows_per_day = max(1, round(pd.Timedelta(days=1) / spacing))
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
    values, mean, std = standardised(raw)
    return Series(values, tuple(frame.columns), mean, std, rows_per_day)


def standardised(raw: np.ndarray, train_end: int = TRAIN_END) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows scaled by the mean and deviation of their first `train_end` (a constant column by
    1), as float32, with that mean and deviation."""
    mean, std = raw[:train_end].mean(axis=0), raw[:train_end].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return ((raw - mean) / std).astype(np.float32), mean, std


@dataclass(frozen=True)
class Protocol:
    name: str  # fsnet | delayed
    horizon: int
    cuts: Cuts = ETT_CUTS

    def __post_init__(self) -> None:
        if self.name not in ("fsnet", "delayed"):
            raise ValueError(f"protocol must be fsnet or delayed, got {self.name!r}")
        stream = self.cuts.stream_end - self.cuts.valid_end
        if not 1 <= self.horizon <= stream:
            raise ValueError(f"horizon must be in [1, {stream}], got {self.horizon}")

    def starts(self) -> range:
        """Row of each online window's first target step: 3600, 3601, …, 14400 - H on ETT."""
        return range(self.cuts.valid_end, self.cuts.stream_end - self.horizon + 1)

    def visible_after_forecast(self, start: int) -> int:
        """How many rows a method may learn from once it has forecast the window at `start`."""
        return start + self.horizon if self.name == "fsnet" else start + 1

    def window_to_learn(self, start: int) -> int:
        """The window whose whole target has become learnable after forecasting `start`."""
        return self.visible_after_forecast(start) - self.horizon


@dataclass
class StreamResult:
    pred: np.ndarray
    true: np.ndarray
    start: np.ndarray
    seconds: float
    frozen_first_fifth: np.ndarray | None = None


def run_stream(
    method: SeriesForecaster, series: np.ndarray, protocol: Protocol, forgetting: bool = True, until: int | None = None
) -> StreamResult:
    """The protocol's windows (those starting before `until`, when given), test then train."""
    horizon, starts = protocol.horizon, protocol.starts()
    if until is not None:
        starts = range(starts.start, min(starts.stop, until))
    method.fit(series[: protocol.cuts.valid_end], horizon, protocol.cuts.train_end)
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
    return StreamResult(pred, target_windows(series, starts, horizon), np.asarray(starts), seconds, frozen)


def first_fifth(starts: range) -> range:
    return starts[: len(starts) // 5]


# --- methods --------------------------------------------------------------------------------
# The forecasters are the product's (flows.model.series_*); this bench builds them from
# configs/ett.yaml and drives them under the protocol. SNARIMAX is river's, a baseline.
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


class RiverSnarimax(SeriesForecaster):
    """river's SNARIMAX on the target column alone, learning each value once it has arrived
    (under both protocols: an ARIMA cannot learn a value before the ones that precede it)."""

    def __init__(self, target: int, config: SnarimaxConfig | None = None) -> None:
        self.config = config or SnarimaxConfig(**load_config("ett").get("snarimax", {}))
        self.target = target

    def fit(self, series: np.ndarray, horizon: int, train_rows: int) -> None:
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
class EnsembleConfig:
    """configs/ett.yaml `ensemble`: the members of the `lru` method and how they are combined."""

    members: tuple[str, ...] = ("lru-blocks", "lru-linear", "linear", "persistence", "seasonal-day", "seasonal-week")
    half_life: float = 1.5
    temperature: float = 2.0
    # Several paces instead (lru_online/paced_mixture.py): each level a {half_life, temperature},
    # `between` the same for weighing the levels; they replace the two fields above.
    levels: tuple[dict, ...] = ()
    between: dict | None = None

    def combination(self) -> PacedMixtureConfig:
        if self.levels:
            return paced_config({"levels": self.levels, "between": self.between})
        return PacedMixtureConfig.single(self.half_life, self.temperature)


def lru_config(member: str = "blocks", variant: str | None = None) -> SeriesLruConfig:
    """configs/ett.yaml `lru` for one LRU member: "blocks", the configured LRU blocks, or
    "linear", the model's linear path alone (the `linear_path` fields changed); `variant` names
    a `variants` entry (lru-replay, lru-ewc) whose fields change too."""
    if member not in ("blocks", "linear"):
        raise ValueError(f"member must be blocks or linear, got {member!r}")
    fields = dict(load_config("ett").get("lru", {}))
    linear_path, variants = fields.pop("linear_path", {}), fields.pop("variants", {})
    if member == "linear":
        fields.update(linear_path)
    if variant:
        fields.update(variants.get(variant, {}))
    return SeriesLruConfig(**fields)


def nlinear() -> OnlineNLinear:
    return OnlineNLinear(NLinearConfig(**load_config("ett").get("linear", {})))


# Each builds a member given the variant of its LRU (None: as configured) and the series' rows
# per day (the seasonal members' periods are a day and a week of rows).
MEMBERS: dict[str, Callable[[str | None, int], SeriesForecaster]] = {
    "lru-blocks": lambda variant, rows_per_day: LruSeriesForecaster(lru_config("blocks", variant)),
    "lru-linear": lambda variant, rows_per_day: LruSeriesForecaster(lru_config("linear", variant)),
    "linear": lambda variant, rows_per_day: nlinear(),
    "persistence": lambda variant, rows_per_day: Persistence(),
    "seasonal-day": lambda variant, rows_per_day: SeasonalPersistence(rows_per_day),
    "seasonal-week": lambda variant, rows_per_day: SeasonalPersistence(7 * rows_per_day),
}


SEASONAL_DAYS = {"seasonal-day": 1, "seasonal-week": 7}  # each seasonal member's period in days


def usable_members(names: tuple[str, ...], rows_per_day: int, rows_before_stream: int) -> tuple[str, ...]:
    """The members with something of their own to forecast. A seasonal member whose period is
    longer than the rows before the stream (a week of 5-minute readings against 1,008 rows, a
    day of a 1-second log) repeats the last row through its first period: a copy of persistence,
    which only takes weight from the others; it is left out."""
    return tuple(name for name in names if SEASONAL_DAYS.get(name, 0) * rows_per_day <= rows_before_stream)


def ensemble(
    variant: str | None = None,
    record: bool = False,
    rows_per_day: int = 24,
    members: tuple[str, ...] | None = None,
    combine: MixtureConfig | PacedMixtureConfig | None = None,
    cuts: Cuts = ETT_CUTS,
) -> SeriesEnsemble:
    """The configured `lru` method (configs/ett.yaml `ensemble`), its LRU members with a variant;
    `members` and `combine` replace the configured ones (bench/ett_tune.py tries others); the
    members `usable_members` keeps on a series so cut. Its mean member weights count the windows
    from the tuning split's end on (the report split)."""
    data = load_config("ett").get("ensemble", {})
    config = EnsembleConfig(**{**data, "members": tuple(data.get("members", EnsembleConfig.members))})
    names = members or config.members
    unknown = set(names) - set(MEMBERS)
    if unknown:
        raise ValueError(f"configs/ett.yaml ensemble.members: unknown {sorted(unknown)}; known: {sorted(MEMBERS)}")
    built = {name: MEMBERS[name](variant, rows_per_day) for name in usable_members(names, rows_per_day, cuts.valid_end)}
    combine = combine or config.combination()
    return SeriesEnsemble(built, combine, record, cuts.tuning_end)


# Each builds a fresh method, given the index of the target column, the protocol's name (the
# same configuration serves both protocols) and the series' rows per day.
METHODS: dict[str, Callable[[int, str, int], SeriesForecaster]] = {
    "lru": lambda target, protocol, rows_per_day: ensemble(rows_per_day=rows_per_day),
    "linear": lambda target, protocol, rows_per_day: nlinear(),
    "persistence": lambda target, protocol, rows_per_day: Persistence(),
    "snarimax": lambda target, protocol, rows_per_day: RiverSnarimax(target),
    "lru-blocks": lambda target, protocol, rows_per_day: LruSeriesForecaster(lru_config("blocks")),
    "lru-linear": lambda target, protocol, rows_per_day: LruSeriesForecaster(lru_config("linear")),
    "lru-replay": lambda target, protocol, rows_per_day: ensemble(variant="lru-replay", rows_per_day=rows_per_day),
    "lru-ewc": lambda target, protocol, rows_per_day: ensemble(variant="lru-ewc", rows_per_day=rows_per_day),
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
            method = METHODS[name](target, args.protocol, series.rows_per_day)
            result = run_stream(method, series.values, Protocol(args.protocol, horizon))
            streams.setdefault(name, {})[horizon] = result
            results.setdefault(name, {})[horizon] = figures(result, target)
            if isinstance(method, SeriesEnsemble):
                results[name][horizon]["member_weights"] = method.mean_weights()
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
