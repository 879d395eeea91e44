"""Engine, sessions and migrations for the pipeline database (SQLite or Postgres)."""

from __future__ import annotations

import ast
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from flows.secrets import mask_secrets

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_ATTEMPTS = 5
MIGRATION_LOCK_KEY = 7_140_727
# A new SQLite database's page: a line's carried states are ~18 KB, which on 4 KB pages spill
# into chains of overflow pages; on 16 KB pages a file's state update at 2,000 lines and its
# commit take ~2/3 of the time (README). An existing database keeps the page it was made with.
SQLITE_PAGE_BYTES = 16_384


class DatabaseError(RuntimeError):
    """The database named in the config cannot be used; the message names the URL (masked)."""


def masked(url: str) -> str:
    """The URL with any password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return mask_secrets(url)


def json_text(value: Any) -> str:
    """The JSON columns' encoder: orjson (a file's 2,000 lines' summaries in 5 ms, not 60), and
    the standard library's for what orjson refuses (keys that are not strings, other types), so
    what a column accepts is unchanged. A non-finite float becomes null, as JSON requires
    (Postgres refuses the standard library's NaN); the pipeline stores finite numbers already."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    except TypeError:
        return json.dumps(value)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA page_size={SQLITE_PAGE_BYTES}")  # before WAL, which fixes the page
    # WAL lets readers work beside one writer; the timeout waits out short write locks of a
    # concurrent run instead of failing at once.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise DatabaseError(f"database_url {masked(url)!r} is not a valid SQLAlchemy URL") from error
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, json_serializer=json_text)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    try:
        return create_engine(url, pool_pre_ping=True, json_serializer=json_text)
    except ModuleNotFoundError as error:
        raise DatabaseError(
            f"database_url {masked(url)!r} needs the driver {error.name!r}, which is not installed"
        ) from None


_REVISION_LINE = re.compile(r"^(down_revision|revision)\s*(?::[^=\n]*)?=\s*(.+?)\s*$", re.MULTILINE)


@cache
def schema_head() -> str | None:
    """The newest revision in the migrations folder, read from each script's `revision` and
    `down_revision` lines without importing them; None where the history is not one line of
    string revisions (alembic then reads it). Why: alembic's own view of the history imports
    every script, and with alembic's import that is about 0.5 s of every command's start on a
    database that is already at this revision."""
    revisions: dict[str, str | None] = {}
    for script in (MIGRATIONS / "versions").glob("*.py"):
        fields = {name: _literal(value) for name, value in _REVISION_LINE.findall(script.read_text(encoding="utf-8"))}
        revision, down = fields.get("revision"), fields.get("down_revision")
        if not isinstance(revision, str) or not isinstance(down, str | None):
            return None  # a merge (a tuple of revisions) or a line not read: alembic decides
        revisions[revision] = down
    heads = set(revisions) - set(revisions.values())
    return heads.pop() if len(heads) == 1 else None


def _literal(source: str) -> object:
    """A script's revision value as Python reads it; a value that is not a literal reads as a
    tuple, which `schema_head` hands back to alembic."""
    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return ()


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _stamped_revisions(connection: Connection) -> list[str]:
    """The revisions the database is stamped with (none before its first migration)."""
    try:
        return list(connection.scalars(text("SELECT version_num FROM alembic_version")))
    except (OperationalError, ProgrammingError):  # no version table yet
        return []


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self, revision: str = "head") -> None:
        """Brings the schema to `revision` (idempotent); refuses an unreachable database. A
        database already at the head returns before alembic is loaded (`schema_head`).

        Two processes starting on a fresh database at once both see it empty; on Postgres an
        advisory lock serialises them, on SQLite the loser's "already exists" is retried after
        the winner has committed, when there is nothing left to do.
        """
        try:
            with self.engine.connect() as connection:
                stamped = _stamped_revisions(connection)
        except OperationalError as error:
            detail = mask_secrets(str(error.orig).strip().splitlines()[0])
            raise DatabaseError(f"database_url {masked(self.url)!r} cannot be reached: {detail}") from None
        if revision == "head" and stamped == [schema_head()]:
            return
        from alembic import command

        for attempt in range(MIGRATION_ATTEMPTS):
            try:
                with self.engine.begin() as connection:
                    if connection.dialect.name == "postgresql":
                        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
                    config = alembic_config(self.url)
                    config.attributes["connection"] = connection
                    command.upgrade(config, revision)
                return
            except (OperationalError, ProgrammingError) as error:
                if "already exists" not in str(error) or attempt == MIGRATION_ATTEMPTS - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def downgrade(self, revision: str) -> None:
        from alembic import command

        with self.engine.begin() as connection:
            config = alembic_config(self.url)
            config.attributes["connection"] = connection
            command.downgrade(config, revision)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error."""
        with self._sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
