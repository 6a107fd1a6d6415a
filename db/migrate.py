"""Schema migrations (Alembic, configured here in code: no alembic.ini): upgrade, check, adopt, new revisions.

Migrates and inspects the schema only; never reads or writes rows of the tables it migrates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSIONS = MIGRATIONS / "versions"
# Tables in our database that are not ours to migrate: APScheduler's job store (loop/scheduler.py) and
# Alembic's own bookkeeping.
IGNORED_TABLES = frozenset({"apscheduler_jobs", "alembic_version"})
UPGRADE_HINT = "run `ratchet db upgrade`"


class SchemaError(RuntimeError):
    """The database schema is not the one this version needs; the message names the command that fixes it."""


@dataclass
class SchemaState:
    """Where a database stands. `current`: its revision (None when unversioned); `head`: this version's;
    `tables`: our tables present (Alembic's and APScheduler's not counted)."""

    current: Optional[str]
    head: Optional[str]
    tables: list[str]

    @property
    def empty(self) -> bool:
        """No revision and none of our tables: a brand-new database."""
        return self.current is None and not self.tables

    @property
    def at_head(self) -> bool:
        return self.current == self.head


# ---- configuration ----


def alembic_config(connection: Optional[Connection] = None, url: Optional[str] = None) -> Config:
    """An Alembic Config for db/migrations, built in code. Migrations run on `connection` when given
    (how the functions below call it), else on a new engine for `url` (the `alembic` CLI's way)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    cfg.set_main_option("truncate_slug_length", "40")
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def script_directory() -> ScriptDirectory:
    """The revisions shipped with this version."""
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> Optional[str]:
    """This version's head revision id (e.g. "0002"); None before the first revision. Raises RuntimeError
    when the revisions branch (two heads)."""
    heads = script_directory().get_heads()
    if not heads:
        return None
    if len(heads) != 1:
        raise RuntimeError(f"db/migrations has {len(heads)} heads {heads}: merge them (alembic merge)")
    return heads[0]


def revisions() -> list[str]:
    """Every revision id, oldest first."""
    return [r.revision for r in reversed(list(script_directory().walk_revisions()))]


def describe(rev: Optional[str]) -> str:
    """A revision for people: `0002 (promotions)`; `none` for an unversioned database."""
    if rev is None:
        return "none"
    try:
        sc = script_directory().get_revision(rev)
    except Exception:  # a revision from a newer version of ratchet
        return f"{rev} (unknown to this version)"
    doc = (sc.doc or "").strip().splitlines()[0].split(":")[0].strip() if sc and sc.doc else ""
    return f"{rev} ({doc})" if doc else rev


# ---- state ----


def _our_tables(conn: Connection) -> list[str]:
    return sorted(t for t in inspect(conn).get_table_names() if t not in IGNORED_TABLES)


def schema_state(engine: Engine) -> SchemaState:
    """Connect and read the database's revision and tables. Raises sqlalchemy errors when it cannot connect."""
    head = head_revision()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        return SchemaState(current, head, _our_tables(conn))


def current_revision(engine: Engine) -> Optional[str]:
    """The database's revision id, None when it has none."""
    return schema_state(engine).current


def check_schema(engine: Engine) -> SchemaState:
    """Raise SchemaError unless the database is at this version's head; the message says what to run."""
    st = schema_state(engine)
    if st.at_head:
        return st
    if st.current is None:
        if not st.tables:
            raise SchemaError(f"database is empty, this version needs {describe(st.head)}: {UPGRADE_HINT}")
        raise SchemaError(f"database has tables but no schema version (made before migrations), this version "
                          f"needs {describe(st.head)}: {UPGRADE_HINT}")
    if st.current not in revisions():
        raise SchemaError(f"database schema is at {st.current}, which this version of ratchet does not know (it "
                          f"needs {describe(st.head)}): the database was upgraded by a newer ratchet; run that "
                          f"version, or `ratchet db downgrade {st.head}` with it")
    raise SchemaError(f"database schema is at {describe(st.current)}, this version needs {describe(st.head)}: "
                      f"{UPGRADE_HINT}")


def ensure_schema(engine: Engine) -> SchemaState:
    """Start-up check: a brand-new empty database is upgraded to head at once; any other database must be at
    head already. Returns the state. Raises SchemaError (what to run) and sqlalchemy errors (cannot connect)."""
    st = schema_state(engine)
    if st.empty:
        upgrade(engine)
        return schema_state(engine)
    return check_schema(engine)


# ---- changing the schema ----


def _run(engine: Engine, fn, *args, **kw) -> None:
    """Run an alembic command on one connection of `engine`. SQLite: foreign keys off meanwhile, so a batch
    migration may rebuild a table that others reference (https://alembic.sqlalchemy.org/en/latest/batch.html)."""
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        try:
            fn(alembic_config(conn), *args, **kw)
            conn.commit()
        finally:
            if sqlite:
                conn.rollback()
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def upgrade(engine: Engine, revision: str = "head") -> Optional[str]:
    """Upgrade to `revision` (default head) and return the revision reached. An unversioned database whose
    tables were made before migrations is first stamped with the revision it matches (see adopt_revision).
    Raises SchemaError when such a database matches no revision."""
    st = schema_state(engine)
    if st.current is None and st.tables:
        stamp(engine, adopt_revision(engine))
    _run(engine, command.upgrade, revision)
    return current_revision(engine)


def downgrade(engine: Engine, revision: str) -> Optional[str]:
    """Downgrade to `revision` ("base" drops every table of ours; "-1" one step) and return where it is."""
    _run(engine, command.downgrade, revision)
    return current_revision(engine)


def stamp(engine: Engine, revision: str) -> None:
    """Record `revision` as the database's without running anything (for adopting an existing schema)."""
    _run(engine, command.stamp, revision)


def _columns(conn: Connection) -> dict[str, frozenset[str]]:
    insp = inspect(conn)
    return {t: frozenset(c["name"] for c in insp.get_columns(t)) for t in _our_tables(conn)}


def adopt_revision(engine: Engine) -> str:
    """The revision whose tables and columns the (unversioned) database has exactly, found by migrating a
    scratch in-memory SQLite step by step and comparing table and column names (dialect-independent).
    Raises SchemaError naming the closest revision's differences when none matches."""
    with engine.connect() as conn:
        have = _columns(conn)
    scratch = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    best: tuple[int, str, str] = (10 ** 9, "", "")
    try:
        for rev in revisions():
            upgrade_plain(scratch, rev)
            with scratch.connect() as conn:
                want = _columns(conn)
            if want == have:
                return rev
            missing = sorted(f"{t}.{c}" for t in want for c in want[t] - have.get(t, frozenset()))
            extra = sorted(f"{t}.{c}" for t in have for c in have[t] - want.get(t, frozenset()))
            missing += sorted(t for t in want if t not in have)
            score = len(missing) + len(extra)
            if score < best[0]:
                best = (score, rev, f"missing {missing[:5] or 'nothing'}, unexpected {extra[:5] or 'nothing'}")
    finally:
        scratch.dispose()
    raise SchemaError(f"the database has tables but no schema version, and they match no revision (closest "
                      f"{best[1]}: {best[2]}); fix them by hand, then `ratchet db stamp REVISION`")


def upgrade_plain(engine: Engine, revision: str = "head") -> None:
    """Upgrade without adopting (the database must be versioned or empty)."""
    _run(engine, command.upgrade, revision)


def schema_diff(engine: Engine) -> list:
    """Alembic's compare_metadata between the database and db/models.py (our tables only): [] when they
    agree. Each item is an autogenerate diff tuple, e.g. ("add_column", None, "runs", Column(...))."""
    from alembic.autogenerate import compare_metadata
    from sqlmodel import SQLModel

    from db import models  # noqa: F401 - registers the tables

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"include_name": include_name, "compare_type": True})
        return compare_metadata(ctx, SQLModel.metadata)


def include_name(name: Optional[str], type_: str, parent_names: dict) -> bool:
    """Autogenerate filter: leave APScheduler's job table (and Alembic's) alone."""
    return not (type_ == "table" and name in IGNORED_TABLES)


# ---- new revisions (for developers) ----


def next_revision_id() -> str:
    """The next four-digit revision id: one more than the highest numeric id so far ("0003" after "0002")."""
    nums = [int(r) for r in revisions() if re.fullmatch(r"\d+", r)]
    return f"{max(nums, default=0) + 1:04d}"


def new_revision(message: str, *, autogenerate: bool = True, url: Optional[str] = None) -> Path:
    """Write db/migrations/versions/<id>_<slug>.py. With `autogenerate` the operations are what changes a
    database at head into db/models.py: compared against `url` (a database already at head) or, by default,
    a scratch SQLite upgraded to head. Review the file before committing it. Returns its path."""
    import tempfile

    from db.session import make_engine

    rev_id = next_revision_id()
    if not autogenerate:
        script = command.revision(alembic_config(), message=message, rev_id=rev_id)
        return Path(script.path)
    with tempfile.TemporaryDirectory(prefix="ratchet-rev-") as tmp:
        eng = make_engine(url or f"sqlite:///{Path(tmp) / 'head.db'}")
        try:
            if url is None:
                upgrade_plain(eng)
            st = schema_state(eng)
            if not st.at_head:
                raise SchemaError(f"{url} is at {describe(st.current)}, not at head {describe(st.head)}: "
                                  f"{UPGRADE_HINT} first")
            with eng.connect() as conn:
                script = command.revision(alembic_config(conn), message=message, autogenerate=True, rev_id=rev_id)
        finally:
            eng.dispose()
    return Path(script.path)


# ---- start-up ----


def safe_url(url: str) -> str:
    """The URL with its password masked (for messages and logs)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: show only its scheme
        return url.split(":", 1)[0] + ":…"


def open_database(url: str) -> Engine:
    """The engine for `url`, its schema checked as a command needs it: a brand-new empty database is upgraded
    to head; any other must be at head. Raises SchemaError with what to run (an out-of-date schema, a database
    that cannot be reached or a malformed URL; the password never appears)."""
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from db.session import make_engine

    try:
        engine = make_engine(url)
    except ArgumentError as e:
        raise SchemaError(f"database URL {safe_url(url)} is malformed ({e.__class__.__name__}): fix "
                          f"RATCHET_DATABASE_URL / database_url") from None
    try:
        ensure_schema(engine)
    except SchemaError:
        engine.dispose()
        raise
    except SQLAlchemyError as e:
        engine.dispose()
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:200]
        raise SchemaError(f"cannot open the database {safe_url(url)}: {reason}; check RATCHET_DATABASE_URL / "
                          f"database_url (`ratchet doctor` checks it)") from None
    return engine
