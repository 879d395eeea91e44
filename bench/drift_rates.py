"""Drift events per line and file on a simulated plant, with and without its drifts.

    python bench/drift_rates.py [--entities 200] [--batches 20] [--rows 40] [--seed 11]
                                [--config configs/embedded.yaml] [--out DIR]
                                [--initial-batches 2] [--initial-epochs 2]

Two plants of the same seed, lines and files (plant-wide files, as a plant exports them): one
with the simulator's gradual and abrupt drifts, one without (every line stationary: operating
regimes, noise and anomalies only). Each goes through `continual_update` with the embedded
defaults of CONFIG, except that a detection is recorded (`drift.on_detect: record`), so every
file is judged by the same model it was scored with. Printed per plant: drift events per line
per file (all, and per detector), plant-level events, the files with any event, and the
retraining requests the configured `on_detect` would have made (at most one per file, none
within `drift.retrain_cooldown_files` of the one before), and the anomaly alarms on the rows the
simulator did not label anomalous, past each line's warm-up: how many alarmed, as a multiple
of the configured false-alarm rate α, over the run and in its worst file. Then the alarm events
an operator is sent: the lines' alarm episodes, the plant-level alarms and how many episodes
they took in, the events raised (each line's own episodes and one per plant-level alarm) beside
the events one per episode would have been, over the run and in the file with the most. The
defaults are the simulator's seed 11 (tuning plants are seeds 11-13; the demo's is 7).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench.common import ROOT

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def run_plant(
    folder: Path,
    config: Path,
    entities: int,
    batches: int,
    rows: int,
    seed: int,
    drifts: bool,
    training: tuple[int, int] = (2, 2),
) -> dict:
    from sqlalchemy import select

    from flows.ingest.simulator import SimulationConfig, simulate
    from flows.monitor.drift_detectors import PLANT
    from flows.orchestrate.prefect_flows import continual_update
    from flows.settings import derive_config, load_settings
    from flows.storage.database import Database
    from flows.storage.models import AnomalyAlarm, Batch, DriftEvent, PlantAlarm

    profile = yaml.safe_load(config.read_text()) or {}
    drift = {**profile.get("drift", {}), "on_detect": "record"}
    path = derive_config(
        config,
        folder,
        {
            "drift": drift,
            "initial_training": {"batches": training[0], "epochs": training[1]},
            "tracking": {"snapshot_every": 0},
        },
    )
    settings = load_settings(path)
    settings.ensure_folders()
    sim = SimulationConfig(
        entities=entities, batches=batches, rows_per_batch=rows, seed=seed, plant_files=True, broken_batches={}
    )
    scale = batches / 36
    sim.gradual_drift_start = int(14 * scale) if drifts else batches + 1
    sim.gradual_drift_batches = max(1, int(8 * scale))
    sim.abrupt_drift_batch = int(26 * scale) if drifts else batches + 1
    simulate(settings.paths.landing, folder / "ground_truth.json", sim, settings.log_schema)
    started = time.perf_counter()
    continual_update(config=str(path))
    seconds = time.perf_counter() - started
    db = Database(settings.database_url)
    with db.session() as session:
        events = list(session.scalars(select(DriftEvent)))
        processed = session.scalar(select(Batch.id).where(Batch.status == "processed").order_by(Batch.id.desc()))
        files = len(list(session.scalars(select(Batch.id).where(Batch.status == "processed"))))
        episodes = [(a.batch_id, a.plant_alarm_id) for a in session.scalars(select(AnomalyAlarm))]
        plant_files = {a.id: a.batch_id for a in session.scalars(select(PlantAlarm))}
    db.dispose()
    judged = files - settings.initial_training.batches if processed else 0
    per_detector: dict[str, int] = {}
    line_events = [e for e in events if e.entity != PLANT]
    for event in line_events:
        per_detector[event.detector] = per_detector.get(event.detector, 0) + 1
    sequences = sorted({e.sequence for e in events})
    requests, last = 0, None
    cooldown = settings.drift.retrain_cooldown_files
    for sequence in sequences:
        if last is None or sequence - last > cooldown:
            requests, last = requests + 1, sequence
    lines_files = max(entities * judged, 1)
    # An episode's own event went out when it opened, unless it opened in its plant alarm's file
    # (one that opened earlier and started alarming again there had sent its event already).
    raised = [batch for batch, plant in episodes if plant_files.get(plant) != batch] + list(plant_files.values())
    per_episode = [batch for batch, _ in episodes]
    alarmed, normal, worst = normal_rows_alarmed(settings.paths.output / "batches", folder / "ground_truth.json")
    return {
        "drifts": drifts,
        "files_judged": judged,
        "seconds": round(seconds, 1),
        "line_events": len(line_events),
        "line_events_per_line_per_file": len(line_events) / lines_files,
        "per_detector_per_line_per_file": {k: v / lines_files for k, v in sorted(per_detector.items())},
        "plant_events": sum(e.entity == PLANT for e in events),
        "files_with_events": len(sequences),
        "retraining_requests": requests,
        "first_event_sequence": sequences[0] if sequences else None,
        "normal_rows_judged": normal,
        "normal_rows_alarmed": alarmed,
        "alarm_rate_x_alpha": alarmed / max(normal, 1) / settings.alarms.false_alarm_rate,
        "worst_file_x_alpha": worst / settings.alarms.false_alarm_rate,
        "alarm_episodes": len(episodes),
        "plant_alarms": len(plant_files),
        "episodes_in_plant_alarms": sum(plant is not None for _, plant in episodes),
        "alarm_events": len(raised),
        "alarm_events_one_per_episode": len(per_episode),
        "worst_file_alarm_events": _most_in_one_file(raised),
        "worst_file_alarm_events_one_per_episode": _most_in_one_file(per_episode),
    }


def _most_in_one_file(batch_ids: list[int]) -> int:
    return int(np.bincount(batch_ids).max()) if batch_ids else 0


def normal_rows_alarmed(outputs: Path, truth: Path) -> tuple[int, int, float]:
    """Rows the simulator did not label anomalous, past their line's alarm warm-up (a finite
    threshold), that alarmed; how many such rows there were; and the largest share of them
    alarmed in any one input file (its output parts together): a plant-wide storm shows there
    even when the run's share is small."""
    import pandas as pd

    labelled = pd.DataFrame(json.loads(truth.read_text())["anomalies"], columns=["entity", "timestamp"])
    stamps = pd.to_datetime(labelled["timestamp"], utc=True, format="ISO8601")  # with and without fractions
    labelled = pd.MultiIndex.from_arrays([labelled["entity"], stamps])
    per_file: dict[str, list[int]] = {}
    for path in sorted(outputs.glob("*.parquet")):
        rows = pd.read_parquet(path, columns=["entity", "timestamp", "anomaly", "anomaly_threshold"])
        keys = pd.MultiIndex.from_arrays([rows["entity"], pd.to_datetime(rows["timestamp"], utc=True)])
        live = ~keys.isin(labelled) & np.isfinite(rows["anomaly_threshold"].to_numpy())
        counts = per_file.setdefault(path.stem.split("-part-")[0], [0, 0])  # batch-<id>-part-<k>[-group-<g>]
        counts[0] += int((rows["anomaly"].to_numpy().astype(bool) & live).sum())
        counts[1] += int(live.sum())
    alarmed = sum(a for a, _ in per_file.values())
    judged = sum(j for _, j in per_file.values())
    worst = max((a / j for a, j in per_file.values() if j), default=0.0)
    return alarmed, judged, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=200)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "embedded.yaml")
    parser.add_argument("--out", type=Path, default=None)
    # A fleet trained longer fits its lines' relations tighter, and a plant-wide change then
    # surprises it more (the configured defaults: 18 files, 6 epochs).
    parser.add_argument("--initial-batches", type=int, default=2, help="files the initial model trains on")
    parser.add_argument("--initial-epochs", type=int, default=2, help="its epochs over them")
    args = parser.parse_args()
    import torch

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory() as scratch:
        results = [
            run_plant(
                Path(scratch) / f"plant-{'drifts' if drifts else 'stationary'}",
                args.config.resolve(),
                args.entities,
                args.batches,
                args.rows,
                args.seed,
                drifts,
                (args.initial_batches, args.initial_epochs),
            )
            for drifts in (False, True)
        ]
    print(
        f"{args.entities} lines x {args.rows} rows per plant-wide file, {args.batches} files, seed {args.seed}; "
        f"initial training on {args.initial_batches} files, {args.initial_epochs} epochs"
    )
    header = (
        f"{'plant':<12} {'files':>5} {'line events':>11} {'/line/file':>10} {'plant ev':>8} {'files w/':>8} "
        f"{'retrain':>7} {'normal rows':>11} {'alarmed':>7} {'x α':>5} {'worst file x α':>14}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{'drifts' if r['drifts'] else 'stationary':<12} {r['files_judged']:>5} {r['line_events']:>11} "
            f"{r['line_events_per_line_per_file']:>10.4f} {r['plant_events']:>8} {r['files_with_events']:>8} "
            f"{r['retraining_requests']:>7} {r['normal_rows_judged']:>11} {r['normal_rows_alarmed']:>7} "
            f"{r['alarm_rate_x_alpha']:>5.2f} {r['worst_file_x_alpha']:>14.1f}"
        )
        print(
            "   per detector, per line per file: "
            + ", ".join(f"{k} {v:.4f}" for k, v in r["per_detector_per_line_per_file"].items())
        )
    header = (
        f"{'plant':<12} {'episodes':>8} {'plant alarms':>12} {'episodes in them':>16} "
        f"{'events (1 per episode)':>22} {'worst file (1 per episode)':>26}"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        events = f"{r['alarm_events']} ({r['alarm_events_one_per_episode']})"
        worst = f"{r['worst_file_alarm_events']} ({r['worst_file_alarm_events_one_per_episode']})"
        print(
            f"{'drifts' if r['drifts'] else 'stationary':<12} {r['alarm_episodes']:>8} {r['plant_alarms']:>12} "
            f"{r['episodes_in_plant_alarms']:>16} {events:>22} {worst:>26}"
        )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "drift_rates.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
