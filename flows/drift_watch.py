"""Drift detection over the committed batch summaries, drift reports and their follow-up.

Detectors are rebuilt for each check from the summaries committed since the last reset (a
retrain), so their state needs no storage of its own and a crash loses nothing:
- ADWIN (river) on each entity's per-event forecast errors over its last `adwin_batches`
  batches since the reset (read back from the batch outputs), firing when it detects a change
  inside the newest batch;
- an error jump: the newest batch's MAE above `error_ratio_threshold` times the median MAE of
  the entity's earlier batches since the reset (a control chart on the forecast error);
- PSI and KS of each sensor's readings against the training reference, firing when one sensor
  exceeds its threshold for `consecutive` batches in a row.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from river.drift import ADWIN
from sqlalchemy import select

from flows.settings import DriftSettings
from flows.storage.database import Database
from flows.storage.models import BatchSummary, DriftEvent

log = logging.getLogger(__name__)


@dataclass
class Detection:
    detector: str
    entity: str
    feature: str | None
    value: float
    threshold: float
    sequence: int
    batch_id: int
    event_time: str


def _trailing_run(values: list[float | None], threshold: float) -> int:
    run = 0
    for value in reversed(values):
        if value is None or not value > threshold:
            break
        run += 1
    return run


def adwin_fires(event_errors: list[np.ndarray], delta: float, scale: float = 5.0) -> bool:
    """ADWIN over the per-event forecast errors of consecutive batches (oldest first): does it
    detect a change while reading the newest batch? Errors are clipped to [0, scale] and scaled
    to [0, 1], the range ADWIN's bound assumes."""
    adwin = ADWIN(delta=delta, clock=1)
    fired = False
    for index, errors in enumerate(event_errors):
        newest = index == len(event_errors) - 1
        for value in np.clip(errors[np.isfinite(errors)], 0, scale) / scale:
            adwin.update(float(value))
            fired = fired or (newest and adwin.drift_detected)
    return fired


def detect(
    summaries: list[BatchSummary], settings: DriftSettings, event_errors: list[np.ndarray] | None = None
) -> list[Detection]:
    """Detections that fire at the newest of one entity's summaries (oldest first);
    `event_errors` holds per-event forecast errors of the newest batches, oldest first."""
    if len(summaries) < max(settings.cooldown_batches, 1):
        return []
    newest = summaries[-1]
    found = []

    def detection(detector: str, feature: str | None, value: float, threshold: float) -> Detection:
        return Detection(
            detector,
            newest.entity,
            feature,
            float(value),
            float(threshold),
            newest.sequence,
            newest.batch_id,
            newest.last_ts.isoformat(),
        )

    if event_errors and adwin_fires(event_errors, settings.adwin_delta):
        found.append(
            detection("adwin_error", None, newest.metrics.get("mae_before") or float("nan"), settings.adwin_delta)
        )

    earlier = [s.metrics.get("mae_before") for s in summaries[:-1]]
    earlier = [v for v in earlier if v is not None]
    newest_mae = newest.metrics.get("mae_before")
    if newest_mae is not None and earlier:
        ratio = newest_mae / max(float(np.median(earlier)), 1e-12)
        if ratio > settings.error_ratio_threshold:
            found.append(detection("error_jump", None, ratio, settings.error_ratio_threshold))

    for statistic, threshold in (("psi", settings.psi_threshold), ("ks", settings.ks_threshold)):
        sensors = newest.drift_stats.get(statistic, {})
        for sensor in sorted(sensors):
            history = [s.drift_stats.get(statistic, {}).get(sensor) for s in summaries]
            if _trailing_run(history, threshold) >= settings.consecutive:
                found.append(detection(statistic, sensor, sensors[sensor], threshold))
    return found


class DriftWatch:
    def __init__(self, db: Database, pipeline: str, settings: DriftSettings) -> None:
        self.db = db
        self.pipeline = pipeline
        self.settings = settings

    def check(self, entity: str, since_sequence: int) -> list[Detection]:
        with self.db.session() as session:
            summaries = list(
                session.scalars(
                    select(BatchSummary)
                    .where(BatchSummary.entity == entity, BatchSummary.sequence > since_sequence)
                    .order_by(BatchSummary.sequence)
                )
            )
        recent = summaries[-self.settings.adwin_batches :]
        # Per-event absolute one-step errors: the square root of each event's anomaly score.
        errors = [np.sqrt(pd.read_parquet(s.features_path, columns=["score"])["score"].to_numpy()) for s in recent]
        return detect(summaries, self.settings, errors)

    def record(self, detections: list[Detection], action: str) -> list[int]:
        ids = []
        with self.db.session() as session:
            for d in detections:
                event = DriftEvent(
                    pipeline=self.pipeline,
                    batch_id=d.batch_id,
                    sequence=d.sequence,
                    entity=d.entity,
                    detector=d.detector,
                    feature=d.feature,
                    value=d.value,
                    threshold=d.threshold,
                    event_time=pd.Timestamp(d.event_time).to_pydatetime(warn=False),
                    action=action,
                    details=asdict(d),
                )
                session.add(event)
                session.flush()
                ids.append(event.id)
        return ids

    def set_report(self, event_ids: list[int], uri: str) -> None:
        with self.db.session() as session:
            for event_id in event_ids:
                session.get(DriftEvent, event_id).report_uri = uri

    def write_report(
        self, folder: Path, detections: list[Detection], reference: dict, sensors: tuple[str, ...]
    ) -> None:
        """Per-sensor distributions (reference vs the drifted batch), error over time with
        drift markers, and a JSON summary, as files in `folder`."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        entity = detections[0].entity
        with self.db.session() as session:
            history = list(session.scalars(select(BatchSummary).order_by(BatchSummary.sequence)))
            events = list(session.scalars(select(DriftEvent).order_by(DriftEvent.id)))
        newest = next(s for s in reversed(history) if s.batch_id == detections[0].batch_id and s.entity == entity)
        batch = pd.read_parquet(newest.features_path)

        figure, axes = plt.subplots(1, len(sensors), figsize=(3.2 * len(sensors), 2.8), squeeze=False)
        for axis, sensor in zip(axes[0], sensors, strict=True):
            ref = reference.get("sensors", {}).get(sensor, {}).get("sample", [])
            current = batch[f"raw_{sensor}"].dropna().to_numpy()
            bins = np.histogram_bin_edges(
                np.concatenate([np.asarray(ref, float), current]) if len(ref) else current, 30
            )
            if len(ref):
                axis.hist(ref, bins=bins, density=True, alpha=0.5, label="reference")
            axis.hist(current, bins=bins, density=True, alpha=0.5, label=f"batch {newest.batch_id}")
            axis.set_title(sensor, fontsize=9)
        axes[0][0].legend(fontsize=7)
        figure.suptitle(f"{entity}: sensor distributions at drift (sequence {newest.sequence})", fontsize=10)
        figure.tight_layout()
        figure.savefig(folder / "feature_distributions.png", dpi=90)
        plt.close(figure)

        figure, axis = plt.subplots(figsize=(8, 3))
        frame = pd.DataFrame(
            [{"sequence": s.sequence, "entity": s.entity, "mae": s.metrics.get("mae_before")} for s in history]
        )
        for name, group in frame.groupby("entity"):
            axis.plot(group["sequence"], group["mae"], marker=".", linewidth=1, label=str(name))
        for event in events:
            axis.axvline(event.sequence, color="red", alpha=0.4, linewidth=1)
        axis.axvline(newest.sequence, color="red", linewidth=2, label="this detection")
        axis.set_xlabel("batch sequence")
        axis.set_ylabel("forecast MAE before update")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(folder / "error_over_time.png", dpi=90)
        plt.close(figure)

        summary = {
            "pipeline": self.pipeline,
            "entity": entity,
            "sequence": newest.sequence,
            "batch_id": newest.batch_id,
            "detections": [asdict(d) for d in detections],
            "batch_stats": newest.drift_stats,
            "batch_metrics": newest.metrics,
            "thresholds": self.settings.model_dump(),
        }
        (folder / "drift_summary.json").write_text(json.dumps(summary, indent=2, default=str))


def report_to_mlflow(
    watch: DriftWatch, tracker, run_id: str, event_ids: list[int], detections, reference, sensors
) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        watch.write_report(Path(tmp), detections, reference, sensors)
        uri = tracker.log_artifacts(run_id, Path(tmp), f"drift/event-{event_ids[0]:05d}")
    watch.set_report(event_ids, uri)
    return uri
