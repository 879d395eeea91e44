"""The pipeline's own alarms on real server-metric streams, scored by the NAB's rules.

    python bench/nab.py --data DIR --out OUT [--config configs/nab.yaml] [--parts 20]
                        [--tuning 'ec2_cpu_utilization_*']

DIR holds NAB-style series (`timestamp,value` CSV files, one reading each few minutes) and
`windows.json` (each file's labelled windows, inclusive timestamps), as `../shared/data/nab-aws`
does. Each series becomes one line of a plant: its first 15 % go into the first plant-wide file
(which trains the initial model), the rest is cut into `--parts` plant-wide files, each holding
the next slice of every line. `lru-online backfill OUT/stream -c CONFIG -w OUT/work` then streams
them through the product as a user would: the embedded defaults plus the log format
(configs/nab.yaml), every row scored before the model learns from it; drift-triggered retraining
runs inline (bench/common.REPRODUCIBLE), so the figures do not hang on the machine's speed. Nothing is removed from
the series (repeated timestamps included): what the product makes of them is counted.

Detections are the product's alarm onsets (the first row of each episode in `anomaly_alarms`),
at the configured false-alarm rate: no threshold is chosen here, on labels or otherwise. Scored
by NAB's rules (bench/nab_scoring.py; standard, reward-low-FP and reward-low-FN profiles) on the
declared tuning files (`--tuning`, a glob on the file name), the report files (the others) and
all of them, beside the published detectors' scores on the same 17 files (from the data's
README). Per file and overall it prints the normal-row alarm rate (alarmed rows outside every
window, after the probationary rows, over such rows scored) against the configured α. The
labels are read only here, for scoring.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench import forgetting
from bench.common import ROOT, library_versions, run_backfill, usable_cores
from bench.nab_scoring import PROFILES, CorpusScore, FileOutcome, match_file, probationary_rows

INITIAL_SHARE = 0.15
# As bench/skab_pipeline.py: online learning carries float rounding forward, so one torch
# thread makes the figures the same on any machine.
BACKFILL_THREADS = 1
# NAB's published detectors on the 17 realAWSCloudwatch files (the data's README): standard,
# reward low FP, reward low FN, each with its threshold chosen on the labels of the whole corpus.
PUBLISHED = {
    "Numenta HTM": (73.4, 68.8, 76.7),
    "CAD OSE": (72.1, 67.7, 75.8),
    "ARTime": (69.9, 61.6, 75.5),
    "Random Cut Forest": (61.4, 50.7, 67.6),
    "KNN CAD": (60.7, 53.1, 64.9),
    "Relative Entropy": (50.0, 44.0, 53.4),
    "Bayesian changepoint": (43.7, 30.8, 51.6),
    "Windowed Gaussian": (31.2, 4.9, 43.0),
    "random": (18.9, 4.5, 33.7),
}


@dataclass
class Series:
    name: str  # the file name, the line's name in the plant
    frame: pd.DataFrame  # timestamp (UTC), value, in the file's order
    windows: list[tuple[int, int]]  # row positions, inclusive


def load_series(data: Path) -> list[Series]:
    windows_file = data / "windows.json"
    if not windows_file.exists():
        raise SystemExit(f"{data}: no windows.json (each file's labelled windows)")
    windows = json.loads(windows_file.read_text())
    found = []
    for path in sorted(data.glob("*.csv")):
        frame = pd.read_csv(path)
        if list(frame.columns[:2]) != ["timestamp", "value"]:
            raise SystemExit(f"{path}: expected the columns timestamp,value; got {list(frame.columns)}")
        frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
        stamps = pd.DatetimeIndex(frame["timestamp"]).as_unit("ns").asi8
        positions = []
        for left, right in windows.get(path.name, []):
            lo = int(np.searchsorted(stamps, pd.Timestamp(left, tz="UTC").as_unit("ns").value, side="left"))
            hi = int(np.searchsorted(stamps, pd.Timestamp(right, tz="UTC").as_unit("ns").value, side="right")) - 1
            positions.append((lo, hi))
        found.append(Series(path.name, frame, positions))
    if not found:
        raise SystemExit(f"{data}: no CSV files")
    return found


def stage_plant(series: list[Series], stream: Path, parts: int, entity: str) -> list[Path]:
    """The plant-wide files: every line's first 15 %, then `parts` slices of the rest."""
    shutil.rmtree(stream, ignore_errors=True)
    stream.mkdir(parents=True)
    slices: list[list[pd.DataFrame]] = [[] for _ in range(parts + 1)]
    for item in series:
        rows = len(item.frame)
        first = int(INITIAL_SHARE * rows)
        bounds = [0, first, *np.linspace(first, rows, parts + 1).round().astype(int)[1:]]
        out = item.frame.assign(**{entity: item.name})[[entity, "timestamp", "value"]]
        for index in range(parts + 1):
            slices[index].append(out.iloc[bounds[index] : bounds[index + 1]])
    paths = []
    for index, frames in enumerate(slices):
        path = stream / f"plant-{index:03d}.csv"
        plant = pd.concat(frames, ignore_index=True)
        plant["timestamp"] = plant["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        plant.to_csv(path, index=False)
        paths.append(path)
    return paths


def backfill(stream: Path, config: Path, work: Path, reproducible: bool = True) -> tuple[float, str]:
    shutil.rmtree(work, ignore_errors=True)
    return run_backfill(stream, config, work, BACKFILL_THREADS, reproducible)


def scored_rows(work: Path, entity: str) -> pd.DataFrame:
    files = sorted((work / "output" / "batches").glob("*.parquet"))
    columns = [entity, "timestamp", "anomaly", "anomaly_score", "anomaly_threshold"]
    return pd.concat([pd.read_parquet(p, columns=columns) for p in files], ignore_index=True)


def alarm_onsets(work: Path) -> dict[str, list[pd.Timestamp]]:
    with sqlite3.connect(work / "lru_online.db") as connection:
        found = connection.execute("SELECT entity, start_ts FROM anomaly_alarms ORDER BY start_ts").fetchall()
    onsets: dict[str, list[pd.Timestamp]] = {}
    for line, start in found:
        onsets.setdefault(line, []).append(pd.Timestamp(start, tz="UTC"))
    return onsets


@dataclass
class SeriesFigures:
    rows: int
    scored: int  # source rows with an output row
    normal_rows: int  # scored rows after probation outside every window
    normal_alarmed: int
    episodes: int  # alarm onsets after probation
    outcome: FileOutcome

    @property
    def normal_rate(self) -> float:
        return self.normal_alarmed / self.normal_rows if self.normal_rows else 0.0


def judge_series(item: Series, rows: pd.DataFrame, onsets: list[pd.Timestamp]) -> SeriesFigures:
    stamps = item.frame["timestamp"]
    # A repeated timestamp has one output row at most: every source row at it takes its flag.
    flags = rows.groupby("timestamp")["anomaly"].max()
    flag = stamps.map(flags)
    scored = flag.notna().to_numpy()
    alarmed = flag.fillna(0).to_numpy(dtype=bool)
    n = len(item.frame)
    probation = probationary_rows(n)
    normal = np.zeros(n, dtype=bool)
    normal[probation:] = True
    for left, right in item.windows:
        normal[left : right + 1] = False
    normal &= scored
    onset_ns = np.array([o.as_unit("ns").value for o in onsets], dtype=np.int64)
    positions = np.searchsorted(pd.DatetimeIndex(stamps).as_unit("ns").asi8, onset_ns)
    detections = positions[positions >= probation]
    return SeriesFigures(
        rows=n,
        scored=int(scored.sum()),
        normal_rows=int(normal.sum()),
        normal_alarmed=int((normal & alarmed).sum()),
        episodes=len(detections),
        outcome=match_file(n, item.windows, detections),
    )


def add_plant_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of a bench that streams NAB-style series as one plant."""
    parser.add_argument("--data", type=Path, required=True, help="folder of timestamp,value CSV files + windows.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "nab.yaml")
    parser.add_argument("--parts", type=int, default=20, help="plant-wide files after the initial one")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plant_arguments(parser)
    parser.add_argument(
        "--tuning", default="ec2_cpu_utilization_*", help="glob of the declared tuning files; the others are reported"
    )
    args = parser.parse_args()
    out, config = args.out.resolve(), args.config.resolve()
    settings = yaml.safe_load(config.read_text())
    entity = settings["log_schema"]["entity_column"]
    series = load_series(args.data)
    stage_plant(series, out / "stream", args.parts, entity)
    seconds, summary = backfill(out / "stream", config, out / "work")
    rows = scored_rows(out / "work", entity)
    rows["timestamp"] = pd.to_datetime(rows["timestamp"], utc=True)
    onsets = alarm_onsets(out / "work")
    by_line = dict(tuple(rows.groupby(entity)))
    figures = {
        s.name: judge_series(s, by_line.get(s.name, rows.iloc[:0]), onsets.get(s.name, [])) for s in series
    }

    import torch

    from flows.settings import load_settings

    alpha = load_settings(config, workdir=out / "work").alarms.false_alarm_rate
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, backfill on {BACKFILL_THREADS} torch thread "
        f"of {usable_cores()} usable cores; {library_versions()}; config {config.name}, false_alarm_rate α = {alpha}"
    )
    print(f"{len(series)} series, {args.parts + 1} plant-wide files; backfill {seconds:.0f} s; {summary}")
    header = (
        f"{'file':<40} {'split':<6} {'rows':>5} {'scored':>6} {'normal':>6} {'alarm %':>7} {'x α':>5} "
        f"{'onsets':>6} {'hit':>5} {'FP':>4} {'std':>6}"
    )
    print(header)
    print("-" * len(header))
    tuning = {s.name for s in series if fnmatch.fnmatch(s.name, args.tuning)}
    for name, f in figures.items():
        print(
            f"{name:<40} {'tune' if name in tuning else 'report':<6} {f.rows:>5} {f.scored:>6} {f.normal_rows:>6} "
            f"{100 * f.normal_rate:>7.2f} {f.normal_rate / alpha:>5.1f} {f.episodes:>6} "
            f"{len(f.outcome.hit_worth):>2}/{f.outcome.windows:<2} {f.outcome.false_positives:>4} "
            f"{f.outcome.score('standard'):>6.2f}"
        )
    corpus = CorpusScore({name: f.outcome for name, f in figures.items()})
    groups = {
        f"tuning ({args.tuning})": sorted(tuning),
        "report (the others)": sorted(set(figures) - tuning),
        "all files": sorted(figures),
    }
    print()
    header = (
        f"{'NAB, normalised':<32} {'standard':>8} {'low FP':>7} {'low FN':>7} {'hit':>7} {'FP':>5} "
        f"{'normal-row alarm %':>18} {'x α':>5}"
    )
    print(header)
    print("-" * len(header))
    report: dict = {"alpha": alpha, "backfill_seconds": round(seconds, 1), "groups": {}, "files": {}}
    for group, names in groups.items():
        part = corpus.subset(names)
        normal = sum(figures[n].normal_rows for n in names)
        alarmed = sum(figures[n].normal_alarmed for n in names)
        rate = alarmed / normal if normal else 0.0
        scores = {profile: round(part.normalised(profile), 1) for profile in PROFILES}
        print(
            f"lru-online, {group:<20} {scores['standard']:>8.1f} {scores['low_fp']:>7.1f} {scores['low_fn']:>7.1f} "
            f"{part.detected:>3}/{part.windows:<3} {part.false_positives:>5} {100 * rate:>18.3f} {rate / alpha:>5.2f}"
        )
        report["groups"][group] = scores | {
            "files": names,
            "windows_detected": part.detected,
            "windows": part.windows,
            "false_positives": part.false_positives,
            "normal_row_alarm_rate": rate,
        }
    print("published, all 17 files, threshold chosen on the labels of the corpus (the data's README):")
    for name, (standard, low_fp, low_fn) in PUBLISHED.items():
        print(f"  {name:<30} {standard:>8.1f} {low_fp:>7.1f} {low_fn:>7.1f}")
    # What the model forgot over the backfill (bench/forgetting.py), on the same work folder.
    forgot = forgetting.measure(load_settings(config, workdir=out / "work"))
    print(forgetting.report(forgot, 0.2))
    report["forgetting"] = {"rows": forgot.rows, "streaming_mse": forgot.streaming_mse, "frozen_mse": forgot.frozen_mse}
    for name, f in figures.items():
        report["files"][name] = {
            "rows": f.rows,
            "scored": f.scored,
            "normal_rows": f.normal_rows,
            "normal_alarmed": f.normal_alarmed,
            "onsets": f.episodes,
            "windows": f.outcome.windows,
            "windows_detected": len(f.outcome.hit_worth),
            "false_positives": f.outcome.false_positives,
        }
    (out / "nab.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
