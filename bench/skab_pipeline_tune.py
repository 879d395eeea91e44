"""Chooses the pipeline's alarm settings for SKAB's logs on the tuning split.

    python bench/skab_pipeline_tune.py [--data ../shared/data/skab] [--smoothing-rows 1,10,40]
                                       [--false-alarm-rates 0.005] [--recent-rows 0,10]
                                       [--recent-rates 0.7] [--bias-rows 0,200]
                                       [--far-limit 12] [--workers 2]

Each setting of the grid overrides the `alarms:` section of configs/skab_backfill.yaml and
streams the tuning split (anomaly-free.csv plus valve1 0-7, configs/skab.yaml) through the real
`lru-online backfill`, as bench/skab_pipeline.py does; the report split is never run. The rule
picks the highest F1 on valve1's test rows (400 to the end) among the settings whose FAR stays at
or below `--far-limit` % over every normal row it judges: valve1's test rows and anomaly-free.csv
(normal data of the tuning split too, and one of the figures the issue asks of the stream);
labelled anomalies caught break ties. The chosen setting
is printed, to be copied into configs/skab_backfill.yaml by hand.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from bench.common import run_in_scratch_folders, usable_cores
from bench.skab_pipeline import ROOT, TEST_ROWS, Counts, PipelineFigures, run_split, staged_files
from bench.skab_tune import SETTING_HEADER, add_grid_arguments, grid, setting_cells


def normal_far_percent(figures: PipelineFigures) -> float:
    """FAR over every normal row the rule judges: valve1's test rows and anomaly-free.csv's."""
    test, free = figures.groups[TEST_ROWS], figures.anomaly_free
    return Counts(fp=test.fp + free.fp, tn=test.tn + free.tn).figures()["far_percent"]


def choose(results: list[tuple[dict, PipelineFigures]], far_limit: float) -> tuple[dict, PipelineFigures] | None:
    """The highest test-row F1 with FAR ≤ the limit over valve1's test rows and anomaly-free.csv
    together, anomalies caught breaking ties."""
    allowed = [r for r in results if normal_far_percent(r[1]) <= far_limit]
    return max(allowed, key=lambda r: (r[1].groups[TEST_ROWS].figures()["f1"], r[1].anomalies_caught), default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/skab")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "skab_backfill.yaml")
    add_grid_arguments(parser, "1,10,40", "0.005", "0,10", "0.7", "0,200")
    parser.add_argument("--far-limit", type=float, default=12.0)
    parser.add_argument("--workers", type=int, default=usable_cores())
    args = parser.parse_args()
    grid_settings = grid(args)
    files, normal = staged_files(args.data, "tuning")
    base = yaml.safe_load(args.config.read_text())
    print(
        f"tuning split: anomaly-free.csv + {', '.join(f.relative for f in files)}; {len(grid_settings)} settings, "
        f"{args.workers} backfills at once, 1 thread each"
    )

    def run(alarm: dict, out: Path) -> PipelineFigures:
        config = out / "config.yaml"
        config.write_text(yaml.safe_dump(base | {"alarms": base.get("alarms", {}) | alarm}))
        return run_split(files, normal, config, out)

    figures = run_in_scratch_folders(grid_settings, run, args.workers)
    results = list(zip(grid_settings, figures, strict=True))
    print(
        f"{SETTING_HEADER}{'F1':>7}{'prec':>7}{'recall':>7}{'FAR %':>8}{'free FA/1000':>13}{'FAR both %':>11}"
        f"{'caught':>8}"
    )
    for alarm, f in sorted(results, key=lambda r: -r[1].groups[TEST_ROWS].figures()["f1"]):
        test, free = f.groups[TEST_ROWS].figures(), f.anomaly_free.figures()
        print(
            f"{setting_cells(alarm)}{test['f1']:>7}{test['precision']:>7}{test['recall']:>7}{test['far_percent']:>8}"
            f"{free['false_alarms_per_1000_normal_rows']:>13}{normal_far_percent(f):>11}"
            f"{f'{f.anomalies_caught}/{f.anomalies}':>8}"
        )
    chosen = choose(results, args.far_limit)
    if chosen is None:
        print(f"no setting keeps FAR at or below {args.far_limit} % on the tuning split's test rows")
    else:
        print(
            f"chosen (highest F1 with FAR <= {args.far_limit} %): {chosen[0]} -> "
            f"{chosen[1].groups[TEST_ROWS].figures()}"
        )


if __name__ == "__main__":
    main()
