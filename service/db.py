"""The database: engine, sessions, and the schema brought to the newest Alembic revision.

SQLite (the one-machine default) runs in WAL mode with a busy timeout, so API and workers read while one
writes; PostgreSQL (several machines) needs nothing special. The schema lives in :mod:`service.models` and
reaches a database only through the migrations in ``service/migrations`` (``upgrade``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL, a 30 s busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _sqlite_connect(connection, _record) -> None:
    connection.isolation_level = None  # SQLAlchemy, not the driver, begins transactions (_sqlite_begin)
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection) -> None:
    # take the write lock at BEGIN: a transaction that reads and then writes cannot fail on the upgrade
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def upgrade(url: str) -> None:
    """Apply every migration to the database at ``url`` (idempotent)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits at the end of the block, or rolls back on an exception."""
    with sessions() as session, session.begin():
        yield session
