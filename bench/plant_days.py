"""The product's alarms on a simulated plant that runs for days, scored day by day.

    python bench/plant_days.py --workdir DIR [--seed 11] [--batches 108] [--config FILE]

Simulates the demo's plant (3 lines, 240 rows per line and file, about 24 hours per 36 files)
with `--seed` for `--batches` files per line, runs the real `lru-online run` on it (embedded
defaults, or `--config` over them) and prints, per day of the stream (UTC days from its first
row), the alarms' precision, recall, F1 and false alarms per 1,000 normal rows against the
plant's `ground_truth.json`. The demo itself covers one day; anything that learns from earlier
days (the recurring-events bar) can only show what it costs on a longer run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.common import library_versions, run_cli
from bench.demo_alarms import counts, scored_rows


def run_plant(workdir: Path, seed: int, batches: int, config: Path | None) -> None:
    chosen = ["-c", str(config.resolve())] if config else []
    for command in (["simulate", "--seed", str(seed), "--batches", str(batches)], ["run"]):
        run_cli([*command, *chosen, "-w", str(workdir)], workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="an empty or missing folder")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--batches", type=int, default=108)
    parser.add_argument("--config", type=Path, default=None)
    args = parser.parse_args()
    if args.seed == 7:
        raise SystemExit("seed 7 is the demo's plant, the one its figures are reported on: use another")
    workdir = args.workdir.resolve()
    if workdir.exists() and any(workdir.iterdir()):
        raise SystemExit(f"{workdir} is not empty")
    print(
        f"python {sys.version.split()[0]}; plant of seed {args.seed}, {args.batches} files per line; "
        f"config {args.config or 'embedded defaults'}; torch threads 1 (bench.common.REPRODUCIBLE); "
        f"{library_versions()}"
    )
    os.environ["OMP_NUM_THREADS"] = "1"
    run_plant(workdir, args.seed, args.batches, args.config)
    rows, truth, _ = scored_rows(workdir)
    day = ((rows["timestamp"] - rows["timestamp"].min()).dt.total_seconds() // 86_400).astype(int)
    print(f"{'day':>4} {'rows':>7} {'labelled':>8} {'precision':>9} {'recall':>7} {'F1':>6} {'FA/1000 normal':>14}")
    for number in sorted(day.unique()):
        here = (day == number).to_numpy()
        figures = counts(truth[here], rows["anomaly"].to_numpy().astype(bool)[here])
        print(
            f"{number:>4} {int(here.sum()):>7} {int(truth[here].sum()):>8} {figures['precision']:>9.3f} "
            f"{figures['recall']:>7.3f} {figures['f1']:>6.3f} {figures['fa_per_1000']:>14.2f}"
        )
    whole = counts(truth, rows["anomaly"].to_numpy().astype(bool))
    print(
        f"{'all':>4} {len(rows):>7} {int(truth.sum()):>8} {whole['precision']:>9.3f} {whole['recall']:>7.3f} "
        f"{whole['f1']:>6.3f} {whole['fa_per_1000']:>14.2f}"
    )


if __name__ == "__main__":
    main()
