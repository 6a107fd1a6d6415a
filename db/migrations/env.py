"""Alembic environment: migrates db/models.py's tables on the connection db/migrate.py hands over.

Never touches APScheduler's job table; batch mode so SQLite can alter tables.
"""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

from db import models  # noqa: F401 - registers the tables on SQLModel.metadata
from db.migrate import include_name

config = context.config
target_metadata = SQLModel.metadata


def render_item(type_, obj, autogen_context):
    """Revisions must not import the app or SQLModel: its AutoString is written as sa.String(), its
    UTCDateTime (aware datetimes, returned in UTC) as the column type it stores, sa.DateTime(timezone=True)."""
    if type_ == "type" and isinstance(obj, AutoString):
        return "sa.String()" if obj.impl.length is None else f"sa.String(length={obj.impl.length})"
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kw) -> None:
    context.configure(target_metadata=target_metadata, include_name=include_name, render_item=render_item,
                      compare_type=True, render_as_batch=True, **kw)


def run_offline() -> None:
    """`--sql`: print the SQL instead of running it."""
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True,
               dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    from db.session import make_engine

    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as conn:
            _configure(connection=conn)
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
