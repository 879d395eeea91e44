"""The Prefect flows: continual_update, retrain and backfill.

They orchestrate; the work is in `flows.pipeline` and the floors below. Tasks that touch files,
the database or MLflow retry; a batch's processing is safe to retry because nothing of it is
visible before its commit and a failure drops the in-memory model back to the committed one.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from flows.drift_watch import DriftWatch, report_to_mlflow
from flows.file_checks import FileCheck, checked_ahead
from flows.ingest import SUPPORTED_SUFFIXES, read_batch
from flows.initial_training import train_initial
from flows.pipeline import BatchResult, Pipeline
from flows.retraining import retrain
from flows.secrets import install_log_masking
from flows.settings import load_settings
from flows.storage.models import ModelState

RESOURCE_PREFIX = "lru-online.pipeline."
install_log_masking()


def drift_resource(pipeline_name: str) -> str:
    return f"{RESOURCE_PREFIX}{pipeline_name}"


@task(name="discover-landing", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def discover_landing(pipeline: Pipeline):
    return pipeline.discover()


@task(name="initial-training", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def initial_training(pipeline: Pipeline) -> str | None:
    return train_initial(pipeline)


@task(name="process-batch", retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def process_batch(pipeline: Pipeline, batch_id: int, check: FileCheck | None = None) -> BatchResult:
    try:
        return pipeline.process(batch_id, check)
    except Exception:
        pipeline.learner = None  # a retry starts again from the committed model
        raise


@task(name="track-batches", retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE)
def track_batches(pipeline: Pipeline, started_at: datetime) -> int:
    count = pipeline.track_pending(started_at)
    pipeline.snapshot_if_due()
    return count


@task(name="watch-drift", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
def watch_drift(pipeline: Pipeline, result: BatchResult) -> list[int]:
    """Checks the detectors after a committed batch; on detection records the drift event,
    logs the drift report to MLflow and restarts the detectors. Returns the event ids."""
    state = pipeline.model_state()
    settings = pipeline.settings
    watch = DriftWatch(pipeline.db, settings.pipeline, settings.drift)
    detections = []
    for outcome in result.entities:
        if outcome.features is not None:
            detections += watch.check(outcome.entity, state.drift_since_sequence)
    if not detections:
        return []
    action = {"retrain": "retrain", "event": "event_emitted", "record": "recorded"}[settings.drift.on_detect]
    event_ids = watch.record(detections, action)
    report_to_mlflow(
        watch,
        pipeline.tracker,
        state.online_run_id,
        event_ids,
        detections,
        state.reference or {},
        pipeline.spec.sensors,
    )
    pipeline.tracker.log_metrics(
        state.online_run_id,
        {f"drift_{d.detector}_{d.feature or 'error'}": d.value for d in detections},
        step=result.sequence,
    )

    def restart_detectors(model: ModelState) -> None:
        model.drift_since_sequence = result.sequence

    pipeline.update_model_state(restart_detectors)
    get_run_logger().warning(
        "drift on %s at batch sequence %s: %s",
        detections[0].entity,
        result.sequence,
        ", ".join(f"{d.detector}({d.feature or 'error'})={d.value:.3g}" for d in detections),
    )
    return event_ids


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
    counts = {"processed": 0, "quarantined": 0, "late": 0, "skipped": 0, "drift_events": 0, "retrains": 0}
    run_lease = f"pipeline:{settings.pipeline}"
    # One run works through the landing folder at a time, in order; a second one leaves at once.
    if not pipeline.ledger.acquire(run_lease):
        logger.info("another run of pipeline %r is working; nothing to do", settings.pipeline)
        pipeline.close()
        return {"run": {**counts, "busy": 1}, **pipeline.ledger.accounting()}
    try:
        track_batches(pipeline, started)  # metrics a crashed run committed but never logged
        discovery = discover_landing(pipeline)
        if discovery.duplicates:
            logger.info("%d duplicate arrivals filed away: %s", len(discovery.duplicates), discovery.duplicates[:5])
        if pipeline.model_state() is None and initial_training(pipeline) is None:
            logger.info("no valid batch to train an initial model on yet")
        pending = pipeline.ledger.pending() if pipeline.model_state() is not None else []
        pending = pending[:max_batches] if max_batches else pending
        files = [(batch_id, Path(pipeline.ledger.get(batch_id).source_file)) for batch_id in pending]
        with checked_ahead(settings, files) as checked:
            for batch_id, check in checked:
                pipeline.ledger.acquire(run_lease)  # renew
                result = process_batch(pipeline, batch_id, check)
                counts[result.status] = counts.get(result.status, 0) + 1
                if result.status == "quarantined":
                    logger.warning("quarantined %s: %s", result.file, "; ".join(result.reasons)[:500])
                if result.status == "processed":
                    _after_commit(pipeline, result, counts, config, started)
        return {"run": counts, **pipeline.ledger.accounting()}
    finally:
        pipeline.ledger.release(run_lease)
        pipeline.close()


def _after_commit(pipeline: Pipeline, result: BatchResult, counts: dict, config: str | None, started: datetime) -> None:
    """Tracking and drift for a committed batch; drift retrains or emits the event as configured."""
    settings = pipeline.settings
    track_batches(pipeline, started)
    event_ids = watch_drift(pipeline, result)
    if not event_ids:
        return
    counts["drift_events"] += len(event_ids)
    if settings.drift.on_detect == "retrain":
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
        outcome = retrain(pipeline, trigger=trigger, drift_event_id=drift_event_id)
        get_run_logger().info("retrain: %s", outcome.reason)
        return asdict(outcome)
    finally:
        pipeline.close()


def _first_timestamp(path: Path, settings) -> str:
    try:
        frame = read_batch(path, settings.log_schema)
        return str(frame[settings.log_schema.timestamp_column].min())
    except Exception:  # unreadable files go last and end in quarantine
        return "~"


@flow(name="backfill")
def backfill(source: str, config: str | None = None, workdir: str | None = None) -> dict:
    """Replays a folder of historical files in time order through the landing folder."""
    settings = load_settings(config, workdir)
    files = [p for p in Path(source).iterdir() if p.is_file() and p.name.lower().endswith(SUPPORTED_SUFFIXES)]
    files.sort(key=lambda p: (_first_timestamp(p, settings), p.name))
    progress = create_progress_artifact(progress=0.0, key="backfill-progress", description=f"backfill of {source}")
    settings.ensure_folders()
    summary: dict = {}
    for index, path in enumerate(files, start=1):
        shutil.copy2(path, settings.paths.landing / path.name)
        summary = continual_update(config=config, workdir=str(settings.workdir))
        update_progress_artifact(progress, progress=100.0 * index / len(files))
    return {"files": len(files), **summary}
