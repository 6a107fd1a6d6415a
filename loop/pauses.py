"""The loop's own pauses and resumes: a budget cap reached, the budget day's rollover, and any reason the engine
or the keep policy gives (a failed baseline, a full disk, a rejected API key). A person's pause and resume are
loop/control.py's."""

from __future__ import annotations

from sqlmodel import Session

from db.models import Run, utcnow
from loop import budget, events


def pause(db: Session, run_id: int, reason: str, by: str = "ratchet", **payload) -> bool:
    """Pause the run in the open transaction `db` (nothing new starts), with a `paused` event carrying `payload`.
    Returns False when it was paused already (nothing written)."""
    run = db.get(Run, run_id)
    if run.state == "paused":
        return False
    run.state, run.pause_reason, run.pause_now, run.updated_at = "paused", reason, False, utcnow()
    db.add(run)
    db.add(events.run_event(run, "paused", f"paused by {by}: {reason}", by=by, reason=reason, **payload))
    return True


def pause_if_over_budget(db: Session, run_id: int, settings) -> bool:
    """Pause the run when a GPU or Claude cap is reached (reason `budget: <which> …`, loop/budget.py); True if a
    cap is reached."""
    cap = budget.reached(db, run_id, settings)
    if cap is None:
        return False
    pause(db, run_id, budget.pause_reason(cap), budget=cap.name)
    return True


def resume_at_rollover(db: Session, run_id: int, settings) -> bool:
    """At the budget day's rollover: resume a run that only a daily budget had paused, if no cap is reached now
    (a `resumed` event). Returns True when the run was resumed."""
    run = db.get(Run, run_id)
    if run.state != "paused" or not run.pause_reason.startswith("budget:"):
        return False
    if budget.reached(db, run.id, settings) is not None:
        return False
    was = run.pause_reason
    run.state, run.pause_reason, run.pause_now, run.updated_at = "running", "", False, utcnow()
    db.add(run)
    db.add(events.run_event(run, "resumed", f"resumed by ratchet: new budget day (was: {was})",
                            by="ratchet", reason="budget rollover"))
    return True
