"""The batch ledger: arrivals, claims on entities, quarantine and the row accounting."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from flows.ingest.landing import IN_PROGRESS_SUFFIXES, LandedFile, content_hash
from flows.storage.database import Database
from flows.storage.models import Arrival, Batch, DriftEvent, Lease, LineQuarantine, SequenceMetrics
from flows.storage.work_folder import resolved_path, stored_path

LEASE_SECONDS = 600


def owner_id() -> str:
    """Who holds a lease: host, process and a per-process token."""
    return f"{socket.gethostname()}:{os.getpid()}:{_TOKEN}"


_TOKEN = uuid.uuid4().hex[:8]


def _owner_is_dead(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def move_into(source: Path, folder: Path) -> Path:
    """Moves a file into a folder without overwriting anything already there."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    if target.exists() or target.is_symlink():
        target = folder / f"{source.stem}-{uuid.uuid4().hex[:8]}{''.join(source.suffixes[-1:])}"
    shutil.move(str(source), str(target))
    return target


def _new_batch(session: Session, digest: str, path: str, size_bytes: int) -> int:
    """A pending ledger row for new content and its first arrival; the row's id."""
    batch = Batch(content_hash=digest, source_file=path, size_bytes=size_bytes, status="pending")
    session.add(batch)
    session.flush()
    session.add(Arrival(path=path, content_hash=digest, size_bytes=size_bytes, outcome="new", batch_id=batch.id))
    return batch.id


# Leases per statement: far below SQLite's and Postgres' limits on bound parameters.
LEASE_CHUNK = 2000


def _chunks(names: list[str]) -> list[list[str]]:
    return [names[i : i + LEASE_CHUNK] for i in range(0, len(names), LEASE_CHUNK)]


def _take_leases(session: Session, names: list[str], me: str, now: datetime, expires: datetime) -> None:
    """INSERT … ON CONFLICT DO UPDATE: new leases are created, expired or own ones taken. One
    statement executed for many rows (SQLAlchemy batches them into multi-row VALUES itself): a
    statement written with every row's values in it is compiled anew each time, which for a
    plant of 2,000 lines cost more than running it."""
    dialect = session.get_bind().dialect.name
    insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"leases need INSERT … ON CONFLICT, which {dialect} lacks here")
    statement = insert(Lease)
    statement = statement.on_conflict_do_update(
        index_elements=[Lease.name],
        set_={"owner": statement.excluded.owner, "expires": statement.excluded.expires},
        where=(Lease.expires < now) | (Lease.owner == me),
    )
    session.execute(statement, [{"name": n, "owner": me, "expires": expires} for n in names])


def _holders(session: Session, names: list[str]) -> dict[str, str]:
    held = {}
    for chunk in _chunks(names):
        held.update(session.execute(select(Lease.name, Lease.owner).where(Lease.name.in_(chunk))).tuples().all())
    return held


@dataclass
class DiscoveryResult:
    new: list[int] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


class Ledger:
    def __init__(self, db: Database, root: Path, archive: Path, quarantine: Path) -> None:
        """`root`: the work folder; paths inside it are stored relative to it."""
        self.db = db
        self.root = root
        self.archive = archive
        self.quarantine = quarantine

    def path(self, stored: str) -> Path:
        """The file a path stored in the ledger names, in this work folder."""
        return resolved_path(self.root, stored)

    # --- arrivals -------------------------------------------------------------------------
    def record(self, landed: LandedFile) -> tuple[str, int]:
        """Records one landed file: ("new", id), ("duplicate", id), ("pending", id) or ("finished", id).

        The same content under any name, or under the same name after the first copy was filed
        away, is a duplicate arrival: counted, archived, never processed again.
        """
        digest = content_hash(landed.path)
        path = stored_path(self.root, landed.path.resolve())
        try:
            return self._record(landed, digest, path)
        except IntegrityError:
            return self._record(landed, digest, path)  # a concurrent run recorded it first

    def _record(self, landed: LandedFile, digest: str, path: str) -> tuple[str, int]:
        with self.db.session() as session:
            batch = session.scalar(select(Batch).where(Batch.content_hash == digest))
            if batch is None:
                return "new", _new_batch(session, digest, path, landed.size_bytes)
            if batch.source_file == path and batch.status == "pending":
                return "pending", batch.id
            if batch.source_file == path and batch.stored_at is None:
                return "finished", batch.id  # finished, but a crash kept it from being filed away
            session.add(
                Arrival(
                    path=path,
                    content_hash=digest,
                    size_bytes=landed.size_bytes,
                    outcome="duplicate",
                    batch_id=batch.id,
                )
            )
            return "duplicate", batch.id

    def file_away_duplicate(self, path: Path) -> Path:
        return move_into(path, self.archive / "duplicates")

    def refuse(self, path: Path, reason: str) -> int:
        """A landing entry that is never read (a symlink out of the folder): quarantined as is."""
        target = os.readlink(path) if path.is_symlink() else ""
        digest = hashlib.sha256(f"refused:{path.resolve(strict=False)}:{target}".encode()).hexdigest()
        with self.db.session() as session:
            batch = session.scalar(select(Batch).where(Batch.content_hash == digest))
            batch_id = batch.id if batch else _new_batch(session, digest, stored_path(self.root, path), 0)
        self.quarantine_batch(batch_id, [reason], [], rows=0)
        return batch_id

    def finish_move(self, batch_id: int) -> None:
        """Completes the move of a finished batch's file that a crash left in the landing folder."""
        with self.db.session() as session:
            batch = session.get(Batch, batch_id)
            source = self.path(batch.source_file)
            if not source.exists() and not source.is_symlink():
                return
            folder = self.quarantine if batch.status == "quarantined" else self.archive
            batch.stored_at = stored_path(self.root, move_into(source, folder))

    # --- lifecycle ------------------------------------------------------------------------
    def pending(self) -> list[int]:
        with self.db.session() as session:
            return list(session.scalars(select(Batch.id).where(Batch.status == "pending").order_by(Batch.id)))

    def get(self, batch_id: int) -> Batch:
        with self.db.session() as session:
            return session.get(Batch, batch_id)

    def quarantine_batch(
        self, batch_id: int, reasons: list[str], samples: list[dict], rows: int, validation_page: Path | None = None
    ) -> Path | None:
        """Marks the batch quarantined (reasons, sample rows, the Data Docs page of its failed
        validation) and moves its file to quarantine/."""
        with self.db.session() as session:
            batch = session.get(Batch, batch_id)
            batch.status = "quarantined"
            batch.reasons = reasons
            batch.sample_rows = samples
            batch.validation_page = stored_path(self.root, validation_page) if validation_page else None
            # Parts committed before the failing one keep their counts; the rest is quarantined.
            batch.rows_received += rows
            batch.rows_quarantined += rows
            batch.processed_at = datetime.now(UTC)
        source = self.path(batch.source_file)
        if not source.exists() and not source.is_symlink():
            return None
        stored = move_into(source, self.quarantine)
        with self.db.session() as session:
            session.get(Batch, batch_id).stored_at = stored_path(self.root, stored)
        return stored

    # --- leases ---------------------------------------------------------------------------
    def acquire(self, name: str, seconds: float = LEASE_SECONDS) -> bool:
        """Takes or renews the lease `name` for this process; False while another live process
        holds it."""
        return self.acquire_all([name], seconds)

    def acquire_all(self, names: list[str], seconds: float = LEASE_SECONDS) -> bool:
        """Takes or renews every lease in `names` for this process, or none of them: False (and
        nothing held) while another live process holds one. One statement takes all that are
        free, expired or ours; a lease whose holder's process is gone is taken over after."""
        names = sorted(set(names))
        if not names:
            return True
        me, now = owner_id(), datetime.now(UTC)
        expires = now + timedelta(seconds=seconds)
        with self.db.session() as session:
            _take_leases(session, names, me, now, expires)
            held = _holders(session, names)
            dead = {owner for owner in set(held.values()) - {me} if _owner_is_dead(owner)}
            if dead:
                session.execute(
                    update(Lease)
                    .where(Lease.name.in_([n for n, o in held.items() if o in dead]), Lease.owner.in_(dead))
                    .values(owner=me, expires=expires)
                )
                held = _holders(session, names)
            if all(held.get(name) == me for name in names):
                return True
        self.release_all(names)  # what this call took, in a transaction of its own
        return False

    def release(self, name: str) -> None:
        self.release_all([name])

    def release_all(self, names: list[str]) -> None:
        """Gives up every lease in `names` that this process holds, in one statement per chunk."""
        with self.db.session() as session:
            for chunk in _chunks(sorted(set(names))):
                session.execute(delete(Lease).where(Lease.name.in_(chunk), Lease.owner == owner_id()))

    def has_work(self, landing: Path) -> bool:
        """Whether a run would do anything: a file in the landing folder, a pending batch, or a
        committed part whose figures MLflow has not been given yet. One listing and two small
        queries: an idle scheduled run need not start Prefect's API to find out."""
        if landing.exists() and any(
            not p.name.startswith(".") and not p.name.endswith(IN_PROGRESS_SUFFIXES) for p in landing.iterdir()
        ):
            return True
        with self.db.session() as session:
            pending = session.scalar(select(func.count()).select_from(Batch).where(Batch.status == "pending"))
            untracked = session.scalar(
                select(func.count()).select_from(SequenceMetrics).where(SequenceMetrics.tracked.is_(False))
            )
        return bool(pending or untracked)

    # --- accounting -----------------------------------------------------------------------
    def accounting(self) -> dict:
        with self.db.session() as session:
            by_status = dict(session.execute(select(Batch.status, func.count()).group_by(Batch.status)).all())
            duplicates = session.scalar(select(func.count()).select_from(Arrival).where(Arrival.outcome == "duplicate"))
            sums = session.execute(
                select(
                    func.coalesce(func.sum(Batch.rows_received), 0),
                    func.coalesce(func.sum(Batch.rows_scored), 0),
                    func.coalesce(func.sum(Batch.rows_quarantined), 0),
                    func.coalesce(func.sum(Batch.rows_late), 0),
                    func.coalesce(func.sum(Batch.rows_duplicate), 0),
                ).where(Batch.status != "pending")
            ).one()
            drift_events = session.scalar(select(func.count()).select_from(DriftEvent))
            quarantined = session.execute(
                select(Batch.source_file, Batch.stored_at, Batch.reasons, Batch.validation_page)
                .where(Batch.status == "quarantined")
                .order_by(Batch.id)
            ).all()
            lines = session.execute(
                select(LineQuarantine, Batch.source_file)
                .join(Batch, Batch.id == LineQuarantine.batch_id)
                .order_by(LineQuarantine.id)
            ).all()
        return {
            "batches": {
                "processed": by_status.get("processed", 0),
                "quarantined": by_status.get("quarantined", 0),
                "late": by_status.get("late", 0),
                "duplicate": duplicates,
                "pending": by_status.get("pending", 0),
            },
            # received = scored + quarantined + late + duplicate (exact duplicate rows dropped)
            "rows": {
                "received": sums[0],
                "scored": sums[1],
                "quarantined": sums[2],
                "late": sums[3],
                "duplicate": sums[4],
            },
            "drift_events": drift_events,
            "quarantined_files": [
                {
                    "file": Path(source).name,
                    "stored_at": stored,
                    "reasons": reasons or [],
                    "validation_page": str(resolved_path(self.root, page)) if page else None,
                }
                for source, stored, reasons, page in quarantined
            ],
            "quarantined_lines": [
                {
                    "file": Path(source).name,
                    "part": line.part,
                    "line": line.entity,
                    "rows": line.rows,
                    "reasons": line.reasons,
                    "rows_file": str(resolved_path(self.root, line.rows_file)) if line.rows_file else None,
                    "validation_page": (
                        str(resolved_path(self.root, line.validation_page)) if line.validation_page else None
                    ),
                }
                for line, source in lines
            ],
        }
