"""One pipeline's working parts, and the processing of a landed batch from ledger to commit.

The Prefect flows in `flows.flows` call these methods as tasks. A batch's results become
visible in one database transaction (entity states, model checkpoint reference, ledger status,
summary); anything that happened before it (a checkpoint file, an output file) is invisible
if the process dies, and is redone from the old state on the next run.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from features import EntityFeatureState, FeatureBatch, build_features
from flows import faults
from flows.fleet import feature_spec, load_learner, save_checkpoint
from flows.ingest import BatchReadError, discover, iter_batch
from flows.ledger import DiscoveryResult, Ledger
from flows.settings import Settings
from flows.storage.database import Database
from flows.storage.models import Batch, BatchSummary, EntityState, ModelState
from lru_online import OnlineLearner, RecurrentState
from lru_online.drift import Reference, ks_statistic, psi

if TYPE_CHECKING:
    from flows.file_checks import FileCheck

log = logging.getLogger(__name__)
COMMIT_ATTEMPTS = 3


class CheckpointRefused(RuntimeError):
    """A checkpoint that would need pickle code execution to load."""


class StaleModel(RuntimeError):
    """Another run committed a newer model or entity state first; redo from the fresh state."""


@dataclass
class EntityOutcome:
    entity: str
    rows: int
    late: int
    features: FeatureBatch | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    drift_stats: dict = field(default_factory=dict)
    output_path: Path | None = None


@dataclass
class BatchResult:
    batch_id: int
    file: str
    status: str  # processed | quarantined | late | skipped (another run holds an entity)
    rows_received: int = 0
    rows_scored: int = 0
    rows_quarantined: int = 0
    rows_late: int = 0
    sequence: int | None = None
    entities: list[EntityOutcome] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def safe_name(entity: str) -> str:
    """A file-system-safe, collision-free folder name for an entity id."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", entity)[:40]
    return f"{readable}-{hashlib.sha1(entity.encode()).hexdigest()[:8]}"


class Pipeline:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.ensure_folders()
        self.db = Database(settings.database_url)
        self.db.migrate()
        self.ledger = Ledger(self.db, settings.paths.archive, settings.paths.quarantine)
        self.spec = feature_spec(settings)
        self._validator = None
        self._tracker = None
        self.learner: OnlineLearner | None = None
        self._model_version: int | None = None  # model_state.version the learner was loaded at

    # --- lazily built adapters (GE and MLflow imports take seconds) -----------------------
    @property
    def validator(self):
        if self._validator is None:
            from flows.validation import BatchValidator

            self._validator = BatchValidator(self.settings.log_schema)
        return self._validator

    @property
    def tracker(self):
        if self._tracker is None:
            from flows.tracking import Tracker

            self._tracker = Tracker(self.settings)
        return self._tracker

    def close(self) -> None:
        self.db.dispose()

    # --- the live model -------------------------------------------------------------------
    def model_state(self) -> ModelState | None:
        with self.db.session() as session:
            return session.get(ModelState, self.settings.pipeline)

    def load_live_model(self) -> OnlineLearner:
        state = self.model_state()
        if state is None:
            raise RuntimeError("no live model yet: run initial training first")
        if self.learner is None or self._model_version != state.version:
            try:
                self.learner = load_learner(Path(state.checkpoint_path), self.settings)
            except FileNotFoundError:
                # A concurrent run committed a newer checkpoint and removed this one.
                raise StaleModel(f"checkpoint {state.checkpoint_path} was replaced") from None
            except pickle.UnpicklingError as error:
                raise CheckpointRefused(
                    f"checkpoint {state.checkpoint_path} holds more than tensors and plain data; "
                    f"refused to load it: {str(error).splitlines()[0]}"
                ) from None
            self._model_version = state.version
        return self.learner

    def reference(self) -> dict:
        state = self.model_state()
        return state.reference if state is not None and state.reference else {}

    # --- discovery ------------------------------------------------------------------------
    def discover(self) -> DiscoveryResult:
        result = DiscoveryResult()
        ready, refused = discover(self.settings.paths.landing, self.settings.ingest.stable_seconds)
        for path, reason in refused:
            self.ledger.refuse(path, reason)
            result.refused.append(reason)
        for landed in ready:
            outcome, batch_id = self.ledger.record(landed)
            if outcome == "new":
                result.new.append(batch_id)
            elif outcome == "duplicate":
                self.ledger.file_away_duplicate(landed.path)
                result.duplicates.append(landed.path.name)
            elif outcome == "finished":
                self.ledger.finish_move(batch_id)
        return result

    # --- one batch ------------------------------------------------------------------------
    def _chunks(self, batch: Batch) -> Iterator[pd.DataFrame]:
        return iter_batch(Path(batch.source_file), self.settings.log_schema, self.settings.ingest.chunk_rows)

    def read_and_validate(self, batch: Batch) -> tuple[pd.DataFrame | None, BatchResult | None]:
        """The validated rows of a file's first part, or the quarantine result when the file is
        unreadable or invalid (used by initial training)."""
        name = Path(batch.source_file).name
        try:
            frame = next(self._chunks(batch))
        except BatchReadError as error:
            return None, self._quarantine(batch.id, name, [str(error)], [], rows=0)
        outcome = self.validator.validate(frame, name)
        if not outcome.success:
            return None, self._quarantine(batch.id, name, outcome.reasons, outcome.sample_rows, rows=len(frame))
        return outcome.frame, None

    def _quarantine(self, batch_id: int, name: str, reasons: list[str], samples: list[dict], rows: int) -> BatchResult:
        self.ledger.quarantine_batch(batch_id, reasons, samples, rows=rows)
        return BatchResult(batch_id, name, "quarantined", rows, rows_quarantined=rows, reasons=reasons)

    def process(self, batch_id: int, check: FileCheck | None = None) -> BatchResult:
        """Validates, scores and learns from one pending file, part by part, committing each part.

        A file larger than `ingest.chunk_rows` rows is read and processed in parts, so memory
        stays flat; after a crash the next run resumes after the last committed part. A part
        that fails validation quarantines the file with every row not yet committed.
        """
        batch = self.ledger.get(batch_id)
        name = Path(batch.source_file).name if batch else "?"
        if batch is None or batch.status != "pending":
            return BatchResult(batch_id, name, "skipped")
        started = time.perf_counter()
        faults.checkpoint("ledger")
        if check is not None and check.decided:
            return self._process_checked(batch, check, started)
        result = BatchResult(batch_id, name, "pending")
        chunks = self._chunks(batch)
        offset, part = 0, 0
        try:
            upcoming = next(chunks)
            while upcoming is not None:
                frame, upcoming = upcoming, next(chunks, None)
                if part < batch.parts_done:  # committed by an earlier, interrupted run
                    offset, part = offset + len(frame), part + 1
                    continue
                tick = time.perf_counter()
                outcome = self.validator.validate(frame, name, row_offset=offset)
                validate_s = time.perf_counter() - tick
                faults.checkpoint("validated")
                if not outcome.success:
                    remaining = (
                        len(frame) + (len(upcoming) if upcoming is not None else 0) + sum(len(c) for c in chunks)
                    )
                    return self._quarantine_rest(
                        result, batch_id, name, outcome.reasons, outcome.sample_rows, remaining
                    )
                committed = self._process_part(batch, part, outcome.frame, upcoming is None, validate_s)
                if committed is None:
                    result.status = "skipped"  # another live run holds one of its entities
                    return result
                _accumulate(result, committed)
                offset, part = offset + len(frame), part + 1
        except BatchReadError as error:
            return self._quarantine_rest(result, batch_id, name, [str(error)], [], rows=0)
        result.timings["total"] = time.perf_counter() - started
        return result

    def _process_checked(self, batch: Batch, check: FileCheck, started: float) -> BatchResult:
        """A one-part file validated ahead of time."""
        name = Path(batch.source_file).name
        faults.checkpoint("validated")
        if check.read_error:
            return self._quarantine(batch.id, name, [check.read_error], [], rows=0)
        if not check.outcome.success:
            return self._quarantine(batch.id, name, check.outcome.reasons, check.outcome.sample_rows, check.rows)
        result = self._process_part(batch, 0, check.outcome.frame, True, 0.0)
        if result is None:
            return BatchResult(batch.id, name, "skipped")
        result.timings["total"] = time.perf_counter() - started
        return result

    def _quarantine_rest(
        self, result: BatchResult, batch_id: int, name: str, reasons: list[str], samples: list[dict], rows: int
    ) -> BatchResult:
        quarantined = self._quarantine(batch_id, name, reasons, samples, rows)
        quarantined.rows_received += result.rows_received
        quarantined.rows_scored, quarantined.rows_late = result.rows_scored, result.rows_late
        quarantined.sequence, quarantined.entities = result.sequence, result.entities
        return quarantined

    def _process_part(
        self, batch: Batch, part: int, rows: pd.DataFrame, last: bool, validate_s: float
    ) -> BatchResult | None:
        entities = sorted(rows[self.spec.entity_column].astype(str).unique())
        held = [e for e in entities if self.ledger.acquire(f"entity:{e}")]
        try:
            if len(held) < len(entities):
                return None
            for attempt in range(COMMIT_ATTEMPTS):
                try:
                    return self._learn_and_commit(batch, part, rows, entities, last, validate_s)
                except StaleModel:
                    log.info(
                        "batch %s part %d: state moved on under us (attempt %d), redoing", batch.id, part, attempt + 1
                    )
                    self.learner = None
            raise RuntimeError(f"batch {batch.id}: gave up after {COMMIT_ATTEMPTS} conflicting commits")
        finally:
            for entity in held:
                self.ledger.release(f"entity:{entity}")

    def _entity_rows(self, rows: pd.DataFrame, entity: str) -> pd.DataFrame:
        return rows[rows[self.spec.entity_column].astype(str) == entity]

    def _learn_and_commit(
        self, batch: Batch, part: int, rows: pd.DataFrame, entities: list[str], last: bool, validate_s: float
    ) -> BatchResult:
        learner = self.load_live_model()
        model_version = self._model_version
        timings = {"validate": validate_s, "features": 0.0, "score": 0.0, "update": 0.0, "output": 0.0}
        loaded: dict[str, int] = {}
        outcomes: list[EntityOutcome] = []
        new_states: dict[str, tuple[bytes, bytes, datetime]] = {}
        reference = self.reference()
        for entity in entities:
            with self.db.session() as session:
                stored = session.get(EntityState, entity)
                if stored is None:  # an entity's first batch
                    stored = EntityState(entity=entity)
                    session.add(stored)
                    session.flush()
                loaded[entity] = stored.version
                watermark = stored.watermark
                hidden = RecurrentState.from_bytes(stored.hidden_state) if stored.hidden_state else None
                feature_state = (
                    EntityFeatureState.from_bytes(stored.feature_state)
                    if stored.feature_state
                    else EntityFeatureState()
                )
            group = self._entity_rows(rows, entity)
            stamps = group[self.spec.timestamp_column]
            late = stamps <= watermark if watermark is not None else np.zeros(len(group), bool)
            fresh = group[~np.asarray(late)]
            outcome = EntityOutcome(entity, rows=len(group), late=int(np.sum(late)))
            outcomes.append(outcome)
            if fresh.empty:
                continue
            tick = time.perf_counter()
            features, feature_state = build_features(fresh, self.spec, feature_state)
            timings["features"] += time.perf_counter() - tick
            faults.checkpoint("features")
            u, y, dt = features.tensors()
            tick = time.perf_counter()
            scored = learner.score(u, y, hidden, dt)
            timings["score"] += time.perf_counter() - tick
            faults.checkpoint("scored")
            tick = time.perf_counter()
            update_index = learner.updates
            update_metrics = learner.update(u, y, hidden, dt)
            timings["update"] += time.perf_counter() - tick
            tick = time.perf_counter()
            outcome.features = features
            outcome.metrics = _batch_metrics(scored, update_metrics)
            outcome.metrics["update_index"] = float(update_index)
            outcome.drift_stats = batch_drift_stats(
                self._recent_raw(entity, features.raw), self.spec.sensors, reference
            )
            outcome.output_path = self._write_output(batch.id, part, features, scored)
            timings["output"] += time.perf_counter() - tick
            new_states[entity] = (
                scored.state.to_bytes(),
                feature_state.to_bytes(),
                features.timestamps[-1].to_pydatetime(warn=False),
            )
        faults.checkpoint("updated")
        for outcome in outcomes:
            share = outcome.rows / max(sum(o.rows for o in outcomes), 1)
            outcome.metrics.update({f"seconds_{k}": v * share for k, v in timings.items()})

        tick = time.perf_counter()
        checkpoint = save_checkpoint(learner, self.settings.paths.checkpoints, "live")
        try:
            result = self._commit(batch, part, last, outcomes, new_states, loaded, model_version, checkpoint)
        except BaseException:
            checkpoint.unlink(missing_ok=True)
            raise
        timings["commit"] = time.perf_counter() - tick
        faults.checkpoint("committed")
        result.timings.update(timings)
        return result

    def _commit(
        self,
        batch: Batch,
        part: int,
        last: bool,
        outcomes: list[EntityOutcome],
        new_states: dict[str, tuple[bytes, bytes, datetime]],
        loaded: dict[str, int],
        model_version: int,
        checkpoint: Path,
    ) -> BatchResult:
        """One transaction: entity states, the live checkpoint, the ledger and the summaries."""
        received = sum(o.rows for o in outcomes)
        late = sum(o.late for o in outcomes)
        scored = received - late
        with_features = [o for o in outcomes if o.features is not None]
        try:
            with self.db.session() as session:
                model = session.get(ModelState, self.settings.pipeline)
                if model.version != model_version:
                    raise StaleModel("the live model changed")
                previous_checkpoint = model.checkpoint_path
                sequence = None
                if with_features:
                    model.checkpoint_path = str(checkpoint)
                    model.batches_since_snapshot += 1
                    sequence = (session.scalar(select(func.max(BatchSummary.sequence))) or 0) + 1
                for entity, (hidden, features, watermark) in new_states.items():
                    state = session.get(EntityState, entity)
                    if state.version != loaded[entity]:
                        raise StaleModel(f"entity {entity} changed")
                    state.hidden_state, state.feature_state, state.watermark = hidden, features, watermark
                    state.batches += 1
                stored = session.get(Batch, batch.id)
                if stored.status != "pending" or stored.parts_done != part:
                    raise StaleModel(f"batch {batch.id} part {part} was committed by another run")
                stored.parts_done = part + 1
                stored.entity = ",".join(
                    sorted({*(stored.entity or "").split(","), *(o.entity for o in outcomes)} - {""})
                )[:200]
                stored.rows_received += received
                stored.rows_scored += scored
                stored.rows_late += late
                if with_features:
                    first = min(o.features.timestamps[0] for o in with_features).to_pydatetime(warn=False)
                    final = max(o.features.timestamps[-1] for o in with_features).to_pydatetime(warn=False)
                    stored.first_ts = min(stored.first_ts, first) if stored.first_ts else first
                    stored.last_ts = max(stored.last_ts, final) if stored.last_ts else final
                    stored.output_path = str(with_features[-1].output_path)
                if last:
                    stored.status = "processed" if stored.rows_scored > 0 else "late"
                    stored.processed_at = datetime.now(UTC)
                for o in with_features:
                    session.add(
                        BatchSummary(
                            batch_id=batch.id,
                            part=part,
                            entity=o.entity,
                            sequence=sequence,
                            rows=len(o.features),
                            first_ts=o.features.timestamps[0].to_pydatetime(warn=False),
                            last_ts=o.features.timestamps[-1].to_pydatetime(warn=False),
                            metrics=json_safe(o.metrics),
                            drift_stats=json_safe(o.drift_stats),
                            features_path=str(o.output_path),
                        )
                    )
                faults.checkpoint("in_commit")
                session.flush()
                status = stored.status
        except (StaleDataError, IntegrityError) as error:
            raise StaleModel(str(error)) from error
        if with_features:
            self._model_version = model_version + 1
            # Registered versions keep their own copy in MLflow; only the newest one is live.
            if previous_checkpoint != str(checkpoint):
                Path(previous_checkpoint).unlink(missing_ok=True)
        else:
            checkpoint.unlink(missing_ok=True)
        if last:
            self.ledger.finish_move(batch.id)
        return BatchResult(
            batch.id,
            Path(batch.source_file).name,
            status,
            rows_received=received,
            rows_scored=scored,
            rows_late=late,
            sequence=sequence,
            entities=outcomes,
        )

    def _recent_raw(self, entity: str, current: np.ndarray) -> np.ndarray | None:
        """Readings of the entity's last `window_batches` batches, this one included (None
        until that many exist)."""
        earlier = self.settings.drift.window_batches - 1
        if earlier == 0:
            return current
        with self.db.session() as session:
            paths = list(
                session.scalars(
                    select(BatchSummary.features_path)
                    .where(BatchSummary.entity == entity)
                    .order_by(BatchSummary.sequence.desc())
                    .limit(earlier)
                )
            )
        if len(paths) < earlier:
            return None
        columns = [f"raw_{s}" for s in self.spec.sensors]
        frames = [pd.read_parquet(path, columns=columns).to_numpy(np.float64) for path in paths]
        return np.concatenate([*frames[::-1], current])

    # --- model state bookkeeping ----------------------------------------------------------
    def update_model_state(self, change) -> None:
        """Applies `change(model_state)` in a transaction, keeping the loaded learner current
        when the change does not touch its checkpoint."""
        with self.db.session() as session:
            state = session.get(ModelState, self.settings.pipeline)
            before, checkpoint = state.version, state.checkpoint_path
            change(state)
            session.flush()
            after, same_checkpoint = state.version, state.checkpoint_path == checkpoint
        if same_checkpoint and self._model_version == before:
            self._model_version = after

    # --- tracking -------------------------------------------------------------------------
    def track_pending(self, started_at: datetime) -> int:
        """Logs the metrics of committed batch parts not yet in MLflow (step = sequence).

        A part committed before this process started may have been logged by a run that died
        before marking it; its step is looked up first so no step is logged twice.
        """
        state = self.model_state()
        if state is None or state.online_run_id is None:
            return 0
        with self.db.session() as session:
            untracked = list(
                session.scalars(
                    select(BatchSummary).where(BatchSummary.tracked.is_(False)).order_by(BatchSummary.sequence)
                )
            )
        by_sequence: dict[int, list[BatchSummary]] = {}
        for summary in untracked:
            by_sequence.setdefault(summary.sequence, []).append(summary)
        logged_before: set[int] | None = None
        for sequence, summaries in by_sequence.items():
            if min(s.committed_at for s in summaries) < started_at:
                if logged_before is None:
                    logged_before = self.tracker.logged_steps(state.online_run_id, "rows")
                if sequence in logged_before:
                    self._mark_tracked(summaries)
                    continue
            self.tracker.log_metrics(state.online_run_id, merge_metrics(summaries), step=sequence)
            self._mark_tracked(summaries)
        return len(by_sequence)

    def _mark_tracked(self, summaries: list[BatchSummary]) -> None:
        with self.db.session() as session:
            for summary in summaries:
                session.get(BatchSummary, summary.id).tracked = True

    def snapshot_if_due(self) -> str | None:
        """Registers the live model as a new version every `snapshot_every` batches."""
        every = self.settings.tracking.snapshot_every
        state = self.model_state()
        if not every or state is None or state.batches_since_snapshot < every:
            return None
        version = self.tracker.register(state.online_run_id, Path(state.checkpoint_path), "snapshot")

        def reset(model: ModelState) -> None:
            model.batches_since_snapshot = 0

        self.update_model_state(reset)
        return version

    def _write_output(self, batch_id: int, part: int, features: FeatureBatch, scored) -> Path:
        """Scores, forecasts and the features of one entity's part of a batch, as Parquet."""
        folder = self.settings.paths.output / "batches" / safe_name(features.entity)
        folder.mkdir(parents=True, exist_ok=True)
        frame = features.to_frame(self.spec)
        frame["score"] = scored.scores[0].numpy()
        for index, sensor in enumerate(self.spec.sensors):
            frame[f"raw_{sensor}"] = features.raw[:, index]
            frame[f"residual_{sensor}"] = scored.residuals[0, :, index].numpy()
            for step in range(scored.forecast.shape[2]):
                frame[f"forecast_h{step + 1}_{sensor}"] = scored.forecast[0, :, step, index].numpy()
        if features.labels is not None:
            present = [c for c in self.spec.label_columns]
            for index, label in enumerate(present[: features.labels.shape[1]]):
                frame[f"label_{label}"] = features.labels[:, index]
        path = folder / f"batch-{batch_id:08d}-part-{part:04d}.parquet"
        frame.to_parquet(path, index=False)
        return path


def _accumulate(total: BatchResult, part: BatchResult) -> None:
    total.status = part.status
    total.rows_received += part.rows_received
    total.rows_scored += part.rows_scored
    total.rows_late += part.rows_late
    if part.sequence is not None:
        total.sequence, total.entities = part.sequence, part.entities
    for key, value in part.timings.items():
        total.timings[key] = total.timings.get(key, 0.0) + value


def merge_metrics(summaries: list[BatchSummary]) -> dict[str, float]:
    """One batch's metrics across its entities: rows and seconds add up, the rest is averaged
    with the rows as weights."""
    merged: dict[str, float] = {}
    keys = {k for s in summaries for k, v in s.metrics.items() if v is not None}
    for key in sorted(keys):
        pairs = [(s.metrics[key], s.rows) for s in summaries if s.metrics.get(key) is not None]
        if key == "rows" or key.startswith("seconds_"):
            merged[key] = float(sum(v for v, _ in pairs))
        else:
            merged[key] = float(sum(v * w for v, w in pairs) / max(sum(w for _, w in pairs), 1))
    merged["entities"] = float(len(summaries))
    for statistic in ("psi", "ks"):
        for summary in summaries:
            for sensor, value in (summary.drift_stats.get(statistic) or {}).items():
                if value is not None:
                    key = f"drift_{statistic}_{sensor}"
                    merged[key] = max(merged.get(key, 0.0), float(value))
    seconds = sum(v for k, v in merged.items() if k.startswith("seconds_"))
    merged["rows_per_second"] = merged.get("rows", 0.0) / max(seconds, 1e-9)
    return merged


def json_safe(value):
    """NaN and ±inf become None: JSON columns on Postgres refuse them."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _batch_metrics(scored, update_metrics: dict[str, float]) -> dict[str, float]:
    scores = scored.scores[0].numpy()
    finite = scores[np.isfinite(scores)]
    residuals = scored.residuals[0].numpy()
    observed = residuals[np.isfinite(residuals)]
    metrics = {
        "loss": update_metrics["loss"],
        "replay_loss": update_metrics["replay_loss"],
        "mae_before": float(np.abs(observed).mean()) if observed.size else float("nan"),
        "rmse_before": float(np.sqrt((observed**2).mean())) if observed.size else float("nan"),
        "rows": float(scores.size),
    }
    for q in (50, 95, 99):
        metrics[f"score_p{q}"] = float(np.percentile(finite, q)) if finite.size else float("nan")
    metrics["score_max"] = float(finite.max()) if finite.size else float("nan")
    return metrics


def batch_drift_stats(raw: np.ndarray | None, sensors: tuple[str, ...], reference: dict) -> dict:
    """PSI and KS of each sensor's readings (rows, sensors) against the reference, and means;
    empty until there are readings to compare."""
    stats: dict[str, dict[str, float]] = {"psi": {}, "ks": {}, "mean": {}}
    if raw is None:
        return stats
    references = reference.get("sensors", {})
    for index, sensor in enumerate(sensors):
        values = raw[:, index]
        finite = values[np.isfinite(values)]
        stats["mean"][sensor] = float(finite.mean()) if finite.size else float("nan")
        if sensor in references:
            summary = Reference.from_dict(references[sensor])
            stats["psi"][sensor] = psi(summary, values)
            stats["ks"][sensor] = ks_statistic(summary, values)
    return stats
