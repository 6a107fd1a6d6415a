"""The engine: fills free slots with the baseline repeats, then with validated proposals, and applies the
ratchet rule to every result.

The database is the source of truth (a restart resumes from it); the branch follows the database.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

from sqlalchemy import bindparam, insert, union, update
from sqlmodel import Session, select

from db.models import (FINAL_STATUSES, BudgetLedger, Event, Experiment, Hint, Host, Promotion, Run, column_values,
                       utcnow)
from db.session import add_row, insert_queued, is_transient, retry_transient, session_scope
from loop import budget, events, faults, promotion
from loop.config import Settings
from loop.proposers.base import (ProposalAuthError, ProposalError, ProposalExhausted, ProposalRejected, Proposer,
                                 ResearchState, TriedEdit)
from loop.rule import SpreadPool, decide, noise_floor
from loop.runners.base import Handle, Job, Outcome, Runner, Slot
from loop.runners.local import is_harness_process, kill_group
from loop.validate import normalised_ast_hash, validate_proposal
from loop.workspace import Workspace, WorkspaceError

log = logging.getLogger("ratchet.engine")

PRUNE_MIN_STEPS = 20  # a run is never pruned before it has logged this many steps
PRUNE_WINDOW = 0.1  # fraction of the budget over which a run's and head's losses are averaged before comparing
PRUNE_CHECKS = 3  # consecutive checks a run must be behind by the margin before it is stopped
HISTORY_RECENT = 200  # most recent experiments always shown to the proposer (besides head's and the keeps)
MAX_ATTEMPTS = 3  # starts of one experiment before an infrastructure fault counts as a crash
FAST_RETRIES = 8  # invalid proposals in a row a fast proposer may make before a slot waits for the next tick
TICK_S = 1.0  # the engine also wakes at once on a result or a command
# Least time from one tick's start to the next's. A fleet's results arrive one at a time (100 a second at 512
# slots of 5 s); a tick each would record and start them one by one. Waiting this long batches a few per tick
# (one transaction, one round): 0.1 s is 2% of even a 5 s simulated run, and nothing next to a real one.
TICK_GAP_S = 0.1
FAST_HISTORY_TTL_S = 10.0  # a fast proposer's history is read again at least this often (new hints, results)
FILL_CHUNK = 32  # free slots started per transaction while a round fills many (a fleet after a wave of results)
PROPOSAL_BACKOFF_S = (5, 15, 60, 300)  # growing delay after proposer failures
NO_SPACE = ("No space left on device", "[Errno 28]", "ENOSPC", "Disk quota exceeded")
SPACE_PROBE_BYTES = 1 << 16  # a failed run's work directory must take this much more, or the disk is full


def disk_full_reason(workdir: Optional[str], outcome: Optional[Outcome], local: bool = True) -> str:
    """'disk full: <where>: <error>' when a run that failed did so for want of disk space, else ''.

    Evidence: its error or log names ENOSPC, or (local runs) its work directory cannot take
    SPACE_PROBE_BYTES more. An ok result is never a disk problem.
    """
    if outcome is not None:
        r = outcome.result
        if outcome.aborted or (r.status == "ok" and not outcome.infra_failed):
            return ""
        text = "\n".join([r.error or "", *(r.log_tail or []), *(outcome.log_tail or [])])
        if any(m in text for m in NO_SPACE):
            return f"disk full: {workdir or outcome.host}: No space left on device"
    if not workdir or not local:
        return ""
    where = Path(workdir)
    while not where.exists() and where != where.parent:
        where = where.parent
    probe = where / ".ratchet-space-probe"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(SPACE_PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full: {where}: {e.strerror}"
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return ""


def curve_loss_at(curve: list, t: float, window_s: float) -> Optional[float]:
    """The mean loss of a [[elapsed_s, loss], …] curve over the window_s seconds up to elapsed time t
    (None when the curve ends before t or has no point in the window).

    A window in seconds, not points: one step's loss is noisy (a small batch on CPU moves it by ±5%), so a
    run and head are compared on the same stretch of time, averaged."""
    if not curve or curve[-1][0] < t:
        return None
    pts = [loss for e, loss in curve if t - window_s < e <= t]
    return sum(pts) / len(pts) if pts else None


def promoted_ref(run: str) -> str:
    """The ref that marks a run's last promoted commit (a gain shown to transfer to a larger scale)."""
    return f"refs/ratchet/promoted/{run}"


class SeenHashes:
    """`h in seen`: is there an experiment of the run with this normalised-AST hash?

    The database (an indexed column) answers, so a long run never holds every hash in memory. A fleet asks
    once per proposal (about 100 times a second at 512 slots) and nearly every answer is no, so after the
    first BLOOM_AFTER questions a Bloom filter of the run's hashes answers those without a query. A hash the
    filter may hold is still asked of the database: the filter never makes an answer wrong, only fewer
    queries. It is read from the database once, takes every hash the engine is about to store (`add`, before
    the transaction commits: a hash rolled back only costs a query later), and reads the rows stored since
    (by another process) at most every REFRESH_S seconds. Thread-safe: a proposer's thread asks too.

    Bloom filter (B. H. Bloom, "Space/time trade-offs in hash coding with allowable errors", CACM 1970):
    BLOOM_BITS bits (2 MiB) and BLOOM_K positions per hash; with n hashes stored, a new hash is a false
    positive (one needless query) with probability (1 − e^(−kn/m))^k: about 0.05% at a million hashes.
    """

    _QUERY = select(Experiment.__table__.c.id).where(Experiment.__table__.c.run_id == bindparam("run_id"),
                                                     Experiment.__table__.c.ast_hash == bindparam("ast_hash")).limit(1)
    _SINCE = select(Experiment.__table__.c.id, Experiment.__table__.c.ast_hash).where(
        Experiment.__table__.c.run_id == bindparam("run_id"), Experiment.__table__.c.id > bindparam("after"),
        Experiment.__table__.c.ast_hash != "").order_by(Experiment.__table__.c.id)
    BLOOM_BITS, BLOOM_K = 1 << 24, 7
    BLOOM_AFTER = 32  # a one-off question (`ratchet propose --dry-run`) is not worth reading every hash for
    REFRESH_S = 1.0

    def __init__(self, db, run_id: int):
        self.db, self.run_id = db, run_id
        self._bits = bytearray(self.BLOOM_BITS // 8)
        self._lock = threading.Lock()
        self._asked = 0
        self._read_upto: Optional[int] = None  # the last experiment id read into the filter (None: not read)
        self._read_at = 0.0

    def _positions(self, ast_hash: str) -> list[int]:
        d = int.from_bytes(hashlib.blake2b(ast_hash.encode(), digest_size=3 * self.BLOOM_K).digest(), "big")
        return [(d >> (24 * i)) & (self.BLOOM_BITS - 1) for i in range(self.BLOOM_K)]

    def _set(self, ast_hash: str) -> None:
        """Put a hash in the filter. Called under the lock."""
        for p in self._positions(ast_hash):
            self._bits[p >> 3] |= 1 << (p & 7)

    def add(self, ast_hash: str) -> None:
        """Note a hash the engine stores (or is about to)."""
        if ast_hash:
            with self._lock:
                self._set(ast_hash)

    def _may_hold(self, ast_hash: str) -> bool:
        """False when the hash is certainly not stored (as of the last read); reads the rows stored since
        when due. Called under the lock."""
        now = time.monotonic()
        if self._read_upto is None or now - self._read_at > self.REFRESH_S:
            with self.db.connect() as conn:
                for i, h in conn.execute(self._SINCE, {"run_id": self.run_id, "after": self._read_upto or 0}):
                    self._set(h)
                    self._read_upto = i
            self._read_upto, self._read_at = self._read_upto or 0, now
        return all(self._bits[p >> 3] & (1 << (p & 7)) for p in self._positions(ast_hash))

    def __contains__(self, ast_hash: object) -> bool:
        if not ast_hash or not isinstance(ast_hash, str):
            return False
        with self._lock:
            self._asked += 1
            if self._asked > self.BLOOM_AFTER and not self._may_hold(ast_hash):
                return False
        with self.db.connect() as conn:  # Core, not a Session
            return conn.execute(self._QUERY, {"run_id": self.run_id, "ast_hash": ast_hash}).first() is not None


def _update_experiments(db: Session, rows: list[dict]) -> None:
    """One executemany UPDATE of experiments rows: each dict holds "id" and the same columns to set."""
    table = Experiment.__table__
    cols = [k for k in rows[0] if k != "id"]
    db.execute(update(table).where(table.c.id == bindparam("b_id")).values(
        {c: bindparam(f"b_{c}") for c in cols}), [{f"b_{k}": v for k, v in r.items()} for r in rows])


class RoundSeen:
    """SeenHashes plus the hashes of the proposals one round of filling has validated but not stored yet."""

    def __init__(self, stored: SeenHashes, pending: set):
        self.stored, self.pending = stored, pending

    def __contains__(self, ast_hash: object) -> bool:
        return ast_hash in self.pending or ast_hash in self.stored


@dataclass
class NewProposal:
    """A fast proposer's validated proposal, not stored yet: the Experiment's fields and its train.py text.
    The round's transaction stores it (see Engine._start_many)."""

    fields: dict
    source: str
    id = None  # no row yet
    kind = "experiment"
    confirms_id = None


def normalise_health(rec) -> dict:
    """A runner's host record (SSH HostHealth, a Ray node dict, …) as {name, up, error, detail}."""
    get = rec.get if isinstance(rec, dict) else (lambda k, d=None: getattr(rec, k, d))
    name = get("name") or get("hostname") or get("address") or get("node_id") or "?"
    up = get("up")
    if up is None:
        up = get("alive", False)
    detail = dict(rec) if isinstance(rec, dict) else {k: v for k, v in vars(rec).items() if k not in ("name", "up")}
    return {"name": str(name), "up": bool(up), "error": str(get("error", "") or ""), "detail": detail}


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


class Engine:
    """The propose → train → decide loop for one run, in its own thread.

    `tick()` does one round of work and may also be called directly (tests do). Thread-safety:
    every state change happens under `self.lock`, which the control API also takes, so a pause that
    has returned is seen before the next experiment starts.
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
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._propose_failures = 0
        self._propose_after = 0.0
        # Proposals are made in the background while slots train, so a free slot never waits on the API.
        self._proposer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="proposer")
        self._pending: Optional[Future] = None
        self._fill: Optional[dict] = None  # set while tick() fills free slots (see there)
        self._pending_parent = ""
        self._pruned: dict[int, dict] = {}  # exp id → why it was pruned (kill sent, outcome pending)
        self._cancels_done: set[int] = set()  # cancelled promotions whose runs were aborted (see _expand_promotions)
        self._loss_seen: dict[int, list] = {}  # exp id → [[elapsed_s, loss], …] as seen at each tick (pruning)
        self._behind: dict[int, int] = {}  # exp id → consecutive checks behind head by the margin
        self._head_curve_cache: tuple[str, list] = ("", [])
        self._history_cache: tuple = ("", 0.0, [], None)  # (head, monotonic time read, history, state): _fast_history
        self._sigma_groups: Optional[dict[int, dict[int, float]]] = None  # see _pooled_sigma
        self._sigma_pool = SpreadPool()  # the groups above as spreads
        self._sigma_base: list[float] = []  # the baseline repeats' val_bpb, read with the groups
        self._seen: Optional[SeenHashes] = None  # see seen_hashes
        self._ledger: Optional[budget.LedgerTotals] = None  # the run's spend, read incrementally per tick
        self.hosts_down: set[str] = set()  # hosts whose slots take no new experiment
        self.run_id: Optional[int] = None
        # the device type experiments train on (what `auto` resolves to), for the proposer
        self.device = device or (settings.device if settings.device != "auto" else "cpu")

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
        self.workspace.ensure_run_branch(run.name, run.baseline_commit)
        if reconcile:
            self.reconcile()
            try:
                self.check_health()
            except Exception:  # noqa: BLE001 - an unreachable fleet must not stop start-up; the job retries
                log.exception("first host health check failed")
        return self.get_run()

    def reconcile(self) -> None:
        """After a restart: experiments found running are re-queued (their old process killed), and the
        branch is moved to the head the database recorded (the database is written first)."""
        with session_scope(self.db) as db:
            run = db.get(Run, self.run_id)
            stale = db.exec(select(Experiment).where(Experiment.run_id == run.id,
                                                     Experiment.status.in_(("running", "proposed")))).all()
            for exp in stale:
                if exp.id in self.handles:
                    continue
                if exp.pid and is_harness_process(exp.pid):
                    kill_group(exp.pid)
                elif exp.host and exp.host != "local" and callable(getattr(self.runner, "reap", None)):
                    try:  # a remote run left behind by the crash: stop it before it is re-run
                        self.runner.reap(exp.id, exp.host)
                    except Exception:  # noqa: BLE001 - an unreachable host is the health check's business
                        log.warning("could not reap #%s on %s", exp.id, exp.host)
                exp.status, exp.pid = "queued", None
                exp.reason = "re-queued after a restart"
                db.add(exp)
            head = run.head_commit
            name = run.name
        tip = self.workspace.branch_tip(name)
        if tip != head:
            log.warning("branch %s at %s, database head %s: moving the branch", name, tip, head)
            self.workspace.set_branch(name, head)

    # ---- thread ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self, kill: bool = True) -> None:
        """Stop the thread; with kill, running experiments are killed (they are re-queued at the next start)."""
        self._stop.set()
        self.wake()
        if self._thread:
            self._thread.join(timeout=30)
        self._proposer_pool.shutdown(wait=False, cancel_futures=True)
        if kill:
            for h in list(self.handles.values()):
                if h.pid:
                    kill_group(h.pid)
        close = getattr(self.runner, "close", None)  # remote runners stop their runs (all at once) here
        if callable(close):
            close()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must survive a bad tick; the error is logged
                log.exception("engine tick failed")
                self._stop.wait(5)
            self._wake.wait(TICK_S)
            gap = TICK_GAP_S - (time.monotonic() - started)
            if gap > 0:
                self._stop.wait(gap)
            self._wake.clear()

    # ---- state ----

    def seen_hashes(self, run_id: int) -> SeenHashes:
        """The run's SeenHashes: one per engine, so its filter is read from the database once."""
        if self._seen is None or self._seen.run_id != run_id:
            self._seen = SeenHashes(self.db, run_id)
        return self._seen

    def get_run(self) -> Run:
        with Session(self.db, expire_on_commit=False) as db:
            return db.get(Run, self.run_id)

    def reached_max(self) -> bool:
        """True once this process has finished (or is finishing) max_experiments experiments."""
        if self.max_experiments is None:
            return False
        live = [*self.handles.values(), *(exp for exp, _ in (self._fill or {}).get("picks", ()))]  # picks start soon
        kinds = [getattr(h, "kind", "experiment") for h in live]
        confirming = {getattr(h, "confirms_id", None) for h in live
                      if getattr(h, "kind", "") == "confirm"}  # an experiment whose confirmation trains
        return self.finished_here + kinds.count("experiment") + len(confirming) >= self.max_experiments

    def finished(self) -> bool:
        """max_experiments is reached and nothing trains: what a bounded run (`--max-experiments`) waits for.
        Asked under the engine's lock from other threads: while a round starts its picks they count towards
        the limit before they are in `handles`, and a look between the two would end the run too early."""
        with self.lock:
            return self.reached_max() and not self.handles

    def idle(self) -> bool:
        """Nothing is training and nothing more will start without a command (a change waiting for its
        confirmation runs still has them to train). Taken under the engine's lock (see finished)."""
        with self.lock:
            return self._idle()

    def _idle(self) -> bool:
        run = self.get_run()
        if self.handles or not (self.reached_max() or run.state == "paused"):
            return False
        if run.state == "paused":
            return True
        with Session(self.db) as db:
            return db.exec(select(Experiment.id).where(Experiment.run_id == run.id, Experiment.status == "queued",
                                                       Experiment.kind.in_(("confirm", "promotion")))
                           .limit(1)).first() is None

    def running(self) -> list[Running]:
        """Live experiments with their latest curve point."""
        out = []
        run = self.get_run()
        for h in list(self.handles.values()):
            p = h.progress() or {}
            loss = p.get("loss")
            out.append(Running(h.exp_id, getattr(h, "kind", "experiment"), getattr(h, "description", ""),
                               h.slot.name, float(p.get("elapsed_s", 0.0)), run.budget_s, p.get("step"),
                               loss if isinstance(loss, (int, float)) else None,
                               time.time() - getattr(h, "started", time.time())))
        return out

    # ---- one round ----

    def tick(self) -> None:
        """Collect finished experiments, then fill free slots unless paused or at the limit."""
        with self.lock:
            done = [(exp_id, h.outcome()) for exp_id, h in list(self.handles.items()) if h.done()]
            if done:
                self._finish_many(done)  # raises if the database stays away: the handles stay for the next tick
                for exp_id, _ in done:
                    del self.handles[exp_id]
                    self._loss_seen.pop(exp_id, None)
                    self._behind.pop(exp_id, None)
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
            busy = {h.slot.name for h in self.handles.values()}
            free = [slot for slot in self.runner.slots() if slot.name not in busy and slot.host not in self.hosts_down]
            try:
                # What one round of filling reads once (the queue, history, research state) and what it picks:
                # the picks start together, in one transaction (a large fleet frees many slots per tick).
                self._fill = {"picks": [], "picked": set(), "invalid": [], "hashes": set(), "run": run}
                for slot in free:
                    exp = self._next_experiment(new_allowed=not self.reached_max())
                    if exp is None:
                        break
                    self._fill["picks"].append((exp, slot))
                    if exp.id is not None:  # a stored row (a new proposal has none yet)
                        self._fill["picked"].add(exp.id)
                    if len(self._fill["picks"]) >= FILL_CHUNK:  # the first slots need not wait for the last
                        self._start_many(self._fill)
                        self._fill["picks"], self._fill["invalid"] = [], []
                self._start_many(self._fill)
            finally:
                self._fill = None
            if not self.reached_max() and not getattr(self.proposer, "fast", False):  # a fast one needs none
                self.prefetch(self.get_run())

    def _next_experiment(self, new_allowed: bool = True) -> Optional[Experiment]:
        """What a free slot trains next: baseline repeats first; then promotion runs (a person asked for them)
        and confirmation runs (a change that passed waits on them); then, unless max_experiments is reached,
        re-queued or rebased experiments and fresh proposals."""
        fill = self._fill if self._fill is not None else {}
        run = fill.get("run") or self.get_run()  # read by tick(): head and state do not change while a round fills
        if run.noise_sigma is None:
            return self._next_baseline(run) if new_allowed else None
        kinds = ("promotion", "confirm", "experiment") if new_allowed else ("promotion", "confirm")
        if fill.get("queued_kinds") != kinds:
            with Session(self.db, expire_on_commit=False) as db:
                fill["queued"] = list(db.exec(select(Experiment).where(
                    Experiment.run_id == run.id, Experiment.status == "queued", Experiment.kind.in_(kinds))
                    .order_by((Experiment.kind == "experiment"), Experiment.id)).all())
            fill["queued_kinds"] = kinds
        queued = fill["queued"]
        while queued:
            exp = queued.pop(0)
            if not self._taken(exp.id):
                return exp
        return self._propose(run) if new_allowed else None

    def _taken(self, exp_id: Optional[int]) -> bool:
        """The experiment trains, or this round of filling already picked it."""
        return exp_id in self.handles or exp_id in (self._fill or {}).get("picked", ())

    def _next_baseline(self, run: Run) -> Optional[Experiment]:
        with session_scope(self.db) as db:
            base = db.exec(select(Experiment).where(Experiment.run_id == run.id, Experiment.kind == "baseline")
                           .order_by(Experiment.id)).all()
            failed = [e for e in base if e.status in ("crash", "timeout")]
            if failed:
                self._pause(db, run.id, f"baseline {failed[0].status}: {failed[0].reason}")
                return None
            for e in base:
                if e.status == "queued" and not self._taken(e.id):
                    return e
            if len(base) >= self.settings.noise_repeats:
                return None  # the remaining repeats are training
            exp = Experiment(run_id=run.id, kind="baseline", status="queued", parent_commit=run.baseline_commit,
                             commit=run.baseline_commit, proposer="baseline", seed=self.settings.seed + len(base),
                             description=f"baseline repeat {len(base) + 1}/{self.settings.noise_repeats}",
                             ast_hash=normalised_ast_hash(self.workspace.read_file(run.baseline_commit)))
            self.seen_hashes(run.id).add(exp.ast_hash)
            db.add(exp)
            db.flush()
            return exp

    def history(self, run_id: int) -> list[TriedEdit]:
        """Earlier experiments for the proposer, oldest first, with Δ val_bpb vs their parent: every one tried
        on head, every keep, and the HISTORY_RECENT most recent (bounded, however long the run)."""
        head = self.get_run().head_commit
        with Session(self.db) as db:
            # Bounded for long runs: what was tried on head, the keeps, and the most recent experiments.
            oldest_recent = db.exec(select(Experiment.id).where(Experiment.run_id == run_id)
                                    .order_by(Experiment.id.desc()).offset(HISTORY_RECENT - 1).limit(1)).first() or 0
            # A union of three indexed reads: with OR in one WHERE, SQLite scans every experiment of the run.
            ids = union(*(select(Experiment.id).where(Experiment.run_id == run_id, cond) for cond in (
                Experiment.parent_commit == head, Experiment.status == "keep", Experiment.id >= oldest_recent)))
            # The columns used below, not whole rows: diffs, curves and logs are most of a row's bytes.
            rows = db.exec(select(Experiment.id, Experiment.kind, Experiment.status, Experiment.commit,
                                  Experiment.parent_commit, Experiment.val_bpb, Experiment.edit_key,
                                  Experiment.description, Experiment.reason)
                           .where(Experiment.id.in_(ids)).order_by(Experiment.id)).all()
        by_commit: dict[str, list[float]] = {}
        for e in rows:
            if e.status == "keep" and e.val_bpb is not None:
                by_commit.setdefault(e.commit, []).append(e.val_bpb)
        out = []
        for e in rows:
            if e.kind != "experiment":
                continue
            parent = by_commit.get(e.parent_commit)
            delta = e.val_bpb - statistics.fmean(parent) if parent and e.val_bpb is not None else None
            out.append(TriedEdit(e.parent_commit, e.edit_key, e.status, e.val_bpb, e.description, exp_id=e.id,
                                 delta=delta, reason=(e.reason or "").splitlines()[0][:200] if e.reason else ""))
        return out

    def _fast_history(self, run: Run) -> tuple[list[TriedEdit], ResearchState]:
        """history() and research_state() for a fast proposer, read again when head moves or after
        FAST_HISTORY_TTL_S; in between, the proposals made since are appended to the list as `queued` (what a
        fast proposer needs: what was tried on head). A fleet fills slots several times a second, and
        history() reads every experiment tried on head (thousands)."""
        head, at, history, state = self._history_cache
        if head != run.head_commit or time.monotonic() - at > FAST_HISTORY_TTL_S:
            history, state = self.history(run.id), self.research_state(run)
            self._history_cache = (run.head_commit, time.monotonic(), history, state)
        return history, state

    def research_state(self, run: Run) -> ResearchState:
        """The run as a proposer sees it: head, noise floor, threshold, hints, program.md, seen hashes."""
        with Session(self.db) as db:
            hints = db.exec(select(Hint).where(Hint.run_id == run.id, Hint.closed_at.is_(None))
                            .order_by(Hint.id)).all()
            base = db.exec(select(Experiment.val_bpb).where(Experiment.run_id == run.id, Experiment.kind == "baseline",
                                                            Experiment.status == "keep")).all()
            failed_ids = [pid for pid in db.exec(select(Promotion.candidate_exp_id).where(
                Promotion.run_id == run.id, Promotion.verdict == "does_not_transfer")).all() if pid]
            not_transferred = tuple(f"#{e.id} {e.description}" for e in db.exec(
                select(Experiment).where(Experiment.id.in_(failed_ids))).all()) if failed_ids else ()
        try:
            program = self.workspace.read_file(run.head_commit, "program.md")
        except WorkspaceError:
            program = ""
        sigma = run.noise_sigma
        return ResearchState(
            run=run.name, head_val_bpb=run.head_val_bpb, noise_sigma=sigma,
            baseline_val_bpb=statistics.fmean(base) if base else None,
            keep_threshold=None if sigma is None else max(self.settings.min_delta, self.settings.noise_z * sigma),
            budget_s=run.budget_s, device=self.device, program=program,
            hints=tuple((h.author, h.text) for h in hints), seen_hashes=self.seen_hashes(run.id),
            not_transferred=not_transferred)

    def prefetch(self, run: Run) -> None:
        """Ask the proposer for the next proposal in the background (at most one in flight)."""
        if self._pending is not None or time.time() < self._propose_after or run.noise_sigma is None \
                or run.state == "paused" or getattr(self.proposer, "fast", False):  # paused: no paid calls
            return
        parent = run.head_commit
        head_source = self.workspace.read_file(parent)
        history, state = self.history(run.id), self.research_state(run)

        def work():
            return parent, head_source, self.proposer.propose(head_source, parent, history, state)

        self._pending, self._pending_parent = self._proposer_pool.submit(work), parent
        self._pending.add_done_callback(lambda _f: self.wake())

    def _take_proposal(self, run: Run):
        """The finished background proposal, moved onto the current head if head advanced meanwhile.

        Returns (head_source, proposal), or None when none is ready. Raises what the proposer raised.
        """
        if self._pending is None:
            if getattr(self.proposer, "fast", False):  # microseconds: no need to propose ahead of need
                head_source = self.workspace.read_file(run.head_commit)
                fill = self._fill if self._fill is not None else {}
                if "history" not in fill:  # once per round; this round's own proposals are appended below
                    fill["history"], fill["state"] = self._fast_history(run)
                try:
                    proposal = self.proposer.propose(head_source, run.head_commit, fill["history"], fill["state"])
                    fill["history"].append(TriedEdit(run.head_commit, proposal.edit_key, "queued", None,
                                                     proposal.description))
                    return head_source, proposal
                except ProposalError:
                    raise
                except Exception as e:  # a proposer bug must not stop the loop
                    log.exception("proposer raised")
                    raise ProposalError(f"{type(e).__name__}: {e}") from e
            self.prefetch(run)
            return None
        if not self._pending.done():
            return None
        fut, self._pending = self._pending, None
        try:
            parent, parent_source, proposal = fut.result()
        except ProposalError:
            if self._pending_parent != run.head_commit:
                return None  # it was about an old head: ask again about the new one
            raise
        except Exception as e:  # a proposer bug must not stop the loop: treat it as a failed proposal
            log.exception("proposer raised")
            raise ProposalError(f"{type(e).__name__}: {e}") from e
        head_source = self.workspace.read_file(run.head_commit)
        if parent != run.head_commit:
            merged = self.workspace.merge_text(parent_source, head_source, proposal.source)
            if merged is None and not proposal.cost_usd:
                return None  # a free proposal that no longer applies: just ask again
            if merged is None:
                raise ProposalRejected(f"made for {parent[:10]}, does not apply to the new head {run.head_commit[:10]}",
                                       description=proposal.description, hypothesis=proposal.hypothesis,
                                       usage=proposal.usage, cost_usd=proposal.cost_usd, proposer=proposal.proposer)
            proposal.source = merged
        return head_source, proposal

    def _propose(self, run: Run) -> Optional[Experiment]:
        """A fresh validated proposal stored `queued`, or None. A fast (offline) proposer whose proposal was
        invalid (a duplicate, say) is asked again at once, a few times, so one invalid proposal does not leave
        the free slots of this round waiting for the next tick."""
        for _ in range(FAST_RETRIES if getattr(self.proposer, "fast", False) else 1):
            invalid_before = self.finished_here
            exp = self._propose_once(run)
            if exp is not None or self.finished_here == invalid_before or self.reached_max():
                return exp  # a proposal, or nothing to propose now (not an invalid one)
        return None

    def _propose_once(self, run: Run) -> Optional[Experiment]:
        if time.time() < self._propose_after:
            return None
        try:
            taken = self._take_proposal(run)
            if taken is None:
                return None
            head_source, proposal = taken
        except ProposalExhausted as e:
            if self.handles or self._has_queued(run):
                self._propose_after = time.time() + TICK_S  # queued and running work first; ask again later
                return None
            with session_scope(self.db) as db:
                self._pause(db, run.id, f"proposer has nothing left to try: {e}")
            return None
        except ProposalAuthError as e:
            with session_scope(self.db) as db:
                self._pause(db, run.id, f"{e}")
            return None
        except ProposalRejected as e:
            self._propose_failures = 0
            self._store_rejected(run, e)
            return None
        except ProposalError as e:
            delay = PROPOSAL_BACKOFF_S[min(self._propose_failures, len(PROPOSAL_BACKOFF_S) - 1)]
            self._propose_failures += 1
            self._propose_after = time.time() + delay
            if self._propose_failures == 1:
                with session_scope(self.db) as db:
                    db.add(events.run_event(run, "proposer_error", f"proposer failed: {e}; retrying with back-off"))
                self.on_change()
            return None
        self._propose_failures = 0
        if getattr(self.proposer, "fast", False) and self._fill is not None:
            return self._prepare(run, head_source, proposal)

        def store():  # a paid proposal is stored even if the database blinks
            with session_scope(self.db) as db:
                verdict = validate_proposal(head_source, {"train.py": proposal.source},
                                            seen_hashes=self.seen_hashes(run.id))
                self.seen_hashes(run.id).add(verdict.ast_hash)  # stored with it, valid or not
                exp = Experiment(**self._proposal_fields(run, proposal, verdict))
                db.add(exp)
                db.flush()
                self._book_proposal(db, run, exp, proposal.source if verdict.ok else None)
            return exp, verdict

        exp, verdict = retry_transient(store, what="storing a proposal")
        if not verdict.ok:
            self.finished_here += 1
            self.on_change()
            return None
        return exp

    def _prepare(self, run: Run, head_source: str, proposal) -> Optional["NewProposal"]:
        """A fast proposer's proposal, validated now and stored with the round's picks (see _start_many).
        An invalid one is counted at once and stored with them as `invalid`; returns None then."""
        fill = self._fill
        seen = RoundSeen(self.seen_hashes(run.id), fill["hashes"])
        verdict = validate_proposal(head_source, {"train.py": proposal.source}, seen_hashes=seen)
        self.seen_hashes(run.id).add(verdict.ast_hash)  # stored with it, valid or not
        fields = self._proposal_fields(run, proposal, verdict)
        if not verdict.ok:
            fill["invalid"].append(NewProposal(fields, ""))
            self.finished_here += 1
            return None
        if verdict.ast_hash:
            fill["hashes"].add(verdict.ast_hash)
        return NewProposal(fields, proposal.source)

    @staticmethod
    def _proposal_fields(run: Run, proposal, verdict) -> dict:
        """The Experiment row of a validated proposal on head: `queued`, or `invalid` with the reason."""
        fields = dict(run_id=run.id, kind="experiment", parent_commit=run.head_commit, proposer=proposal.proposer,
                      description=proposal.description, hypothesis=proposal.hypothesis, diff=verdict.diff,
                      edit_key=proposal.edit_key, ast_hash=verdict.ast_hash, usage=proposal.usage,
                      cost_usd=proposal.cost_usd, status="queued")
        if not verdict.ok:
            fields.update(status="invalid", reason=verdict.reason, finished_at=utcnow())
        return fields

    def _book_proposal(self, db: Session, run: Run, exp, source: Optional[str]) -> None:
        """What storing a new proposal's row (flushed: it has its id) brings with it in its transaction: its
        Claude cost in the ledger; then its commit, off the branch (source given: it is valid; sets exp.commit)
        or, invalid, its event. `exp`: an Experiment, or for a valid one a row inserted by _insert_running (its
        values as attributes). Raises WorkspaceError when git fails."""
        if exp.cost_usd:
            db.add(BudgetLedger(day=self._today(), run_id=run.id, experiment_id=exp.id,
                                kind="claude_usd", amount=exp.cost_usd))
        if source is not None:
            exp.commit = self.workspace.commit_experiment(exp.id, exp.parent_commit, source,
                                                          f"exp {exp.id}: {exp.description}")
        else:
            db.add(events.experiment_event(exp, run))

    def _has_queued(self, run: Run) -> bool:
        with Session(self.db) as db:
            return db.exec(select(Experiment.id).where(Experiment.run_id == run.id,
                                                       Experiment.status == "queued")).first() is not None

    def _store_rejected(self, run: Run, e: ProposalRejected) -> None:
        """An answer the proposer could not turn into a valid proposal: `invalid`, with its cost charged."""
        retry_transient(lambda: self._store_rejected_once(run, e), what="storing a rejected proposal")
        self.finished_here += 1
        self.on_change()

    def _store_rejected_once(self, run: Run, e: ProposalRejected) -> None:
        with session_scope(self.db) as db:
            exp = Experiment(run_id=run.id, kind="experiment", parent_commit=run.head_commit, proposer=e.proposer,
                             description=e.description or "(no usable proposal)", hypothesis=e.hypothesis,
                             status="invalid", reason=e.reason, usage=e.usage, cost_usd=e.cost_usd,
                             finished_at=utcnow())
            if e.source:
                from loop.validate import unified_diff

                exp.diff = unified_diff(self.workspace.read_file(run.head_commit), e.source)[0]
            db.add(exp)
            db.flush()
            if e.cost_usd:
                db.add(BudgetLedger(day=self._today(), run_id=run.id, experiment_id=exp.id,
                                    kind="claude_usd", amount=e.cost_usd))
            db.add(events.experiment_event(exp, run))

    def _start_many(self, fill: dict) -> None:
        """Start a round's picks: one transaction stores its new proposals (valid ones committed to the
        workspace, invalid ones recorded) and marks every pick running; then each goes to the runner. A
        pick that cannot start is recorded (re-queued as an infrastructure failure, or the run paused when
        the disk is full) and the others still start. Raises what the database raises after its retries
        (nothing has started then; the round's new proposals are dropped, their invalid count undone)."""
        picks, invalid = fill["picks"], fill["invalid"]
        if not picks and not invalid:
            return
        try:
            started = retry_transient(lambda: self._mark_running(fill), what=f"starting {len(picks)} experiment(s)")
        except Exception:
            self.finished_here -= len(invalid)
            raise
        if invalid:
            self.on_change()
        pids = []
        for exp, slot, job in started:
            try:
                handle = self.runner.start(job, slot, self.wake)
            except OSError as e:
                full = f"disk full: {job.workdir}: {e.strerror}" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
                self._finish(exp.id, None, infra_error=f"could not start on {slot.name}: {e}", disk_full=full)
                continue
            handle.kind, handle.description, handle.promotion_id = exp.kind, exp.description, exp.promotion_id
            handle.confirms_id = exp.confirms_id
            self.handles[exp.id] = handle
            if handle.pid is not None:  # remote runners have none: their runs are reaped by experiment id
                pids.append((exp.id, handle.pid))

        def note_pids():  # what a restart uses to kill the orphaned processes
            with session_scope(self.db) as db:
                _update_experiments(db, [{"id": i, "pid": pid} for i, pid in pids])

        if pids:
            retry_transient(note_pids, what=f"recording {len(pids)} pid(s)")

    def _mark_running(self, fill: dict) -> list[tuple]:
        """_start_many's transaction: returns (experiment, slot, job) per pick. The experiment is the stored
        row, or for a new proposal its values as attributes (id, kind, description, …): new proposals are
        inserted with Core statements, as building an ORM object per row cost more than the rest of storing
        it at fleet scale."""
        run = fill.get("run") or self.get_run()
        s = self.settings
        out = []
        with session_scope(self.db) as db:
            invalid = [Experiment(**p.fields) for p in fill["invalid"]]  # rare: they get an event each
            for exp in invalid:
                db.add(exp)
            if invalid:
                db.flush()  # ids, for the events
            for exp in invalid:
                self._book_proposal(db, run, exp, None)
            fresh = self._insert_running([(p, slot) for p, slot in fill["picks"] if isinstance(p, NewProposal)],
                                         db, run)
            ids = [p.id for p, _ in fill["picks"] if not isinstance(p, NewProposal)]
            stored = {e.id: e for e in db.exec(select(Experiment).where(Experiment.id.in_(ids))).all()} if ids else {}
            for pick, slot in fill["picks"]:
                if isinstance(pick, NewProposal):
                    row, source = fresh[id(pick)], pick.source
                else:
                    row = stored[pick.id]
                    workdir = self._workdir(run, row.id)
                    seed = row.seed if row.kind in ("baseline", "promotion") else s.seed + row.id
                    row.status, row.started_at, row.attempts = "running", utcnow(), row.attempts + 1
                    row.slot, row.host, row.workdir, row.seed = slot.name, slot.host, str(workdir), seed
                    db.add(row)
                    source = self.workspace.read_file(row.commit)
                out.append((row, slot, Job(exp_id=row.id, source=source, workdir=Path(row.workdir),
                                           data_dir=self.data_dir, budget_s=row.budget_s or run.budget_s,
                                           seed=row.seed, scale=dict(row.scale_overrides or {}),
                                           eval_tokens=s.eval_tokens, seq_len=s.seq_len, grace_s=s.grace_s,
                                           device=s.device)))
        return out

    def _insert_running(self, picks: list[tuple["NewProposal", Slot]], db: Session, run: Run) -> dict:
        """Store new proposals as `running` on their slots in the open transaction: one INSERT for all, their
        commits off the branch (they need the ids; one pack for the round), one UPDATE for all. Returns
        id(proposal) → the row's values as attributes. Raises WorkspaceError when git fails (the transaction
        is then rolled back)."""
        if not picks:
            return {}
        s, now, table = self.settings, utcnow(), Experiment.__table__
        values = [column_values(Experiment, **{**p.fields, "status": "running", "started_at": now, "attempts": 1,
                                               "slot": slot.name, "host": slot.host}) for p, slot in picks]
        ids = db.execute(insert(table).returning(table.c.id, sort_by_parameter_order=True), values).scalars().all()
        rows, params = {}, []
        with self.workspace.batch():  # the round's commits in one pack, written before the transaction commits
            for (pick, _), exp_id, v in zip(picks, ids, values):
                row = SimpleNamespace(**v, id=exp_id)
                row.workdir, row.seed = str(self._workdir(run, exp_id)), s.seed + exp_id  # as for a stored row
                self._book_proposal(db, run, row, pick.source)
                params.append({"id": exp_id, "commit": row.commit, "workdir": row.workdir, "seed": row.seed})
                rows[id(pick)] = row
        _update_experiments(db, params)
        return rows

    def _workdir(self, run: Run, exp_id: int) -> Path:
        """The experiment's own directory: <home>/runs/<run>/exp-NNNNNN."""
        return self.settings.home / "runs" / run.name / f"exp-{exp_id:06d}"

    def _finish(self, exp_id: int, outcome: Optional[Outcome], infra_error: str = "", disk_full: str = "") -> None:
        """Record a result and apply the ratchet rule: decision, ledger and event in one transaction (tried
        again while the database connection is lost; a result already recorded is not recorded twice); then
        the branch follows the database. A run that failed for want of disk space is re-queued and the run
        paused with the reason (`disk full: …`) instead of counting against the idea."""
        done = retry_transient(lambda: self._record(exp_id, outcome, infra_error, disk_full),
                               what=f"recording #{exp_id}")
        self._after_record(exp_id, done)
        self.on_change()

    def _finish_many(self, items: list[tuple[int, Optional[Outcome]]]) -> None:
        """_finish for several results, in one transaction (a large fleet finishes many per tick), in the
        order given: a keep early in the batch is head for the results after it, as if recorded one by one.
        When the batch fails for a reason other than a lost connection (a bug, bad data), the results are
        recorded one by one, so one bad result does not hold up the rest; its error is raised after them."""
        if len(items) == 1:
            self._finish(*items[0])
            return
        try:
            done = retry_transient(lambda: self._record_many(items), what=f"recording {len(items)} results")
        except Exception as e:  # noqa: BLE001 - re-raised below when it concerns the database's reach
            if is_transient(e):
                raise
            log.exception("recording %d results together failed; recording them one by one", len(items))
            first: Optional[Exception] = None
            for exp_id, outcome in items:
                try:
                    self._finish(exp_id, outcome)
                except Exception as one:  # noqa: BLE001 - the first is raised once every result had its try
                    first = first or one
            if first is not None:
                raise first
            return
        for (exp_id, _), d in zip(items, done):
            self._after_record(exp_id, d)
        self.on_change()

    def _record_many(self, items: list[tuple[int, Optional[Outcome]]]) -> list:
        """_finish_many's transaction: _record_in for each item; one query loads their experiments."""
        with session_scope(self.db) as db:
            # Held, so they stay in the session's (weak) identity map: each db.get below is then no query, and
            # no query means no autoflush, so the batch's changes go out together at the commit.
            rows = db.exec(select(Experiment).where(Experiment.id.in_([i for i, _ in items]))).all()
            rows += [db.get(Run, self.run_id)]
            with self.workspace.batch():  # the batch's rebased changes in one pack, before the commit
                done = [self._record_in(db, exp_id, outcome, "", "") for exp_id, outcome in items]
            del rows
            self._written(db, done)
            return done

    @staticmethod
    def _written(db: Session, done: list) -> None:
        """Send a transaction's recorded results to the database (one flush for a batch); the commit follows.
        The fault point lets the reliability tests kill the process between the two."""
        insert_queued(db)  # the events and ledger rows (add_row), also when no ORM row changed
        db.flush()
        for d in done:
            if d is not None:
                faults.point("decision.before_commit", d[1])

    def _after_record(self, exp_id: int, done) -> None:
        """What follows a recorded result's commit: counters, then the branch follows the database."""
        if done is None:
            return
        counted, status, keep_move, promoted = done
        self._pruned.pop(exp_id, None)
        if counted:
            self.finished_here += 1
        faults.point("decision.after_commit", status)
        if keep_move:
            name, new, old = keep_move
            try:
                self.workspace.fast_forward(name, new, old)
            except WorkspaceError:
                log.exception("fast-forward of %s failed; forcing the branch to the database head", name)
                self.workspace.set_branch(name, new)
        if promoted:
            self.workspace.set_ref(promoted_ref(promoted[0]), promoted[1])

    def _record(self, exp_id: int, outcome: Optional[Outcome], infra_error: str, disk_full: str):
        """_finish's transaction (see _record_in)."""
        with session_scope(self.db) as db:
            with self.workspace.batch():
                done = self._record_in(db, exp_id, outcome, infra_error, disk_full)
            self._written(db, [done])
            return done

    def _record_in(self, db: Session, exp_id: int, outcome: Optional[Outcome], infra_error: str, disk_full: str):
        """Record one result in the open transaction `db`. Returns (counted, status, keep_move, promoted), or
        None when the experiment is no longer running (its result was recorded by an earlier try). counted:
        an experiment reached its final status (this one, or the candidate whose last confirmation run this
        was)."""
        keep_move: Optional[tuple[str, str, str]] = None
        promoted: Optional[tuple[str, str]] = None
        exp = db.get(Experiment, exp_id)
        if exp is None:  # its row was deleted while it trained (by hand): nothing left to record it in
            log.warning("experiment #%s finished but is no longer in the database; its result is dropped", exp_id)
            return None
        if exp.status != "running":
            return None
        run = db.get(Run, exp.run_id)
        head_before = run.head_val_bpb
        disk_full = disk_full or disk_full_reason(exp.workdir, outcome, local=(exp.host or "local") == "local")
        exp.finished_at, exp.pid = utcnow(), None
        if outcome is not None:
            r = outcome.result
            exp.val_bpb, exp.training_seconds, exp.total_seconds = r.val_bpb, r.training_seconds, r.total_seconds
            exp.peak_memory_mb, exp.mfu_percent, exp.tokens = r.peak_memory_mb, r.mfu_percent, r.tokens
            exp.steps, exp.params, exp.wall_seconds = r.steps, r.params, outcome.wall_seconds
            exp.curve = outcome.curve or []
            exp.log_tail = "\n".join((r.log_tail or [])[-15:] + ["--- log ---"] + outcome.log_tail[-15:]) \
                if r.status != "ok" else ""
            add_row(db, BudgetLedger, day=self._today(), run_id=run.id, experiment_id=exp.id,
                    kind="gpu_seconds", amount=outcome.wall_seconds)
            infra_error = infra_error or (f"infrastructure failure on {outcome.slot}: {r.error}"
                                          if outcome.infra_failed else "")
        if disk_full:
            exp.status, exp.reason = "queued", f"re-queued: {disk_full}"  # the idea is not at fault
            self._pause(db, run.id, disk_full)
        elif infra_error:
            if exp.attempts < MAX_ATTEMPTS:
                exp.status, exp.reason = "queued", infra_error  # never counts against the idea
                add_row(db, Event, **events.run_event_fields(
                    run, "infra_failed", f"#{exp.id} re-queued: {infra_error}", experiment_id=exp.id))
            else:
                exp.status, exp.reason = "crash", f"{infra_error} (after {exp.attempts} attempts)"
                add_row(db, Event, **events.experiment_event_fields(exp, run, head_before))
        elif outcome.aborted and exp.id in self._pruned:
            info = self._pruned[exp.id]
            exp.status, exp.reason, exp.val_bpb = "pruned", info["reason"], None
            exp.decision = {"pruned": info}
            add_row(db, Event, **events.experiment_event_fields(exp, run, head_before))
        elif outcome.aborted and exp.kind == "confirm":
            exp.status, exp.reason, exp.val_bpb = "queued", f"re-queued: {outcome.aborted}", None  # still owed
        elif outcome.aborted:
            exp.status, exp.reason, exp.val_bpb = "aborted", outcome.aborted, None
            add_row(db, Event, **events.experiment_event_fields(exp, run, head_before))
        elif outcome.result.status != "ok":
            exp.status, exp.reason, exp.val_bpb = outcome.result.status, outcome.result.error, None
            if exp.kind != "confirm":  # a failed confirmation is told in its candidate's discard
                add_row(db, Event, **events.experiment_event_fields(exp, run, head_before))
        elif exp.kind == "baseline":
            exp.status = "keep"
            add_row(db, Event, **events.experiment_event_fields(exp, run))
            self._maybe_measure_noise(db, run)
        elif exp.kind in ("promotion", "confirm"):
            exp.status = "keep"  # measured (a confirm run's verdict is its candidate's, set below)
        elif exp.parent_commit != run.head_commit:
            self._rebase_or_discard(db, run, exp)
        else:
            d = decide(exp.val_bpb, run.head_val_bpb, run.noise_sigma, min_delta=self.settings.min_delta,
                       z=self.settings.noise_z)
            exp.decision, exp.status = d.as_dict(), d.verdict
            if d.verdict == "keep" and self.settings.confirm_runs:
                self._queue_confirmation(db, run, exp)
            else:
                if d.verdict == "keep":
                    keep_move = self._advance_head(db, run, exp, [exp.val_bpb])
                add_row(db, Event, **events.experiment_event_fields(exp, run, head_before))
        db.add(exp)
        if exp.status == "keep":
            db.info.pop("commit_bpb", None)  # an accepted run changes its commit's mean
        counted = exp.kind == "experiment" and exp.status in FINAL_STATUSES
        if exp.kind == "confirm" and exp.status in FINAL_STATUSES:
            db.flush()
            resolved = self._resolve_confirmation(db, run, exp)
            if resolved is not None:
                counted, keep_move = True, resolved
        if exp.kind == "promotion" and exp.status != "queued":
            db.flush()
            promoted = self._judge_promotion(db, run, exp.promotion_id)
        if keep_move and self.settings.auto_promote_every:
            self._maybe_auto_promote(db, run)
        return counted, exp.status, keep_move, promoted

    def _advance_head(self, db: Session, run: Run, exp: Experiment, runs: list[float]) -> tuple[str, str, str]:
        """Make `exp` head in the database (val_bpb = the mean of its runs); returns the branch move
        (name, new, old) that _finish applies after the commit."""
        move = (run.name, exp.commit, run.head_commit)
        run.head_commit, run.head_val_bpb, run.head_runs = exp.commit, statistics.fmean(runs), list(runs)
        run.updated_at = utcnow()
        db.add(run)
        return move

    def _queue_confirmation(self, db: Session, run: Run, exp: Experiment) -> None:
        """A result that passed the rule does not become head yet: the same commit is queued confirm_runs
        more times (new seeds, ahead of fresh proposals) and is kept only if the mean of its runs passes too.

        Why: the best of many noisy tries is biased low (the winner's curse), so a keep on one seed is
        often luck; a fresh seed's run is not selected and pulls the estimate back to the truth. The pairs
        also measure the noise floor again as the run goes on (see _pooled_sigma).
        """
        exp.status = "confirming"
        rows = [Experiment(run_id=run.id, kind="confirm", confirms_id=exp.id, status="queued",
                           parent_commit=exp.parent_commit, commit=exp.commit, proposer=exp.proposer,
                           description=f"confirm #{exp.id}: {exp.description}", edit_key=exp.edit_key)
                for _ in range(self.settings.confirm_runs)]
        for r in rows:
            db.add(r)
        db.flush()
        d = exp.decision
        ids = ", ".join(f"#{r.id}" for r in rows)
        text = (f"#{exp.id} {exp.description or exp.edit_key}: val_bpb {exp.val_bpb:.4f} vs head "
                f"{d['head_val_bpb']:.4f} ({d['delta']:+.4f}) passes; re-training it with {len(rows)} new "
                f"seed{'s' if len(rows) > 1 else ''} ({ids}) before it becomes head")
        ev = events.run_event_fields(run, "confirming", text, val_bpb=exp.val_bpb, head_val_bpb=d["head_val_bpb"],
                                     confirm_ids=[r.id for r in rows], description=exp.description)
        add_row(db, Event, **ev, experiment_id=exp.id)

    def _resolve_confirmation(self, db: Session, run: Run, confirm: Experiment) -> Optional[tuple]:
        """After a confirm run is recorded: once its candidate's confirmation runs are all in (or one failed),
        the candidate's verdict. Keep iff the mean of all its runs passes the rule against head with σ
        re-pooled (a failed confirmation run discards it; a head that moved on meanwhile gets the stale-parent
        treatment with that mean). Confirm runs take their candidate's verdict. Returns the branch move of a
        keep, () for a verdict that moves nothing, or None while the candidate still waits."""
        cand = db.get(Experiment, confirm.confirms_id) if confirm.confirms_id else None
        if cand is not None:
            self._note_confirm_run(cand, confirm)
        if cand is None or cand.status != "confirming":
            if cand is not None and confirm.status == "keep" and cand.status != "keep":
                confirm.status = "discard"  # a late sibling of a candidate already discarded
            return None
        rows = list(db.exec(select(Experiment).where(Experiment.confirms_id == cand.id)).all())
        failed = next((r for r in rows if r.status in FINAL_STATUSES and r.status != "keep"), None)
        if failed is None and any(r.status not in FINAL_STATUSES for r in rows):
            return None
        head_before, first, move = run.head_val_bpb, dict(cand.decision or {}), ()
        if failed is not None:
            cand.status = "discard"
            cand.reason = f"its confirmation run #{failed.id} {failed.status}: {failed.reason}"
            cand.decision = {**first, "verdict": "discard", "first_run": first, "confirm_failed": failed.id}
            add_row(db, Event, **events.experiment_event_fields(cand, run, head_before))
        else:
            runs = [cand.val_bpb] + [r.val_bpb for r in rows]
            mean = statistics.fmean(runs)
            run.noise_sigma = self._pooled_sigma(db, run)
            db.add(run)
            if cand.parent_commit != run.head_commit:
                self._rebase_or_discard(db, run, cand, val_bpb=mean, runs=runs, first_run=first)  # adds the event
            else:
                d = decide(mean, run.head_val_bpb, run.noise_sigma, min_delta=self.settings.min_delta,
                           z=self.settings.noise_z)
                cand.status = d.verdict
                cand.decision = {**d.as_dict(), "runs": runs, "first_run": first}
                if d.verdict == "keep":
                    move = self._advance_head(db, run, cand, runs)
                else:
                    cand.reason = (f"did not hold up: {len(runs)} runs average {mean:.4f} vs head "
                                   f"{run.head_val_bpb:.4f} (first run {cand.val_bpb:.4f})")
                add_row(db, Event, **events.experiment_event_fields(cand, run, head_before))
        for r in rows:
            if r.status == "queued":  # a sibling run no longer needed
                r.status, r.reason = "aborted", f"#{cand.id} was discarded"
            elif r.status == "keep":
                r.status = "keep" if cand.status == "keep" else "discard"
            db.add(r)
        db.add(cand)
        return move

    def _pooled_sigma(self, db: Session, run: Run) -> float:
        """σ pooled over the baseline repeats and every change with confirmation runs (each a group of runs
        of one commit): the three baseline runs alone give a rough σ (two degrees of freedom), and every
        confirmation adds one more. The groups are read from the database once per process and then kept
        up to date by _note_confirm_run: read every time, they cost a scan of the run's confirmation runs
        per confirmation (a week-long fleet run has tens of thousands), and pooled in numpy (SpreadPool)."""
        if self._sigma_groups is None:
            confirms = select(Experiment.id, Experiment.confirms_id, Experiment.val_bpb).where(
                Experiment.run_id == run.id, Experiment.kind == "confirm", Experiment.val_bpb.is_not(None))
            groups: dict[int, dict[int, float]] = {
                cid: {cid: v} for cid, v in db.exec(select(Experiment.id, Experiment.val_bpb).where(
                    Experiment.id.in_(confirms.with_only_columns(Experiment.confirms_id).scalar_subquery()),
                    Experiment.val_bpb.is_not(None)).order_by(Experiment.id)).all()}
            for i, cid, v in db.exec(confirms.order_by(Experiment.id)).all():
                if cid in groups:
                    groups[cid][i] = v
            self._sigma_groups, self._sigma_pool = groups, SpreadPool()
            for cid, g in groups.items():
                self._sigma_pool.set(cid, list(g.values()))
            # Read with them: the baseline repeats are all in before any change is confirmed (they set σ first).
            self._sigma_base = self._baseline_runs(db, run)
        return self._sigma_pool.sigma([self._sigma_base])

    def _note_confirm_run(self, cand: Experiment, confirm: Experiment) -> None:
        """Add a measured confirmation run to its candidate's group for _pooled_sigma (keyed by experiment id,
        so recording it again after a rolled-back transaction changes nothing)."""
        if self._sigma_groups is None or confirm.val_bpb is None or cand.val_bpb is None:
            return  # not read yet (the first _pooled_sigma reads it), or nothing measured
        group = self._sigma_groups.setdefault(cand.id, {cand.id: cand.val_bpb})
        group[confirm.id] = confirm.val_bpb
        self._sigma_pool.set(cand.id, list(group.values()))

    def _commit_bpb(self, db: Session, run: Run, commit: str) -> Optional[float]:
        """Mean val_bpb of the accepted runs of `commit` (its keep or its baseline repeats). Remembered for the
        transaction: when head moves on, every result in flight asks about the same parent; a parent's runs
        are complete before any child of it exists, and the memo is dropped whenever a run is accepted."""
        memo = db.info.setdefault("commit_bpb", {})
        if commit in memo:
            return memo[commit]
        vals = db.exec(select(Experiment.val_bpb).where(Experiment.run_id == run.id, Experiment.commit == commit,
                                                        Experiment.status == "keep")).all()
        vals = [v for v in vals if v is not None]
        memo[commit] = statistics.fmean(vals) if vals else None
        return memo[commit]

    def _rebase_or_discard(self, db: Session, run: Run, exp: Experiment, val_bpb: Optional[float] = None,
                           **extra) -> None:
        """A result whose parent is no longer head (another slot kept meanwhile). If it beat its own parent
        by the rule, its change is rebased onto the new head and queued as a new experiment that must
        confirm the gain there; so the ratchet stays monotone and two results never both advance the
        branch from the same parent. Otherwise it is discarded. val_bpb: the value judged (default the
        experiment's own; the mean of its runs after a confirmation); extra: stored with the decision."""
        parent_bpb = self._commit_bpb(db, run, exp.parent_commit)
        d = decide(exp.val_bpb if val_bpb is None else val_bpb,
                   parent_bpb if parent_bpb is not None else run.head_val_bpb, run.noise_sigma,
                   min_delta=self.settings.min_delta, z=self.settings.noise_z)
        exp.decision = {**d.as_dict(), "compared_with": "parent", "stale_parent": True, **extra}
        exp.status = "discard"
        if d.verdict != "keep":
            exp.reason = f"head moved on while it trained, and it did not beat its parent ({d.delta:+.4f})"
            add_row(db, Event, **events.experiment_event_fields(exp, run, parent_bpb))
            return
        head_src = self.workspace.read_file(run.head_commit)
        merged = self.workspace.merge_text(self.workspace.read_file(exp.parent_commit), head_src,
                                           self.workspace.read_file(exp.commit))
        verdict = validate_proposal(head_src, {"train.py": merged}, seen_hashes=self.seen_hashes(run.id)) \
            if merged is not None else None
        if verdict is None or not verdict.ok:
            why = "does not apply to the new head" if verdict is None else f"rebased change is invalid: {verdict.reason}"
            exp.reason = f"beat its parent ({d.delta:+.4f}) but {why}"
            add_row(db, Event, **events.experiment_event_fields(exp, run, parent_bpb))
            return
        confirm = Experiment(run_id=run.id, kind="experiment", parent_commit=run.head_commit, proposer=exp.proposer,
                             description=f"{exp.description} (rebased, confirms #{exp.id})",
                             hypothesis=exp.hypothesis, diff=verdict.diff, edit_key=f"{exp.edit_key}@{exp.id}",
                             ast_hash=verdict.ast_hash, status="queued")
        self.seen_hashes(run.id).add(verdict.ast_hash)
        db.add(confirm)
        db.flush()
        confirm.commit = self.workspace.commit_experiment(confirm.id, run.head_commit, merged,
                                                          f"exp {confirm.id}: rebase of #{exp.id}")
        db.add(confirm)
        exp.reason = f"beat its parent ({d.delta:+.4f}) while head moved on: rebased as #{confirm.id} to confirm"
        add_row(db, Event, **events.run_event_fields(run, "rebased", f"#{exp.id} {exp.description}: beat its parent, "
                                                     f"rebased onto head as #{confirm.id} to confirm",
                                                     experiment_id=exp.id, confirm_id=confirm.id))

    # ---- promotion ----

    def _expand_promotions(self, run: Run) -> None:
        """Queued promotions get their runs (reference and candidate at the scale, paired seeds); the runs of
        a cancelled promotion are aborted (killed when training). Asked every tick, so one indexed query
        answers when there is nothing new (a cancelled promotion stays `cancelled`; it is handled once)."""
        table = Promotion.__table__
        with self.db.connect() as conn:
            pending = conn.execute(select(table.c.id).where(
                table.c.run_id == run.id, table.c.status.in_(("queued", "cancelled")))).scalars().all()
        if not set(pending) - self._cancels_done:
            return
        with session_scope(self.db) as db:
            for p in db.exec(select(Promotion).where(Promotion.run_id == run.id, Promotion.status == "queued")).all():
                for exp in promotion.runs_for(p, seed_base=self.settings.seed):
                    db.add(exp)
                p.status = "running"
                db.add(p)
                db.add(events.run_event(run, "promotion_started", f"promotion #{p.id} started: "
                                        f"{p.candidate_commit[:10]} vs {p.reference_commit[:10]} at {p.scale} "
                                        f"({p.budget_s:g} s, {p.seeds} seed(s) each)", promotion_id=p.id))
            cancelled = {p.id for p in db.exec(select(Promotion).where(Promotion.run_id == run.id,
                                                                        Promotion.status == "cancelled")).all()}
            if cancelled:
                for exp in db.exec(select(Experiment).where(Experiment.promotion_id.in_(cancelled),
                                                            Experiment.status == "queued")).all():
                    exp.status, exp.reason, exp.finished_at = "aborted", "promotion cancelled", utcnow()
                    db.add(exp)
        for exp_id, h in list(self.handles.items()):
            if getattr(h, "kind", "") == "promotion" and getattr(h, "promotion_id", None) in cancelled:
                h.kill("promotion cancelled")
        self._cancels_done |= cancelled

    def _judge_promotion(self, db: Session, run: Run, promotion_id: int) -> Optional[tuple[str, str]]:
        """When every run of the promotion has ended: the verdict, stored and posted. A transfer advances the
        run's promoted commit; returns (run name, commit) then, for the ref to follow."""
        p = db.get(Promotion, promotion_id)
        if p is None or p.status != "running":
            return None
        exps = db.exec(select(Experiment).where(Experiment.promotion_id == p.id).order_by(Experiment.id)).all()
        if any(e.status in ("queued", "running", "proposed") for e in exps):
            return None
        by_seed: dict[int, dict[str, Experiment]] = {}
        for e in exps:
            by_seed.setdefault(e.seed, {})[e.edit_key] = e
        pairs = [(d["reference"], d["candidate"]) for d in by_seed.values()
                 if all(x in d and d[x].status == "keep" and d[x].val_bpb is not None for x in ("reference", "candidate"))]
        failed = [e for e in exps if e.status in ("crash", "timeout", "aborted")]
        ref_small, ref_params = promotion.commit_stats(db, run.id, p.reference_commit)
        cand_small, cand_params = promotion.commit_stats(db, run.id, p.candidate_commit)
        if not pairs:
            p.status, p.verdict = "failed", ""
            p.result = {"reason": f"no completed pair: {failed[0].status} {failed[0].reason}" if failed else "no runs"}
            text = f"promotion #{p.id} failed: {p.result['reason']}"
        else:
            t = promotion.judge(
                [r.val_bpb for r, _ in pairs], [c.val_bpb for _, c in pairs],
                delta_small=None if ref_small is None or cand_small is None else cand_small - ref_small,
                sigma_small=run.noise_sigma,
                params_small={k: v for k, v in (("reference", ref_params), ("candidate", cand_params)) if v},
                params_large={"reference": pairs[0][0].params, "candidate": pairs[0][1].params},
                overrides=p.scale_overrides, z=self.settings.noise_z, min_delta=self.settings.min_delta)
            p.status, p.verdict, p.result = "done", t.verdict, t.as_dict()
            small = f"{t.delta_small:+.4f}" if t.delta_small is not None else "n/a"
            large = f"{t.delta_large:+.4f} ± {t.se_large:.4f}" if t.delta_large is not None else "n/a"
            text = (f"promotion #{p.id} to {p.scale}: {t.verdict.replace('_', ' ')} — Δ val_bpb {small} at the "
                    f"loop's scale, {large} at {p.scale}; {t.reason}")
        p.finished_at = utcnow()
        db.add(p)
        out = None
        if p.verdict == "transfers":
            run.promoted_commit, run.updated_at = p.candidate_commit, utcnow()
            db.add(run)
            out = (run.name, p.candidate_commit)
        db.add(events.run_event(run, "promotion", text, promotion_id=p.id, verdict=p.verdict, result=p.result,
                                scale=p.scale, candidate_exp_id=p.candidate_exp_id))
        return out

    def _maybe_auto_promote(self, db: Session, run: Run) -> None:
        """Every `auto_promote_every` keeps since the last promotion, promote head."""
        last = db.exec(select(Promotion.created_at).where(Promotion.run_id == run.id)
                       .order_by(Promotion.id.desc())).first()
        q = select(Experiment.id).where(Experiment.run_id == run.id, Experiment.kind == "experiment",
                                        Experiment.status == "keep")
        if last is not None:
            q = q.where(Experiment.finished_at > last)
        if len(db.exec(q).all()) < self.settings.auto_promote_every:
            return
        try:
            p = promotion.plan(db, run, self.settings, exp_id=None, scale=None, user="auto")
        except promotion.PromotionError as e:
            log.info("auto-promote skipped: %s", e)
            return
        db.add(p)
        db.flush()
        db.add(events.run_event(run, "promotion_requested", f"promotion #{p.id} of head to {p.scale} requested "
                                f"automatically (every {self.settings.auto_promote_every} keeps)", promotion_id=p.id))

    # ---- hosts ----

    def check_health(self) -> list[dict]:
        """Ask the runner about its hosts (when it has any), record them in the hosts table, post an
        event when one goes down or comes back, and keep new experiments off hosts that are down.

        Returns [{name, up, error, detail}]. A host's running experiments are the runner's to report
        (as infra_failed); they are then re-queued onto another slot.
        """
        health = getattr(self.runner, "health", None)
        records = [normalise_health(r) for r in health()] if callable(health) else \
            [{"name": "local", "up": True, "error": "", "detail": {}}]
        slots_by_host: dict[str, int] = {}
        for slot in getattr(self.runner, "all_slots", self.runner.slots)():  # down hosts' slots too
            slots_by_host[slot.host] = slots_by_host.get(slot.host, 0) + 1
        with session_scope(self.db) as db:
            run = db.get(Run, self.run_id)
            for rec in records:
                row = db.exec(select(Host).where(Host.name == rec["name"])).first()
                row = row or Host(name=rec["name"], runner=self.runner.name)
                was_up = row.state == "up"
                row.state = "up" if rec["up"] else "down"
                row.slots = slots_by_host.get(rec["name"], row.slots)
                row.address = str(rec["detail"].get("address", row.address) or "")
                row.last_error = rec["error"] if not rec["up"] else row.last_error
                row.last_seen = utcnow() if rec["up"] else row.last_seen
                db.add(row)
                if was_up != bool(rec["up"]) and row.id is not None:
                    kind = "host_up" if rec["up"] else "host_down"
                    text = (f"host {rec['name']} is back: its slots take experiments again" if rec["up"] else
                            f"host {rec['name']} is down: {rec['error'] or 'no answer'}; its experiments are re-queued")
                    db.add(events.run_event(run, kind, text, host=rec["name"], error=rec["error"]))
        self.hosts_down = {r["name"] for r in records if not r["up"]}
        self.on_change()
        return records

    # ---- early pruning ----

    def _head_curves(self, run: Run) -> list[list[list[float]]]:
        """Head's loss curves ([[elapsed_s, loss], …] each): those of its accepted runs (the kept run and its
        confirm runs, or the baseline repeats), the most recent five."""
        if self._head_curve_cache[0] == run.head_commit:
            return self._head_curve_cache[1]
        with Session(self.db) as db:
            curves = [c for c in db.exec(select(Experiment.curve).where(
                Experiment.run_id == run.id, Experiment.commit == run.head_commit, Experiment.status == "keep",
                Experiment.kind != "promotion").order_by(Experiment.id.desc()).limit(5)).all() if c]
        self._head_curve_cache = (run.head_commit, curves)
        return curves

    def _prune(self, run: Run) -> None:
        """Stop experiments whose loss is behind head's at the same elapsed time by more than the margin, once
        prune_after of the budget has passed (status `pruned`; the GPU-seconds saved are kept).

        Both sides are averaged over the last PRUNE_WINDOW of the budget (the run over the points seen at
        each tick, head over all its accepted runs' curves), and the run must be behind on PRUNE_CHECKS
        checks in a row: comparing one noisy step with one stretch of one head curve stopped good runs."""
        s = self.settings
        head = self._head_curves(run) if s.prune and run.noise_sigma is not None else []
        window = PRUNE_WINDOW * run.budget_s
        for exp_id, h in list(self.handles.items()):
            p = h.progress() if head else None
            if not p or getattr(h, "kind", "") != "experiment" or exp_id in self._pruned:
                continue
            loss, t = p.get("loss"), float(p.get("elapsed_s", 0.0))
            if not isinstance(loss, (int, float)) or int(p.get("step") or 0) < PRUNE_MIN_STEPS:
                continue  # too few steps to judge: on a slow or busy machine the first steps say nothing
            seen = self._loss_seen.setdefault(exp_id, [])
            if seen and seen[-1][0] > t:
                seen.clear()  # a re-run of the experiment: its clock started again
            if not seen or seen[-1][0] < t:
                seen.append([t, float(loss)])
            del seen[:-200]  # bounded: only the last window is ever read
            mine = curve_loss_at(seen, t, window)
            refs = [r for r in (curve_loss_at(c, t, window) for c in head) if r is not None]
            ref = sum(refs) / len(refs) if refs else None
            behind = (t >= s.prune_after * run.budget_s and mine is not None and ref is not None
                      and sum(1 for e, _ in seen if e > t - window) >= PRUNE_CHECKS
                      and mine > ref * (1 + s.prune_margin))
            self._behind[exp_id] = self._behind.get(exp_id, 0) + 1 if behind else 0
            if self._behind[exp_id] < PRUNE_CHECKS:
                continue
            info = {"reason": f"pruned at {t:.0f}/{run.budget_s:.0f} s: loss {mine:.3f} vs head's {ref:.3f} "
                              f"(means over the last {window:.3g} s)",
                    "elapsed_s": t, "loss": mine, "head_loss": ref, "saved_s": max(0.0, run.budget_s - t)}
            self._pruned[exp_id] = info
            h.kill(info["reason"])

    def _baseline_runs(self, db: Session, run: Run) -> list[float]:
        """val_bpb of each finished baseline repeat of the run."""
        return [v for v in db.exec(select(Experiment.val_bpb).where(
            Experiment.run_id == run.id, Experiment.kind == "baseline", Experiment.status == "keep")).all()
            if v is not None]

    def _maybe_measure_noise(self, db: Session, run: Run) -> None:
        done = self._baseline_runs(db, run)
        if len(done) < self.settings.noise_repeats or run.noise_sigma is not None:
            return
        run.noise_sigma = noise_floor(done)
        run.head_val_bpb = statistics.fmean(done)
        run.head_runs = list(done)
        run.updated_at = utcnow()
        db.add(run)
        db.add(events.run_event(run, "baseline", f"baseline measured: val_bpb {run.head_val_bpb:.4f}, noise σ "
                                f"{run.noise_sigma:.4f} over {len(done)} runs; keep threshold "
                                f"{max(self.settings.min_delta, self.settings.noise_z * run.noise_sigma):.4f}",
                                val_bpb=run.head_val_bpb, sigma=run.noise_sigma, runs=list(done)))

    def _today(self) -> str:
        """The budget day the ledger books spend under (configured timezone)."""
        return budget.budget_day(None, self.settings.timezone)

    def _budget_reached(self, run: Run) -> bool:
        """Pause the run when a GPU or Claude cap is reached (reason `budget: <which> …`); True if so."""
        if self._ledger is None or self._ledger.run_id != run.id:
            self._ledger = budget.LedgerTotals(run.id)
        with session_scope(self.db) as db:
            cap = budget.reached(db, run.id, self.settings, totals=self._ledger)
            if cap is None:
                return False
            self._pause(db, run.id, budget.pause_reason(cap), budget=cap.name)
        return True

    def rollover(self) -> bool:
        """At the budget day's rollover: resume a run that only a daily budget had paused, if no cap is
        reached now. Returns True when the run was resumed."""
        with self.lock, session_scope(self.db) as db:
            run = db.get(Run, self.run_id)
            if run.state != "paused" or not run.pause_reason.startswith("budget:"):
                return False
            if budget.reached(db, run.id, self.settings) is not None:
                return False
            was = run.pause_reason
            run.state, run.pause_reason, run.pause_now, run.updated_at = "running", "", False, utcnow()
            db.add(run)
            db.add(events.run_event(run, "resumed", f"resumed by ratchet: new budget day (was: {was})",
                                    by="ratchet", reason="budget rollover"))
        self.wake()
        self.on_change()
        return True

    def _pause(self, db: Session, run_id: int, reason: str, by: str = "ratchet", **payload) -> None:
        run = db.get(Run, run_id)
        if run.state == "paused":
            return
        run.state, run.pause_reason, run.pause_now, run.updated_at = "paused", reason, False, utcnow()
        db.add(run)
        db.add(events.run_event(run, "paused", f"paused by {by}: {reason}", by=by, reason=reason, **payload))
        self.on_change()
