"""Chooses the `lru` ensemble's members and combination settings on the tuning splits of
several series at once.

    python bench/ett_tune.py [--data ../shared/data/ett/ETTh1.csv ...] [--no-reversed] [--no-tail]
                             [--nab DIR] [--skab FILE] [--jobs 2] [--recordings FILE]
                             [--horizons 1,24,48] [--half-lives 0.75,1.5,3,6] [--temperatures 1,2,4]
                             [--paced 1.5/4+96/8,...] [--between 24/8,96/8]
                             [--optional-members seasonal-day,seasonal-week]

Series, in three families:
- ETT: each `--data` file, unless `--no-reversed` its time-reversed copy (the file's rows
  backwards, cut and standardised as bench/ett.py cuts any file: a series with the same columns
  and periods whose trends and level shifts run the other way; for ETTh1 its training rows are
  the file's last 2,880, which no split of the forward bench uses, but its tuning windows lie on
  rows of the forward report split), and unless `--no-tail` its rows after the 14,400 the bench
  streams (3,020 on ETTh1, which no split of the forward bench uses) as a series of their own;
- nab-aws (`--nab DIR`): every labelled real server-metric stream of the folder, one column each;
- SKAB (`--skab FILE`): the anomaly-free run's eight sensors.
A series of another length than ETT's is cut in ETT's shares (20 % training, 5 % validation, the
rest streamed) and standardised on its own training rows; its rows per day come from its time
column's spacing. The tuning split of each is the first 20 % of its online stream (on ETT files
the windows starting at rows 3600-5759); bench/ett.py reports the rest of ETT's apart. The
labelled anomalies of nab-aws stay in: a forecaster meets them in a stream too.

For each series, protocol and horizon the ensemble of configs/ett.yaml's members plus every
optional member runs once through the tuning windows, its members' forecasts recorded; every
setting (a member set: the configured members with any subset of the optional ones, times a
combination: one half-life and temperature, or with `--paced` several such levels, each
half-life/temperature joined by `+`, weighed by a `--between` half-life/temperature: see
lru_online/paced_mixture.py) is then replayed from the recording (the members depend neither on
each other nor on the combination, so a replay is what a run with that setting would forecast).
A seasonal member whose period the rows before a series' stream do not hold is left out there
(bench/ett.usable_members: it would be a copy of persistence), so on SKAB's 1-second log a
member set with seasonal members is the set without them.
`--jobs N` records and replays in N processes of one torch thread each; `--recordings FILE`
keeps the recordings, so that a wider grid is replayed without streaming again.

The rule, fixed before any report figure was looked at: a setting's score is its MSE ÷
persistence's averaged over each family's series, both protocols and the horizons, then over the
families (each family counts once, however many series it holds); the lowest wins, and among
the settings within 0.005 of it the one with the fewest members, then the fewest levels (one
half-life is simpler than several), then the lowest score.
Printed: every setting's score, its families' and its worst series, the chosen one's figures
per series and their spread, to be copied into configs/ett.yaml by hand.
"""

from __future__ import annotations

import argparse
import itertools
import pickle
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.common import load_config
from bench.ett import (
    STREAM_END,
    Cuts,
    Protocol,
    Series,
    ensemble,
    load_series,
    run_stream,
    standardised,
    usable_members,
)
from flows.model.series_ensemble import replay_combination
from lru_online.mixture import MixtureConfig
from lru_online.paced_mixture import PacedMixtureConfig

TIE = 0.005  # scores this close count as equal: the simpler member set is kept


@dataclass
class Recording:
    """One series under one protocol and horizon: every member's forecasts of the tuning windows."""

    series: str
    family: str
    protocol: Protocol
    values: np.ndarray
    members: tuple[str, ...]
    recorded: list[tuple[int, np.ndarray, np.ndarray]]  # (window start, (K, H, C) forecasts, (K,) healthy)
    starting_losses: np.ndarray  # (K, H, C)
    true: np.ndarray
    persistence: float  # persistence's MSE on the same windows

    def ratio(self, members: tuple[str, ...], combine: PacedMixtureConfig) -> float:
        """The ensemble of `members` under `combine`: its MSE ÷ persistence's (of the members
        this series could use: those the recording holds)."""
        kept = self.restricted(tuple(m for m in members if m in self.members))
        horizon = self.protocol.horizon
        forecasts = replay_combination(
            kept.recorded, kept.starting_losses, self.values, horizon, self.protocol.window_to_learn, combine
        )
        return float(np.mean((forecasts - self.true) ** 2)) / self.persistence

    def restricted(self, members: tuple[str, ...]) -> Recording:
        """The recording of `members` alone (members do not depend on each other)."""
        keep = [self.members.index(m) for m in members]
        recorded = [(start, forecasts[keep], healthy[keep]) for start, forecasts, healthy in self.recorded]
        return replace(self, members=members, recorded=recorded, starting_losses=self.starting_losses[keep])


def reversed_series(path: Path) -> Series:
    """The file's rows backwards, cut to the protocol's rows and standardised on its training rows."""
    forward = load_series(path)  # validates the file
    frame = pd.read_csv(path).drop(columns="date", errors="ignore")
    values, mean, std = standardised(frame.to_numpy(dtype=np.float64)[::-1][:STREAM_END])
    return replace(forward, values=np.ascontiguousarray(values), mean=mean, std=std)


def tail_series(path: Path) -> Series | None:
    """The file's rows after the STREAM_END the bench streams, as a series of their own (None
    when fewer than 1,000 are left)."""
    forward = load_series(path)  # validates the file
    raw = pd.read_csv(path).drop(columns="date", errors="ignore").to_numpy(dtype=np.float64)[STREAM_END:]
    if len(raw) < 1000:
        return None
    cuts = Cuts.proportional(len(raw))
    values, mean, std = standardised(raw, cuts.train_end)
    return replace(forward, values=values, mean=mean, std=std, cuts=cuts)


def table_series(path: Path, time_column: str, sep: str = ",", drop: tuple[str, ...] = ()) -> Series:
    """Any time-stamped table of numeric columns (nab-aws, SKAB), cut in ETT's shares and
    standardised on its own training rows; rows per day from the time column's spacing."""
    frame = pd.read_csv(path, sep=sep)
    if time_column not in frame:
        raise SystemExit(f"{path}: no {time_column!r} column")
    spacing = pd.to_datetime(frame.pop(time_column)).diff().median()
    frame = frame.drop(columns=[c for c in drop if c in frame])
    raw = frame.to_numpy(dtype=np.float64)
    if not np.isfinite(raw).all():
        row = int(np.argwhere(~np.isfinite(raw))[0, 0])
        raise SystemExit(f"{path}: row {row + 2} (line) holds a missing or non-finite value")
    rows_per_day = max(1, round(pd.Timedelta(days=1) / spacing)) if spacing > pd.Timedelta(0) else 1
    cuts = Cuts.proportional(len(raw))
    values, mean, std = standardised(raw, cuts.train_end)
    return Series(values, tuple(frame.columns), mean, std, rows_per_day, cuts)


def record(
    name: str,
    series: Series,
    protocol: Protocol,
    members: tuple[str, ...],
    combine: PacedMixtureConfig,
    family: str = "ETT",
) -> Recording:
    protocol = replace(protocol, cuts=series.cuts)
    method = ensemble(record=True, rows_per_day=series.rows_per_day, members=members, combine=combine, cuts=series.cuts)
    result = run_stream(method, series.values, protocol, forgetting=False, until=series.cuts.tuning_end)
    replayed = replay_combination(
        method.recorded, method.starting_losses, series.values, protocol.horizon, protocol.window_to_learn, combine
    )
    np.testing.assert_allclose(replayed, result.pred, rtol=1e-5, atol=1e-6)  # the replay is the ensemble
    persistence = float(np.mean((series.values[result.start - 1][:, None] - result.true) ** 2))
    return Recording(
        name,
        family,
        protocol,
        series.values,
        tuple(method.members),
        method.recorded,
        method.starting_losses,
        result.true,
        persistence,
    )


def _record_alone(task: tuple) -> tuple[Recording, float]:
    """One recording in a worker process of one torch thread, with its seconds."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    return record(*task), time.perf_counter() - started


def _replay_all(task: tuple[Recording, list]) -> list[float]:
    torch.set_num_threads(1)
    recording, settings = task
    return [recording.ratio(members, combine) for members, combine in settings]


Setting = tuple[tuple[str, ...], PacedMixtureConfig]


def by_family(values: list[float], families: list[str]) -> dict[str, float]:
    """Each family's mean of its values (`families[i]` is the family of `values[i]`)."""
    return {
        g: float(np.mean([v for v, f in zip(values, families, strict=True) if f == g])) for g in sorted(set(families))
    }


def family_mean(values: list[float], families: list[str]) -> float:
    """The mean over each family's values, then over the families: each family counts once."""
    return float(np.mean(list(by_family(values, families).values())))


def choose(scores: dict[Setting, list[float]], families: list[str] | None = None) -> Setting:
    """The rule: the lowest score (`family_mean`, the families of the values in order; one family
    when None); among the settings within `TIE` of it, the fewest members, then the fewest
    levels, then the lowest score (the first in the grid among equals)."""
    families = families or ["one"] * len(next(iter(scores.values())))
    mean = {key: family_mean(values, families) for key, values in scores.items()}
    best = min(mean.values())
    near = [key for key in scores if mean[key] <= best + TIE]
    return min(near, key=lambda key: (len(key[0]), len(key[1].levels), mean[key]))


def load_recordings(path: Path, tasks: list[tuple]) -> list[Recording]:
    """The recordings a run of the same series, protocols, horizons and members saved in `path`
    (this script's own pickle: read only files you wrote)."""
    with path.open("rb") as saved:
        recordings = pickle.load(saved)
    wanted = [(name, protocol.name, protocol.horizon) for name, _, protocol, *_ in tasks]
    found = [(r.series, r.protocol.name, r.protocol.horizon) for r in recordings]
    # A recording holds the members its series could use (`usable_members`), no more.
    usable = [
        usable_members(members, series.rows_per_day, series.cuts.valid_end) for _, series, _, members, *_ in tasks
    ]
    if found != wanted or any(not set(u) <= set(r.members) for r, u in zip(recordings, usable, strict=True)):
        raise SystemExit(f"{path}: recorded for other series, horizons or members; remove it to record again")
    # Members do not depend on each other: a recording of more members holds each one's record.
    return [r.restricted(u) for r, u in zip(recordings, usable, strict=True)]


def pair(text: str) -> MixtureConfig:
    """ "half-life/temperature" as a level's settings."""
    half_life, _, temperature = text.partition("/")
    try:
        return MixtureConfig(float(half_life), float(temperature))
    except ValueError as bad:
        raise SystemExit(f"{text!r}: not a half-life/temperature pair ({bad})") from None


def tuning_series(args: argparse.Namespace, default_data: Path) -> dict[str, tuple[str, Series]]:
    """Name → (family, series) of every series the command line asks for."""
    series: dict[str, tuple[str, Series]] = {}
    for path in args.data or [default_data]:
        series[path.stem] = ("ETT", load_series(path))
        if not args.no_reversed:
            series[f"{path.stem} reversed"] = ("ETT", reversed_series(path))
        tail = None if args.no_tail else tail_series(path)
        if tail is not None:
            series[f"{path.stem} tail"] = ("ETT", tail)
    if args.nab:
        for path in sorted(args.nab.glob("*.csv")):
            series[path.stem] = ("nab-aws", table_series(path, "timestamp"))
    if args.skab:
        labels = ("anomaly", "changepoint")
        series[f"skab {args.skab.stem}"] = ("SKAB", table_series(args.skab, "datetime", ";", labels))
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(__file__).resolve().parents[2] / "shared/data"
    parser.add_argument("--data", type=Path, action="append", default=None, help="an ETT file (repeatable)")
    parser.add_argument("--no-reversed", action="store_true", help="leave out the time-reversed copies")
    parser.add_argument("--no-tail", action="store_true", help="leave out the rows after the bench's stream")
    parser.add_argument("--nab", type=Path, default=None, help="a folder of nab-aws streams (timestamp,value)")
    parser.add_argument("--skab", type=Path, default=None, help="SKAB's anomaly-free.csv")
    parser.add_argument("--jobs", type=int, default=1, help="processes (one torch thread each)")
    parser.add_argument(
        "--recordings", type=Path, default=None, help="a file to keep the recordings in (read back when it exists)"
    )
    parser.add_argument("--horizons", default="1,24,48")
    parser.add_argument("--half-lives", default="0.75,1.5,3,6")
    parser.add_argument("--temperatures", default="1,2,4")
    parser.add_argument(
        "--paced", default="", help="level sets to try: half-life/temperature pairs joined by +, sets by commas"
    )
    parser.add_argument("--between", default="", help="half-life/temperature pairs weighing the --paced levels")
    parser.add_argument("--optional-members", default="seasonal-day,seasonal-week")
    args = parser.parse_args()
    horizons = [int(h) for h in args.horizons.split(",")]
    optional = tuple(m for m in args.optional_members.split(",") if m)
    base = tuple(m for m in load_config("ett").get("ensemble", {}).get("members", ()) if m not in optional)
    member_sets = [
        base + tuple(m for m in optional if m in subset)
        for size in range(len(optional) + 1)
        for subset in itertools.combinations(optional, size)
    ]
    combinations = [
        PacedMixtureConfig.single(float(h), float(t))
        for h, t in itertools.product(args.half_lives.split(","), args.temperatures.split(","))
    ]
    combinations += [
        PacedMixtureConfig(tuple(map(pair, levels.split("+"))), pair(between))
        for levels, between in itertools.product(
            [p for p in args.paced.split(",") if p], [b for b in args.between.split(",") if b]
        )
    ]
    series = tuning_series(args, shared / "ett/ETTh1.csv")
    print(
        f"series {', '.join(f'{name} ({family}, {len(s.values)} rows)' for name, (family, s) in series.items())}; "
        "tuning windows: the first 20 % of each stream; "
        f"torch {torch.__version__}, {args.jobs} process(es) of 1 thread"
    )
    everything = base + optional
    tasks = [
        (name, data, Protocol(protocol_name, horizon), everything, combinations[0], family)
        for (name, (family, data)), protocol_name, horizon in itertools.product(
            series.items(), ("fsnet", "delayed"), horizons
        )
    ]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        recordings = []
        cached = load_recordings(args.recordings, tasks) if args.recordings and args.recordings.exists() else None
        recorded = ((r, 0.0) for r in cached) if cached else pool.map(_record_alone, tasks)
        for recording, seconds in recorded:
            recordings.append(recording)
            forecasts = np.stack([f for _, f, _ in recording.recorded], axis=1)  # (K, windows, H, C)
            alone = {
                m: float(np.mean((forecasts[k] - recording.true) ** 2)) / recording.persistence
                for k, m in enumerate(recording.members)
            }
            print(
                f"{recording.series:<34} {recording.protocol.name:<8} H={recording.protocol.horizon:<3} "
                f"persistence MSE {recording.persistence:.3f}; members ÷persist: "
                + ", ".join(f"{m} {r:.3f}" for m, r in alone.items())
                + f"  ({seconds:.0f} s)",
                flush=True,
            )
        if args.recordings and not cached:
            with args.recordings.open("wb") as out:
                pickle.dump(recordings, out)
        settings = list(itertools.product(member_sets, combinations))
        ratios = list(pool.map(_replay_all, [(r, settings) for r in recordings]))
    print(f"recorded and replayed in {time.perf_counter() - started:.0f} s")
    scores: dict[Setting, list[float]] = {
        setting: [by_recording[i] for by_recording in ratios] for i, setting in enumerate(settings)
    }
    families = [r.family for r in recordings]
    print(
        "\nensemble MSE ÷ persistence on the tuning splits: the score (each family's mean over its series, "
        "protocols and horizons, then their mean), each family's, and the worst recording"
    )
    for (members, combine), values in scores.items():
        extra = "+".join(m for m in members if m not in base) or "-"
        worst = recordings[int(np.argmax(values))]
        where = f"{worst.series}, {worst.protocol.name} H={worst.protocol.horizon}"
        per_family = "  ".join(f"{g} {v:.4f}" for g, v in by_family(values, families).items())
        print(
            f"{extra:<28} {combine.describe():<44}: "
            f"score {family_mean(values, families):.4f}  ({per_family})  worst {max(values):.3f} ({where})"
        )
    chosen = choose(scores, families)
    best = min(family_mean(v, families) for v in scores.values())
    members, combine = chosen
    print(
        f"\nchosen: members {list(members)}, {combine.describe()} "
        f"(score {family_mean(scores[chosen], families):.4f}; the best {best:.4f})"
    )
    print(
        "per series, the chosen setting's MSE ÷ persistence (fsnet / delayed, H = " + "/".join(map(str, horizons)) + ")"
    )
    means = {}
    for name in series:
        values = [v for r, v in zip(recordings, scores[chosen], strict=True) if r.series == name]
        means[name] = float(np.mean(values))
        print(f"  {name:<34} " + " ".join(f"{v:.3f}" for v in values) + f"   mean {means[name]:.4f}")
    spread = np.array(list(means.values()))
    print(
        f"spread over the {len(spread)} series' means: min {spread.min():.3f}, median {np.median(spread):.3f}, "
        f"max {spread.max():.3f}; series above persistence (≥ 1): {int((spread >= 1).sum())}"
    )


if __name__ == "__main__":
    main()
