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
