"""What retraining costs a backfill: wall time without retraining, with retraining inline (the
files wait) and beside the update run (the default: its own process and flow run).

    python bench/retrain_cost.py --data DIR --out OUT [--config configs/nab.yaml] [--parts 20]

DIR holds NAB-style series, as for bench/nab.py, staged the same way (one line per series,
plant-wide files). Three backfills of the same files, one after the other, each from an empty
work folder on the same configuration but for: `drift.on_detect: record` (detections recorded,
no retraining), `retrain.beside: false` (drift-triggered retraining in the update run) and the
configuration as given (`retrain.beside: true` by default). Per run it prints the wall time, the
longest wait between two consecutive file commits (a retraining inline shows there), the
retraining decisions (window end and swap point, in file parts) and the rows scored: the same
in all three, since nothing is lost either way.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

import pandas as pd
import yaml

from bench.common import usable_cores
from bench.nab import BACKFILL_THREADS, add_plant_arguments, backfill, load_series, stage_plant

VARIANTS = {
    "no retraining": {"drift": {"on_detect": "record"}},
    "retraining inline": {"drift": {"on_detect": "retrain"}, "retrain": {"beside": False}},
    "retraining beside": {"drift": {"on_detect": "retrain"}, "retrain": {"beside": True}},
}


def variant_config(base: dict, change: dict, path: Path) -> Path:
    data = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for section, values in change.items():
        data[section] = {**data.get(section, {}), **values}
    path.write_text(yaml.safe_dump(data))
    return path


def run_figures(work: Path) -> dict:
    """From the work folder's ledger: file commit gaps, retraining decisions, rows scored."""
    with sqlite3.connect(work / "lru_online.db") as db:
        done = pd.read_sql("select processed_at, rows_scored from batches where processed_at is not null", db)
        decisions = pd.read_sql(
            "select trigger, promoted, window_sequence, swapped_at_sequence, decided_at from retrain_decisions", db
        )
    times = pd.to_datetime(done["processed_at"], utc=True, format="ISO8601").sort_values()
    gaps = times.diff().dt.total_seconds().dropna()
    return {
        "files": len(done),
        "rows_scored": int(done["rows_scored"].sum()),
        "longest_gap_s": float(gaps.max()) if len(gaps) else 0.0,
        "median_gap_s": float(gaps.median()) if len(gaps) else 0.0,
        "retrainings": len(decisions),
        "promoted": int(decisions["promoted"].sum()) if len(decisions) else 0,
        "decisions": decisions.to_dict("records"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plant_arguments(parser)
    args = parser.parse_args()
    out, config = args.out.resolve(), args.config.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(config.read_text())
    entity = base["log_schema"]["entity_column"]
    series = load_series(args.data)
    stage_plant(series, out / "stream", args.parts, entity)

    import torch

    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, {usable_cores()} usable cores; backfill on "
        f"{BACKFILL_THREADS} torch thread (a retraining beside it on another); {len(series)} series, "
        f"{args.parts + 1} plant-wide files, config {config.name}"
    )
    header = (
        f"{'run':<20} {'wall s':>7} {'files':>5} {'rows scored':>11} {'median gap s':>12} {'longest gap s':>13} "
        f"{'retrainings':>11} {'promoted':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, change in VARIANTS.items():
        slug = name.replace(" ", "-")
        variant = variant_config(base, change, out / f"config-{slug}.yaml")
        seconds, _ = backfill(out / "stream", variant, out / f"work-{slug}", reproducible=False)
        figures = run_figures(out / f"work-{slug}")
        print(
            f"{name:<20} {seconds:>7.1f} {figures['files']:>5} {figures['rows_scored']:>11} "
            f"{figures['median_gap_s']:>12.2f} {figures['longest_gap_s']:>13.2f} {figures['retrainings']:>11} "
            f"{figures['promoted']:>8}"
        )
        for decision in figures["decisions"]:
            swap = decision["swapped_at_sequence"]
            print(
                f"{'':<20} {decision['trigger']} retraining: window to part {decision['window_sequence']}, "
                f"{'swapped in at part ' + str(swap) if swap is not None else 'not promoted'}"
            )


if __name__ == "__main__":
    main()
