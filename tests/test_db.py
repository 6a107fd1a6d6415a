"""The tables on SQLite and on PostgreSQL: round trips of JSON fields, timestamps, constraints, WAL."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from db.models import BudgetLedger, CommandLog, Event, Experiment, Hint, Host, Run
from db.session import create_tables, make_engine, session_scope


def _run(name="main"):
    return Run(name=name, branch=f"ratchet/{name}", workspace="/w", baseline_commit="a" * 40,
               head_commit="a" * 40, budget_s=60.0)


def test_tables_round_trip(db_url):
    eng = make_engine(db_url)
    create_tables(eng)
    create_tables(eng)  # idempotent
    with session_scope(eng) as db:
        run = _run()
        db.add(run)
        db.flush()
        exp = Experiment(run_id=run.id, status="keep", val_bpb=1.2345, decision={"verdict": "keep", "delta": -0.01},
                         usage={"input_tokens": 10}, diff="--- a/train.py\n+++ b/train.py\n")
        db.add(exp)
        db.flush()
        db.add(Event(run_id=run.id, experiment_id=exp.id, kind="kept", text="kept #1", payload={"val_bpb": 1.2345}))
        db.add(CommandLog(user="U1", backend="shell", text="pause", command="pause", result="ok"))
        db.add(BudgetLedger(day="2026-11-21", run_id=run.id, experiment_id=exp.id, kind="gpu_seconds", amount=61.5))
        db.add(Host(name="local"))
        db.add(Hint(run_id=run.id, author="U1", text="try a longer warmup"))
    with Session(eng) as db:
        exp = db.exec(select(Experiment)).one()
        assert exp.decision == {"verdict": "keep", "delta": -0.01} and exp.usage["input_tokens"] == 10
        ev = db.exec(select(Event)).one()
        assert ev.payload["val_bpb"] == 1.2345 and ev.delivered_at is None and ev.created_at is not None
        assert db.exec(select(BudgetLedger)).one().amount == 61.5
        assert db.exec(select(Hint)).one().closed_at is None


def test_run_names_are_unique_and_failed_transactions_roll_back(db_url):
    eng = make_engine(db_url)
    create_tables(eng)
    with session_scope(eng) as db:
        db.add(_run())
    with pytest.raises(IntegrityError):
        with session_scope(eng) as db:
            db.add(Event(kind="paused", text="paused by x"))
            db.add(_run())
    with Session(eng) as db:
        assert db.exec(select(Event)).all() == []  # the event went with the failed transaction


def test_sqlite_uses_wal(tmp_path):
    eng = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    with eng.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_rows_inserted_with_core_statements_get_the_models_defaults(db_url):
    # The engine stores a fleet's new proposals with one INSERT (column_values) instead of ORM objects: the rows
    # must read back as the ORM would have stored them, ids in the order given, on SQLite and PostgreSQL.
    from sqlalchemy import insert

    from db.models import column_values

    eng = make_engine(db_url)
    create_tables(eng)
    table = Experiment.__table__
    with session_scope(eng) as db:
        run = _run()
        db.add(run)
        db.flush()
        orm = Experiment(run_id=run.id, description="by the ORM")
        db.add(orm)
        values = [column_values(Experiment, run_id=run.id, description=f"core {i}") for i in range(3)]
        assert values[0]["usage"] is not values[1]["usage"]  # a fresh default per row, never a shared one
        ids = db.execute(insert(table).returning(table.c.id, sort_by_parameter_order=True), values).scalars().all()
    with Session(eng) as db:
        rows = {e.id: e for e in db.exec(select(Experiment)).all()}
    assert [rows[i].description for i in ids] == ["core 0", "core 1", "core 2"]
    skip = {"id", "description", "created_at"}
    as_orm = {c.name: getattr(rows[orm.id], c.name) for c in table.c if c.name not in skip}
    for i in ids:
        assert {c.name: getattr(rows[i], c.name) for c in table.c if c.name not in skip} == as_orm
        assert rows[i].created_at is not None
    with pytest.raises(KeyError, match="no column 'nonsense'"):
        column_values(Experiment, nonsense=1)


def test_queued_rows_are_written_in_order_before_the_flush_and_dropped_by_a_rollback(db_url):
    # The engine queues a result's outbox event and ledger row (add_row) instead of building ORM objects: they
    # must land in the transaction, in the order queued, visible to the transaction's own queries (autoflush),
    # and vanish with a rollback, or a crash could post an event for a result that was never recorded.
    from db.session import add_row

    eng = make_engine(db_url)
    create_tables(eng)
    with session_scope(eng) as db:
        run = _run()
        db.add(run)
        db.flush()
        run_id = run.id
        for i in range(3):
            add_row(db, Event, run_id=run_id, kind="discarded", text=f"discarded #{i}", payload={"i": i})
            add_row(db, BudgetLedger, day="2026-11-22", run_id=run_id, kind="gpu_seconds", amount=float(i))
        run.head_val_bpb = 1.0  # an ORM change: the query below autoflushes, queued rows first
        db.add(run)
        seen = db.exec(select(Event.text).order_by(Event.id)).all()
        assert seen == ["discarded #0", "discarded #1", "discarded #2"]
        add_row(db, Event, run_id=run_id, kind="kept", text="kept #3")  # no ORM change after it: written at commit
    with Session(eng) as db:
        evs = db.exec(select(Event).order_by(Event.id)).all()
        assert [(e.text, e.payload, e.delivered_at) for e in evs] == [
            ("discarded #0", {"i": 0}, None), ("discarded #1", {"i": 1}, None), ("discarded #2", {"i": 2}, None),
            ("kept #3", {}, None)]
        assert all(e.created_at is not None for e in evs)
        assert sorted(b.amount for b in db.exec(select(BudgetLedger)).all()) == [0.0, 1.0, 2.0]
    with pytest.raises(RuntimeError):
        with session_scope(eng) as db:
            add_row(db, Event, run_id=run_id, kind="kept", text="never recorded")
            r = db.get(Run, run_id)
            r.head_val_bpb = 2.0
            db.add(r)
            db.flush()  # written inside the transaction...
            assert "never recorded" in db.exec(select(Event.text)).all()
            raise RuntimeError("crash before the commit")
    with Session(eng) as db:
        assert "never recorded" not in db.exec(select(Event.text)).all()
    with pytest.raises(KeyError, match="no column 'nonsense'"):
        add_row(Session(eng), Event, nonsense=1)
