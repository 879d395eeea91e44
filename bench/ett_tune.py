"""Chooses the `lru` ensemble's members and combination settings on the tuning splits of
several series at once.

    python bench/ett_tune.py [--data ../shared/data/ett/ETTh1.csv ...] [--no-reversed]
                             [--horizons 1,24,48] [--half-lives 6,12,24] [--temperatures 4,8,16]
                             [--optional-members seasonal-day,seasonal-week]

Series: each `--data` file and, unless `--no-reversed`, its time-reversed copy (the file's rows
backwards, cut and standardised as bench/ett.py cuts any file: a series with the same columns
and periods whose trends and level shifts run the other way; for ETTh1 its training rows are
the file's last 2,880, which no split of the forward bench uses, but its tuning windows lie on
rows of the forward report split). The tuning split of each is the first 20 % of its online
stream (windows starting at rows 3600-5759); bench/ett.py reports the rest apart.

For each series, protocol and horizon the ensemble of configs/ett.yaml's members plus every
optional member runs once through the tuning windows, its members' forecasts recorded; every
setting (a member set: the configured members with any subset of the optional ones, times a
half-life and a temperature) is then replayed from the recording (the members depend neither on
each other nor on the combination, so a replay is what a run with that setting would forecast).

The rule, fixed before any report figure was looked at: a setting's score is its MSE ÷
persistence's averaged over the series, both protocols and the horizons; the lowest wins, and
among the settings within 0.005 of it the one with the fewest members (then the lowest score).
Printed: every setting's score and its worst series, the chosen one's figures per series, to be
copied into configs/ett.yaml by hand.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.common import load_config
from bench.ett import STREAM_END, TUNING_END, Protocol, Series, ensemble, load_series, run_stream, standardised
from flows.model.series_ensemble import replay_combination
from lru_online.mixture import MixtureConfig

TIE = 0.005  # scores this close count as equal: the simpler member set is kept


@dataclass
class Recording:
    """One series under one protocol and horizon: every member's forecasts of the tuning windows."""

    series: str
    protocol: Protocol
    values: np.ndarray
    members: tuple[str, ...]
    recorded: list[tuple[int, np.ndarray]]  # (window start, (K, H, C) member forecasts)
    starting_losses: np.ndarray  # (K, H, C)
    true: np.ndarray
    persistence: float  # persistence's MSE on the same windows

    def ratio(self, members: tuple[str, ...], combine: MixtureConfig) -> float:
        """The ensemble of `members` under `combine`: its MSE ÷ persistence's."""
        keep = [self.members.index(m) for m in members]
        recorded = [(start, forecasts[keep]) for start, forecasts in self.recorded]
        horizon = self.protocol.horizon
        forecasts = replay_combination(
            recorded, self.starting_losses[keep], self.values, horizon, self.protocol.window_to_learn, combine
        )
        return float(np.mean((forecasts - self.true) ** 2)) / self.persistence


def reversed_series(path: Path) -> Series:
    """The file's rows backwards, cut to the protocol's rows and standardised on its training rows."""
    forward = load_series(path)  # validates the file
    frame = pd.read_csv(path).drop(columns="date", errors="ignore")
    values, mean, std = standardised(frame.to_numpy(dtype=np.float64)[::-1][:STREAM_END])
    return replace(forward, values=np.ascontiguousarray(values), mean=mean, std=std)


def record(
    name: str, series: Series, protocol: Protocol, members: tuple[str, ...], combine: MixtureConfig
) -> Recording:
    method = ensemble(record=True, rows_per_day=series.rows_per_day, members=members, combine=combine)
    result = run_stream(method, series.values, protocol, forgetting=False, until=TUNING_END)
    replayed = replay_combination(
        method.recorded, method.starting_losses, series.values, protocol.horizon, protocol.window_to_learn, combine
    )
    np.testing.assert_allclose(replayed, result.pred, rtol=1e-5, atol=1e-6)  # the replay is the ensemble
    persistence = float(np.mean((series.values[result.start - 1][:, None] - result.true) ** 2))
    return Recording(
        name, protocol, series.values, members, method.recorded, method.starting_losses, result.true, persistence
    )


Setting = tuple[tuple[str, ...], MixtureConfig]


def choose(scores: dict[Setting, list[float]]) -> Setting:
    """The rule: the lowest mean score; among the settings within `TIE` of it, the fewest
    members, then the lowest mean (the first in the grid among equals)."""
    best = min(float(np.mean(v)) for v in scores.values())
    near = [key for key, values in scores.items() if float(np.mean(values)) <= best + TIE]
    return min(near, key=lambda key: (len(key[0]), float(np.mean(scores[key]))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(__file__).resolve().parents[2] / "shared/data/ett/ETTh1.csv"
    parser.add_argument("--data", type=Path, action="append", default=None, help="an ETT file (repeatable)")
    parser.add_argument("--no-reversed", action="store_true", help="leave out the time-reversed copies")
    parser.add_argument("--horizons", default="1,24,48")
    parser.add_argument("--half-lives", default="6,12,24")
    parser.add_argument("--temperatures", default="4,8,16")
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
        MixtureConfig(float(h), float(t))
        for h, t in itertools.product(args.half_lives.split(","), args.temperatures.split(","))
    ]
    series: dict[str, Series] = {}
    for path in args.data or [default_data]:
        series[path.stem] = load_series(path)
        if not args.no_reversed:
            series[f"{path.stem} reversed"] = reversed_series(path)
    print(
        f"series {', '.join(series)}; tuning windows starting at rows 3600-{TUNING_END - 1}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    everything = base + optional
    recordings = []
    for (name, data), protocol_name, horizon in itertools.product(series.items(), ("fsnet", "delayed"), horizons):
        started = time.perf_counter()
        recording = record(name, data, Protocol(protocol_name, horizon), everything, combinations[0])
        recordings.append(recording)
        forecasts = np.stack([f for _, f in recording.recorded], axis=1)  # (K, windows, H, C)
        alone = {
            m: float(np.mean((forecasts[k] - recording.true) ** 2)) / recording.persistence
            for k, m in enumerate(everything)
        }
        print(
            f"{name:<18} {protocol_name:<8} H={horizon:<3} persistence MSE {recording.persistence:.3f}; members "
            "÷persist: "
            + ", ".join(f"{m} {r:.3f}" for m, r in alone.items())
            + f"  ({time.perf_counter() - started:.0f} s)"
        )

    scores: dict[Setting, list[float]] = {}
    for members, combine in itertools.product(member_sets, combinations):
        scores[members, combine] = [r.ratio(members, combine) for r in recordings]
    print("\nensemble MSE ÷ persistence on the tuning splits, mean over series × protocols × horizons (worst one)")
    for (members, combine), values in scores.items():
        extra = "+".join(m for m in members if m not in base) or "-"
        worst = recordings[int(np.argmax(values))]
        where = f"{worst.series}, {worst.protocol.name} H={worst.protocol.horizon}"
        print(
            f"{extra:<28} half_life {combine.half_life:>4g} temperature {combine.temperature:>4g}: mean "
            f"{np.mean(values):.4f}  worst {max(values):.3f} ({where})"
        )
    chosen = choose(scores)
    best = min(np.mean(v) for v in scores.values())
    members, combine = chosen
    print(
        f"\nchosen: members {list(members)}, half_life {combine.half_life:g}, temperature {combine.temperature:g} "
        f"(mean ÷persist {np.mean(scores[chosen]):.4f}; the best {best:.4f})"
    )
    print(
        "per series, the chosen setting's MSE ÷ persistence (fsnet / delayed, H = " + "/".join(map(str, horizons)) + ")"
    )
    for name in series:
        values = [v for r, v in zip(recordings, scores[chosen], strict=True) if r.series == name]
        print(f"  {name:<18} " + " ".join(f"{v:.3f}" for v in values) + f"   mean {np.mean(values):.4f}")


if __name__ == "__main__":
    main()
