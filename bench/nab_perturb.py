"""Perturbed copies of NAB-style streams: does the alarms' normal-row rate hold on what real
streams do that the given ones may not? (The real-streams issue, part 1: bursts of missing
data, irregular sampling, slow wander, scale changes, level shifts; and streams longer than these.)

    python bench/nab_perturb.py --data DIR --out PERTURBED --kind KIND [--seed 0]
    python bench/nab.py --data PERTURBED --out RESULTS

Each series keeps its first 15 % (bench/nab.py's initial training file) as it is, and no row
of a labelled window is removed; windows.json is copied, so the labels mean what they meant.
Kinds, applied after the first 15 % only:
- gaps: six bursts of missing rows, each 1-3 % of the series long, at random places;
- irregular: a third of the rows, drawn one by one, removed (uneven spacing throughout);
- wander: a slow random walk added to the values (a Gaussian walk's moving mean over
  `WANDER_ROWS` rows, scaled so that its largest excursion is 3 standard deviations of the
  series), labelled rows included;
- volatility: from a random row between 30 % and 70 % of the series on, every value's distance
  from its level (the median of the `WANDER_ROWS` rows around it) three times as large: the
  same level, three times the spread, labelled rows included;
- shift: from a random row between 30 % and 70 % of the series on, every value moved by
  `SHIFT_SDS` standard deviations of the series, up or down at random, for good: a level that
  jumps and stays (a recalibrated meter, a resized service), labelled rows included;
- seasonal: a pattern by the clock added to every row, the first 15 % included (a real
  stream has its day from the start): a daily profile (two harmonics, random phases) spanning
  `SEASONAL_SDS` standard deviations of the series from trough to peak, and on Saturdays and
  Sundays a level lower by half as much (a plant's or a service's weekend), labelled rows included.
  The first file holds about two days: the weekly part is first met while streaming;
- long: each series three times in a row (`LONG_COPIES`), time running on (each copy starts one
  row spacing after the one before ends), its labelled windows copied with it into windows.json:
  a stream three times as long whose every anomaly is labelled, cut by bench/nab.py into files
  three times as large.
Random draws come from `--seed` and the file's name, so a file's copy does not depend on
which other files the folder holds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from bench.nab import INITIAL_SHARE, Series, load_series

KINDS = ("gaps", "irregular", "wander", "volatility", "shift", "seasonal", "long")
GAP_BURSTS = 6
GAP_SHARE = (0.01, 0.03)  # each burst's length, as a share of the series
IRREGULAR_SHARE = 1 / 3
WANDER_ROWS = 288  # a day of 5-minute rows: the walk's smoothing span
WANDER_SDS = 3.0
VOLATILITY_FACTOR = 3.0
CHANGE_START = (0.3, 0.7)  # where a volatility change or a shift may fall, as a share of the series
SHIFT_SDS = 3.0
SEASONAL_SDS = 3.0
LONG_COPIES = 3


def perturb(item: Series, kind: str, rng: np.random.Generator) -> pd.DataFrame:
    """The series' rows after the perturbation `kind` (timestamp, value)."""
    frame = item.frame[["timestamp", "value"]].reset_index(drop=True)
    rows = len(frame)
    first = int(INITIAL_SHARE * rows)
    labelled = np.zeros(rows, dtype=bool)
    for lo, hi in item.windows:
        labelled[lo : hi + 1] = True
    if kind == "gaps":
        removed = np.zeros(rows, dtype=bool)
        for _ in range(GAP_BURSTS):
            length = int(rng.uniform(*GAP_SHARE) * rows)
            start = int(rng.integers(first, max(first + 1, rows - length)))
            removed[start : start + length] = True
        return frame[~(removed & ~labelled)].reset_index(drop=True)
    if kind == "irregular":
        removed = rng.random(rows) < IRREGULAR_SHARE
        removed[:first] = False
        return frame[~(removed & ~labelled)].reset_index(drop=True)
    if kind == "wander":
        walk = np.convolve(np.cumsum(rng.normal(size=rows)), np.ones(WANDER_ROWS) / WANDER_ROWS, mode="same")
        walk = walk - walk[first]
        walk[:first] = 0.0
        largest = np.abs(walk).max()
        scale = WANDER_SDS * float(frame["value"].std()) / largest if largest > 0 else 0.0
        return frame.assign(value=frame["value"] + walk * scale)
    if kind == "volatility":
        level = frame["value"].rolling(WANDER_ROWS, center=True, min_periods=1).median().to_numpy()
        start = int(rng.uniform(*CHANGE_START) * rows)
        factor = np.where(np.arange(rows) >= max(start, first), VOLATILITY_FACTOR, 1.0)
        return frame.assign(value=level + factor * (frame["value"].to_numpy() - level))
    if kind == "shift":
        start = max(int(rng.uniform(*CHANGE_START) * rows), first)
        step = rng.choice([-1.0, 1.0]) * SHIFT_SDS * float(frame["value"].std())
        return frame.assign(value=frame["value"] + np.where(np.arange(rows) >= start, step, 0.0))
    if kind == "seasonal":
        return frame.assign(value=frame["value"] + clock_pattern(frame["timestamp"], rng) * float(frame["value"].std()))
    if kind == "long":
        span = copy_span(frame["timestamp"])
        return pd.concat(
            [frame.assign(timestamp=frame["timestamp"] + copy * span) for copy in range(LONG_COPIES)],
            ignore_index=True,
        )
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def clock_pattern(stamps: pd.Series, rng: np.random.Generator) -> np.ndarray:
    """`seasonal`'s pattern at each timestamp, in standard deviations of the series: a daily
    profile from trough to peak `SEASONAL_SDS`, and weekends half as much lower."""
    day = 2 * np.pi * (stamps.dt.hour + stamps.dt.minute / 60 + stamps.dt.second / 3600).to_numpy() / 24
    first, second = rng.uniform(0, 2 * np.pi, size=2)
    profile = np.sin(day - first) + 0.5 * np.sin(2 * (day - second))
    profile = (profile - profile.min()) / max(float(np.ptp(profile)), 1e-12) - 0.5
    weekend = (stamps.dt.day_of_week >= 5).to_numpy()
    return SEASONAL_SDS * (profile - 0.5 * weekend)


def copy_span(stamps: pd.Series) -> pd.Timedelta:
    """How far each `long` copy is shifted: the series' span and one median row spacing."""
    return stamps.iloc[-1] - stamps.iloc[0] + stamps.diff().median()


def write_perturbed(data: Path, out: Path, kind: str, seed: int) -> dict[str, tuple[int, int]]:
    """Every series of `data` perturbed into `out` (same file names), windows.json copied (for
    `long`, each series' windows once per copy); each file's rows before and after."""
    out.mkdir(parents=True, exist_ok=True)
    series = load_series(data)
    if kind == "long":
        windows = json.loads((data / "windows.json").read_text())
        for item in series:
            span = copy_span(item.frame["timestamp"])
            windows[item.name] = [
                [str(pd.Timestamp(bound) + copy * span) for bound in window]
                for copy in range(LONG_COPIES)
                for window in windows.get(item.name, [])
            ]
        (out / "windows.json").write_text(json.dumps(windows, indent=1))
    else:
        shutil.copy(data / "windows.json", out / "windows.json")
    rows = {}
    for item in series:
        rng = np.random.default_rng([seed, zlib.crc32(item.name.encode())])
        frame = perturb(item, kind, rng)
        frame = frame.assign(timestamp=frame["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S"))
        frame.to_csv(out / item.name, index=False)
        rows[item.name] = (len(item.frame), len(frame))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder of timestamp,value CSV files + windows.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.resolve() == args.data.resolve():
        raise SystemExit("--out must not be --data: the perturbed copies would overwrite the streams")
    rows = write_perturbed(args.data, args.out, args.kind, args.seed)
    print(json.dumps({"kind": args.kind, "seed": args.seed, "rows before, after": rows}))


if __name__ == "__main__":
    main()
