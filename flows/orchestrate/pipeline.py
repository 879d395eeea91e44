"""One pipeline's working parts, and a landed file's way from the ledger to its commit.

A file is processed part by part (a part is the whole file unless it holds more than
`ingest.chunk_rows` rows), every part in one fleet step over all of its lines
(`flows.model.file_step`), committed in one transaction (`flows.storage.line_states`). The Prefect flows in
`flows.orchestrate.prefect_flows` call `process` as a task.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from features import FeatureBatch
from flows import faults
from flows.cores import driver_threads
from flows.ingest.checks import FileCheck
from flows.ingest.expectations import ensure_suite, generated_from_other_schema
from flows.ingest.landing import BatchReadError, discover, iter_batch
from flows.ingest.validation import ValidationOutcome
from flows.model.file_step import FinishedLines, ScoredLines, learn_lines, score_lines
from flows.model.fleet import save_checkpoint
from flows.model.live import CheckpointMissing, CheckpointRefused, LiveModel
from flows.monitor.drift_detectors import plant_level
from flows.monitor.helper import MonitorHelper
from flows.monitor.plant_alarms import plant_alarms
from flows.orchestrate.line_work import DaskLineWork, LocalLineWork
from flows.settings import Settings
from flows.storage.database import Database
from flows.storage.ledger import DiscoveryResult, Ledger
from flows.storage.line_states import LineUpdate, PartCommit, StaleModel, commit_part, read_carried
from flows.storage.models import Batch, BatchStatus
from flows.storage.work_folder import stored_path
from lru_online.alarms import typical_spacing

log = logging.getLogger(__name__)
COMMIT_ATTEMPTS = 3
DRIFT_ACTIONS = {"retrain": "retrain", "event": "event_emitted", "record": "recorded"}


@dataclass
class BatchResult:
    batch_id: int
    file: str
    status: str  # a BatchStatus
    rows_received: int = 0
    rows_scored: int = 0
    rows_quarantined: int = 0
    rows_late: int = 0
    rows_duplicate: int = 0  # exact duplicate rows dropped
    lines: int = 0  # lines with rows in the file
    sequence: int | None = None  # of the file's last committed part
    drift_event_ids: list[int] = field(default_factory=list)
    drift_action: str | None = None  # what its drift events asked for: retrain | event_emitted | recorded
    alarm_ids: list[int] = field(default_factory=list)  # anomaly alarms the file started
    plant_alarm_ids: list[int] = field(default_factory=list)  # plant-level alarms the file started
    reasons: list[str] = field(default_factory=list)
    validation_page: str | None = None  # the Data Docs page of a quarantined file's failed validation
    line_quarantines: list[dict] = field(default_factory=list)  # rows taken out of a file that went on
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class FilePart:
    """Validated rows of one part of a file, by line group (frames, or futures on Dask)."""

    index: int
    groups: list[list[str]]
    rows: list
    last: bool
    validate_seconds: float
    # What validation took out of the part while its other rows go on (its frame dropped).
    outcome: ValidationOutcome | None = None


class Pipeline:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        torch.set_num_threads(driver_threads(settings.update.torch_threads))
        settings.ensure_folders()
        self.db = Database(settings.database_url)
        self.db.migrate()
        self.ledger = Ledger(self.db, settings.workdir, settings.paths.archive, settings.paths.quarantine)
        self.spec = settings.feature_spec
        # Runs validate against the work folder's suite file; the first run generates it.
        self.suite_file = ensure_suite(settings.workdir, settings.log_schema)
        self._suite_checked = False
        self._validation_docs = None
        self._tracker = None
        self.live = LiveModel(settings, self.db)
        self.monitor = MonitorHelper(settings, in_driver=lambda: (self.db, self.tracker))
        self.local_work = LocalLineWork()
        self.dask_work: DaskLineWork | None = None
        self._beside = beside_executor()

    # --- lazily built adapters (GE, MLflow and Dask take seconds to start) -----------------
    @property
    def validator(self):
        """The validator of the suite file as it is now (an edit applies from the next file)."""
        from flows.ingest.validation import validator_for

        validator = validator_for(self.settings.log_schema, self.suite_file)
        if not self._suite_checked:
            self._suite_checked = True
            if generated_from_other_schema(self.suite_file, self.settings.log_schema):
                log.warning(
                    "%s was not generated from the configured log schema (edited, or the schema changed); "
                    "`lru-online validation init --force` regenerates it",
                    self.suite_file,
                )
        return validator

    @property
    def validation_docs(self):
        if self._validation_docs is None:
            from flows.ingest.validation_docs import ValidationDocs

            self._validation_docs = ValidationDocs(self.settings.workdir, self.settings.validation.keep_results)
        return self._validation_docs

    @property
    def tracker(self):
        if self._tracker is None:
            from flows.monitor.tracking import Tracker

            self._tracker = Tracker(self.settings)
        return self._tracker

    def connect_dask(self) -> DaskLineWork | None:
        """The Dask workers of `prefect.dask_address`, connected on first use (None: none set)."""
        if self.dask_work is None and self.settings.prefect.dask_address:
            self.dask_work = DaskLineWork(self.settings.prefect.dask_address)
        return self.dask_work

    def close(self) -> None:
        self._beside.shutdown()
        self.monitor.close()
        if self.dask_work is not None:
            self.dask_work.close()
        self.db.dispose()

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

    # --- one file -------------------------------------------------------------------------
    def _chunks(self, batch: Batch) -> Iterator[pd.DataFrame]:
        source = self.ledger.path(batch.source_file)
        return iter_batch(source, self.settings.log_schema, self.settings.ingest.chunk_rows)

    def initial_frames(self) -> list[pd.DataFrame]:
        """The validated rows of the first `initial_training.batches` valid pending files (their
        first parts); the invalid ones on the way end in quarantine."""
        frames = []
        for batch_id in self.ledger.pending():
            rows, _ = self.read_and_validate(self.ledger.get(batch_id))
            if rows is not None:
                frames.append(rows)
            if len(frames) == self.settings.initial_training.batches:
                break
        return frames

    def read_and_validate(self, batch: Batch) -> tuple[pd.DataFrame | None, BatchResult | None]:
        """The validated rows of a file's first part, or the quarantine result when the file is
        unreadable or invalid."""
        name = Path(batch.source_file).name
        try:
            frame = next(self._chunks(batch))
        except BatchReadError as error:
            return None, self._quarantine(batch.id, name, [str(error)], [], rows=0)
        outcome = self.validator.validate(frame, name)
        if not outcome.success:
            return None, self._quarantine(batch.id, name, outcome.reasons, outcome.sample_rows, len(frame), outcome)
        return outcome.frame, None

    def _quarantine(
        self,
        batch_id: int,
        name: str,
        reasons: list[str],
        samples: list[dict],
        rows: int,
        outcome: ValidationOutcome | None = None,
    ) -> BatchResult:
        """Quarantines the file; a failed validation's result is stored with its Data Docs page."""
        page = None
        if outcome is not None and outcome.result is not None:
            page = self.validation_docs.record(outcome.result)
        self.ledger.quarantine_batch(batch_id, reasons, samples, rows=rows, validation_page=page)
        return BatchResult(
            batch_id,
            name,
            BatchStatus.QUARANTINED,
            rows,
            rows_quarantined=rows,
            reasons=reasons,
            validation_page=str(page) if page else None,
        )

    def process(self, batch_id: int, check: FileCheck | None = None) -> BatchResult:
        """Validates, scores and learns from one pending file, part by part, committing each part.

        `check`: the file read and validated ahead of time on Dask workers; its line groups are
        then prepared and finished there too. Otherwise the driver reads the file in parts of
        `ingest.chunk_rows` rows, so memory stays flat; after a crash the next run resumes after
        the last committed part. A part that fails validation quarantines the file with every
        row not yet committed.
        """
        batch = self.ledger.get(batch_id)
        name = Path(batch.source_file).name if batch else "?"
        if batch is None or batch.status != BatchStatus.PENDING:
            return BatchResult(batch_id, name, BatchStatus.SKIPPED)
        started = time.perf_counter()
        faults.checkpoint("ledger")
        result = BatchResult(batch_id, name, BatchStatus.PENDING)
        if check is None or not check.decided:
            return self._process_parts(batch, result, self._driver_parts(batch), self.local_work, started)
        on_dask = bool(check.parts) and not isinstance(check.parts[0], pd.DataFrame)
        if not on_dask:
            return self._process_parts(batch, result, self._checked_part(batch, check), self.local_work, started)
        try:
            return self._process_parts(batch, result, self._checked_part(batch, check), self.connect_dask(), started)
        except (StaleModel, CheckpointRefused, CheckpointMissing):
            raise
        except Exception as error:  # a lost worker, say: the ledger tells what was committed
            log.warning("batch %s on Dask failed (%s); processing it in the driver", batch_id, error)
            return self.process(batch_id)

    def _checked_part(self, batch: Batch, check: FileCheck) -> Iterator[FilePart | BatchResult]:
        name = Path(batch.source_file).name
        faults.checkpoint("validated")
        if check.read_error:
            yield self._quarantine(batch.id, name, [check.read_error], [], rows=0)
        elif not check.outcome.success:
            outcome = check.outcome
            yield self._quarantine(batch.id, name, outcome.reasons, outcome.sample_rows, check.rows, outcome)
        else:
            yield FilePart(0, check.groups, check.parts, True, 0.0, check.outcome)

    def _driver_parts(self, batch: Batch) -> Iterator[FilePart | BatchResult]:
        """The file's parts read and validated here; a failing part ends it in quarantine."""
        name = Path(batch.source_file).name
        chunks = self._chunks(batch)
        offset, index = 0, 0
        try:
            upcoming = next(chunks)
            while upcoming is not None:
                frame, upcoming = upcoming, next(chunks, None)
                if index < batch.parts_done:  # committed by an earlier, interrupted run
                    offset, index = offset + len(frame), index + 1
                    continue
                tick = time.perf_counter()
                outcome = self.validator.validate(frame, name, row_offset=offset)
                validate_seconds = time.perf_counter() - tick
                faults.checkpoint("validated")
                if not outcome.success:
                    remaining = (
                        len(frame) + (len(upcoming) if upcoming is not None else 0) + sum(len(c) for c in chunks)
                    )
                    yield self._quarantine(batch.id, name, outcome.reasons, outcome.sample_rows, remaining, outcome)
                    return
                rows, outcome.frame = outcome.frame, None
                entities = sorted(rows[self.spec.entity_column].astype(str).unique())
                yield FilePart(index, [entities], [rows], upcoming is None, validate_seconds, outcome)
                offset, index = offset + len(frame), index + 1
        except BatchReadError as error:
            yield self._quarantine(batch.id, name, [str(error)], [], rows=0)

    def _process_parts(
        self, batch: Batch, result: BatchResult, parts: Iterator[FilePart | BatchResult], work, started: float
    ) -> BatchResult:
        for part in parts:
            if isinstance(part, BatchResult):  # quarantined: what earlier parts committed stays
                part.rows_received += result.rows_received
                part.rows_quarantined += result.rows_quarantined
                part.rows_scored, part.rows_late = result.rows_scored, result.rows_late
                part.rows_duplicate = result.rows_duplicate
                part.sequence, part.drift_event_ids = result.sequence, result.drift_event_ids
                return part
            committed = self._process_part(batch, part, work)
            if committed is None:
                result.status = BatchStatus.SKIPPED  # another live run holds one of its lines
                return result
            _accumulate(result, committed)
        result.timings["total"] = time.perf_counter() - started
        return result

    def _process_part(self, batch: Batch, part: FilePart, work) -> BatchResult | None:
        entities = [entity for group in part.groups for entity in group]
        leases = [f"entity:{entity}" for entity in entities]
        if not self.ledger.acquire_all(leases):
            return None
        try:
            aside = self._set_aside(batch, part)
            for attempt in range(COMMIT_ATTEMPTS):
                try:
                    return self._learn_and_commit(batch, part, work, aside)
                except StaleModel:
                    log.info(
                        "batch %s part %d: state moved on under us (attempt %d), redoing",
                        batch.id,
                        part.index,
                        attempt + 1,
                    )
                    self.live.drop()
            raise RuntimeError(f"batch {batch.id}: gave up after {COMMIT_ATTEMPTS} conflicting commits")
        finally:
            self.ledger.release_all(leases)

    def _set_aside(self, batch: Batch, part: FilePart) -> list[dict]:
        """The rows validation took out of the part, written to quarantine/ as read (with their
        file row and reason), and the Data Docs page of the file's result: what the commit
        records per line. Written again, to the same file, if the part is redone."""
        outcome = part.outcome
        if outcome is None or not outcome.lines:
            return []
        name = Path(batch.source_file).name
        folder = self.settings.paths.quarantine
        folder.mkdir(parents=True, exist_ok=True)
        rows_file = folder / f"{name}.part-{part.index:04d}.quarantined-rows.csv"
        outcome.quarantined.to_csv(rows_file, index=False)
        page = self.validation_docs.record(outcome.result) if outcome.result is not None else None
        return [
            {
                "entity": line.entity,
                "rows": line.rows,
                "reasons": line.reasons,
                "sample_rows": line.sample_rows,
                "rows_file": stored_path(self.settings.workdir, rows_file),
                "validation_page": stored_path(self.settings.workdir, page) if page else None,
            }
            for line in outcome.lines
        ]

    def _live_learner(self):
        """The live learner; a missing or unreadable checkpoint is restored from the registry
        first when `recovery.on_missing_checkpoint` says so."""
        try:
            return self.live.load()
        except CheckpointMissing as missing:
            if self.settings.recovery.on_missing_checkpoint != "restore":
                raise
            log.warning("%s: restoring it from the registry", missing)
            from flows.model.recovery import NothingToRecover, restore_live_model

            with contextlib.suppress(NothingToRecover):  # another process restored it meanwhile
                restore_live_model(self.live, self.tracker, self.ledger, trigger="run")
            return self.live.load()

    def _learn_and_commit(self, batch: Batch, part: FilePart, work, aside: list[dict]) -> BatchResult:
        started = time.perf_counter()
        learner = self._live_learner()
        model_version = self.live.version
        model = self.live.state()
        timings = {"validate": part.validate_seconds}
        entities = [entity for group in part.groups for entity in group]

        tick = time.perf_counter()
        new_run = self.settings.log_schema.file_is_run and part.index == 0
        carried = read_carried(self.db, entities, new_run=new_run)
        timings["read_state"] = time.perf_counter() - tick
        tick = time.perf_counter()
        handles = work.prepare(part.groups, part.rows, self.spec, carried)
        prepared = work.gather(handles)
        timings["features"] = time.perf_counter() - tick
        faults.checkpoint("features")
        received = sum(sum(p.received.values()) for p in prepared)
        late = sum(sum(p.late.values()) for p in prepared)
        learned = [index for index, p in enumerate(prepared) if p.features is not None]

        lines: list[LineUpdate] = []
        metrics: dict[str, float] = {}
        finished: list[FinishedLines] = []
        checkpoint = None
        spacing = 0.0
        if learned:
            features = FeatureBatch.stack([prepared[i].features for i in learned])
            tick = time.perf_counter()
            scored, state, scoring = score_lines(
                learner, features, carried.hidden, self.settings.mixture.setup(), self._beside, for_update=True
            )
            timings["score"] = time.perf_counter() - tick
            faults.checkpoint("scored")
            # The update changes only the model; the per-line finish (alarms, drift, output) reads
            # the scored rows, never the model. So the update runs on the other core meanwhile:
            # torch's kernels release the GIL, and a file costs the longer of the two, not the sum.
            learning = self._beside.submit(_timed, learn_lines, learner, features, state, scoring)
            tick = time.perf_counter()
            bounds = np.cumsum([0, *(len(prepared[i].features) for i in learned)])
            try:
                finished = work.finish(
                    [handles[i] for i in learned],
                    [scored.rows(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)],
                    [
                        (
                            {e: carried.drift.get(e) for e in prepared[i].features.entities},
                            {e: carried.alarm.get(e) for e in prepared[i].features.entities},
                        )
                        for i in learned
                    ],
                    model.reference or {},
                    self.spec,
                    self.settings.drift,
                    self.settings.alarms.config(),
                    model.drift_since_sequence,
                    [self._output_path(batch.id, part.index, i, len(part.groups)) for i in learned],
                )
                finish_seconds = time.perf_counter() - tick
            finally:  # never leave the model being changed behind an error
                futures.wait([learning])
            update_metrics, timings["update"] = learning.result()
            faults.checkpoint("updated")
            worker_seconds = {k: sum(f.seconds[k] for f in finished) for k in ("alarms", "drift", "output")}
            share = finish_seconds / max(sum(worker_seconds.values()), 1e-9)
            timings.update({k: v * share for k, v in worker_seconds.items()})
            lines = _line_updates([prepared[i] for i in learned], scored, finished, self.settings.workdir)
            metrics = _part_metrics(scored, update_metrics, features, finished, late)
            metrics.update({f"seconds_{k}": v for k, v in timings.items()})
            # Wall time, not the stages' sum: the update overlaps the finish.
            elapsed = time.perf_counter() - started + part.validate_seconds
            metrics["rows_per_second"] = metrics["rows"] / max(elapsed, 1e-9)
            checkpoint = save_checkpoint(learner, self.settings.paths.checkpoints, "live")
            seconds = features.timestamps.as_unit("ns").asi8.astype(np.float64) / 1e9
            spacing = typical_spacing(torch.from_numpy(features.padded(seconds, fill=np.nan)))

        plants, alarms = plant_alarms(
            [a for f in finished for a in f.alarms], len(lines), spacing, self.settings.alarms.plant
        )
        if metrics:
            metrics["plant_alarms_started"] = float(len(plants))

        tick = time.perf_counter()
        commit = PartCommit(
            batch_id=batch.id,
            part=part.index,
            last=part.last,
            received=received,
            late=late,
            entities=entities,
            lines=lines,
            metrics=metrics,
            detections=plant_level(
                [asdict(d) for f in finished for d in f.detections], len(entities), self.settings.drift
            ),
            drift_action=DRIFT_ACTIONS[self.settings.drift.on_detect],
            retrain_cooldown_files=self.settings.drift.retrain_cooldown_files,
            alarms=alarms,
            plant_alarms=plants,
            update_index=learner.updates,
            line_quarantines=aside,
            duplicates=part.outcome.duplicates if part.outcome is not None else 0,
        )
        try:
            stored = stored_path(self.settings.workdir, checkpoint) if checkpoint is not None else None
            committed = commit_part(self.db, self.settings.pipeline, commit, carried, model_version, stored)
        except BaseException:
            if checkpoint is not None:
                checkpoint.unlink(missing_ok=True)
            raise
        timings["commit"] = time.perf_counter() - tick
        faults.checkpoint("committed")
        if lines or committed.drift_event_ids:
            self.live.version = committed.model_version
        # Registered versions keep their own copy in MLflow; only the newest one is live.
        if lines and committed.previous_checkpoint != stored:
            self.live.remove_checkpoint(committed.previous_checkpoint)
        if part.last:
            self.ledger.finish_move(batch.id)
        return BatchResult(
            batch.id,
            Path(batch.source_file).name,
            committed.status,
            rows_received=received + commit.quarantined + commit.duplicates,
            rows_scored=received - late,
            rows_quarantined=commit.quarantined,
            rows_late=late,
            rows_duplicate=commit.duplicates,
            line_quarantines=aside,
            lines=len(entities),
            sequence=committed.sequence,
            drift_event_ids=committed.drift_event_ids,
            drift_action=committed.drift_action,
            alarm_ids=committed.alarm_ids,
            plant_alarm_ids=committed.plant_alarm_ids,
            timings=timings,
        )

    def _output_path(self, batch_id: int, part: int, group: int, groups: int) -> Path:
        """One Parquet file per part of a file (per line group when the lines are split)."""
        suffix = f"-group-{group:03d}" if groups > 1 else ""
        return self.settings.paths.output / "batches" / f"batch-{batch_id:08d}-part-{part:04d}{suffix}.parquet"


def _accumulate(total: BatchResult, part: BatchResult) -> None:
    total.status = part.status
    total.rows_received += part.rows_received
    total.rows_scored += part.rows_scored
    total.rows_late += part.rows_late
    total.rows_quarantined += part.rows_quarantined
    total.rows_duplicate += part.rows_duplicate
    total.line_quarantines += part.line_quarantines
    total.lines = max(total.lines, part.lines)
    if part.sequence is not None:
        total.sequence = part.sequence
    total.drift_event_ids += part.drift_event_ids
    if part.drift_action is not None:
        total.drift_action = part.drift_action if total.drift_action in (None, "recorded") else total.drift_action
    total.alarm_ids += part.alarm_ids
    total.plant_alarm_ids += part.plant_alarm_ids
    for key, value in part.timings.items():
        total.timings[key] = total.timings.get(key, 0.0) + value


def beside_executor() -> futures.Executor:
    """The one thread that runs beside the driver's: the fleet update while the lines are
    finished, the mixture's linear member while the model scores. Each file waits for both, so
    the order of the results (and so every committed state) is the order of the steps."""
    return futures.ThreadPoolExecutor(1, thread_name_prefix="beside-driver")


def _timed(function, *args):
    """The function's result and its wall seconds (on the thread that runs it)."""
    tick = time.perf_counter()
    return function(*args), time.perf_counter() - tick


def _line_updates(prepared: list, scored: ScoredLines, finished: list[FinishedLines], root: Path) -> list[LineUpdate]:
    updates = []
    for group, done in zip(prepared, finished, strict=True):
        features = group.features
        # Each line's first and last time converted at once (one Timestamp per line cost ~30 ms
        # a file at 2,000 lines); sub-microsecond digits dropped as before.
        firsts = features.timestamps[features.offsets[:-1]].to_pydatetime()
        lasts = features.timestamps[features.offsets[1:] - 1].to_pydatetime()
        for index, entity in enumerate(features.entities):
            first, last = firsts[index], lasts[index]
            updates.append(
                LineUpdate(
                    entity=entity,
                    hidden=scored.hidden[entity],
                    features=group.feature_states[entity],
                    drift=done.drift_states[entity],
                    alarm=done.alarm_states[entity],
                    watermark=last,
                    rows=int(features.lengths[index]),
                    first_ts=first,
                    last_ts=last,
                    metrics=done.metrics[entity],
                    drift_stats=done.drift_stats[entity],
                    output_path=stored_path(root, done.output_path),
                )
            )
    return updates


def _part_metrics(
    scored: ScoredLines,
    update_metrics: dict[str, float],
    features: FeatureBatch,
    finished: list[FinishedLines],
    late: int,
) -> dict:
    """The part's figures across all its lines, for MLflow."""
    residuals = scored.residuals[np.isfinite(scored.residuals)]
    scores = scored.scores[np.isfinite(scored.scores)]
    metrics = {
        "rows": float(len(features)),
        "rows_late": float(late),
        "lines": float(len(features.entities)),
        **{k: float(v) for k, v in update_metrics.items()},
        "mae_before": float(np.abs(residuals).mean()) if residuals.size else float("nan"),
        "rmse_before": float(np.sqrt((residuals**2).mean())) if residuals.size else float("nan"),
        "dask_workers": float(len({f.worker for f in finished} - {None})),
        # Counts of the anomaly detector: rows alarmed, alarms started, lines alarmed.
        "anomaly_rows": float(sum(m["anomaly_rows"] for f in finished for m in f.metrics.values())),
        "alarms_started": float(sum(not a["continues"] for f in finished for a in f.alarms)),
        "lines_in_alarm": float(len({a["entity"] for f in finished for a in f.alarms})),
    }
    for q in (50, 95, 99):
        metrics[f"score_p{q}"] = float(np.percentile(scores, q)) if scores.size else float("nan")
    metrics["score_max"] = float(scores.max()) if scores.size else float("nan")
    for done in finished:
        for stats in done.drift_stats.values():
            for statistic in ("psi", "ks"):
                for sensor, value in (stats.get(statistic) or {}).items():
                    if value is not None and math.isfinite(value):  # not np.isfinite: 20,000 scalars
                        key = f"drift_{statistic}_{sensor}"
                        metrics[key] = max(metrics.get(key, 0.0), float(value))
    return metrics
