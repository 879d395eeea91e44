"""The drift report of a detection, logged to MLflow: what the detectors saw, as pictures and JSON.

Per-sensor distributions (reference against the line's drifted batch), the line's forecast
error over its recent batches with the drift events marked, and a JSON summary. Written once
per file with detections, so it may read the line's output file back.

In a fleet some line drifts every few files, and drawing takes a few hundred milliseconds of
matplotlib, which holds the GIL: reports are drawn by the run's helper process
(`flows.monitor.helper`), so the next file does not wait for the pictures.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import func, select, update

from flows.monitor.drift_detectors import PLANT
from flows.settings import DriftSettings
from flows.storage.database import Database
from flows.storage.models import BatchSummary, DriftEvent
from flows.storage.work_folder import resolved_path

# Batches of the line's history shown in the error plot.
HISTORY_BATCHES = 200


def write_report(
    db: Database,
    folder: Path,
    events: list[DriftEvent],
    lines_fired: dict[str, int],
    reference: dict,
    sensors: tuple[str, ...],
    entity_column: str,
    settings: DriftSettings,
    pipeline: str,
    root: Path,
) -> None:
    """`root`: the work folder the stored output paths are relative to; `entity_column`: the
    line column of the stored features (the log schema's)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    first = events[0]
    # A plant-level event is drawn on the first line it names.
    entity = (first.details or {}).get("lines", [first.entity])[0] if first.entity == PLANT else first.entity
    with db.session() as session:
        newest = session.scalar(
            select(BatchSummary).where(BatchSummary.entity == entity, BatchSummary.sequence == first.sequence)
        )
        history = list(
            session.scalars(
                select(BatchSummary)
                .where(BatchSummary.entity == entity, BatchSummary.sequence <= first.sequence)
                .order_by(BatchSummary.sequence.desc())
                .limit(HISTORY_BATCHES)
            )
        )[::-1]
        marks = list(
            session.scalars(
                select(DriftEvent.sequence)
                .where(
                    DriftEvent.entity == entity,
                    DriftEvent.sequence >= (history[0].sequence if history else 0),
                    DriftEvent.sequence <= first.sequence,
                )
                .distinct()
            )
        )
    batch = pd.read_parquet(resolved_path(root, newest.features_path), filters=[(entity_column, "==", entity)])

    # Fixed margins: a layout engine costs more than the drawing.
    figure = Figure(figsize=(3.2 * len(sensors), 2.8))
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.1, top=0.82, wspace=0.3)
    axes = figure.subplots(1, len(sensors), squeeze=False)[0]
    for axis, sensor in zip(axes, sensors, strict=True):
        ref = np.asarray(reference.get("sensors", {}).get(sensor, {}).get("sample", []), float)
        current = batch[f"raw_{sensor}"].dropna().to_numpy()
        bins = np.histogram_bin_edges(np.concatenate([ref, current]) if len(ref) else current, 30)
        if len(ref):
            axis.stairs(np.histogram(ref, bins, density=True)[0], bins, fill=True, alpha=0.5, label="reference")
        axis.stairs(
            np.histogram(current, bins, density=True)[0], bins, fill=True, alpha=0.5, label=f"batch {newest.batch_id}"
        )
        axis.set_title(sensor, fontsize=9)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"{entity}: sensor distributions at drift (sequence {newest.sequence})", fontsize=10)
    figure.savefig(folder / "feature_distributions.png", dpi=90)

    figure = Figure(figsize=(8, 3))
    figure.subplots_adjust(left=0.09, right=0.98, bottom=0.17, top=0.95)
    axis = figure.subplots()
    axis.plot(
        [s.sequence for s in history],
        [s.metrics.get("mae_before") for s in history],
        marker=".",
        linewidth=1,
        label=entity,
    )
    for sequence in marks:  # this line's earlier detections
        axis.axvline(sequence, color="red", alpha=0.4, linewidth=1)
    axis.axvline(newest.sequence, color="red", linewidth=2, label="this detection")
    axis.set_xlabel("batch sequence")
    axis.set_ylabel("forecast MAE before update")
    axis.legend(fontsize=7)
    figure.savefig(folder / "error_over_time.png", dpi=90)

    summary = {
        "pipeline": pipeline,
        "entity": entity,
        "sequence": newest.sequence,
        "batch_id": newest.batch_id,
        "detections": [event.details for event in events],
        "lines_fired_by_detector": lines_fired,
        "batch_stats": newest.drift_stats,
        "batch_metrics": newest.metrics,
        "thresholds": settings.model_dump(),
    }
    (folder / "drift_summary.json").write_text(json.dumps(summary, indent=2, default=str))


def report_to_mlflow(
    db: Database,
    tracker,
    run_id: str,
    event_ids: list[int],
    reference: dict,
    sensors: tuple[str, ...],
    entity_column: str,
    settings: DriftSettings,
    pipeline: str,
    root: Path,
) -> str:
    """Writes the report of the detections `event_ids` (one file part's) into the run's
    artifacts and records where on each event. The report shows the first line that fired;
    its JSON counts the lines that fired by detector."""
    with db.session() as session:
        first = session.get(DriftEvent, min(event_ids))
        events = list(
            session.scalars(
                select(DriftEvent)
                .where(DriftEvent.sequence == first.sequence, DriftEvent.entity == first.entity)
                .order_by(DriftEvent.id)
            )
        )
        fired = dict(
            session.execute(
                select(DriftEvent.detector, func.count(DriftEvent.entity.distinct()))
                .where(DriftEvent.sequence == first.sequence)
                .group_by(DriftEvent.detector)
            )
            .tuples()
            .all()
        )
        if first.entity == PLANT:  # its lines' detections, counted by detector
            fired = dict((first.details or {}).get("detectors", fired))
    with tempfile.TemporaryDirectory() as tmp:
        write_report(db, Path(tmp), events, fired, reference, sensors, entity_column, settings, pipeline, root)
        uri = tracker.log_artifacts(run_id, Path(tmp), f"drift/event-{event_ids[0]:05d}")
    with db.session() as session:
        session.execute(update(DriftEvent).where(DriftEvent.sequence == first.sequence).values(report_uri=uri))
    return uri
