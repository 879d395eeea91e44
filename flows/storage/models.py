"""Tables of the pipeline's own database (SQLAlchemy 2 ORM). Alembic migrations create them."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no offset of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the pipeline stores UTC-aware times only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class BatchStatus(StrEnum):
    """Where a landed file stands; stored as its value."""

    PENDING = "pending"
    PROCESSED = "processed"  # its rows were scored and learned from
    QUARANTINED = "quarantined"  # refused: unreadable or invalid, kept in quarantine/
    LATE = "late"  # every row older than its line's watermark
    SKIPPED = "skipped"  # another run held one of its lines; still pending (never stored)


class Batch(Base):
    """The ledger: one row per distinct landed content (a second arrival is a no-op)."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    source_file: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    entity: Mapped[str | None] = mapped_column(String(200), index=True)
    # a BatchStatus: pending -> processed | quarantined | late
    status: Mapped[str] = mapped_column(String(20), index=True, default=BatchStatus.PENDING)
    kind: Mapped[str] = mapped_column(String(20), default="live")  # live | initial
    rows_received: Mapped[int] = mapped_column(Integer, default=0)
    rows_scored: Mapped[int] = mapped_column(Integer, default=0)
    rows_quarantined: Mapped[int] = mapped_column(Integer, default=0)
    rows_late: Mapped[int] = mapped_column(Integer, default=0)
    rows_duplicate: Mapped[int] = mapped_column(Integer, default=0)  # exact duplicate rows dropped
    reasons: Mapped[list | None] = mapped_column(JSON)
    sample_rows: Mapped[list | None] = mapped_column(JSON)
    first_ts: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_ts: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # A large file is processed in parts of `ingest.chunk_rows` rows, each committed on its own;
    # a rerun after a crash resumes after the last committed part.
    parts_done: Mapped[int] = mapped_column(Integer, default=0)
    stored_at: Mapped[str | None] = mapped_column(Text)  # archive or quarantine path
    # The Data Docs page of a quarantined file's failed validation (relative to the work folder).
    validation_page: Mapped[str | None] = mapped_column(Text)
    output_path: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Arrival(Base):
    """Every file seen in the landing folder, duplicates included."""

    __tablename__ = "arrivals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(20))  # new | duplicate
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"))
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class EntityState(Base):
    """What one entity carries between batches. `version` is the optimistic lock."""

    __tablename__ = "entity_state"

    entity: Mapped[str] = mapped_column(String(200), primary_key=True)
    hidden_state: Mapped[bytes | None] = mapped_column(LargeBinary)
    feature_state: Mapped[bytes | None] = mapped_column(LargeBinary)
    watermark: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The drift detectors' statistics of this line since their last reset (flows.monitor.drift_detectors).
    drift_state: Mapped[bytes | None] = mapped_column(LargeBinary)
    alarm_state: Mapped[bytes | None] = mapped_column(LargeBinary)  # lru_online.alarms.AlarmState
    model_version: Mapped[str | None] = mapped_column(String(50))
    batches: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    __mapper_args__ = {"version_id_col": version}


class Lease(Base):
    """Who may work on something right now: an entity ("entity:<id>") or a whole pipeline run
    ("pipeline:<name>"). A lease lapses at `expires` or when its holder's process is gone."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(300), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    expires: Mapped[datetime] = mapped_column(UTCDateTime())


class ModelState(Base):
    """The live fleet model of a pipeline: its checkpoint and its place in the registry."""

    __tablename__ = "model_state"

    pipeline: Mapped[str] = mapped_column(String(200), primary_key=True)
    checkpoint_path: Mapped[str] = mapped_column(Text)
    champion_version: Mapped[str | None] = mapped_column(String(50))
    online_run_id: Mapped[str | None] = mapped_column(String(64))
    # Drift reference (per-sensor bins and fractions, samples, reference error) from training
    # data. Deferred: 100-200 KB of JSON that most reads of this row (a file's version checks,
    # its commit, the snapshot count) never use; `LiveModel.state` loads it.
    reference: Mapped[dict | None] = mapped_column(JSON, deferred=True)
    # Drift detectors only read batches after this sequence number (reset at each retrain).
    drift_since_sequence: Mapped[int] = mapped_column(Integer, default=0)
    batches_since_snapshot: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    __mapper_args__ = {"version_id_col": version}


class ModelRecovery(Base):
    """A live model restored from the registry after its checkpoint went missing or unreadable."""

    __tablename__ = "model_recoveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(200))
    missing_checkpoint: Mapped[str] = mapped_column(Text)  # as stored: relative to the work folder
    reason: Mapped[str] = mapped_column(Text)
    restored_version: Mapped[str] = mapped_column(String(50))
    restored_kind: Mapped[str | None] = mapped_column(String(30))  # initial | snapshot | challenger
    checkpoint_path: Mapped[str] = mapped_column(Text)  # the restored checkpoint
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    trigger: Mapped[str] = mapped_column(String(30))  # run | command
    recovered_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class LineQuarantine(Base):
    """Rows of one line (entity None: rows that name no line) taken out of a file whose other
    lines went on: the fault concerned that line or those rows only."""

    __tablename__ = "line_quarantines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), index=True)
    part: Mapped[int] = mapped_column(Integer, default=0)
    entity: Mapped[str | None] = mapped_column(String(200), index=True)
    rows: Mapped[int] = mapped_column(Integer)
    reasons: Mapped[list] = mapped_column(JSON)
    sample_rows: Mapped[list | None] = mapped_column(JSON)
    rows_file: Mapped[str | None] = mapped_column(Text)  # the rows as read, relative to the work folder
    validation_page: Mapped[str | None] = mapped_column(Text)  # the Data Docs page of the file's result
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class PlantAlarm(Base):
    """Episodes that most of a file's lines started together (flows.monitor.plant_alarms): one
    alarm for the plant, its lines' episodes pointing to it."""

    __tablename__ = "plant_alarms"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(200))
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"))  # the file it started in
    sequence: Mapped[int | None] = mapped_column(Integer, index=True)  # the part that started it
    start_ts: Mapped[datetime] = mapped_column(UTCDateTime())  # the first line's onset
    end_ts: Mapped[datetime] = mapped_column(UTCDateTime())  # the last of its episodes' ends
    lines: Mapped[int] = mapped_column(Integer)
    entities: Mapped[list] = mapped_column(JSON)
    share: Mapped[float] = mapped_column(Float)  # of the part's lines opening in the densest stretch
    threshold: Mapped[float] = mapped_column(Float)  # the share that raises one
    rows: Mapped[int] = mapped_column(Integer)  # alarmed rows of its episodes
    peak_ratio: Mapped[float | None] = mapped_column(Float)  # the highest peak score / threshold of its lines
    detected_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AnomalyAlarm(Base):
    """One run of alarmed rows of a line; an alarm still running at the end of a file is
    extended by the next file's rows instead of opening another."""

    __tablename__ = "anomaly_alarms"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(200))
    entity: Mapped[str] = mapped_column(String(200), index=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"))  # the file it started in
    sequence: Mapped[int | None] = mapped_column(Integer, index=True)  # the part that started it
    start_ts: Mapped[datetime] = mapped_column(UTCDateTime())
    end_ts: Mapped[datetime] = mapped_column(UTCDateTime())
    rows: Mapped[int] = mapped_column(Integer)
    peak_score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)  # the line's threshold when it started
    model_version: Mapped[str | None] = mapped_column(String(50))  # the champion then (None: the initial model)
    update_index: Mapped[int] = mapped_column(Integer)  # the live model's update count then
    detected_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The plant-level alarm it is part of (None: the line's own).
    plant_alarm_id: Mapped[int | None] = mapped_column(ForeignKey("plant_alarms.id"), index=True)


class BatchSummary(Base):
    """Per-line figures of each committed batch part: the line's history for retraining and
    drift reports."""

    __tablename__ = "batch_summaries"
    __table_args__ = (UniqueConstraint("sequence", "entity"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), index=True)
    part: Mapped[int] = mapped_column(Integer, default=0)
    entity: Mapped[str] = mapped_column(String(200), index=True)
    # Order of commits across the pipeline: the MLflow step.
    sequence: Mapped[int] = mapped_column(Integer, index=True)
    rows: Mapped[int] = mapped_column(Integer)
    first_ts: Mapped[datetime] = mapped_column(UTCDateTime())
    last_ts: Mapped[datetime] = mapped_column(UTCDateTime())
    metrics: Mapped[dict] = mapped_column(JSON)  # loss, mae, rmse, score quantiles, latencies
    drift_stats: Mapped[dict] = mapped_column(JSON)  # psi/ks per sensor, sensor means
    features_path: Mapped[str] = mapped_column(Text)  # the part's output file (all its lines)
    committed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SequenceMetrics(Base):
    """One committed batch part's figures across its lines, logged to MLflow at its sequence."""

    __tablename__ = "sequence_metrics"

    sequence: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"))
    part: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict] = mapped_column(JSON)
    tracked: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    committed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DriftEvent(Base):
    __tablename__ = "drift_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(200))
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"))
    sequence: Mapped[int] = mapped_column(Integer)
    entity: Mapped[str] = mapped_column(String(200))
    detector: Mapped[str] = mapped_column(String(50))
    feature: Mapped[str | None] = mapped_column(String(200))
    value: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    event_time: Mapped[datetime] = mapped_column(UTCDateTime())
    detected_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    action: Mapped[str] = mapped_column(String(30))
    report_uri: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict | None] = mapped_column(JSON)


class RetrainDecision(Base):
    __tablename__ = "retrain_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(200))
    drift_event_id: Mapped[int | None] = mapped_column(ForeignKey("drift_events.id"))
    trigger: Mapped[str] = mapped_column(String(30))
    champion_version: Mapped[str | None] = mapped_column(String(50))
    challenger_version: Mapped[str | None] = mapped_column(String(50))
    champion_mse: Mapped[float | None] = mapped_column(Float)
    challenger_mse: Mapped[float | None] = mapped_column(Float)
    margin: Mapped[float] = mapped_column(Float)
    promoted: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    # The newest file part of the window it trained on, and (promoted) the newest one its
    # challenger had caught up to when swapped in: they differ when files landed meanwhile.
    window_sequence: Mapped[int | None] = mapped_column(Integer)
    swapped_at_sequence: Mapped[int | None] = mapped_column(Integer)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
