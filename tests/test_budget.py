"""Budgets: command units, spend by budget day in the configured timezone, caps pause the run, the
day's rollover resumes it."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlmodel import Session, select

from db.models import BudgetLedger, Event, Run
from db.session import create_tables, make_engine, session_scope
from loop import budget
from loop.config import Settings
from tests.test_engine import make_engine_for, rows, tick_until


@pytest.mark.parametrize("text, want", [
    ("gpu 24h/day", ("gpu", "day", 86400.0)),
    ("gpu 500h total", ("gpu", "total", 1_800_000.0)),
    ("gpu 90m/day", ("gpu", "day", 5400.0)),
    ("claude $40/day", ("claude", "day", 40.0)),
    ("claude 300usd total", ("claude", "total", 300.0)),
    ("GPU none/day", ("gpu", "day", None)),
])
def test_budget_commands_parse(text, want):
    assert budget.parse_budget(text) == want


@pytest.mark.parametrize("text, msg", [
    ("gpu $40/day", "GPU budget is in hours"),
    ("gpu 24/day", "GPU budget is in hours"),
    ("claude 24h/day", "Claude budget is in US dollars"),
    ("tpu 5h/day", "budget takes"),
    ("gpu 5h weekly", "budget takes"),
    ("gpu lots/day", "cannot read the amount"),
])
def test_budget_values_in_wrong_units_are_refused(text, msg):
    with pytest.raises(budget.BudgetError, match=msg):
        budget.parse_budget(text)


def test_budget_day_follows_the_configured_timezone():
    late = datetime(2026, 11, 21, 23, 30, tzinfo=timezone.utc)
    assert budget.budget_day(late, "UTC") == "2026-11-21"
    assert budget.budget_day(late, "Europe/Berlin") == "2026-11-22"
    assert budget.budget_day(late, "America/Los_Angeles") == "2026-11-21"


CAPS = Settings(budget_gpu_hours_per_day=1.0, budget_claude_usd_total=10.0)
NOW = datetime(2026, 11, 21, 12, tzinfo=timezone.utc)


def runs_db(db_url, *names):
    """A new database holding runs of these names: (engine, their ids)."""
    eng = make_engine(db_url)
    create_tables(eng)
    with session_scope(eng) as db:
        runs = [Run(name=n, branch=f"ratchet/{n}", workspace="/w", baseline_commit="a", head_commit="a", budget_s=60)
                for n in names]
        for run in runs:
            db.add(run)
        db.flush()
        return eng, [run.id for run in runs]


def test_caps_from_config_and_commands(db_url):
    eng, (run_id,) = runs_db(db_url, "main")
    settings, now = CAPS, NOW
    with session_scope(eng) as db:
        db.add(BudgetLedger(day="2026-11-21", run_id=run_id, kind="gpu_seconds", amount=3000))
        db.add(BudgetLedger(day="2026-11-20", run_id=run_id, kind="gpu_seconds", amount=5000))
        db.add(BudgetLedger(day="2026-11-21", run_id=run_id, kind="claude_usd", amount=4.5))
    with Session(eng) as db:
        c = {cap.name: cap for cap in budget.caps(db, run_id, settings, now)}
        assert c["gpu/day"].used == 3000 and c["gpu/day"].limit == 3600 and not c["gpu/day"].reached
        assert c["gpu/total"].used == 8000 and c["gpu/total"].limit is None
        assert c["claude/total"].left == 5.5
        assert budget.reached(db, run_id, settings, now=now) is None
    with session_scope(eng) as db:
        budget.set_limit(db, run_id, "gpu", "day", 2400.0, "op")  # a command overrides the config
    with Session(eng) as db:
        cap = budget.reached(db, run_id, settings, now=now)
        assert cap.name == "gpu/day" and budget.pause_reason(cap) == "budget: gpu/day (0.83 h used of 0.67 h)"


def test_caps_sum_the_run_s_ledger_by_kind_and_day(db_url):
    """Spend is summed from the run's ledger rows (another run's are not its), today's and in total."""
    eng, (run_id, other_id) = runs_db(db_url, "main", "other")
    settings, now = CAPS, NOW
    rows = [("2026-11-20", "gpu_seconds", 5000.0), ("2026-11-21", "gpu_seconds", 1000.0),
            ("2026-11-21", "claude_usd", 4.5), ("2026-11-21", "gpu_seconds", 2000.0),
            ("2026-11-21", "gpu_seconds", 700.0), ("2026-11-21", "claude_usd", 6.0)]
    with session_scope(eng) as db:
        for day, kind, amount in rows:
            db.add(BudgetLedger(day=day, run_id=run_id, kind=kind, amount=amount))
        db.add(BudgetLedger(day="2026-11-21", run_id=other_id, kind="gpu_seconds", amount=99999.0))
    with Session(eng) as db:
        c = {cap.name: cap for cap in budget.caps(db, run_id, settings, now)}
        assert (c["gpu/day"].used, c["gpu/total"].used, c["claude/total"].used) == (3700.0, 8700.0, 10.5)
        assert budget.reached(db, run_id, settings, now=now).name == "gpu/day"


def test_a_cap_pauses_the_run_and_the_rollover_resumes_it(tmp_path, data_dir, tiny_workspace):
    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace)
    eng.settings.budget_gpu_hours_per_day = 2.0 / 3600  # two GPU-seconds a day: the first run exceeds it
    tick_until(eng, lambda: eng.get_run().state == "paused")
    run = rows(db, Run)[0]
    assert run.pause_reason.startswith("budget: gpu/day")
    assert len(rows(db)) == 1  # the running experiment finished; nothing more started
    assert any(ev.kind == "paused" and ev.payload.get("budget") == "gpu/day" for ev in rows(db, Event))
    assert eng.rollover() is False  # same day: still over the cap
    with session_scope(db) as s:  # the clock passes midnight: today's spend is yesterday's
        for row in s.exec(select(BudgetLedger)).all():
            row.day = "2000-01-01"
            s.add(row)
    assert eng.rollover() is True and eng.get_run().state == "running"
    assert rows(db, Event)[-1].kind == "resumed"
    # a pause by a person is not lifted by the rollover
    from loop.control import Control

    Control(db, "main", eng).pause("alice", reason="investigating")
    assert eng.rollover() is False and eng.get_run().state == "paused"
