"""Chooses the pipeline's alarm settings for SKAB's logs on the tuning split.

    python bench/skab_pipeline_tune.py [--data ../shared/data/skab] [--smoothing-rows 1,10,40]
                                       [--false-alarm-rates 0.005] [--recent-rows 0,10]
                                       [--recent-rates 0.7] [--bias-rows 0,200]
                                       [--far-limit 12] [--workers 2]

Each setting of the grid overrides the `alarms:` section of configs/skab_backfill.yaml and
streams the tuning split (anomaly-free.csv plus valve1 0-7, configs/skab.yaml) through the real
`lru-online backfill`, as bench/skab_pipeline.py does; the report split is never run. The rule
picks the highest F1 on valve1's test rows (400 to the end) among the settings whose normal rows
alarm at no more than `--rate-multiple` times the setting's own `false_alarm_rate` α, on
valve1's test rows and on anomaly-free.csv each (a user is promised α on every stream, not on
their sum: a 2.5-hour normal run alarming at 4α is not made good by short runs at 1α), and whose
FAR over both together stays at or below `--far-limit` %; labelled anomalies caught break
ties. The chosen setting
is printed, to be copied into configs/skab_backfill.yaml by hand.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from bench.common import run_in_scratch_folders, usable_cores
from bench.skab_pipeline import ROOT, TEST_ROWS, Counts, PipelineFigures, run_split, staged_files
from bench.skab_tune import SETTING_HEADER, add_grid_arguments, grid, setting_cells
from flows.settings import load_settings


def normal_far_percent(figures: PipelineFigures) -> float:
    """FAR over every normal row the rule judges: valve1's test rows and anomaly-free.csv's."""
    test, free = figures.groups[TEST_ROWS], figures.anomaly_free
    return Counts(fp=test.fp + free.fp, tn=test.tn + free.tn).figures()["far_percent"]


def rate_multiples(alarm: dict, figures: PipelineFigures, alpha: float) -> tuple[float, float]:
    """Normal-row alarm rate over α on valve1's test rows and on anomaly-free.csv."""
    alpha = alarm.get("false_alarm_rate", alpha)
    test, free = figures.groups[TEST_ROWS], figures.anomaly_free
    return tuple(g.fp / (g.fp + g.tn) / alpha if g.fp + g.tn else 0.0 for g in (test, free))


def choose(
    results: list[tuple[dict, PipelineFigures]], far_limit: float, rate_multiple: float, alpha: float
) -> tuple[dict, PipelineFigures] | None:
    """The highest test-row F1 among settings whose normal rows alarm at ≤ `rate_multiple`·α on
    each group and whose FAR over both together is ≤ the limit, anomalies caught breaking ties."""
    allowed = [
        r
        for r in results
        if normal_far_percent(r[1]) <= far_limit and max(rate_multiples(r[0], r[1], alpha)) <= rate_multiple
    ]
    return max(allowed, key=lambda r: (r[1].groups[TEST_ROWS].figures()["f1"], r[1].anomalies_caught), default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/skab")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "skab_backfill.yaml")
    add_grid_arguments(parser, "1,10,40", "0.005", "0,10", "0.7", "0,200")
    parser.add_argument("--far-limit", type=float, default=12.0)
    parser.add_argument(
        "--rate-multiple", type=float, default=2.0, help="most normal-row alarms per α allowed on each group"
    )
    parser.add_argument("--workers", type=int, default=usable_cores())
    args = parser.parse_args()
    grid_settings = grid(args)
    files, normal = staged_files(args.data, "tuning")
    base = yaml.safe_load(args.config.read_text())
    alpha = load_settings(args.config, workdir=ROOT / "skab-work").alarms.false_alarm_rate
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
        f"{'x α test':>9}{'x α free':>9}{'caught':>8}"
    )
    for alarm, f in sorted(results, key=lambda r: -r[1].groups[TEST_ROWS].figures()["f1"]):
        test, free = f.groups[TEST_ROWS].figures(), f.anomaly_free.figures()
        print(
            f"{setting_cells(alarm)}{test['f1']:>7}{test['precision']:>7}{test['recall']:>7}{test['far_percent']:>8}"
            f"{free['false_alarms_per_1000_normal_rows']:>13}{normal_far_percent(f):>11}"
            f"{''.join(f'{m:>9.2f}' for m in rate_multiples(alarm, f, alpha))}"
            f"{f'{f.anomalies_caught}/{f.anomalies}':>8}"
        )
    chosen = choose(results, args.far_limit, args.rate_multiple, alpha)
    rule = f"normal rows at <= {args.rate_multiple} α on each group, FAR <= {args.far_limit} % over both"
    if chosen is None:
        print(f"no setting keeps {rule} on the tuning split")
    else:
        print(
            f"chosen (highest F1 with {rule}): {chosen[0]} -> "
            f"{chosen[1].groups[TEST_ROWS].figures()}"
        )


if __name__ == "__main__":
    main()
