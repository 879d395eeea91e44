"""Chooses the pipeline's default alarm settings on a simulated plant of a tuning seed.

    python bench/plant_alarm_tune.py [--seed 11] [--smoothing-rows 1,5] [--false-alarm-rates 0.005]
                                     [--recent-rows 0] [--recent-rates 0.5] [--bias-rows 0,200]
                                     [--max-false-alarms 10] [--workers 2]

Each setting of the grid overrides the `alarms:` section of the embedded profile, simulates the
demo's plant (3 lines, 36 batches of 240 rows, drifts and broken files) with `--seed` (never the
demo's seed 7, whose figures `lru-online demo` reports), and runs the real `lru-online run` on
it: initial training, continual updates, drift, retraining. The alarms are scored against the
plant's `ground_truth.json` as the demo scores its own. The rule picks the highest F1 among the
settings with at most `--max-false-alarms` false alarms per 1,000 normal rows, anomalies caught
breaking ties; it is printed, to be copied into flows/settings.py's defaults by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from bench.common import run_cli, run_in_scratch_folders, usable_cores
from bench.skab_tune import SETTING_HEADER, add_grid_arguments, setting_cells
from bench.skab_tune import grid as alarm_grid
from flows.monitor.alarm_scoring import alarm_scores


def run_plant(alarm: dict, seed: int, folder: Path) -> dict:
    """The plant of `seed` through `lru-online run` with these alarm settings; its alarm scores."""
    config, workdir = folder / "config.yaml", folder / "work"
    config.write_text(yaml.safe_dump({"alarms": alarm}))
    for command in (["simulate", "--seed", str(seed)], ["run"]):
        run_cli([*command, "-c", str(config), "-w", str(workdir)], workdir)
    truth = json.loads((workdir / "ground_truth.json").read_text())
    return alarm_scores(sorted((workdir / "output" / "batches").glob("*.parquet")), truth["anomalies"])


def choose(results: list[tuple[dict, dict]], max_false_alarms: float) -> tuple[dict, dict] | None:
    """The highest F1 with at most that many false alarms per 1,000 normal rows, anomalies caught
    breaking ties."""
    allowed = [r for r in results if r[1]["false_alarms_per_1000_normal_rows"] <= max_false_alarms]
    return max(allowed, key=lambda r: (r[1]["f1"], r[1]["anomalies_caught"]), default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=11)
    add_grid_arguments(parser, "1,5", "0.005", "0", "0.5", "0,200")
    parser.add_argument("--max-false-alarms", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=usable_cores())
    args = parser.parse_args()
    if args.seed == 7:
        raise SystemExit("seed 7 is the demo's plant, the one its figures are reported on: tune on another")
    grid = alarm_grid(args)
    print(f"plant of seed {args.seed}; {len(grid)} settings, {args.workers} plants at once, 1 thread each")
    scores = run_in_scratch_folders(grid, lambda alarm, folder: run_plant(alarm, args.seed, folder), args.workers)
    results = list(zip(grid, scores, strict=True))
    print(f"{SETTING_HEADER}{'F1':>7}{'prec':>7}{'recall':>7}{'FA/1000':>9}{'caught':>8}")
    for alarm, s in sorted(results, key=lambda r: -r[1]["f1"]):
        caught = f"{s['anomalies_caught']}/{s['anomalies']}"
        print(
            f"{setting_cells(alarm)}{s['f1']:>7}{s['precision']:>7}{s['recall']:>7}"
            f"{s['false_alarms_per_1000_normal_rows']:>9}{caught:>8}"
        )
    chosen = choose(results, args.max_false_alarms)
    if chosen is None:
        print(f"no setting keeps false alarms at or below {args.max_false_alarms} per 1,000 normal rows")
    else:
        print(f"chosen (highest F1 with <= {args.max_false_alarms} false alarms per 1,000): {chosen[0]} -> {chosen[1]}")


if __name__ == "__main__":
    main()
