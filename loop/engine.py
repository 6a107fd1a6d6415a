"""The engine: one thread that keeps every free slot training — what a slot takes next is loop/picker.py's
choice — and hands every result to the keep policy (loop/decision.py).

The database is the source of truth (a restart resumes from it); the branch follows the database.
"""

from __future__ import annotations

import errno
import gc
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from sqlmodel import Session, select

from db.models import Experiment, Run, utcnow
from db.session import is_transient, retry_transient, session_scope
from loop import (decision, events, faults, hardware, hosts, pauses, picker, placement, promotion, pruning, recovery,
                  swarm)
from loop.config import Settings
from loop.proposals import Proposals, SeenHashes
from loop.proposers.base import Proposer
from loop.runners.base import Handle, Job, Outcome, Runner, Slot, kill_group
from loop.workspace import Workspace, WorkspaceError

log = logging.getLogger("ratchet.engine")

TICK_S = 1.0  # the engine also wakes at once on a result, a ready proposal or a command
# A round of filling free slots stops after this long and the next tick goes on with it: a command waiting for
# the engine's lock (pause, revert) is not held up behind a large fleet's first round.
ROUND_S = 1.0
# Net new container objects between collections of the youngest generation (Python's default is 700). At the
# default, the short-lived objects of every decision (a proposal's syntax tree, ORM rows; reference counting
# frees them milliseconds later) are promoted into the older generations and set off full collections that walk
# the whole heap, several times a second on a large fleet.
GC_THRESHOLD = 100_000


@dataclass
class Running:
    """A live experiment, for status and progress displays. Seconds."""

    exp_id: int
    kind: str
    description: str
    slot: str
    elapsed_s: float  # counted training time reported by the harness
    budget_s: float
    step: Optional[int]
    loss: Optional[float]
    wall_s: float
    slots: tuple[str, ...] = ()  # the single slots it holds (several for a multi-GPU scale)


class Engine:
    """The propose → train → decide loop for one run, in its own thread.

    `tick()` does one round of work and may also be called directly (tests do). Thread-safety: every state
    change happens under `self.lock`, which the control API also takes, so a pause that has returned is seen
    before the next experiment starts.
    """

    def __init__(self, settings: Settings, db, workspace: Workspace, runner: Runner, proposer: Proposer,
                 data_dir: Path, *, max_experiments: Optional[int] = None,
                 on_change: Optional[Callable[[], None]] = None, device: Optional[str] = None):
        self.settings = settings
        self.db = db
        self.workspace = workspace
        self.runner = runner
        self.proposer = proposer
        self.data_dir = Path(data_dir)
        self.max_experiments = max_experiments
        self.on_change = on_change or (lambda: None)  # e.g. wake the outbox delivery
        self.lock = threading.RLock()
        self.handles: dict[int, Handle] = {}
        self.finished_here = 0  # experiments (not baseline repeats) finished by this process
        self.hosts_down: set[str] = set()  # hosts whose slots take no new experiment
        # slot name → the hardware class its last result reported (loop/hardware.py): which slots a paired run
        # may take, and which a pinned run may use; a slot not in it has reported nothing yet
        self.slot_class: dict[str, str] = {}
        self.run_id: Optional[int] = None
        # the device type experiments train on (what `auto` resolves to), for the proposer
        self.device = device or (settings.device if settings.device != "auto" else "cpu")
        # proposer_concurrency, else one request per slot: set at each tick (a Ray cluster's slots come and go)
        self.proposals = Proposals(proposer, db, workspace, settings, self.device, on_ready=self.wake,
                                   concurrency=settings.proposer_concurrency or 1)
        self.run_wall = swarm.Latency(default_s=settings.budget_s)  # recent experiments' wall seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.pruner = pruning.Pruner()
        self._cancels_done: set[int] = set()  # cancelled promotions whose runs were aborted

    # ---- set-up ----

    def setup(self, reconcile: bool = True) -> Run:
        """Create the run if needed (baseline = the workspace's HEAD); reconcile after a restart.

        reconcile=False only attaches (for read-only tools next to a live service).
        """
        s = self.settings
        with session_scope(self.db) as db:
            run = db.exec(select(Run).where(Run.name == s.run)).first()
            if run is None:
                base = self.workspace.head_commit("HEAD")
                run = Run(name=s.run, branch=self.workspace.run_branch(s.run), workspace=str(self.workspace.path),
                          baseline_commit=base, head_commit=base, budget_s=s.budget_s, device=s.device)
                db.add(run)
                db.flush()
            self.run_id = run.id
            for slot, cls in db.exec(select(Experiment.slot, Experiment.device_name).where(
                    Experiment.run_id == run.id, Experiment.val_bpb.is_not(None))
                    .order_by(Experiment.id.desc()).limit(10_000)).all():
                self.slot_class.setdefault(slot, cls)  # the latest result of each slot
        self.workspace.ensure_run_branch(run.name, run.baseline_commit)
        if reconcile:  # after a restart (loop/recovery.py)
            recovery.reconcile(self.db, self.run_id, self.handles, self.runner, self.workspace)
            try:
                self.check_health()
            except Exception:  # noqa: BLE001 - an unreachable fleet must not stop start-up; the job retries
                log.exception("first host health check failed")
        return self.get_run()

    # ---- thread ----

    def start(self) -> None:
        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self, kill: bool = True) -> None:
        """Stop the thread; with kill, running experiments are killed (they are re-queued at the next start)."""
        self._stop.set()
        self.wake()
        if self._thread:
            self._thread.join(timeout=30)
        self.proposals.close()
        if kill:
            for h in list(self.handles.values()):
                if h.pid:
                    kill_group(h.pid)
        self.runner.close()  # remote runners stop their runs (all at once) here

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must survive a bad tick; the error is logged
                log.exception("engine tick failed")
                self._stop.wait(5)
            self._wake.wait(TICK_S)
            self._wake.clear()

    # ---- state ----

    def get_run(self) -> Run:
        with Session(self.db, expire_on_commit=False) as db:
            return db.get(Run, self.run_id)

    def reached_max(self) -> bool:
        """True once this process has finished (or is finishing) max_experiments experiments."""
        if self.max_experiments is None:
            return False
        live = list(self.handles.values())
        confirming = {h.confirms_id for h in live if h.kind == "confirm"}  # an experiment whose confirmation trains
        experiments = sum(1 for h in live if h.kind == "experiment")
        return self.finished_here + experiments + len(confirming) >= self.max_experiments

    def finished(self) -> bool:
        """max_experiments is reached and nothing trains: what a bounded run (`--max-experiments`) waits for.
        Taken under the engine's lock: a round may be starting an experiment that is not in `handles` yet."""
        with self.lock:
            return self.reached_max() and not self.handles

    def finished_invalid(self) -> None:
        """An invalid proposal is finished: it counts towards max_experiments."""
        self.finished_here += 1
        self.on_change()

    def idle(self) -> bool:
        """Nothing is training and nothing more will start without a command (a change waiting for its
        confirmation runs still has them to train). Taken under the engine's lock (see finished)."""
        with self.lock:
            if self.handles:
                return False
            run = self.get_run()
            if not (self.reached_max() or run.state == "paused"):
                return False
            if run.state == "paused":
                return True
            with Session(self.db) as db:
                return db.exec(select(Experiment.id).where(
                    Experiment.run_id == run.id, Experiment.status == "queued",
                    Experiment.kind.in_(("confirm", "promotion"))).limit(1)).first() is None

    def running(self) -> list[Running]:
        """Live experiments with their latest curve point."""
        out = []
        run = self.get_run()
        for h in list(self.handles.values()):
            p = h.progress() or {}
            loss = p.get("loss")
            out.append(Running(h.exp_id, h.kind, h.description, h.slot.name, float(p.get("elapsed_s", 0.0)),
                               run.budget_s, p.get("step"), loss if isinstance(loss, (int, float)) else None,
                               time.time() - h.started, h.slot.names))
        return out

    # ---- one round ----

    def tick(self) -> None:
        """Record finished experiments, then fill free slots unless paused or a budget is reached."""
        with self.lock:
            self._collect()
            self._drain_proposals()
            run = self.get_run()
            self._prune(run)
            if run.noise_sigma is not None:
                self._expand_promotions(run)
            if run.state == "paused":
                if run.pause_now:
                    for h in list(self.handles.values()):
                        h.kill(f"paused now: {run.pause_reason}" if run.pause_reason else "paused now")
                return
            if self._budget_reached(run):
                return
            free = self._fill(run)
            if not self.proposer.fast:
                if not self.settings.proposer_concurrency:
                    self.proposals.set_concurrency(swarm.default_concurrency(len(self.runner.slots())))
                self._fill_proposals(free)

    def _fill_proposals(self, free: int) -> None:
        """Keep enough Claude requests in flight for the free slots and those expected to free up within the
        median answer time (loop/swarm.py), bounded by max_experiments."""
        if self.reached_max():
            return
        now = time.time()
        expected = self.run_wall.median()
        # Ask a little early: the engine wakes up to a tick late, and runs of one budget end seconds apart.
        early = TICK_S + 0.1 * expected
        remaining = [max(0.0, (h.started or now) + expected - early - now) for h in self.handles.values()]
        left = None
        if self.max_experiments is not None:
            experiments = sum(1 for h in self.handles.values() if h.kind in ("experiment", "confirm"))
            left = self.max_experiments - self.finished_here - experiments
        self.proposals.fill(self.get_run(), free, remaining, left)

    def _drain_proposals(self) -> None:
        """Act on what ended requests reported: count invalid answers, pause on a rejected key, one event per
        outage and per rate-limit back-off."""
        for kind, text in self.proposals.drain():
            if kind == "stored":
                if text != "queued":
                    self.finished_invalid()
                else:
                    self.on_change()
            elif kind == "auth":
                with session_scope(self.db) as db:
                    self.pause_in(db, text)
            elif kind == "exhausted":
                self.proposals.wait(TICK_S)
            elif kind in ("error", "throttled"):
                if kind == "throttled" or self.proposals.failed():
                    with session_scope(self.db) as db:
                        run = db.get(Run, self.run_id)
                        what = "proposer_throttled" if kind == "throttled" else "proposer_error"
                        msg = text if kind == "throttled" else f"proposer failed: {text}; retrying with back-off"
                        db.add(events.run_event(run, what, msg))
                    self.on_change()

    def _fill(self, run: Run) -> int:
        """Start experiments on free slots, what each slot takes is loop/picker.py's choice. A slot
        outside the run's hardware pin takes nothing (one whose class is not known yet may: its first result
        tells, and is re-queued when it is outside). One at a scale of N > 1 GPUs takes N free slots of one host
        together (loop/placement.py); while no host has N free it is held and the host closest to N free is
        drained (nothing new starts there this round, and it comes first again next round); one that no host
        could ever hold fails its promotion. Returns how many free slots are left without work."""
        busy = {name for h in self.handles.values() for name in h.slot.names}
        free = [slot for slot in self.runner.slots() if slot.name not in busy and slot.host not in self.hosts_down
                and hardware.allowed(self.settings.hardware, self.slot_class.get(slot.name), slot.host) is not False]
        if not free:
            return 0
        rnd, until = picker.Round(run, picker.queued(self.db, run)), time.monotonic() + ROUND_S
        drained: set[str] = set()
        passed: set[str] = set()  # slots nothing queued fits (their class) this round
        while True:
            open_slots = [slot for slot in free if slot.host not in drained and slot.name not in passed]
            if not open_slots:
                break
            if time.monotonic() > until:
                self.wake()
                break
            exp = picker.next_experiment(self, rnd, open_slots[0])
            if exp is None:
                rnd.no_proposal = True
                if rnd.queued or rnd.run.noise_sigma is None:
                    passed.add(open_slots[0].name)  # what is queued must train on another class
                    continue
                break
            need = self._gpus(exp)
            if need == 1:
                slot = open_slots[0]
            else:
                where = placement.place(need, open_slots, self.runner.all_slots(), self.hosts_down)
                if where.error:
                    self._unplaceable(run, exp, where.error)
                    continue
                if not where.slots:
                    if where.drain is not None:
                        drained.add(where.drain)
                        log.info("#%s needs %d slots of one host: draining %s", exp.id, need, where.drain)
                    continue
                slot = Slot.together(where.slots)
            free = [f for f in free if f.name not in slot.names]
            self._start(run, exp, slot)
        return len(free)

    def _gpus(self, exp: Experiment) -> int:
        """GPUs (slots of one host) the experiment trains on: its scale's `gpus` for a promotion run, else 1.
        A scale no longer in the ladder counts as 1."""
        if exp.kind != "promotion" or not exp.scale:
            return 1
        return next((sc.gpus for sc in self.settings.scales if sc.name == exp.scale), 1)

    def _unplaceable(self, run: Run, exp: Experiment, why: str) -> None:
        """A run no host can hold (its scale needs more GPUs than any host has): its promotion fails now, with
        the reason stored and posted, instead of waiting for slots that will never be free."""
        with session_scope(self.db) as db:
            promotion.fail(db, db.get(Run, run.id), exp.promotion_id, f"scale {exp.scale} {why}")
        self.on_change()

    def _collect(self) -> None:
        """Record every finished experiment and free its slot. A result that cannot be recorded for a reason
        other than a lost database connection (a bug, bad data) does not hold up the others: its handle stays
        for the next tick and its error is raised once every result had its try. While the database is away
        the error is raised at once (the handles stay)."""
        first: Optional[Exception] = None
        for exp_id, h in list(self.handles.items()):
            if not h.done():
                continue
            try:
                self._finish(exp_id, h.outcome(), gpus=h.slot.gpus)
            except Exception as e:  # noqa: BLE001 - raised below, after the other results
                if is_transient(e):
                    raise
                log.exception("recording #%s failed", exp_id)
                first = first or e
                continue
            del self.handles[exp_id]
            if h.kind != "promotion" and h.started:  # the run's own budget: how soon a training slot frees up (the swarm)
                self.run_wall.add(time.time() - h.started)
        if first is not None:
            raise first

    def _start(self, run: Run, exp: Experiment, slot: Slot) -> None:
        """Mark the experiment running on the slot, then hand it to the runner. One that cannot start is recorded
        at once (re-queued as an infrastructure failure, or the run paused when the disk is full)."""
        job = retry_transient(lambda: self._mark_running(run, exp.id, slot), what=f"starting #{exp.id}")
        try:
            handle = self.runner.start(job, slot, self.wake)
        except OSError as e:
            full = f"disk full: {job.workdir}: {e.strerror}" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            self._finish(exp.id, None, infra_error=f"could not start on {slot.name}: {e}", disk_full=full)
            return
        handle.kind, handle.description, handle.promotion_id = exp.kind, exp.description, exp.promotion_id
        handle.confirms_id = exp.confirms_id
        self.handles[exp.id] = handle
        if handle.pid is not None:  # what a restart uses to kill the orphaned process; remote runs are reaped
            def note_pid():
                with session_scope(self.db) as db:
                    row = db.get(Experiment, exp.id)
                    row.pid = handle.pid
                    db.add(row)

            retry_transient(note_pid, what=f"recording #{exp.id}'s pid")

    def _mark_running(self, run: Run, exp_id: int, slot: Slot) -> Job:
        """The transaction that marks an experiment running on `slot`; returns its Job."""
        s = self.settings
        with session_scope(self.db) as db:
            exp = db.get(Experiment, exp_id)
            workdir = s.home / "runs" / run.name / f"exp-{exp.id:06d}"
            exp.seed = exp.seed if exp.kind in ("baseline", "promotion") else s.seed + exp.id
            exp.status, exp.started_at, exp.attempts = "running", utcnow(), exp.attempts + 1
            exp.slot, exp.host, exp.workdir = slot.name, slot.host, str(workdir)
            db.add(exp)
            cls = self.slot_class.get(slot.name)
            if exp.kind == "promotion" and cls is not None:
                promotion.pair_on(db, exp, cls)  # the other side of this seed trains on the same class
            return Job(exp_id=exp.id, source=self.workspace.read_file(exp.commit), workdir=workdir,
                       data_dir=self.data_dir, budget_s=exp.budget_s or run.budget_s, seed=exp.seed,
                       scale=dict(exp.scale_overrides or {}), eval_tokens=s.eval_tokens, seq_len=s.seq_len,
                       grace_s=s.grace_s, device=s.device, nproc=slot.gpus)

    # ---- results ----

    def _finish(self, exp_id: int, outcome: Optional[Outcome], infra_error: str = "", disk_full: str = "",
                gpus: int = 1) -> None:
        """Record a result and apply the keep policy (loop/decision.py): decision, ledger (`gpus` × its wall time)
        and event in one transaction (tried again while the database connection is lost; a result already
        recorded is not recorded twice); then the branch follows the database."""
        if outcome is not None and (outcome.result.device_name or outcome.result.status == "ok"):
            self.slot_class[outcome.slot] = outcome.result.device_name  # before a re-queue picks a slot again
        done = retry_transient(lambda: self._record(exp_id, outcome, infra_error, disk_full, gpus),
                               what=f"recording #{exp_id}")
        self.pruner.forget(exp_id)
        if done is not None:
            self.finished_here += int(done.counted)
            faults.point("decision.after_commit", done.status)
            if done.keep_move:
                name, new, old = done.keep_move
                try:
                    self.workspace.fast_forward(name, new, old)
                except WorkspaceError:
                    log.exception("fast-forward of %s failed; forcing the branch to the database head", name)
                    self.workspace.set_branch(name, new)
            if done.promoted:
                self.workspace.set_ref(promotion.promoted_ref(done.promoted[0]), done.promoted[1])
        self.on_change()

    def _record(self, exp_id: int, outcome: Optional[Outcome], infra_error: str, disk_full: str, gpus: int = 1):
        """_finish's transaction. The fault point lets the reliability tests kill the process between the
        decision's flush and its commit."""
        with session_scope(self.db) as db:
            done = decision.record(db, exp_id, outcome, settings=self.settings, workspace=self.workspace,
                                   seen_hashes=SeenHashes(self.db, self.run_id), infra_error=infra_error,
                                   disk_full=disk_full, pruned=self.pruner.pruned.get(exp_id), gpus=gpus)
            if done is not None:
                if done.pause:
                    self.pause_in(db, done.pause)
                db.flush()
                faults.point("decision.before_commit", done.status)
            return done

    # ---- hosts, pruning, promotions ----

    def check_health(self) -> list[dict]:
        """Ask the runner about its hosts, record them (loop/hosts.py) and keep new experiments off hosts that
        are down. Returns [{name, up, error, address}]. A host's running experiments are the runner's to report
        (as infra_failed); they are then re-queued onto another slot."""
        records = [hosts.normalise_health(r) for r in self.runner.health()]
        with session_scope(self.db) as db:
            hosts.record_health(db, db.get(Run, self.run_id), records, self.runner)
        self.hosts_down = {r["name"] for r in records if not r["up"]}
        self.on_change()
        return records

    def _prune(self, run: Run) -> None:
        """Stop experiments whose loss is clearly behind head's at the same elapsed time (loop/pruning.py): status
        `pruned` when their outcome comes back; the GPU-seconds saved are kept."""
        if self.settings.prune and run.noise_sigma is not None:
            self.pruner.check(self.db, run, self.handles, self.slot_class, run.budget_s, self.settings.prune_after,
                              self.settings.prune_margin)

    def _expand_promotions(self, run: Run) -> None:
        """Queued promotions get their runs; the runs of a cancelled promotion are aborted (killed when
        training). Asked every tick: one indexed query answers when there is nothing new (a cancelled
        promotion stays `cancelled`; it is handled once)."""
        if not set(promotion.pending_ids(self.db, run)) - self._cancels_done:
            return
        with session_scope(self.db) as db:
            promotion.start_queued(db, run, self.settings)
            cancelled = promotion.abort_cancelled(db, run)
        for h in list(self.handles.values()):
            if h.kind == "promotion" and h.promotion_id in cancelled:
                h.kill("promotion cancelled")
        self._cancels_done |= cancelled

    # ---- pauses (loop/pauses.py) ----

    def _budget_reached(self, run: Run) -> bool:
        """Pause the run when a GPU or Claude cap is reached; True if so."""
        with session_scope(self.db) as db:
            reached = pauses.pause_if_over_budget(db, run.id, self.settings)
        if reached:
            self.on_change()
        return reached

    def rollover(self) -> bool:
        """At the budget day's rollover: resume a run that only a daily budget had paused, if no cap is reached
        now. Returns True when the run was resumed."""
        with self.lock, session_scope(self.db) as db:
            resumed = pauses.resume_at_rollover(db, self.run_id, self.settings)
        if resumed:
            self.wake()
            self.on_change()
        return resumed

    def pause_in(self, db: Session, reason: str) -> None:
        """Pause the run in the open transaction `db` (nothing new starts), with a `paused` event by ratchet."""
        if pauses.pause(db, self.run_id, reason):
            self.on_change()
