"""The pipeline's own anomaly alarms on SKAB's real logs, through `lru-online backfill`.

    python bench/skab_pipeline.py --data DIR --out DIR [--split report|tuning|all]
                                  [--config configs/skab_backfill.yaml]

Stages anomaly-free.csv and the split's valve1 files (the splits of configs/skab.yaml: tuning =
anomaly-free plus valve1 0-7, report = valve1 8-15) into `OUT/stream`, then runs the real
command, `lru-online backfill OUT/stream -c CONFIG -w OUT/work`: one line through the files
in time order (with the default config each file a run of it: `log_schema.file_is_run`),
anomaly-free.csv (first in time) trains the initial model, every row is scored before the
model learns from it, and the product's detector (`alarms:`) raises the alarms. The backfill
runs on one torch thread (see BACKFILL_THREADS). The labels are read only here, for scoring.

Printed per group of rows: row-level precision, recall and F1 of the `anomaly` flag against
SKAB's `anomaly` label, FAR, false alarms per 1,000 normal rows, on test rows the NAB score
(standard profile; changepoints where the `anomaly` flag switches, as bench/skab.py scores
them) and the alarm episodes stored; per file, the ROC AUC of the per-row forecast error
(`score`) on the test rows, which no alarm setting can raise; and what the model forgot over the
stream (bench/forgetting.py: the first fifth of the online rows, streamed against re-scored by
the final model).
valve1 rows are scored on SKAB's test part (rows 400 to the end of each file) and on all rows.
Beside them, measured in the same run on the same test rows: Hotelling's T² of bench/skab.py,
fitted on each file's first 400 rows (the leaderboard's per-file protocol; the stream scores
those rows too, before it learns from them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from anomaly_metrics import NabScore, OutlierCounts, changepoints_from_outliers, roc_auc  # noqa: E402
from common import library_versions, run_backfill, usable_cores  # noqa: E402
from skab import TRAIN_ROWS, HotellingT2, SkabFile, in_tuning_split, load_folder, scored_changepoints  # noqa: E402

TEST_ROWS = "valve1 test rows (400-end)"  # the group the leaderboard's protocol scores
# The backfill runs on one torch thread, as bench/skab_pipeline_tune.py runs each setting: the
# stream's online learning and alarms carry float rounding forward, so a different thread count
# (a different summation order) gives different alarms (anomaly-free.csv: 68 false alarms per
# 1,000 rows on 2 threads, 107 on 1). One thread makes the figures the same on any machine and
# the same as the tuner's.
BACKFILL_THREADS = 1
T2_TEST_ROWS = "t2 (per-file fit), test rows"


class Counts(OutlierCounts):
    """Row counts of one group, with the stream's figures: precision, recall and false alarms
    per 1,000 normal rows beside the leaderboard's F1 and FAR."""

    def figures(self) -> dict[str, float]:
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        normal = self.fp + self.tn
        return {
            "rows": self.tp + self.fp + self.fn + self.tn,
            "labelled": self.tp + self.fn,
            "precision": round(precision, 3),
            "recall": round(recall, 3),
            "f1": round(self.f1, 3),
            "far_percent": round(self.far_percent, 2),
            "false_alarms_per_1000_normal_rows": round(1000 * self.fp / normal, 2) if normal else 0.0,
        }


def staged_files(data: Path, split: str) -> tuple[list[SkabFile], SkabFile]:
    tuning = yaml.safe_load((ROOT / "configs" / "skab.yaml").read_text())["tuning_files"]
    files, normal = load_folder(data)
    if normal is None:
        raise SystemExit(f"{data}: no anomaly-free.csv; the stream needs it to train the initial model")
    if split != "all":
        files = [f for f in files if in_tuning_split(f, tuning) == (split == "tuning")]
    if not files:
        raise SystemExit(f"{data}: no SKAB experiment files in the {split} split")
    return files, normal


def stream_name(item: SkabFile) -> str:
    return item.relative.replace("/", "__")


def backfill(files: list[SkabFile], normal: SkabFile, config: Path, out: Path) -> tuple[float, str]:
    stream, work = out / "stream", out / "work"
    for folder in (stream, work):
        shutil.rmtree(folder, ignore_errors=True)
    stream.mkdir(parents=True)
    for item in [normal, *files]:
        shutil.copyfile(item.path, stream / stream_name(item))
    return run_backfill(stream, config, work, BACKFILL_THREADS)


def scored_rows(work: Path, timestamp_column: str) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted((work / "output" / "batches").glob("*.parquet"))]
    rows = pd.concat(frames, ignore_index=True)
    return rows.set_index(timestamp_column).sort_index()


def alarm_episodes(work: Path) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    import sqlite3

    with sqlite3.connect(work / "lru_online.db") as connection:
        found = connection.execute("SELECT start_ts, end_ts FROM anomaly_alarms ORDER BY start_ts").fetchall()
    return [(pd.Timestamp(start, tz="UTC"), pd.Timestamp(end, tz="UTC")) for start, end in found]


@dataclass
class PipelineFigures:
    seconds: float
    summary: str  # the backfill's own last line (its JSON counts)
    groups: dict[str, Counts]
    nab: dict[str, NabScore]  # the test-row groups' changepoint scores
    anomaly_free: Counts
    anomalies_caught: int
    anomalies: int
    alarm_episodes: int
    # Per file, test rows: how well the per-row forecast error (`score`) ranks the labelled rows
    # above the others, whatever the alarm settings (0.5: no better than chance).
    score_auc: dict[str, float]


def run_split(files: list[SkabFile], normal: SkabFile, config: Path, out: Path) -> PipelineFigures:
    """Streams the files through `lru-online backfill` and scores its alarms against the labels."""
    seconds, summary = backfill(files, normal, config, out)
    rows = scored_rows(out / "work", yaml.safe_load(config.read_text())["log_schema"]["timestamp_column"])
    groups = {
        TEST_ROWS: Counts(),
        "valve1 all rows": Counts(),
        T2_TEST_ROWS: Counts(),
    }
    nab = {TEST_ROWS: NabScore(), T2_TEST_ROWS: NabScore()}
    free = Counts()
    labelled_runs, caught = 0, 0
    score_auc = {}
    for item in files:
        index = item.frame.index.tz_localize("UTC")
        scored = rows[["anomaly", "score"]].reindex(index)
        if scored["anomaly"].isna().any():
            raise SystemExit(f"{item.relative}: {int(scored['anomaly'].isna().sum())} rows have no scored output row")
        flags = scored["anomaly"].to_numpy(dtype=int)
        groups[TEST_ROWS].add(item.anomaly[TRAIN_ROWS:], flags[TRAIN_ROWS:])
        scores = scored["score"].to_numpy(dtype=float)[TRAIN_ROWS:]
        score_auc[item.relative] = round(roc_auc(item.anomaly[TRAIN_ROWS:], np.nan_to_num(scores)), 3)
        groups["valve1 all rows"].add(item.anomaly, flags)
        baseline = HotellingT2()
        baseline.adapt(item.sensors[:TRAIN_ROWS])
        t2_flags = baseline.detect(item.sensors[TRAIN_ROWS:]).alarms
        groups[T2_TEST_ROWS].add(item.anomaly[TRAIN_ROWS:], t2_flags)
        for group, test_flags in ((TEST_ROWS, flags[TRAIN_ROWS:]), (T2_TEST_ROWS, t2_flags)):
            nab[group].add(scored_changepoints(item, changepoints_from_outliers(test_flags)))
        starts = np.flatnonzero(np.diff(np.concatenate([[0], item.anomaly])) == 1)
        ends = np.flatnonzero(np.diff(np.concatenate([item.anomaly, [0]])) == -1)
        for start, end in zip(starts, ends, strict=True):
            labelled_runs += 1
            caught += bool(flags[start : end + 1].any())
    free_flags = rows["anomaly"].reindex(normal.frame.index.tz_localize("UTC")).to_numpy(dtype=int)
    free.add(np.zeros(len(free_flags), dtype=int), free_flags)
    return PipelineFigures(
        seconds, summary, groups, nab, free, caught, labelled_runs, len(alarm_episodes(out / "work")), score_auc
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="SKAB data folder (anomaly-free/, valve1/, ...)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", choices=("report", "tuning", "all"), default="report")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "skab_backfill.yaml")
    args = parser.parse_args()
    out = args.out.resolve()
    files, normal = staged_files(args.data, args.split)
    figures = run_split(files, normal, args.config.resolve(), out)

    import torch

    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, backfill on {BACKFILL_THREADS} torch thread "
        f"of {usable_cores()} usable cores; {library_versions()}"
    )
    print(
        f"split {args.split}: anomaly-free.csv + {len(files)} valve1 files; "
        f"backfill {figures.seconds:.0f} s; {figures.summary}"
    )
    header = (
        f"{'rows scored':<32} {'rows':>7} {'labelled':>8} {'prec':>6} {'recall':>6} {'F1':>6} {'FAR %':>6} "
        f"{'FA/1000':>8} {'NAB':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, counts in [*figures.groups.items(), ("anomaly-free.csv (trained on)", figures.anomaly_free)]:
        f = counts.figures()
        nab = f"{figures.nab[name].score():>6.2f}" if name in figures.nab else f"{'-':>6}"
        print(
            f"{name:<32} {f['rows']:>7} {f['labelled']:>8} {f['precision']:>6.3f} {f['recall']:>6.3f} {f['f1']:>6.3f} "
            f"{f['far_percent']:>6.2f} {f['false_alarms_per_1000_normal_rows']:>8.2f} {nab}"
        )
    print(
        f"labelled anomalies (runs of label 1) with an alarm inside: {figures.anomalies_caught} of {figures.anomalies}"
    )
    print(f"alarm episodes stored (anomaly_alarms): {figures.alarm_episodes}")
    print(
        "forecast-error ROC AUC per file, test rows (0.5: chance): "
        + " ".join(f"{name.removesuffix('.csv')} {auc:.2f}" for name, auc in figures.score_auc.items())
    )
    # What the model forgot over the stream (bench/forgetting.py), on the same work folder.
    from bench import forgetting
    from flows.settings import load_settings

    forgot = forgetting.measure(load_settings(args.config.resolve(), workdir=out / "work"))
    print(forgetting.report(forgot, 0.2))
    report = {
        "split": args.split,
        "files": [f.relative for f in files],
        "backfill_seconds": round(figures.seconds, 1),
        "groups": {name: counts.figures() for name, counts in figures.groups.items()},
        "nab": {
            name: {profile: round(score.score(profile), 2) for profile in ("standard", "low_fp", "low_fn")}
            | {"missed_changepoints": score.missed, "false_positives": score.false_positives}
            for name, score in figures.nab.items()
        },
        "anomaly_free": figures.anomaly_free.figures(),
        "anomalies_caught": figures.anomalies_caught,
        "anomalies": figures.anomalies,
        "alarm_episodes": figures.alarm_episodes,
        "score_auc": figures.score_auc,
        "forgetting": {"rows": forgot.rows, "streaming_mse": forgot.streaming_mse, "frozen_mse": forgot.frozen_mse},
    }
    (out / "skab_pipeline.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
