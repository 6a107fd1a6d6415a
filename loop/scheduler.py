"""The scheduler (APScheduler 3): the daily digest, the budget-day rollover and an engine safety tick.

Jobs have fixed ids and live in the database (SQLAlchemyJobStore), so a restart neither skips nor
doubles a digest: a digest time missed while the service was down fires once when it is back (coalesce,
misfire grace), and the digest job itself refuses a second digest for the same day.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Optional

from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlmodel import select

from db.models import Event, Run, utcnow
from db.session import session_scope
from loop import budget, events

log = logging.getLogger("ratchet.scheduler")

MISFIRE_GRACE_S = 23 * 3600  # a digest missed while down is still posted (once) within the day
JOBS_TABLE = "apscheduler_jobs"

# The live objects of this process, looked up by the persisted jobs (which can only store a function's
# import path and plain arguments).
_DB = {}
_ENGINES = {}


DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _dow_field(field: str) -> str:
    """Standard crontab day-of-week (0 or 7 = Sunday) → APScheduler's names: APScheduler 3 counts 0 as
    Monday, so `1-5` would silently mean Tuesday to Saturday. Ranges become explicit lists."""
    out = []
    for part in field.split(","):
        base, _, step = part.partition("/")
        if "-" in base and base.replace("-", "").isdigit():
            a, b = (int(x) for x in base.split("-"))
            days = list(range(a, b + 1))[::int(step) if step else 1]
            out += [DOW_NAMES[d] for d in days]
        elif base.isdigit():
            out.append(DOW_NAMES[int(base)])
        else:
            out.append(part)  # *, */2, names: already unambiguous
    return ",".join(dict.fromkeys(out))


def crontab_trigger(expr: str, tz: str) -> CronTrigger:
    """A standard 5-field crontab (minute hour day month day-of-week, 0 = Sunday) in timezone `tz`.

    Raises ValueError for a malformed expression.
    """
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"a crontab has 5 fields (minute hour day month day-of-week), got {len(fields)}")
    minute, hour, day, month, dow = fields
    return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=_dow_field(dow), timezone=tz)


def digest_trigger(settings) -> CronTrigger:
    """The digest's cron (settings.digest_cron, default 09:00) in the configured timezone."""
    return crontab_trigger(settings.digest_cron, settings.timezone)


def rollover_trigger(settings) -> CronTrigger:
    """Local midnight in the configured timezone: a new budget day."""
    return CronTrigger(hour=0, minute=0, second=5, timezone=settings.timezone)


def request_digest(db_engine, run_name: str, tz: str, *, by: str = "schedule",
                   now: Optional[datetime] = None) -> Optional[int]:
    """Write a `digest` event for the 24 h before `now`; the chat backend renders and posts it.

    A scheduled digest is written at most once per budget day (returns None when it already was);
    one asked for by a person always is. Returns the event id.
    """
    now = now or utcnow()
    day = budget.budget_day(now, tz)
    with session_scope(db_engine) as db:
        run = db.exec(select(Run).where(Run.name == run_name)).first()
        if run is None:
            return None
        if by == "schedule":
            done = db.exec(select(Event.payload).where(Event.run_id == run.id, Event.kind == "digest")).all()
            if any(p.get("day") == day and p.get("by") == "schedule" for p in done):
                log.info("digest for %s already written; skipping", day)
                return None
        ev = events.run_event(run, "digest", f"digest for {day}", day=day, by=by, until=now.isoformat())
        db.add(ev)
        db.flush()
        return ev.id


def digest_job(run_name: str, tz: str) -> None:
    """Scheduled: request the day's digest (import path stored in the job table)."""
    db = _DB.get("default")
    if db is None:
        log.warning("digest job fired with no database registered")
        return
    request_digest(db, run_name, tz)
    engine = _ENGINES.get(run_name)
    if engine is not None:
        engine.on_change()


def rollover_job(run_name: str) -> None:
    """Scheduled at local midnight: resume a run paused only by a daily budget."""
    engine = _ENGINES.get(run_name)
    if engine is not None:
        engine.rollover()


def health_job(run_name: str) -> None:
    """Periodic host health checks (connect, GPUs, free disk) through the runner."""
    engine = _ENGINES.get(run_name)
    if engine is not None:
        try:
            engine.check_health()
        except Exception:  # noqa: BLE001 - logged; the next check tries again
            log.exception("host health check failed")


def tick_job(run_name: str) -> None:
    """A safety net beside the engine's own loop: wake it."""
    engine = _ENGINES.get(run_name)
    if engine is not None:
        engine.wake()


def make_scheduler(settings, db_engine, engine=None, *, run_name: Optional[str] = None) -> BackgroundScheduler:
    """A started scheduler with the digest and rollover jobs (persisted) and the engine tick (in memory).

    A stored job whose trigger still matches the configuration is kept as it is, so its missed run
    (the service was down at digest time) fires once on start; a changed cron replaces it.
    """
    run_name = run_name or settings.run
    _DB["default"] = db_engine
    if engine is not None:
        _ENGINES[run_name] = engine
    sched = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(engine=db_engine, tablename=JOBS_TABLE), "memory": MemoryJobStore()},
        job_defaults={"coalesce": True, "misfire_grace_time": MISFIRE_GRACE_S, "max_instances": 1},
        timezone=settings.timezone)
    sched.start(paused=True)
    wanted = {
        f"digest:{run_name}": (digest_job, digest_trigger(settings), [run_name, settings.timezone]),
        f"budget-rollover:{run_name}": (rollover_job, rollover_trigger(settings), [run_name]),
    }
    for job_id, (func, trigger, args) in wanted.items():
        job = sched.get_job(job_id)
        if job is not None and str(job.trigger) == str(trigger) and list(job.args) == args:
            continue  # keep its stored next run time: a missed run fires on resume
        sched.add_job(func, trigger, args=args, id=job_id, replace_existing=True)
    if engine is not None:
        sched.add_job(tick_job, "interval", seconds=30, args=[run_name], id=f"engine-tick:{run_name}",
                      jobstore="memory", replace_existing=True)
        sched.add_job(health_job, "interval", seconds=settings.health_interval_s, args=[run_name],
                      id=f"host-health:{run_name}", jobstore="memory", replace_existing=True)
    sched.resume()
    return sched


def next_digest(settings, now: Optional[datetime] = None) -> datetime:
    """When the next digest fires after `now` (aware)."""
    now = now or utcnow()
    return digest_trigger(settings).get_next_fire_time(None, now)
