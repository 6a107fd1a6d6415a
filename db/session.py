"""Database engine and sessions: SQLite (WAL) by default, PostgreSQL when RATCHET_DATABASE_URL says so.

Knows nothing of runs or experiments beyond creating the tables (migrations: db/migrate.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine

from db import models  # noqa: F401 - registers the tables on SQLModel.metadata


def sqlite_url(path: Path) -> str:
    """`sqlite:///` URL for a file path."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


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
