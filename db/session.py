"""Database engine and sessions: SQLite (WAL) by default, PostgreSQL when RATCHET_DATABASE_URL says so.

Knows nothing of runs or experiments beyond creating the tables (migrations: db/migrate.py).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine

from db import models  # noqa: F401 - registers the tables on SQLModel.metadata

log = logging.getLogger("ratchet.db")
T = TypeVar("T")
# Waits between tries of a transaction whose connection failed (about a minute in all): long enough for
# PostgreSQL to restart or fail over, short enough that a real outage surfaces.
RETRY_WAITS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


def normalise_url(url: str) -> str:
    """`postgresql://` and `postgres://` → the psycopg 3 driver SQLAlchemy needs spelled out."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, **kw) -> Engine:
    """An engine for `url`. SQLite: WAL journal, 30 s busy timeout, usable from several threads.

    Raises sqlalchemy.exc.ArgumentError for a malformed URL.
    """
    url = normalise_url(url)
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kw)

        @event.listens_for(eng, "connect")
        def _pragmas(dbapi_conn, _record):  # WAL lets the shell read while the engine writes
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return eng
    return create_engine(url, pool_pre_ping=True, **kw)


def create_tables(engine: Engine) -> None:
    """Create any missing tables straight from db/models.py (idempotent; tests and benchmarks). A database that
    had none of our tables is recorded as at the migrations' head, so `ratchet` commands accept it.

    Services go through db.migrate.ensure_schema / `ratchet db upgrade` instead.
    """
    from db import migrate

    fresh = schema_is_empty(engine)
    SQLModel.metadata.create_all(engine)
    if fresh and migrate.head_revision():
        migrate.stamp(engine, "head")


def schema_is_empty(engine: Engine) -> bool:
    """True when the database has none of db/models.py's tables."""
    from sqlalchemy import inspect

    with engine.connect() as conn:
        have = set(inspect(conn).get_table_names())
    return not have & set(SQLModel.metadata.tables)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: commits on success, rolls back on any exception and re-raises it."""
    with Session(engine, expire_on_commit=False) as s:
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise


def is_transient(e: BaseException) -> bool:
    """True for a database error worth retrying as a whole transaction: the connection was lost or refused
    (PostgreSQL restarting, a network blip) or SQLite was busy. Constraint violations and bad SQL are not."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(e, DBAPIError) and e.connection_invalidated:
        return True
    return isinstance(e, (OperationalError, InterfaceError))


def retry_transient(fn: Callable[[], T], *, what: str = "transaction", waits: Sequence[float] = RETRY_WAITS_S) -> T:
    """`fn()` (one whole transaction, e.g. a `with session_scope(...)` block), tried again after each wait in
    `waits` (seconds) while it fails with a transient error (is_transient). Returns fn's value; raises its
    last error. fn must be safe to run again after a rollback."""
    for wait in (*waits, None):
        try:
            return fn()
        except Exception as e:
            if wait is None or not is_transient(e):
                raise
            log.warning("%s failed (%s); retrying in %.1f s", what, str(e).splitlines()[0][:200], wait)
            time.sleep(wait)
    raise AssertionError("unreachable")
