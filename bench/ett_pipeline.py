"""An ETT transformer station streamed through the product itself: forecast, alarms, drift and
forgetting of the pipeline's own forecaster on a series nobody tuned it on.

    python bench/ett_pipeline.py --data ../shared/data/ett/ETTh1.csv --out OUT
                                 [--config configs/ett_backfill.yaml] [--parts 20]

The station's CSV (ETT's format: `date` and the seven columns) becomes plant files of one line:
its first 20 % (ETT's usual training share) in the first file, which initial training fits the
first model on, the rest in `--parts` files, through `lru-online backfill` with
configs/ett_backfill.yaml (the embedded defaults plus the log format). Printed, over the rows
after initial training:
- the one-step forecast's MSE (the output's, so the mixture's with `mixture.enabled`, the
  default) on the model's standardised targets beside persistence's (the reading before) on the
  same entries, per sensor and over all;
- the rows the alarms flagged, against the configured α: ETT has no labels, so every alarmed
  row counts, an upper bound of the false-alarm rate on a stream with daily and weekly patterns
  and a load that drifts for two years;
- drift events (one per detector and sensor), the files they fell in and the retrainings;
- forgetting (`bench/forgetting.py`): the first fifth of the online rows re-scored by the final
  model, frozen (through a fresh mixture with it on), against the error made on them while
  streaming.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench import forgetting
from bench.common import ROOT, library_versions, run_backfill, usable_cores

INITIAL_SHARE = 0.2
BACKFILL_THREADS = 1


def stage(data: Path, stream: Path, parts: int) -> int:
    """The plant files of one station; returns its rows."""
    frame = pd.read_csv(data)
    if "date" not in frame.columns:
        raise SystemExit(f"{data}: expected ETT's `date` column; got {list(frame.columns)}")
    frame["date"] = pd.to_datetime(frame["date"], utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    stream.mkdir(parents=True, exist_ok=True)
    rows = len(frame)
    first = int(INITIAL_SHARE * rows)
    bounds = [0, *np.linspace(first, rows, parts + 1).round().astype(int)]
    for index in range(parts + 1):
        frame.iloc[bounds[index] : bounds[index + 1]].to_csv(stream / f"station-{index:03d}.csv", index=False)
    return rows


def forecast_table(settings, online: list[list[Path]]) -> list[tuple[str, float, float, int]]:
    """Per sensor and over all: the model's one-step MSE and persistence's on the same entries
    (the `online` files' rows, after initial training, each with the reading before it)."""
    sensors = settings.feature_spec.sensors
    rows = pd.concat([pd.read_parquet(p) for parts in online for p in parts], ignore_index=True)
    rows = rows.sort_values(settings.feature_spec.timestamp_column, kind="stable")
    targets = rows[[f"target_{s}" for s in sensors]].to_numpy(np.float64)
    residuals = rows[[f"residual_{s}" for s in sensors]].to_numpy(np.float64)
    persistence = targets[1:] - targets[:-1]
    model = residuals[1:]
    both = np.isfinite(model) & np.isfinite(persistence)
    table = []
    for index, sensor in enumerate(sensors):
        used = both[:, index]
        table.append(
            (sensor, float(np.mean(model[used, index] ** 2)), float(np.mean(persistence[used, index] ** 2)), used.sum())
        )
    table.append(("all", float(np.mean(model[both] ** 2)), float(np.mean(persistence[both] ** 2)), int(both.sum())))
    return table


def alarm_and_drift(settings, online: list[list[Path]], files: int) -> dict:
    flags = pd.concat([pd.read_parquet(p, columns=["anomaly"]) for parts in online for p in parts])["anomaly"]
    with sqlite3.connect(settings.workdir / "lru_online.db") as connection:
        drift = connection.execute("SELECT entity, sequence FROM drift_events").fetchall()
        onsets = connection.execute("SELECT COUNT(*) FROM anomaly_alarms").fetchone()[0]
        retrainings = connection.execute("SELECT COUNT(*) FROM retrain_decisions").fetchone()[0]
    return {
        "rows": len(flags),
        "alarmed": int(flags.sum()),
        "onsets": int(onsets),
        "drift_events": len(drift),
        "plant_events": sum(1 for entity, _ in drift if entity == "*plant*"),
        "files_with_drift": len({sequence for _, sequence in drift}),
        "retrainings": int(retrainings),
        "files": files,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="an ETT station's CSV (ETTh1's format)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "ett_backfill.yaml")
    parser.add_argument("--parts", type=int, default=20, help="files after the initial one")
    args = parser.parse_args()
    out, config = args.out.resolve(), args.config.resolve()
    import shutil

    import torch

    from flows.settings import load_settings

    for folder in (out / "stream", out / "work"):
        shutil.rmtree(folder, ignore_errors=True)
    rows = stage(args.data, out / "stream", args.parts)
    seconds, summary = run_backfill(out / "stream", config, out / "work", BACKFILL_THREADS)
    settings = load_settings(config, workdir=out / "work")
    alpha = settings.alarms.false_alarm_rate
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, backfill on {BACKFILL_THREADS} torch thread "
        f"of {usable_cores()} usable cores; {library_versions()}; config {config.name}, α = {alpha}"
    )
    print(f"{args.data.name}: {rows} rows, {args.parts + 1} files; backfill {seconds:.0f} s; {summary}")
    print(f"{'one-step forecast (standardised)':<34} {'MSE':>10} {'persistence':>12} {'ratio':>6} {'entries':>8}")
    outputs = forgetting.processed_outputs(settings)
    online = outputs[settings.initial_training.batches :]
    for sensor, model, persistence, used in forecast_table(settings, online):
        print(f"{sensor:<34} {model:>10.4f} {persistence:>12.4f} {model / persistence:>6.2f} {used:>8}")
    figures = alarm_and_drift(settings, online, len(outputs))
    share = figures["alarmed"] / max(figures["rows"], 1)
    print(
        f"alarms after initial training: {figures['alarmed']} of {figures['rows']} rows ({100 * share:.2f} %, "
        f"{share / alpha:.2f} α; no labels: every alarmed row counted), {figures['onsets']} episodes"
    )
    print(
        f"drift events: {figures['drift_events']} (one per detector and sensor) in {figures['files_with_drift']} of "
        f"{figures['files']} files ({figures['plant_events']} plant-level), {figures['retrainings']} retrainings"
    )
    print(forgetting.report(forgetting.measure(settings), 0.2))


if __name__ == "__main__":
    main()
