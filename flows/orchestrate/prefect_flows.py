"""The Prefect flows: continual_update, retrain and backfill.

They orchestrate; the work is in `flows.orchestrate.pipeline` and the floors below. Tasks that touch files,
the database or MLflow retry; a batch's processing is safe to retry because nothing of it is
visible before its commit and a failure drops the in-memory model back to the committed one.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from sqlalchemy import select

from flows.ingest.checks import FileCheck
from flows.ingest.landing import SUPPORTED_SUFFIXES, read_batch
from flows.ingest.validation import parse_timestamps
from flows.model.initial_training import train_initial
from flows.model.registry_package import snapshot_if_due
from flows.model.retraining import retrain
from flows.monitor.tracking import track_pending
from flows.orchestrate.heap import frozen_heap
from flows.orchestrate.pipeline import BatchResult, Pipeline
from flows.orchestrate.retrain_beside import RetrainBeside
from flows.secrets import install_log_masking
from flows.settings import load_settings
from flows.storage.models import AnomalyAlarm, BatchStatus, DriftEvent, PlantAlarm

RESOURCE_PREFIX = "lru-online.pipeline."
install_log_masking()


def drift_resource(pipeline_name: str) -> str:
    return f"{RESOURCE_PREFIX}{pipeline_name}"


@task(name="discover-landing", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def discover_landing(pipeline: Pipeline):
    return pipeline.discover()


@task(name="initial-training", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def initial_training(pipeline: Pipeline) -> str | None:
    return train_initial(pipeline.live, pipeline.tracker, pipeline.initial_frames())


@task(name="process-batch", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def process_batch(pipeline: Pipeline, batch_id: int, check: FileCheck | None = None) -> BatchResult:
    try:
        return pipeline.process(batch_id, check)
    except Exception:
        pipeline.live.drop()  # a retry starts again from the committed model
        raise


@task(name="track-batches", retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE)
def track_batches(pipeline: Pipeline, started_at: datetime) -> int:
    count = track_pending(pipeline.db, pipeline.tracker, pipeline.settings.pipeline, started_at)
    snapshot_if_due(pipeline.db, pipeline.tracker, pipeline.settings)
    return count


@task(name="report-drift", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
def report_drift(pipeline: Pipeline, result: BatchResult) -> list[int]:
    """The drift events a committed file recorded (its detectors ran in the fleet step and
    restarted with the commit): their values to MLflow and a warning to the run log now, their
    report (pictures and JSON) from the helper process; the run waits for it before it ends."""
    event_ids = result.drift_event_ids
    if not event_ids:
        return []
    state = pipeline.live.state()
    pipeline.monitor.report(state.online_run_id, event_ids, state.reference or {})
    with pipeline.db.session() as session:
        events = list(session.scalars(select(DriftEvent).where(DriftEvent.sequence == result.sequence)))
    pipeline.tracker.log_metrics(
        state.online_run_id,
        {f"drift_{e.detector}_{e.feature or 'error'}": e.value for e in events},
        step=result.sequence,
    )
    get_run_logger().warning(
        "drift on %s at batch sequence %s: %s",
        ", ".join(sorted({e.entity for e in events})[:5]),
        result.sequence,
        ", ".join(f"{e.entity} {e.detector}({e.feature or 'error'})={e.value:.3g}" for e in events[:10]),
    )
    return event_ids


def announce_alarms(pipeline: Pipeline, result: BatchResult) -> None:
    """The alarm episodes a committed file opened: a warning in the run log, and one Prefect
    event (`alarms.event_name`) per episode, with its line, onset, peak and threshold, that
    automations can act on (an episode that runs on into later files raises no other). Episodes
    most of the file's lines started together raise one plant-level event instead
    (`alarms.plant.event_name`), naming the lines and their alarms."""
    from prefect.events import emit_event

    with pipeline.db.session() as session:
        alarms = list(session.scalars(select(AnomalyAlarm).where(AnomalyAlarm.id.in_(result.alarm_ids))))
        plants = list(session.scalars(select(PlantAlarm).where(PlantAlarm.id.in_(result.plant_alarm_ids))))
        # Its lines' alarms, those that opened before the plant changed and alarmed again in it too.
        members = list(
            session.scalars(select(AnomalyAlarm).where(AnomalyAlarm.plant_alarm_id.in_(result.plant_alarm_ids)))
        )
    own = [a for a in alarms if a.plant_alarm_id is None]
    logger = get_run_logger()
    for plant in plants:
        logger.warning(
            "plant-level anomaly alarm in %s: %d line(s) (%.0f%% of the file's in one stretch) from %s to %s",
            result.file,
            plant.lines,
            100 * plant.share,
            f"{plant.start_ts:%Y-%m-%d %H:%M:%S}",
            f"{plant.end_ts:%Y-%m-%d %H:%M:%S}",
        )
    if own:
        logger.warning(
            "%d anomaly alarm(s) in %s on %d line(s): %s",
            len(own),
            result.file,
            len({a.entity for a in own}),
            ", ".join(f"{a.entity} from {a.start_ts:%Y-%m-%d %H:%M:%S} (peak {a.peak_score:.3g})" for a in own[:10]),
        )
    name = pipeline.settings.pipeline
    resource = {"prefect.resource.id": drift_resource(name), "prefect.resource.name": name}
    for plant in plants:
        emit_event(
            event=pipeline.settings.alarms.plant.event_name,
            resource=resource,
            payload={
                "plant_alarm_id": plant.id,
                "lines": plant.entities,
                "alarm_ids": [a.id for a in members if a.plant_alarm_id == plant.id],
                "onset": plant.start_ts.isoformat(),
                "end": plant.end_ts.isoformat(),
                "share": plant.share,
                "threshold": plant.threshold,
                "rows": plant.rows,
                "file": result.file,
                "sequence": result.sequence,
            },
        )
    for alarm in own:
        emit_event(
            event=pipeline.settings.alarms.event_name,
            resource=resource,
            related=[{"prefect.resource.id": f"lru-online.line.{alarm.entity}", "prefect.resource.role": "line"}],
            payload={
                "alarm_id": alarm.id,
                "line": alarm.entity,
                "onset": alarm.start_ts.isoformat(),
                "end": alarm.end_ts.isoformat(),
                "rows": alarm.rows,
                "peak_score": alarm.peak_score,
                "threshold": alarm.threshold,
                "file": result.file,
                "sequence": result.sequence,
            },
        )


def emit_drift_event(pipeline_name: str, event_name: str, event_ids: list[int], sequence: int | None) -> None:
    from prefect.events import emit_event

    emit_event(
        event=event_name,
        resource={
            "prefect.resource.id": drift_resource(pipeline_name),
            "prefect.resource.name": pipeline_name,
        },
        payload={"drift_event_id": event_ids[0], "drift_event_ids": event_ids, "sequence": sequence},
    )


@flow(name="continual-update")
def continual_update(config: str | None = None, workdir: str | None = None, max_batches: int | None = None) -> dict:
    """Validates, scores and learns from every new landing file, from each entity's carried
    state; tracks each batch in MLflow and answers drift as configured."""
    logger = get_run_logger()
    settings = load_settings(config, workdir)
    pipeline = Pipeline(settings)
    started = datetime.now(UTC)
    counts = {
        "processed": 0,
        "quarantined": 0,
        "late": 0,
        "skipped": 0,
        "anomaly_alarms": 0,
        "plant_alarms": 0,
        "drift_events": 0,
        "retrains": 0,
    }
    run_lease = f"pipeline:{settings.pipeline}"
    beside = RetrainBeside(config, str(settings.workdir))
    # One run works through the landing folder at a time, in order; a second one leaves at once.
    if not pipeline.ledger.acquire(run_lease):
        logger.info("another run of pipeline %r is working; nothing to do", settings.pipeline)
        pipeline.close()
        return {"run": {**counts, "busy": 1}, "processed_files": [], **pipeline.ledger.accounting()}
    try:
        track_batches(pipeline, started)  # metrics a crashed run committed but never logged
        discovery = discover_landing(pipeline)
        if discovery.duplicates:
            logger.info("%d duplicate arrivals filed away: %s", len(discovery.duplicates), discovery.duplicates[:5])
        if pipeline.live.state() is None and initial_training(pipeline) is None:
            logger.info("no valid batch to train an initial model on yet")
        pending = pipeline.ledger.pending() if pipeline.live.state() is not None else []
        pending = pending[:max_batches] if max_batches else pending
        files = [(batch_id, pipeline.ledger.path(pipeline.ledger.get(batch_id).source_file)) for batch_id in pending]
        if files:
            pipeline.monitor.start(len(files))  # every processed file gives it a job; let it import meanwhile
        work = (pipeline.connect_dask() if files else None) or pipeline.local_work
        checked = work.checked_ahead(settings, files)
        progress = _Progress(len(files))
        timings = []  # per processed file: its rows and where its seconds went
        with frozen_heap():  # what the run built so far is not scanned again for every file
            for batch_id, check in checked:
                pipeline.ledger.acquire(run_lease)  # renew
                result = process_batch(pipeline, batch_id, check)
                progress.advance()
                counts[result.status] = counts.get(result.status, 0) + 1
                if result.status == BatchStatus.QUARANTINED:
                    page = f" (Data Docs: {result.validation_page})" if result.validation_page else ""
                    logger.warning("quarantined %s: %s%s", result.file, "; ".join(result.reasons)[:500], page)
                for quarantine in result.line_quarantines:
                    page = quarantine["validation_page"]
                    logger.warning(
                        "quarantined %d row(s) of %s in %s; its other lines went on: %s%s",
                        quarantine["rows"],
                        "rows without a line" if quarantine["entity"] is None else f"line {quarantine['entity']!r}",
                        result.file,
                        "; ".join(quarantine["reasons"])[:500],
                        f" (rows: {quarantine['rows_file']}; Data Docs: {page})" if page else "",
                    )
                if result.status == BatchStatus.PROCESSED:
                    timings.append({"batch_id": batch_id, "rows": result.rows_scored, "seconds": result.timings})
                    _after_commit(pipeline, result, counts, config, started, beside)
        pipeline.monitor.wait()  # a report or tracking that failed fails the run, as a task would
        return {"run": counts, "processed_files": timings, **pipeline.ledger.accounting()}
    finally:
        pipeline.ledger.release(run_lease)
        pipeline.close()
        _end_with(beside)


def _end_with(beside: RetrainBeside) -> None:
    """A run called directly (`lru-online run`, `backfill`, a test) waits for its retraining,
    whose flow run reports to this run's API, a temporary one on embedded defaults (the pipeline
    is free meanwhile). A deployment's run does not: its server stays up, and while the run
    waited the deployment's concurrency limit would hold the next scheduled run back."""
    from prefect.runtime import deployment

    if deployment.id is None:
        beside.wait()
    elif beside.running():
        get_run_logger().info("its retraining goes on in a process of its own, as a flow run of its own")


class _Progress:
    """A Prefect progress artifact for runs of many files, updated every 1 % of them."""

    MIN_FILES = 20

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.key = None
        if total >= self.MIN_FILES:
            self.key = create_progress_artifact(progress=0.0, description=f"continual_update over {total} files")

    def advance(self) -> None:
        self.done += 1
        if self.key is not None and (self.done % max(1, self.total // 100) == 0 or self.done == self.total):
            update_progress_artifact(self.key, progress=100.0 * self.done / self.total)


def _after_commit(
    pipeline: Pipeline, result: BatchResult, counts: dict, config: str | None, started: datetime, beside: RetrainBeside
) -> None:
    """Tracking and drift for a committed file; drift retrains or emits the event as configured."""
    settings = pipeline.settings
    pipeline.monitor.track(started)  # logged by the helper process while the next file runs
    snapshot_if_due(pipeline.db, pipeline.tracker, settings)
    if result.alarm_ids or result.plant_alarm_ids:
        counts["anomaly_alarms"] += len(result.alarm_ids)
        counts["plant_alarms"] += len(result.plant_alarm_ids)
        announce_alarms(pipeline, result)
    if not result.drift_event_ids:
        return
    event_ids = report_drift(pipeline, result)
    counts["drift_events"] += len(event_ids)
    if result.drift_action == "recorded":  # within the fleet-wide cooldown of the last request
        return
    if settings.drift.on_detect == "retrain" and settings.retrain.beside:
        counts["retrains"] += beside.start("drift", event_ids[0])
    elif settings.drift.on_detect == "retrain":
        retrain_flow(config=config, workdir=str(settings.workdir), trigger="drift", drift_event_id=event_ids[0])
        counts["retrains"] += 1
    elif settings.drift.on_detect == "event":
        emit_drift_event(settings.pipeline, settings.drift.event_name, event_ids, result.sequence)


@flow(name="retrain")
def retrain_flow(
    config: str | None = None,
    workdir: str | None = None,
    trigger: str = "manual",
    drift_event_id: int | None = None,
) -> dict:
    """Trains a challenger on the recent window and promotes it only if it wins."""
    settings = load_settings(config, workdir)
    pipeline = Pipeline(settings)
    try:
        outcome = retrain(pipeline.live, pipeline.tracker, trigger=trigger, drift_event_id=drift_event_id)
        get_run_logger().info("retrain: %s", outcome.reason)
        return asdict(outcome)
    finally:
        pipeline.close()


def _first_timestamp(path: Path, settings) -> pd.Timestamp:
    """The file's earliest timestamp, parsed (text and Parquet files write them differently)."""
    try:
        frame = read_batch(path, settings.log_schema)
        first = parse_timestamps(frame[settings.log_schema.timestamp_column]).min()
        return first if pd.notna(first) else pd.Timestamp.max.tz_localize("UTC")
    except Exception:  # unreadable files go last and end in quarantine
        return pd.Timestamp.max.tz_localize("UTC")


def backfill_files(source: Path) -> list[Path]:
    """The log files of a folder, in the order of their names (see `backfill` for time order)."""
    return sorted(p for p in source.iterdir() if p.is_file() and p.name.lower().endswith(SUPPORTED_SUFFIXES))


@flow(name="backfill")
def backfill(source: str, config: str | None = None, workdir: str | None = None) -> dict:
    """Replays a folder of historical files in time order: lands them all at once, ordered by
    their first timestamp (their modification times say the order to the ledger), then one
    continual_update works through them, the first `initial_training.batches` training the
    model when there is none yet."""
    settings = load_settings(config, workdir)
    files = backfill_files(Path(source))
    files.sort(key=lambda p: (_first_timestamp(p, settings), p.name))
    settings.ensure_folders()
    # Landed "earlier" than the stability wait, one second apart, oldest first.
    base = time.time() - settings.ingest.stable_seconds - len(files) - 1
    for index, path in enumerate(files):
        target = settings.paths.landing / path.name
        shutil.copyfile(path, target)
        os.utime(target, (base + index, base + index))
    summary = continual_update(config=config, workdir=str(settings.workdir))
    return {"files": len(files), **summary}
