"""The database: engine, sessions, and the schema brought to the newest Alembic revision.

SQLite (the one-machine default) runs in WAL mode with a busy timeout, so API and workers read while one
writes: a :func:`transaction` (the only way to write) takes the write lock at its start, any other session
begins deferred and reads a snapshot without queueing behind writers. PostgreSQL (several machines) needs
nothing special. The schema lives in :mod:`service.models` and
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
    """An engine for ``url``; SQLite files get WAL, a 30 s busy timeout and foreign keys.

    The pool must not be the bottleneck: a request holds its connection from its first query until its
    session closes, which can wait for a free worker thread (AnyIO's 40), so a busy API holds more
    connections than it runs threads. SQLite connections are cheap: no limit beyond the 20 kept open.
    PostgreSQL: up to 50 per process (its default server limit is 100).
    """
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=20, max_overflow=-1
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=40)


def _sqlite_connect(connection, _record) -> None:
    connection.isolation_level = None  # SQLAlchemy, not the driver, begins transactions (_sqlite_begin)
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


_WRITES = "distill_writes"  # execution option of a transaction()'s connection


def _sqlite_begin(connection) -> None:
    # A writer takes the write lock at BEGIN, so a transaction that reads and then writes cannot fail on the
    # lock upgrade (a deferred one would get SQLITE_BUSY at once, not after the busy timeout). Readers begin
    # deferred: in WAL mode they never wait for the lock, so polling clients do not queue behind uploads.
    immediate = connection.get_execution_options().get(_WRITES, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


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
    """A session whose work commits at the end of the block, or rolls back on an exception; the only kind
    of session that may write (on SQLite it holds the write lock from its start: keep it short)."""
    # the option reaches the connection when the session first needs one (nothing is held before that)
    with sessions(execution_options={_WRITES: True}, info={_WRITES: True}) as session, session.begin():
        yield session


@contextmanager
def reading(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session for reads only (a snapshot; never waits for SQLite's write lock); flushing a change in it
    raises :class:`ReadOnlySession`."""
    with sessions() as session:
        yield session


class ReadOnlySession(RuntimeError):
    """A change was flushed in a session that is not a :func:`transaction`."""


@event.listens_for(Session, "before_flush")
def _writes_need_a_transaction(session: Session, _context, _instances) -> None:
    if not session.info.get(_WRITES) and (session.new or session.dirty or session.deleted):
        raise ReadOnlySession("a change in a read-only session: write inside service.db.transaction()")
