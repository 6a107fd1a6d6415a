"""The control API: the one door every front end (shell, Slack, CLI) uses to read and steer a run.

State lives in the database, so a restart comes back in the same state. Front ends never write tables.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Optional

from sqlmodel import Session, func, select

from db.models import CommandLog, Event, Experiment, Hint, Host, Promotion, Run, utcnow
from db.session import session_scope
from loop import budget, decision, events, faults, promotion
from loop.config import Settings
from loop.digest import build_digest
from loop.workspace import Workspace, WorkspaceError

log = logging.getLogger("ratchet.control")

MAX_HINT_CHARS = 2000
MAX_ID = 2**31 - 1  # ids are 32-bit integers on PostgreSQL: a larger number names no row


def _text(s: str) -> str:
    """Text as every database stores it: NUL (which PostgreSQL refuses in text and JSON) shown as U+FFFD."""
    return s.replace("\x00", "\ufffd")


def _get(db: Session, model, ident: int):
    """db.get(model, ident), or None for an id no table can hold (< 1 or beyond MAX_ID) instead of a database
    error (SQLite overflows at 64 bits, PostgreSQL at 32)."""
    return db.get(model, ident) if 1 <= ident <= MAX_ID else None


class ControlError(ValueError):
    """A request that cannot be done as asked (unknown experiment, bad value); the message says why."""


@dataclass
class Status:
    """A run at a glance. val_bpb in bits per byte, seconds for times."""

    run: str
    state: str
    pause_reason: str
    baseline_val_bpb: Optional[float]
    head_val_bpb: Optional[float]
    head_commit: str
    noise_sigma: Optional[float]
    budget_s: float
    counts: dict  # experiment status → count (baseline repeats excluded)
    baseline_runs: int  # finished baseline repeats
    running: list = field(default_factory=list)  # engine.Running rows when the engine is in this process
    open_hints: int = 0
    promotions: list = field(default_factory=list)  # queued and running promotions
    proposals_in_flight: Optional[tuple[int, int]] = None  # (Claude requests in flight, limit now); engine only

    @property
    def improvement_pct(self) -> Optional[float]:
        """% lower val_bpb than the baseline (positive is better)."""
        if self.baseline_val_bpb and self.head_val_bpb is not None:
            return 100.0 * (self.baseline_val_bpb - self.head_val_bpb) / self.baseline_val_bpb
        return None


class Control:
    """Read and steer one run. With `engine` (same process) commands take its lock and wake it, so
    `pause` is in force before the next experiment can start; without, the engine sees the database
    change at its next tick."""

    def __init__(self, db, run_name: str, engine=None, workspace=None):
        self.db = db
        self.run_name = run_name
        self.engine = engine
        # the research repo whose branch `revert` moves; default: the engine's, else the run's recorded path
        self.workspace = workspace if workspace is not None else engine.workspace if engine is not None else None

    # ---- helpers ----

    def _run(self, db: Session) -> Run:
        run = db.exec(select(Run).where(Run.name == self.run_name)).first()
        if run is None:
            raise ControlError(f"no run named {self.run_name!r} yet; start one with `ratchet serve`")
        return run

    def _locked(self):
        return self.engine.lock if self.engine is not None else contextlib.nullcontext()

    def _wake(self) -> None:
        if self.engine is not None:
            self.engine.wake()
            self.engine.on_change()

    # ---- reads ----

    def status(self) -> Status:
        """The run's state, head, noise floor, experiment counts and what is training now."""
        with Session(self.db) as db:
            run = self._run(db)
            rows = db.exec(select(Experiment.kind, Experiment.status, func.count()).where(Experiment.run_id == run.id)
                           .group_by(Experiment.kind, Experiment.status)).all()
            counts = {st: n for kind, st, n in rows if kind == "experiment"}
            baseline_runs = sum(n for kind, st, n in rows if kind == "baseline" and st == "keep")
            hints = db.exec(select(func.count()).select_from(Hint).where(Hint.run_id == run.id,
                                                                          Hint.closed_at.is_(None))).one()
            base = None
            if run.noise_sigma is not None:
                vals = db.exec(select(Experiment.val_bpb).where(Experiment.run_id == run.id,
                                                                Experiment.kind == "baseline",
                                                                Experiment.status == "keep")).all()
                base = sum(vals) / len(vals) if vals else None
            st = Status(run=run.name, state=run.state, pause_reason=run.pause_reason, baseline_val_bpb=base,
                        head_val_bpb=run.head_val_bpb, head_commit=run.head_commit, noise_sigma=run.noise_sigma,
                        budget_s=run.budget_s, counts=counts, baseline_runs=baseline_runs, open_hints=hints)
        if self.engine is not None:
            st.running = self.engine.running()
            if not self.engine.proposer.fast:
                st.proposals_in_flight = (self.engine.proposals.in_flight(), self.engine.proposals.limit())
        st.promotions = self.promotions(active_only=True)
        return st

    def history(self, n: int = 10) -> list[Experiment]:
        """The last n experiments of the run, newest first (baseline repeats included)."""
        if not 1 <= n <= 1000:
            raise ControlError("history takes a count between 1 and 1000")
        with Session(self.db) as db:
            run = self._run(db)
            return list(db.exec(select(Experiment).where(Experiment.run_id == run.id)
                                .order_by(Experiment.id.desc()).limit(n)).all())

    def show(self, exp_id: int) -> Experiment:
        """One experiment of this run. Raises ControlError for an unknown id."""
        with Session(self.db) as db:
            run = self._run(db)
            exp = _get(db, Experiment, exp_id)
            if exp is None or exp.run_id != run.id:
                raise ControlError(f"no experiment #{exp_id} in run {run.name!r}")
            return exp

    def events_after(self, after_id: int, limit: int = 100) -> list[Event]:
        """Outbox events with id > after_id, oldest first (for front ends that print them)."""
        with Session(self.db) as db:
            return list(db.exec(select(Event).where(Event.id > after_id).order_by(Event.id).limit(limit)).all())

    def pending_events(self, backend: str, limit: int = 100) -> list[Event]:
        """Events not yet delivered, oldest first. One chat backend is active per service."""
        with Session(self.db) as db:
            return list(db.exec(select(Event).where(Event.delivered_at.is_(None)).order_by(Event.id)
                                .limit(limit)).all())

    def mark_delivered(self, event_id: int, backend: str, ref: str = "") -> None:
        """Record that an event reached the chat (with its message reference, e.g. a Slack ts)."""
        with session_scope(self.db) as db:
            ev = db.get(Event, event_id)
            faults.point("deliver.before_mark", ev.kind)  # posted, not yet marked: the crash tests' window
            ev.delivered_at, ev.delivery_ref, ev.attempts = utcnow(), ref or backend, ev.attempts + 1
            db.add(ev)

    def note_delivery(self, event_id: int, ref: str) -> None:
        """Replace a delivered event's reference (e.g. add the uploaded plot's file id to the post's ts),
        leaving when and how often it was delivered as they were."""
        with session_scope(self.db) as db:
            ev = db.get(Event, event_id)
            ev.delivery_ref = ref
            db.add(ev)

    # ---- changes ----

    def pause(self, user: str, now: bool = False, reason: str = "") -> str:
        """Pause the run. Graceful: running experiments finish and none starts. `now`: they are killed
        (status `aborted`). Returns the announcement line."""
        reason = _text(reason)
        with self._locked(), session_scope(self.db) as db:
            run = self._run(db)
            if run.state == "paused" and not (now and not run.pause_now):
                return f"already paused: {run.pause_reason or 'no reason given'}"
            run.state, run.pause_now, run.updated_at = "paused", now, utcnow()
            run.pause_reason = reason or ("paused now" if now else "paused")
            text = f"paused{' now' if now else ''} by {user}" + (f": {reason}" if reason else "")
            db.add(run)
            db.add(events.run_event(run, "paused", text, by=user, reason=reason, now=now))
        self._wake()
        return text

    def resume(self, user: str) -> str:
        """Resume a paused run. Returns the announcement line."""
        with self._locked(), session_scope(self.db) as db:
            run = self._run(db)
            if run.state != "paused":
                return "not paused"
            was = run.pause_reason
            run.state, run.pause_reason, run.pause_now, run.updated_at = "running", "", False, utcnow()
            text = f"resumed by {user}" + (f" (was: {was})" if was else "")
            db.add(run)
            db.add(events.run_event(run, "resumed", text, by=user))
        self._wake()
        return text

    def hint(self, user: str, text: str) -> Hint:
        """Store a team member's hint for the proposer (data, never instructions). Raises ControlError."""
        text = _text(text.strip())
        if not text:
            raise ControlError("a hint needs some text: hint <text>")
        if len(text) > MAX_HINT_CHARS:
            raise ControlError(f"a hint is at most {MAX_HINT_CHARS} characters (got {len(text)})")
        with session_scope(self.db) as db:
            run = self._run(db)
            h = Hint(run_id=run.id, author=user, text=text)
            db.add(h)
            db.flush()
            db.add(events.run_event(run, "hint", f"hint #{h.id} from {user}: {text[:200]}", by=user))
        self._wake()
        return h

    def revert(self, user: str, exp_id: int) -> str:
        """Undo the last keep: head moves back to the parent of experiment `exp_id`, which must be head's.

        The database changes first (loop.decision.revert: the experiment becomes `discard`, head's val_bpb the
        mean of the parent's recorded runs, a "reverted" event), then the branch follows (a failure there is
        repaired at the next start, when the engine moves the branch to the database head). Returns the
        announcement line.
        Raises ControlError when the experiment is unknown, was not kept, or is no longer head.
        """
        with self._locked():
            with session_scope(self.db) as db:
                run = self._run(db)
                exp = _get(db, Experiment, exp_id)
                if exp is None or exp.run_id != run.id:
                    raise ControlError(f"no experiment #{exp_id} in run {run.name!r}")
                if exp.kind != "experiment" or exp.status != "keep":
                    raise ControlError(f"#{exp_id} is not a kept experiment ({exp.kind}, {exp.status}); "
                                       "only head's experiment can be reverted")
                if exp.commit != run.head_commit:
                    head = db.exec(select(Experiment.id).where(Experiment.run_id == run.id,
                                                               Experiment.kind == "experiment",
                                                               Experiment.status == "keep",
                                                               Experiment.commit == run.head_commit)).first()
                    raise ControlError(f"#{exp_id} is not head" + (f" (head is #{head})" if head else "") +
                                       "; only head's experiment can be reverted")
                try:
                    text = decision.revert(db, run, exp, user)
                except ValueError as e:
                    raise ControlError(str(e)) from None
                parent = exp.parent_commit
                name, workspace_path = run.name, run.workspace
            try:
                (self.workspace or Workspace(workspace_path)).set_branch(name, parent)
            except WorkspaceError:
                log.exception("revert: branch of %s not moved yet", name)
        self._wake()
        return text

    def audit(self, *, user: str, backend: str, text: str, command: str, allowed: bool, result: str) -> None:
        """Append one command to the audit log (allowed or refused)."""
        with session_scope(self.db) as db:
            db.add(CommandLog(user=_text(user), backend=backend, text=_text(text[:4000]), command=command,
                              allowed=allowed, result=_text(result[:4000])))

    # ---- budgets and the digest ----

    def _settings(self) -> Settings:
        return self.engine.settings if self.engine is not None else Settings()

    def budget(self) -> list:
        """Every budget line (loop.budget.Cap): GPU-seconds / USD used today and in total, and the caps."""
        with Session(self.db) as db:
            return budget.caps(db, self._run(db).id, self._settings())

    def set_budget(self, user: str, resource: str, period: str, limit: Optional[float]) -> str:
        """Set a cap (GPU-seconds or USD; None removes it). Returns the announcement line."""
        with self._locked(), session_scope(self.db) as db:
            run = self._run(db)
            budget.set_limit(db, run.id, resource, period, limit, user)
            text = f"budget {resource}/{period} set to {budget.fmt_amount(resource, limit)} by {user}"
            db.add(events.run_event(run, "budget_changed", text, by=user, resource=resource, period=period,
                                    limit=limit))
        self._wake()
        return text

    def digest(self, until=None, hours: float = 24.0):
        """The digest numbers (loop.digest.Digest) for the `hours` before `until` (default now)."""
        return build_digest(self.db, self.run_name, self._settings(), now=until, hours=hours)

    def request_digest(self, user: str) -> Optional[int]:
        """Ask for a digest now: a `digest` event the chat backend renders and posts. Returns its id."""
        from loop.scheduler import request_digest

        ev = request_digest(self.db, self.run_name, self._settings().timezone, by=user)
        self._wake()
        return ev

    # ---- hosts ----

    def hosts(self) -> list[dict]:
        """Each host and slot: {host, state, slot, busy, exp_id, description, elapsed_s, budget_s, last_error}.

        Hosts come from the hosts table (kept by the engine's health checks); slots and what they run
        from the engine when it lives in this process.
        """
        with Session(self.db) as db:
            hosts = {h.name: h for h in db.exec(select(Host).order_by(Host.name)).all()}
        rows = []
        if self.engine is not None:
            running = {name: r for r in self.engine.running() for name in (r.slots or (r.slot,))}
            for slot in self.engine.runner.slots():
                h = hosts.get(slot.host)
                r = running.get(slot.name)
                rows.append({"host": slot.host, "state": h.state if h else "up", "slot": slot.name,
                             "busy": r is not None, "exp_id": r.exp_id if r else None,
                             "description": r.description if r else "", "elapsed_s": r.elapsed_s if r else None,
                             "budget_s": r.budget_s if r else None, "last_error": h.last_error if h else ""})
        else:
            rows = [{"host": h.name, "state": h.state, "slot": f"{h.slots} slot(s)", "busy": None, "exp_id": None,
                     "description": "", "elapsed_s": None, "budget_s": None, "last_error": h.last_error}
                    for h in hosts.values()]
        return rows

    # ---- promotion ----

    def promote(self, user: str, exp_id: Optional[int] = None, scale: Optional[str] = None) -> str:
        """Ask whether a kept change (None: head) transfers to a larger scale (default settings.promote_scale).

        Queues a promotion the engine runs on free slots. Returns the announcement; raises ControlError.
        """
        with self._locked(), session_scope(self.db) as db:
            run = self._run(db)
            if exp_id is not None and _get(db, Experiment, exp_id) is None:
                raise ControlError(f"no experiment #{exp_id} in run {run.name!r}")
            try:
                p = promotion.plan(db, run, self._settings(), exp_id=exp_id, scale=scale, user=user)
            except promotion.PromotionError as e:
                raise ControlError(str(e)) from None
            db.add(p)
            db.flush()
            what = f"#{p.candidate_exp_id}" if p.candidate_exp_id else f"head {p.candidate_commit[:10]}"
            text = (f"promotion #{p.id} requested by {user}: {what} vs {p.reference_commit[:10]} at {p.scale} "
                    f"({p.budget_s:g} s × {p.seeds} seed(s) each side)")
            db.add(events.run_event(run, "promotion_requested", text, by=user, promotion_id=p.id))
        self._wake()
        return text

    def cancel_promotion(self, user: str, promotion_id: int) -> str:
        """Cancel a queued or running promotion: its runs are aborted. Raises ControlError."""
        with self._locked(), session_scope(self.db) as db:
            run = self._run(db)
            p = _get(db, Promotion, promotion_id)
            if p is None or p.run_id != run.id:
                raise ControlError(f"no promotion #{promotion_id} in run {run.name!r}")
            if p.status not in ("queued", "running"):
                raise ControlError(f"promotion #{promotion_id} is already {p.status}")
            p.status, p.finished_at = "cancelled", utcnow()
            db.add(p)
            text = f"promotion #{p.id} cancelled by {user}"
            db.add(events.run_event(run, "promotion_cancelled", text, by=user, promotion_id=p.id))
        self._wake()
        return text

    def promotions(self, active_only: bool = False) -> list:
        """The run's promotions, newest first (db.models.Promotion rows)."""
        with Session(self.db) as db:
            run = self._run(db)
            q = select(Promotion).where(Promotion.run_id == run.id)
            if active_only:
                q = q.where(Promotion.status.in_(("queued", "running")))
            return list(db.exec(q.order_by(Promotion.id.desc())).all())
