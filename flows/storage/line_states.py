"""What every line carries between files, read for a whole file in one query and written back
with everything else the file produced in one transaction.

A part's results become visible together (hidden, feature and drift states of its lines, the
live checkpoint reference, the ledger, the summaries, drift events); anything written before
(a checkpoint file, an output file) is invisible if the process dies, and is redone from the
old state on the next run. Each line's `version` and the live model's are optimistic locks:
a run that finds either moved on raises `StaleModel` and redoes the part from the fresh state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import bindparam, func, insert, null, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from flows import faults
from flows.storage.database import Database
from flows.storage.models import (
    AnomalyAlarm,
    Batch,
    BatchStatus,
    BatchSummary,
    DriftEvent,
    EntityState,
    LineQuarantine,
    ModelState,
    PlantAlarm,
    SequenceMetrics,
)

READ_CHUNK = 500  # lines per SELECT … IN


class StaleModel(RuntimeError):
    """Another run committed a newer model or line state first; redo from the fresh state."""


@dataclass
class CarriedLines:
    """The stored state of a file's lines; a line never seen before is absent."""

    versions: dict[str, int] = field(default_factory=dict)
    hidden: dict[str, bytes | None] = field(default_factory=dict)
    features: dict[str, bytes | None] = field(default_factory=dict)
    drift: dict[str, bytes | None] = field(default_factory=dict)
    alarm: dict[str, bytes | None] = field(default_factory=dict)
    watermarks: dict[str, datetime | None] = field(default_factory=dict)

    def subset(self, entities: list[str]) -> CarriedLines:
        keep = set(entities)

        def pick(values: dict) -> dict:
            return {k: v for k, v in values.items() if k in keep}

        return CarriedLines(
            pick(self.versions),
            pick(self.hidden),
            pick(self.features),
            pick(self.drift),
            pick(self.alarm),
            pick(self.watermarks),
        )


_CARRIED_COLUMNS = (
    EntityState.entity,
    EntityState.version,
    EntityState.hidden_state,
    EntityState.feature_state,
    EntityState.drift_state,
    EntityState.alarm_state,
    EntityState.watermark,
)


def _collect(carried: CarriedLines, rows) -> None:
    for entity, version, hidden, features, drift, alarm, watermark in rows:
        carried.versions[entity] = version
        carried.hidden[entity] = hidden
        carried.features[entity] = features
        carried.drift[entity] = drift
        carried.alarm[entity] = alarm
        carried.watermarks[entity] = watermark


# A new run of a line carries no hidden state, feature scaling or alarm calibration (its drift
# detectors, watermark and state version carry on): those columns are not read at all.
_NEW_RUN_COLUMNS = (
    EntityState.entity,
    EntityState.version,
    null(),  # hidden state
    null(),  # feature state
    EntityState.drift_state,
    null(),  # alarm state
    EntityState.watermark,
)


def read_carried(db: Database, entities: list[str], new_run: bool = False) -> CarriedLines:
    """The stored states of the lines; with `new_run`, as they start a new run."""
    columns = _NEW_RUN_COLUMNS if new_run else _CARRIED_COLUMNS
    carried = CarriedLines()
    with db.session() as session:
        for start in range(0, len(entities), READ_CHUNK):
            chunk = entities[start : start + READ_CHUNK]
            _collect(carried, session.execute(select(*columns).where(EntityState.entity.in_(chunk))))
    return carried


def carried_by_every_line(session) -> CarriedLines:
    """Every line's stored states, read in the caller's session (one transaction with whatever
    else it reads)."""
    carried = CarriedLines()
    _collect(carried, session.execute(select(*_CARRIED_COLUMNS)))
    return carried


@dataclass
class LineUpdate:
    """One line's new state and its summary row for this part."""

    entity: str
    hidden: bytes
    features: bytes
    drift: bytes
    alarm: bytes
    watermark: datetime
    rows: int
    first_ts: datetime
    last_ts: datetime
    metrics: dict
    drift_stats: dict
    output_path: str


@dataclass
class PartCommit:
    """Everything one file part produced, to become visible at once."""

    batch_id: int
    part: int
    last: bool  # the file's last part: its ledger status becomes final
    received: int
    late: int
    entities: list[str]  # every line with rows in the part
    lines: list[LineUpdate]  # the lines with rows to learn from (not all late)
    metrics: dict[str, float]  # the part's figures across its lines, for MLflow
    # Drift detections: dicts of entity, detector, feature, value, threshold, event_time (ISO).
    detections: list[dict]
    drift_action: str  # what a detection does: retrain | event_emitted | recorded
    # Detections within this many files of the last retraining request are recorded only.
    retrain_cooldown_files: int = 0
    # Anomaly alarms (flows.model.file_step.JudgedLines.episodes, each with "plant": the index of
    # its plant-level alarm or None) and the plant-level alarms (flows.monitor.plant_alarms).
    alarms: list[dict] = field(default_factory=list)
    plant_alarms: list[dict] = field(default_factory=list)
    update_index: int = 0
    # Rows taken out of the part while its other lines go on (flows.ingest.validation), each a
    # dict of entity, rows, reasons, sample_rows, rows_file, validation_page; and exact
    # duplicate rows dropped.
    line_quarantines: list[dict] = field(default_factory=list)
    duplicates: int = 0

    @property
    def quarantined(self) -> int:
        return sum(q["rows"] for q in self.line_quarantines)


@dataclass
class Committed:
    status: str
    sequence: int | None
    previous_checkpoint: str | None
    drift_event_ids: list[int]
    model_version: int  # the live model's version lock after this commit
    alarm_ids: list[int] = field(default_factory=list)  # alarms this part started
    plant_alarm_ids: list[int] = field(default_factory=list)  # plant-level alarms this part started
    drift_action: str | None = None  # what the part's drift events ask for (None: no events)


def commit_part(
    db: Database,
    pipeline: str,
    part: PartCommit,
    loaded: CarriedLines,
    model_version: int,
    checkpoint: str | None,
) -> Committed:
    """One transaction: line states, the live checkpoint (as stored: relative to the work
    folder), the ledger, the summaries, the part's metrics and drift events. Raises StaleModel
    when a line, the model or the batch moved on."""
    try:
        with db.session() as session:
            model = session.get(ModelState, pipeline)
            if model.version != model_version:
                raise StaleModel("the live model changed")
            previous = model.checkpoint_path
            sequence = None
            if part.lines:
                model.checkpoint_path = checkpoint
                model.batches_since_snapshot += 1
                sequence = (session.scalar(select(func.max(BatchSummary.sequence))) or 0) + 1
                _write_lines(session, part.lines, loaded)
                _add_summaries(session, part, sequence)
                session.add(
                    SequenceMetrics(
                        sequence=sequence, batch_id=part.batch_id, part=part.part, metrics=json_safe(part.metrics)
                    )
                )
            action = _drift_action(session, pipeline, part, sequence)
            event_ids = _record_detections(session, pipeline, part, sequence, action)
            plant_alarm_ids = _record_plant_alarms(session, pipeline, part, sequence)
            alarm_ids = _record_alarms(session, pipeline, part, sequence, model.champion_version, plant_alarm_ids)
            session.add_all(
                LineQuarantine(batch_id=part.batch_id, part=part.part, **json_safe(quarantine))
                for quarantine in part.line_quarantines
            )
            if event_ids:
                model.drift_since_sequence = sequence  # every line's detectors restart after it
            status = _update_ledger(session, part)
            faults.checkpoint("in_commit")
            session.flush()
            version = model.version
    except (StaleDataError, IntegrityError) as error:
        raise StaleModel(str(error)) from error
    return Committed(
        status, sequence, previous, event_ids, version, alarm_ids, plant_alarm_ids, action if event_ids else None
    )


def _write_lines(session, lines: list[LineUpdate], loaded: CarriedLines) -> None:
    now = datetime.now(UTC)
    known = [line for line in lines if line.entity in loaded.versions]
    new = [line for line in lines if line.entity not in loaded.versions]
    if known:
        statement = (
            update(EntityState)
            .where(EntityState.entity == bindparam("key"), EntityState.version == bindparam("loaded_version"))
            .values(
                hidden_state=bindparam("hidden"),
                feature_state=bindparam("features"),
                drift_state=bindparam("drift"),
                alarm_state=bindparam("alarm"),
                watermark=bindparam("mark"),
                batches=EntityState.batches + 1,
                version=EntityState.version + 1,
                updated_at=bindparam("now"),
            )
            .execution_options(synchronize_session=False)
        )
        rows = [
            {
                "key": line.entity,
                "loaded_version": loaded.versions[line.entity],
                "hidden": line.hidden,
                "features": line.features,
                "drift": line.drift,
                "alarm": line.alarm,
                "mark": line.watermark,
                "now": now,
            }
            for line in known
        ]
        connection = session.connection()
        result = connection.execute(statement, rows)
        if connection.dialect.supports_sane_multi_rowcount and result.rowcount != len(rows):
            raise StaleModel(f"{len(rows) - result.rowcount} of the file's lines changed under this run")
    if new:
        session.execute(
            insert(EntityState),
            [
                {
                    "entity": line.entity,
                    "hidden_state": line.hidden,
                    "feature_state": line.features,
                    "drift_state": line.drift,
                    "alarm_state": line.alarm,
                    "watermark": line.watermark,
                    "batches": 1,
                    "version": 1,
                    "updated_at": now,
                }
                for line in new
            ],
        )


def _add_summaries(session, part: PartCommit, sequence: int) -> None:
    session.execute(
        insert(BatchSummary),
        [
            {
                "batch_id": part.batch_id,
                "part": part.part,
                "entity": line.entity,
                "sequence": sequence,
                "rows": line.rows,
                "first_ts": line.first_ts,
                "last_ts": line.last_ts,
                "metrics": line.metrics,  # finite numbers or None already
                "drift_stats": line.drift_stats,
                "features_path": line.output_path,
            }
            for line in part.lines
        ],
    )


def _drift_action(session, pipeline: str, part: PartCommit, sequence: int | None) -> str:
    """What this part's detections ask for: the configured action, or only a record while the
    pipeline's last retraining request lies within `retrain_cooldown_files` files."""
    if part.drift_action == "recorded" or not part.detections or not part.retrain_cooldown_files:
        return part.drift_action
    last = session.scalar(
        select(func.max(DriftEvent.sequence)).where(
            DriftEvent.pipeline == pipeline, DriftEvent.action.in_(["retrain", "event_emitted"])
        )
    )
    if last is not None and sequence is not None and sequence - last <= part.retrain_cooldown_files:
        return "recorded"
    return part.drift_action


def _record_detections(session, pipeline: str, part: PartCommit, sequence: int | None, action: str) -> list[int]:
    events = [
        DriftEvent(
            pipeline=pipeline,
            batch_id=part.batch_id,
            sequence=sequence,
            entity=detection["entity"],
            detector=detection["detector"],
            feature=detection["feature"],
            value=detection["value"],
            threshold=detection["threshold"],
            event_time=datetime.fromisoformat(detection["event_time"]),
            action=action,
            details=json_safe({**detection, "sequence": sequence, "batch_id": part.batch_id}),
        )
        for detection in part.detections
    ]
    session.add_all(events)
    session.flush()
    return [event.id for event in events]


def _record_plant_alarms(session, pipeline: str, part: PartCommit, sequence: int | None) -> list[int]:
    if not part.plant_alarms:  # most parts: no flush to pay for
        return []
    started = [
        PlantAlarm(
            pipeline=pipeline,
            batch_id=part.batch_id,
            sequence=sequence,
            start_ts=datetime.fromisoformat(a["start_ts"]),
            end_ts=datetime.fromisoformat(a["end_ts"]),
            lines=len(a["entities"]),
            entities=a["entities"],
            share=a["share"],
            threshold=a["threshold"],
            rows=a["rows"],
            peak_ratio=a["peak_ratio"] if math.isfinite(a["peak_ratio"]) else None,
        )
        for a in part.plant_alarms
    ]
    session.add_all(started)
    session.flush()
    return [alarm.id for alarm in started]


def _record_alarms(
    session, pipeline: str, part: PartCommit, sequence: int | None, champion: str | None, plant_alarm_ids: list[int]
) -> list[int]:
    """New alarms as rows, each pointing to its plant-level alarm if it has one; an alarm that
    runs on from the line's previous file extends the line's newest alarm (found for all such
    lines in one query) and the plant-level alarm that one is part of, or joins the new one."""
    continuing = {a["entity"]: a for a in part.alarms if a["continues"]}
    newest: dict[str, int] = {}
    if continuing:
        latest_ids = (
            select(func.max(AnomalyAlarm.id))
            .where(AnomalyAlarm.pipeline == pipeline, AnomalyAlarm.entity.in_(list(continuing)))
            .group_by(AnomalyAlarm.entity)
        )
        for stored in session.scalars(select(AnomalyAlarm).where(AnomalyAlarm.id.in_(latest_ids))):
            episode = continuing[stored.entity]
            stored.end_ts = datetime.fromisoformat(episode["end_ts"])
            stored.rows += episode["rows"]
            stored.peak_score = max(stored.peak_score, episode["peak_score"])
            newest[stored.entity] = stored.id
            if stored.plant_alarm_id is not None:  # the plant-level alarm it is part of goes on
                plant = session.get(PlantAlarm, stored.plant_alarm_id)
                plant.end_ts = max(plant.end_ts, stored.end_ts)
                plant.rows += episode["rows"]
            elif episode.get("plant") is not None:  # alarming again as the plant changed
                stored.plant_alarm_id = plant_alarm_ids[episode["plant"]]
    started = [
        AnomalyAlarm(
            pipeline=pipeline,
            entity=a["entity"],
            batch_id=part.batch_id,
            sequence=sequence,
            start_ts=datetime.fromisoformat(a["start_ts"]),
            end_ts=datetime.fromisoformat(a["end_ts"]),
            rows=a["rows"],
            peak_score=a["peak_score"],
            threshold=a["threshold"],
            model_version=champion,
            update_index=part.update_index,
            plant_alarm_id=plant_alarm_ids[a["plant"]] if a.get("plant") is not None else None,
        )
        for a in part.alarms
        # A continued alarm whose start was never stored opens a row of its own.
        if not a["continues"] or a["entity"] not in newest
    ]
    session.add_all(started)
    session.flush()
    return [alarm.id for alarm in started]


def _update_ledger(session, part: PartCommit) -> str:
    stored = session.get(Batch, part.batch_id)
    if stored.status != BatchStatus.PENDING or stored.parts_done != part.part:
        raise StaleModel(f"batch {part.batch_id} part {part.part} was committed by another run")
    stored.parts_done = part.part + 1
    names = sorted({*(stored.entity or "").split(","), *part.entities} - {""})
    stored.entity = ",".join(names)[:200]
    stored.rows_received += part.received + part.quarantined + part.duplicates
    stored.rows_scored += part.received - part.late
    stored.rows_late += part.late
    stored.rows_quarantined += part.quarantined
    stored.rows_duplicate += part.duplicates
    if part.lines:
        first = min(line.first_ts for line in part.lines)
        final = max(line.last_ts for line in part.lines)
        stored.first_ts = min(stored.first_ts, first) if stored.first_ts else first
        stored.last_ts = max(stored.last_ts, final) if stored.last_ts else final
        stored.output_path = part.lines[0].output_path
    if part.line_quarantines:  # a new list: the JSON column sees the change
        stored.reasons = [*(stored.reasons or []), *(r for q in part.line_quarantines for r in q["reasons"])]
    if part.last:
        stored.status = BatchStatus.PROCESSED if stored.rows_scored > 0 else BatchStatus.LATE
        stored.processed_at = datetime.now(UTC)
    return stored.status


def json_safe(value):
    """NaN and ±inf become None: JSON columns on Postgres refuse them."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return None
    if isinstance(value, np.floating):
        return float(value)
    return value
