"""Where the engine's fresh proposals come from and how they are stored: what the proposer is shown (history,
research state, seen hashes), asking it (inline for a fast proposer, else in the background while slots train),
and storing its answer validated — `queued` with its commit off the branch, or `invalid` with the reason.

Never decides keep or discard and never starts a run.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Optional

from sqlalchemy import func, union
from sqlmodel import Session, select

from db.models import BudgetLedger, Experiment, Hint, Promotion, Run, utcnow
from db.session import retry_transient, session_scope
from loop import budget, events, swarm
from loop.config import Settings
from loop.proposers.base import (Proposal, ProposalAuthError, ProposalError, ProposalExhausted, ProposalRejected,
                                 Proposer, ResearchState, TriedEdit)
from loop.validate import unified_diff, validate_proposal
from loop.workspace import STALE_LOCK_S, Workspace, WorkspaceError

log = logging.getLogger("ratchet.proposals")

HISTORY_RECENT = 200  # most recent experiments always shown to the proposer (besides head's and the keeps)
PROPOSAL_BACKOFF_S = (5, 15, 60, 300)  # growing delay after proposer failures
KEPT_DIFFS = 3  # last kept changes whose diffs the proposer is shown
KEPT_DIFF_LINES = 40  # lines of each such diff
# A paid answer is not dropped because git refused its commit for a while: a ref lock that a killed process left
# behind is taken for stale (and removed) after STALE_LOCK_S, so storing is tried again until a little after that.
STORE_RETRY_S = STALE_LOCK_S + 10


@dataclass
class Flight:
    """A request in flight: its research direction and its expected cost (USD)."""

    direction: str
    expected_usd: float


class SeenHashes:
    """`h in seen`: has the run an experiment with this normalised-AST hash? Asked of the indexed column each
    time, so a long run never holds every hash in memory. Thread-safe (a proposer's thread asks too)."""

    def __init__(self, db, run_id: int):
        self.db, self.run_id = db, run_id

    def __contains__(self, ast_hash: object) -> bool:
        if not ast_hash or not isinstance(ast_hash, str):
            return False
        with Session(self.db) as s:
            return s.exec(select(Experiment.id).where(Experiment.run_id == self.run_id,
                                                      Experiment.ast_hash == ast_hash).limit(1)).first() is not None


class Proposals:
    """The run's proposer as the engine uses it: a fast one is asked inline (take); a slow one (Claude) has as
    many requests in flight as the fleet needs (fill), each stored as it lands. `on_ready` is called (from a
    request's thread) when one ends. `concurrency`: the most requests in flight (`proposer_concurrency`).
    Counters for status and benchmarks: requests, throttles (429 / 529 seen), peak_in_flight."""

    def __init__(self, proposer: Proposer, db, workspace: Workspace, settings: Settings, device: str,
                 on_ready: Callable[[], None], concurrency: int = 1):
        self.proposer, self.db, self.workspace, self.settings, self.device = proposer, db, workspace, settings, device
        self.on_ready = on_ready
        self._pool = ThreadPoolExecutor(max_workers=swarm.MAX_CONCURRENCY, thread_name_prefix="proposer")
        self._lock = threading.Lock()  # the flights, the AIMD limit, the latency window, the landed notes
        self._store_lock = threading.Lock()  # one answer stored at a time (the duplicate check, git)
        self._flights: dict[int, Flight] = {}
        self._next_id = 0
        self._landed: list[tuple[str, str]] = []
        self.aimd = swarm.Aimd(concurrency)
        self.latency = swarm.Latency()
        self.requests = self.throttles = self.peak_in_flight = 0
        self._failures = 0
        self._retry_at = 0.0
        if proposer is not None:  # None: an engine that only reads and steers (tools, tests), never proposes
            proposer.on_throttle = self.throttled

    # ---- what the proposer is shown ----

    def history(self, run: Run) -> list[TriedEdit]:
        """Earlier experiments, oldest first, with Δ val_bpb vs their parent: every keep and the HISTORY_RECENT most
        recent (bounded, however long head stands still; what was tried on head is research_state's
        tried_on_head)."""
        with Session(self.db) as db:
            oldest_recent = db.exec(select(Experiment.id).where(Experiment.run_id == run.id)
                                    .order_by(Experiment.id.desc()).offset(HISTORY_RECENT - 1).limit(1)).first() or 0
            # A union of two indexed reads: with OR in one WHERE, SQLite scans every experiment of the run.
            ids = union(*(select(Experiment.id).where(Experiment.run_id == run.id, cond) for cond in (
                Experiment.status == "keep", Experiment.id >= oldest_recent)))
            # The columns used below, not whole rows: diffs, curves and logs are most of a row's bytes.
            rows = db.exec(select(Experiment.id, Experiment.kind, Experiment.status, Experiment.commit,
                                  Experiment.parent_commit, Experiment.val_bpb, Experiment.edit_key,
                                  Experiment.description, Experiment.reason, Experiment.steps, Experiment.tokens,
                                  Experiment.training_seconds, Experiment.peak_memory_mb, Experiment.mfu_percent,
                                  Experiment.direction)
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
            tps = e.tokens / e.training_seconds if e.tokens and e.training_seconds else None
            out.append(TriedEdit(e.parent_commit, e.edit_key, e.status, e.val_bpb, e.description, exp_id=e.id,
                                 delta=delta, reason=(e.reason or "").splitlines()[0][:200] if e.reason else "",
                                 steps=e.steps, tokens_per_s=tps, peak_memory_mb=e.peak_memory_mb,
                                 mfu_percent=e.mfu_percent, direction=e.direction or ""))
        return out

    def research_state(self, run: Run) -> ResearchState:
        """The run as a proposer sees it: head, noise floor, threshold, hints, program.md, seen hashes; for a slow
        proposer also the swarm's part of its prompt (in_progress: what is queued or training; the last kept
        diffs), for a fast one the edit keys tried on head (tried_on_head) instead. Each reads thousands of rows
        on a large fleet, and only its own kind of proposer uses it: a fast one, asked inline every round, sees
        what is queued or training on head in tried_on_head; a slow one sees what was tried in its history and
        prompt (tried_on_head grows for as long as head stands still)."""
        fast = self.proposer is not None and self.proposer.fast
        with Session(self.db) as db:
            hints = db.exec(select(Hint).where(Hint.run_id == run.id, Hint.closed_at.is_(None))
                            .order_by(Hint.id)).all()
            base = db.exec(select(Experiment.val_bpb).where(Experiment.run_id == run.id, Experiment.kind == "baseline",
                                                            Experiment.status == "keep")).all()
            failed_ids = [pid for pid in db.exec(select(Promotion.candidate_exp_id).where(
                Promotion.run_id == run.id, Promotion.verdict == "does_not_transfer")).all() if pid]
            not_transferred = tuple(f"#{e.id} {e.description}" for e in db.exec(
                select(Experiment).where(Experiment.id.in_(failed_ids))).all()) if failed_ids else ()
            # Sorted here: with ORDER BY id, SQLite reads every experiment of the run in id order instead of
            # the (run_id, status) index.
            in_progress = tuple(f"#{i} {d}" + (f" [{dr}]" if dr else "") for i, d, dr in sorted(db.exec(
                select(Experiment.id, Experiment.description, Experiment.direction).where(
                    Experiment.run_id == run.id, Experiment.kind == "experiment",
                    Experiment.status.in_(("queued", "running", "confirming")))).all())) if not fast else ()
            tried = frozenset(db.exec(select(Experiment.edit_key).where(
                Experiment.run_id == run.id, Experiment.kind == "experiment",
                Experiment.parent_commit == run.head_commit)).all()) if fast else frozenset()
            kept = db.exec(select(Experiment.id, Experiment.description, Experiment.diff).where(
                Experiment.run_id == run.id, Experiment.kind == "experiment", Experiment.status == "keep")
                .order_by(Experiment.id.desc()).limit(KEPT_DIFFS)).all() if not fast else ()
        kept_diffs = tuple((f"#{i} {d}", short_diff(diff)) for i, d, diff in kept)
        try:
            program = self.workspace.read_file(run.head_commit, "program.md")
        except WorkspaceError:
            program = ""
        sigma, s = run.noise_sigma, self.settings
        return ResearchState(
            run=run.name, head_val_bpb=run.head_val_bpb, noise_sigma=sigma,
            baseline_val_bpb=statistics.fmean(base) if base else None,
            keep_threshold=None if sigma is None else max(s.min_delta, s.noise_z * sigma),
            budget_s=run.budget_s, device=self.device, program=program,
            hints=tuple((h.author, h.text) for h in hints), seen_hashes=SeenHashes(self.db, run.id),
            not_transferred=not_transferred, in_progress=in_progress, kept_diffs=kept_diffs, tried_on_head=tried)

    # ---- asking ----

    def waiting(self) -> bool:
        """True while nothing is to be asked (backing off after a failure, or told to wait)."""
        return time.time() < self._retry_at

    def wait(self, seconds: float) -> None:
        """Ask nothing for `seconds`."""
        self._retry_at = time.time() + seconds

    def failed(self) -> bool:
        """Note a failed request: nothing is asked for the next step of PROPOSAL_BACKOFF_S. Returns True for the
        first failure in a row."""
        self.wait(PROPOSAL_BACKOFF_S[min(self._failures, len(PROPOSAL_BACKOFF_S) - 1)])
        self._failures += 1
        return self._failures == 1

    def succeeded(self) -> None:
        """The proposer answered: the back-off starts again from its first step."""
        self._failures = 0

    # ---- the swarm: slow proposers, many requests in flight ----

    def in_flight(self) -> int:
        """Requests in flight now."""
        with self._lock:
            return len(self._flights)

    def set_concurrency(self, n: int) -> None:
        """The most requests in flight (`proposer_concurrency`); a back-off in progress keeps its lower limit."""
        with self._lock:
            if n != self.aimd.cap:
                self.aimd.set_cap(n)

    def limit(self) -> int:
        """The most requests allowed in flight now: `proposer_concurrency`, lowered by the AIMD back-off."""
        with self._lock:
            return self.aimd.limit

    def fill(self, run: Run, free: int, remaining_s: list[float], left: Optional[int] = None) -> int:
        """Start the requests the fleet needs (loop/swarm.py: free slots and slots expected to free up within the
        median answer time, less the proposals stored `queued`), within the AIMD limit, `left` (experiments left
        before max_experiments, not counting the queued ones) and the Claude budget (spend + the expected cost of
        every request in flight never passes a cap). Never while paused, backing off, or before the noise floor is
        known. Each answer is stored by the request's own thread as soon as it arrives (see _land). Returns the
        requests started."""
        if self.proposer.fast or self.waiting() or run.noise_sigma is None or run.state == "paused":
            return 0
        with self._lock:  # flights first, then the queue: an answer stored in between is counted twice, not never
            in_flight = len(self._flights)
        with Session(self.db) as db:
            ready = db.exec(select(func.count()).select_from(Experiment).where(
                Experiment.run_id == run.id, Experiment.status == "queued", Experiment.kind == "experiment")).one()
        with self._lock:
            need = swarm.demand(free, remaining_s, self.latency.median(), ready)
            n = min(swarm.to_start(need, in_flight, self.aimd.limit, None if left is None else left - ready),
                    self.aimd.limit - len(self._flights))
        if n <= 0:
            return 0
        expected = self.expected_cost_usd(run)
        with Session(self.db) as db:
            headroom = budget.headroom(db, run.id, self.settings, "claude")
        if headroom is not None and expected > 0:
            with self._lock:
                headroom -= sum(f.expected_usd for f in self._flights.values())
            n = min(n, int((headroom + 1e-9) // expected)) if headroom > 0 else 0  # 1e-9: float sums
        if n <= 0:
            return 0
        parent = run.head_commit
        head_source = self.workspace.read_file(parent)
        history, state = self.history(run), self.research_state(run)
        active, tried = self._directions_now(run)
        directions = swarm.parse_directions(state.program)
        text = {d.name: d.text for d in directions}
        for _ in range(n):
            with self._lock:
                now_active = dict(active)  # queued and training, plus the requests in flight now
                for f in self._flights.values():
                    now_active[f.direction] = now_active.get(f.direction, 0) + 1
                direction = swarm.pick_direction(directions, now_active, tried)
                others = tuple(f.direction or "any" for f in self._flights.values())
                self._next_id += 1
                fid = self._next_id
                self._flights[fid] = Flight(direction, expected)
                self.peak_in_flight = max(self.peak_in_flight, len(self._flights))
                self.requests += 1
            asked = replace(state, direction=direction, direction_text=text.get(direction, ""), being_proposed=others)
            fut = self._pool.submit(self._ask, fid, run.id, parent, head_source, history, asked)
            fut.add_done_callback(lambda _f: self.on_ready())
        return n

    def drain(self) -> list[tuple[str, str]]:
        """What the requests that ended since the last call have to tell the engine, oldest first:
        ("stored", status) for each stored answer, ("error", message) for a failed request, ("auth", message),
        ("exhausted", message), ("throttled", event text) once per back-off (loop/swarm.py Aimd)."""
        with self._lock:
            out, self._landed = self._landed, []
        return out

    def close(self, wait: bool = False) -> None:
        """Stop taking requests; with wait, let those in flight finish (and be stored) first."""
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def expected_cost_usd(self, run: Run) -> float:
        """What one more request is expected to cost (USD), for the budget check: the dearest of the last
        twenty paid proposals, or the proposer's own estimate before the first."""
        with Session(self.db) as db:
            recent = db.exec(select(Experiment.cost_usd).where(Experiment.run_id == run.id, Experiment.cost_usd > 0)
                             .order_by(Experiment.id.desc()).limit(20)).all()
        if recent:
            return max(recent)
        return float(self.proposer.estimate_usd())

    def throttled(self, status: int) -> None:
        """A 429 / 529 was seen (the SDK may retry it): halve the limit on requests in flight, one event per
        back-off. Called from the proposer's HTTP hook, any thread."""
        with self._lock:
            before = self.aimd.limit
            self.throttles += 1
            if self.aimd.throttled(time.monotonic()):
                kind = "rate-limited (429)" if status == 429 else "overloaded (529)"
                self._landed.append(("throttled", f"Anthropic API {kind}: proposals in flight {before} → "
                                                  f"{self.aimd.limit}, growing back as answers arrive"))

    def _directions_now(self, run: Run) -> tuple[dict[str, int], dict[str, int]]:
        """({direction: proposals queued or training}, {direction: experiments tried}) of the run."""
        with Session(self.db) as db:
            rows = db.exec(select(Experiment.direction, Experiment.status, func.count()).where(
                Experiment.run_id == run.id, Experiment.kind == "experiment", Experiment.direction != "")
                .group_by(Experiment.direction, Experiment.status)).all()
        active: dict[str, int] = {}
        tried: dict[str, int] = {}
        for d, status, n in rows:
            tried[d] = tried.get(d, 0) + n
            if status in ("queued", "running", "confirming"):
                active[d] = active.get(d, 0) + n
        return active, tried

    def _ask(self, fid: int, run_id: int, parent: str, parent_source: str, history: list[TriedEdit],
             state: ResearchState) -> None:
        """One request, in a pool thread: ask, then store the answer at once (a kill after this loses nothing
        paid that was stored); what the engine must act on goes to drain()."""
        started = time.monotonic()
        note: Optional[tuple[str, str]] = None
        try:
            proposal = self.proposer.propose(parent_source, parent, history, state)
            proposal.direction = proposal.direction or state.direction
            with self._lock:
                self.latency.add(time.monotonic() - started)
                self.aimd.answered()
                self._failures = 0
            note = self._land(run_id, parent, parent_source, proposal)
        except ProposalAuthError as e:
            note = ("auth", str(e))
        except ProposalExhausted as e:
            note = ("exhausted", str(e))
        except ProposalRejected as e:
            with self._lock:
                self._failures = 0
            with self._store_lock:
                self.store_rejected(self._run(run_id), e, direction=state.direction)
            note = ("stored", "invalid")
        except ProposalError as e:
            note = ("error", str(e))
        except Exception as e:  # noqa: BLE001 - a proposer bug must not stop the loop: a failed proposal
            log.exception("proposer raised")
            note = ("error", f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._flights.pop(fid, None)
                if note is not None:
                    self._landed.append(note)

    def _land(self, run_id: int, parent: str, parent_source: str, proposal: Proposal) -> Optional[tuple[str, str]]:
        """Store an answer on the head of now: as it is when head has not moved, else 3-way merged onto the new
        head (a paid answer that no longer applies is stored `invalid`, a free one dropped to be asked again).
        One store at a time, so two answers with the same normalised AST cannot both pass the duplicate check."""
        with self._store_lock:
            run = self._run(run_id)
            head_source = self.workspace.read_file(run.head_commit)
            if parent != run.head_commit:
                merged = self.workspace.merge_text(parent_source, head_source, proposal.source)
                if merged is None and not proposal.cost_usd:
                    return None
                if merged is None:
                    self.store_rejected(run, ProposalRejected(
                        f"made for {parent[:10]}, does not apply to the new head {run.head_commit[:10]}",
                        description=proposal.description, hypothesis=proposal.hypothesis, usage=proposal.usage,
                        cost_usd=proposal.cost_usd, proposer=proposal.proposer), direction=proposal.direction)
                    return ("stored", "invalid")
                proposal.source = merged
            deadline = time.monotonic() + STORE_RETRY_S
            while True:
                try:
                    exp = self.store(run, head_source, proposal)
                    return ("stored", exp.status)
                except WorkspaceError as e:
                    if time.monotonic() > deadline:
                        raise
                    log.warning("storing a proposal failed, trying again: %s", e)
                    time.sleep(1.0)

    def _run(self, run_id: int) -> Run:
        with Session(self.db, expire_on_commit=False) as db:
            return db.get(Run, run_id)

    def restack(self, run: Run, exp: Experiment) -> Optional[Experiment]:
        """A queued proposal made for an older head, moved onto `run`'s head before it trains (3-way merge,
        validated there, a new commit): the updated row, or None when it no longer applies or no longer
        validates (then stored `invalid` with the reason and an event). Never trains a change on a head it was
        not validated on."""
        with self._store_lock:
            head_source = self.workspace.read_file(run.head_commit)
            merged = self.workspace.merge_text(self.workspace.read_file(exp.parent_commit), head_source,
                                               self.workspace.read_file(exp.commit))

            def once():
                with session_scope(self.db) as db:
                    row = db.get(Experiment, exp.id)
                    if row.status != "queued":
                        return None
                    verdict = None if merged is None else validate_proposal(
                        head_source, {"train.py": merged}, seen_hashes=SeenHashes(self.db, run.id))
                    if verdict is None or not verdict.ok:
                        why = "does not apply" if verdict is None else f"is invalid there: {verdict.reason}"
                        row.status, row.finished_at = "invalid", utcnow()
                        row.reason = f"made for {row.parent_commit[:10]}, {why} on the new head {run.head_commit[:10]}"
                        db.add(row)
                        db.add(events.experiment_event(row, run))
                        return None
                    row.parent_commit, row.diff, row.ast_hash = run.head_commit, verdict.diff, verdict.ast_hash
                    row.commit = self.workspace.commit_experiment(row.id, run.head_commit, merged,
                                                                  f"exp {row.id}: {row.description} (onto new head)")
                    db.add(row)
                    db.flush()
                    db.expunge(row)
                    return row

            return retry_transient(once, what=f"moving #{exp.id} onto the new head")

    def take(self, run: Run, head_source: str, history: list[TriedEdit], state: ResearchState) -> Proposal:
        """A fast proposer's proposal on head (whose train.py is `head_source`), asked now with `history` and
        `state`; the proposal is appended to `history` as `queued`. Raises ProposalError (what the proposer
        raised; a proposer bug as ProposalError too). A slow proposer's answers are stored as they arrive
        (fill), never taken here."""
        try:
            proposal = self.proposer.propose(head_source, run.head_commit, history, state)
        except ProposalError:
            raise
        except Exception as e:  # a proposer bug must not stop the loop: treat it as a failed proposal
            log.exception("proposer raised")
            raise ProposalError(f"{type(e).__name__}: {e}") from e
        history.append(TriedEdit(run.head_commit, proposal.edit_key, "queued", None, proposal.description))
        return proposal

    # ---- storing ----

    def store(self, run: Run, head_source: str, proposal: Proposal) -> Experiment:
        """Validate a proposal on head and store it, with its Claude cost in the ledger: `queued` with its commit
        off the branch, or `invalid` (the reason, and an event). Tried again while the database connection is
        lost: a paid proposal is not dropped. Raises WorkspaceError when git fails."""
        def once():
            with session_scope(self.db) as db:
                verdict = validate_proposal(head_source, {"train.py": proposal.source},
                                            seen_hashes=SeenHashes(self.db, run.id))
                exp = Experiment(run_id=run.id, kind="experiment", parent_commit=run.head_commit,
                                 proposer=proposal.proposer, description=proposal.description,
                                 hypothesis=proposal.hypothesis, diff=verdict.diff, edit_key=proposal.edit_key,
                                 ast_hash=verdict.ast_hash, usage=proposal.usage, cost_usd=proposal.cost_usd,
                                 direction=proposal.direction, status="queued")
                if not verdict.ok:
                    exp.status, exp.reason, exp.finished_at = "invalid", verdict.reason, utcnow()
                db.add(exp)
                db.flush()
                self._charge(db, run, exp)
                if verdict.ok:
                    exp.commit = self.workspace.commit_experiment(exp.id, exp.parent_commit, proposal.source,
                                                                  f"exp {exp.id}: {exp.description}")
                else:
                    db.add(events.experiment_event(exp, run))
            return exp

        return retry_transient(once, what="storing a proposal")

    def store_rejected(self, run: Run, e: ProposalRejected, direction: str = "") -> None:
        """An answer the proposer could not turn into a valid proposal: `invalid`, with its cost charged."""
        def once():
            with session_scope(self.db) as db:
                exp = Experiment(run_id=run.id, kind="experiment", parent_commit=run.head_commit, proposer=e.proposer,
                                 description=e.description or "(no usable proposal)", hypothesis=e.hypothesis,
                                 status="invalid", reason=e.reason, usage=e.usage, cost_usd=e.cost_usd,
                                 direction=direction, finished_at=utcnow())
                if e.source:
                    exp.diff = unified_diff(self.workspace.read_file(run.head_commit), e.source)[0]
                db.add(exp)
                db.flush()
                self._charge(db, run, exp)
                db.add(events.experiment_event(exp, run))

        retry_transient(once, what="storing a rejected proposal")

    def _charge(self, db: Session, run: Run, exp: Experiment) -> None:
        """A proposal's Claude cost (USD) in the ledger, under today's budget day."""
        if exp.cost_usd:
            db.add(BudgetLedger(day=budget.budget_day(None, self.settings.timezone), run_id=run.id,
                                experiment_id=exp.id, kind="claude_usd", amount=exp.cost_usd))


def short_diff(diff: str, lines: int = KEPT_DIFF_LINES) -> str:
    """A unified diff cut to its first `lines` changed or context lines (file headers dropped)."""
    body = [ln for ln in (diff or "").splitlines() if not ln.startswith(("--- ", "+++ "))]
    return "\n".join(body[:lines] + ([f"… ({len(body) - lines} more lines)"] if len(body) > lines else []))
