"""The pipeline database: migrations, optimistic locking, the ledger and entity leases."""

import json
import math
import sqlite3
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from flows.ingest.landing import LandedFile
from flows.storage.database import SQLITE_PAGE_BYTES, Database, DatabaseError, json_text, masked
from flows.storage.ledger import Ledger
from flows.storage.models import Base, EntityState, Lease


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path}/ledger.db")
    database.migrate()
    yield database
    database.dispose()


def test_migrations_match_the_models_and_go_down_and_up(db):
    with db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    db.downgrade("base")
    assert sa.inspect(db.engine).get_table_names() == ["alembic_version"]
    db.migrate()
    assert {"batches", "arrivals", "entity_state", "model_state", "drift_events"} <= set(
        sa.inspect(db.engine).get_table_names()
    )


def test_two_writers_cannot_both_win(db):
    with db.session() as session:
        session.add(EntityState(entity="line-1", hidden_state=b"v1"))
    first, second = Session(db.engine), Session(db.engine)
    mine, theirs = first.get(EntityState, "line-1"), second.get(EntityState, "line-1")
    mine.hidden_state = b"mine"
    first.commit()
    theirs.hidden_state = b"theirs"
    with pytest.raises(StaleDataError):
        second.commit()
    second.rollback()
    with db.session() as session:
        assert session.get(EntityState, "line-1").hidden_state == b"mine"


def test_times_come_back_in_utc(db):
    moment = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    with db.session() as session:
        session.add(EntityState(entity="e", watermark=moment + timedelta(hours=0)))
    with db.session() as session:
        assert session.get(EntityState, "e").watermark == moment
    with pytest.raises(sa.exc.StatementError, match="naive datetime"), db.session() as session:
        session.add(EntityState(entity="f", watermark=datetime(2026, 3, 1)))


def test_a_new_sqlite_database_takes_large_pages_and_an_existing_one_keeps_its_own(db, tmp_path):
    with db.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA page_size").scalar() == SQLITE_PAGE_BYTES
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    older = tmp_path / "older.db"
    with sqlite3.connect(older) as made:  # made by an earlier release, on SQLite's default page
        made.execute("PRAGMA page_size=4096")
        made.execute("PRAGMA journal_mode=WAL")
        made.execute("CREATE TABLE kept (value TEXT)")
        made.execute("INSERT INTO kept VALUES ('there')")
    database = Database(f"sqlite:///{older}")
    with database.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA page_size").scalar() == 4096
        assert connection.exec_driver_sql("SELECT value FROM kept").scalar() == "there"
    database.dispose()


def test_json_columns_store_what_the_standard_library_reads_back(db):
    figures = {
        "psi": {"temperature": 0.1 + 0.2, "flow": 1e-7, "pressure": 1e16, "vibration": -0.0},
        "count": 3,
        "numpy": np.float64(2.5),
        "numpy32": np.float32(0.5),
        "none": None,
        "text": "é ✓",
        "nested": [[1, 2.25], []],
    }
    expected = {**figures, "numpy": 2.5, "numpy32": 0.5}
    assert json.loads(json_text(figures)) == expected
    # What orjson refuses goes through the standard library as before: keys that are not strings.
    assert json.loads(json_text({1: "one"})) == {"1": "one"}
    # Non-finite floats are stored as JSON's null (the standard library wrote NaN, which
    # Postgres refuses).
    assert json.loads(json_text({"nan": math.nan, "inf": math.inf})) == {"nan": None, "inf": None}
    table = sa.Table(
        "figures", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True), sa.Column("value", sa.JSON)
    )
    table.create(db.engine)
    with db.engine.begin() as connection:
        connection.execute(table.insert(), [{"id": 1, "value": figures}])
    with db.engine.connect() as connection:
        stored = connection.execute(sa.select(table.c.value)).scalar()
        text = connection.exec_driver_sql("SELECT value FROM figures").scalar()
    assert stored == expected
    assert json.loads(text) == expected


def test_ledger_records_new_and_duplicate_arrivals(db, tmp_path):
    ledger = Ledger(db, tmp_path, tmp_path / "archive", tmp_path / "quarantine")
    original = tmp_path / "a.csv"
    original.write_text("entity,timestamp\nx,1\n")
    copy = tmp_path / "copy of a.csv"
    copy.write_text(original.read_text())
    new, batch_id = ledger.record(LandedFile(original, 10, 0.0))
    again, same_id = ledger.record(LandedFile(original, 10, 0.0))
    duplicate, dup_id = ledger.record(LandedFile(copy, 10, 0.0))
    assert (new, again, duplicate) == ("new", "pending", "duplicate")
    assert batch_id == same_id == dup_id
    assert ledger.accounting()["batches"]["duplicate"] == 1
    ledger.quarantine_batch(batch_id, ["a.csv: bad"], [{"row": 1}], rows=1)
    report = ledger.accounting()
    assert report["batches"]["quarantined"] == 1 and report["rows"] == {
        "received": 1,
        "scored": 0,
        "quarantined": 1,
        "late": 0,
        "duplicate": 0,
    }
    assert report["quarantined_files"][0]["reasons"] == ["a.csv: bad"]
    assert (tmp_path / "quarantine" / "a.csv").exists() and not original.exists()


def test_lease_is_exclusive_until_released_expired_or_its_owner_dies(db, tmp_path):
    import socket

    ledger = Ledger(db, tmp_path, tmp_path / "archive", tmp_path / "quarantine")
    assert ledger.acquire("entity:line-1") and ledger.acquire("entity:line-1")  # renewing is fine
    with db.session() as session:
        session.get(Lease, "entity:line-1").owner = "other-host:1:abcd"
    assert not ledger.acquire("entity:line-1")  # a live holder elsewhere
    with db.session() as session:
        session.get(Lease, "entity:line-1").owner = f"{socket.gethostname()}:999999999:dead"
    assert ledger.acquire("entity:line-1")  # its process is gone
    with db.session() as session:
        lease = session.get(Lease, "entity:line-1")
        lease.owner, lease.expires = "other-host:1:abcd", datetime.now(UTC) - timedelta(seconds=1)
    assert ledger.acquire("entity:line-1")  # expired
    ledger.release("entity:line-1")
    with db.session() as session:
        assert session.get(Lease, "entity:line-1") is None


def test_a_files_leases_are_taken_all_or_none_in_few_statements(db, tmp_path):
    ledger = Ledger(db, tmp_path, tmp_path / "archive", tmp_path / "quarantine")
    names = [f"entity:line-{i:04d}" for i in range(3000)]  # more than one statement's chunk
    statements = []
    sa.event.listen(db.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    assert ledger.acquire_all(names)
    taking = len(statements)
    assert taking <= 6, statements  # two inserts, two reads: not one per lease
    with db.session() as session:
        session.get(Lease, "entity:line-2999").owner = "other-host:1:abcd"
    ledger.release_all(names)
    # One lease held elsewhere: nothing is taken, not even the free ones.
    assert not ledger.acquire_all(names)
    with db.session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Lease)) == 1
    ledger.release_all(names)


def test_migration_0002_keeps_what_earlier_runs_committed(tmp_path):
    """A work folder of the per-line era: its summaries become one metrics row per sequence,
    tracked when all of its lines were, so MLflow neither misses nor repeats a step."""
    database = Database(f"sqlite:///{tmp_path}/old.db")
    database.migrate("0001")
    stamp = datetime(2026, 1, 1, tzinfo=UTC).replace(tzinfo=None)
    with database.engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO batches (id, content_hash, source_file, size_bytes, status, kind, rows_received, "
                "rows_scored, rows_quarantined, rows_late, parts_done, received_at) "
                "VALUES (1, 'h', 'f.csv', 1, 'processed', 'live', 30, 30, 0, 0, 1, :t)"
            ),
            {"t": stamp},
        )
        for entity, sequence, rows, mae, tracked in (("a", 1, 10, 0.2, 1), ("b", 1, 20, 0.5, 1), ("a", 2, 5, 0.1, 0)):
            connection.execute(
                sa.text(
                    "INSERT INTO batch_summaries (batch_id, part, entity, sequence, rows, first_ts, last_ts, metrics, "
                    "drift_stats, features_path, tracked, committed_at) VALUES (1, 0, :e, :s, :r, :t, :t, :m, '{}', "
                    "'x.parquet', :k, :t)"
                ),
                {"e": entity, "s": sequence, "r": rows, "m": f'{{"mae_before": {mae}}}', "k": tracked, "t": stamp},
            )
    database.migrate()
    with database.session() as session:
        from flows.storage.models import SequenceMetrics

        rows = {m.sequence: m for m in session.scalars(sa.select(SequenceMetrics))}
    assert rows[1].tracked and not rows[2].tracked
    assert rows[1].metrics["rows"] == 30 and rows[1].metrics["mae_before"] == pytest.approx((10 * 0.2 + 20 * 0.5) / 30)
    assert "drift_state" in {c["name"] for c in sa.inspect(database.engine).get_columns("entity_state")}
    database.dispose()


def test_unreachable_database_is_refused_with_the_url_masked():
    database = Database("postgresql+psycopg://user:secret@127.0.0.1:1/nowhere")
    with pytest.raises(DatabaseError) as error:
        database.migrate()
    assert "cannot be reached" in str(error.value) and "secret" not in str(error.value) and "***" in str(error.value)
    assert masked("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"


def test_a_ledger_knows_whether_a_run_has_anything_to_do(db, tmp_path):
    from flows.storage.models import SequenceMetrics

    landing = tmp_path / "landing"
    landing.mkdir()
    ledger = Ledger(db, tmp_path, tmp_path / "archive", tmp_path / "quarantine")
    (landing / ".hidden.csv").write_text("x")
    (landing / "half.csv.part").write_text("x")  # still being written
    assert not ledger.has_work(landing) and not ledger.has_work(tmp_path / "missing")
    (landing / "a.csv").write_text("entity,timestamp\n")
    assert ledger.has_work(landing)
    _, batch_id = ledger.record(LandedFile(landing / "a.csv", 10, 0.0))
    (landing / "a.csv").unlink()
    assert ledger.has_work(landing)  # pending in the ledger
    ledger.quarantine_batch(batch_id, ["a.csv: bad"], [], rows=0)
    assert not ledger.has_work(landing)
    with db.session() as session:
        session.add(SequenceMetrics(sequence=1, batch_id=batch_id, part=0, metrics={}, tracked=False))
    assert ledger.has_work(landing)  # figures MLflow has not been given yet


def test_an_idle_run_starts_no_flow_run(tmp_path):
    """Nothing landed: `lru-online run` answers at once, and Prefect's home holds no database."""
    import json
    import os
    import subprocess
    import sys

    prefect_home = tmp_path / "prefect-home"
    done = subprocess.run(
        [sys.executable, "-m", "flows", "run", "-w", str(tmp_path / "work")],
        env={**os.environ, "PREFECT_HOME": str(prefect_home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["idle"] == 1
    assert not (prefect_home / "prefect.db").exists()


def test_the_schema_head_read_from_the_scripts_is_alembics(tmp_path):
    from alembic.script import ScriptDirectory

    from flows.storage.database import alembic_config, schema_head

    assert schema_head() == ScriptDirectory.from_config(alembic_config(f"sqlite:///{tmp_path}/x.db")).get_current_head()


def test_a_database_at_head_starts_without_alembic_and_an_older_one_is_upgraded(tmp_path):
    """A command's start on a migrated database neither imports alembic nor reads its history
    (half a second of every run); a database a revision behind is still brought to the head."""
    import subprocess
    import sys

    from flows.storage.database import schema_head

    url = f"sqlite:///{tmp_path}/ledger.db"
    database = Database(url)
    database.migrate()
    probe = (
        "import sys; from flows.storage.database import Database; Database(sys.argv[1]).migrate(); "
        "print('alembic' in sys.modules)"
    )

    def migrate_in_a_fresh_interpreter() -> str:
        return subprocess.run([sys.executable, "-c", probe, url], capture_output=True, text=True, check=True).stdout

    database.downgrade("0007")
    assert migrate_in_a_fresh_interpreter().strip() == "True"
    with database.engine.connect() as connection:
        assert list(connection.scalars(sa.text("SELECT version_num FROM alembic_version"))) == [schema_head()]
    assert "plant_alarms" in sa.inspect(database.engine).get_table_names()
    assert migrate_in_a_fresh_interpreter().strip() == "False"
    database.dispose()
