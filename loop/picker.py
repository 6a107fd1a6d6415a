"""What a free slot trains next: baseline repeats until the noise floor is known; then the queue — promotion and
confirmation runs first, a run pinned to a hardware class only on a slot of that class, a proposal made for an
older head moved onto head first — and experiments only until max_experiments is reached; then a fresh proposal
from a fast proposer (a slow proposer's answers land in the queue as they arrive, loop/proposals.py).

Functions of the engine (loop/engine.py), called under its lock from its round of filling free slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from sqlmodel import Session, select

from db.models import Experiment, Run
from db.session import session_scope
from loop import events, hardware, noise
from loop.proposers.base import (ProposalAuthError, ProposalError, ProposalExhausted, ProposalRejected,
                                 ResearchState, TriedEdit)
from loop.runners.base import Slot

if TYPE_CHECKING:
    from loop.engine import Engine

FAST_RETRIES = 8  # invalid proposals in a row a fast proposer may make before a slot waits for the next tick
WAIT_S = 1.0  # how long a proposer with nothing left on head is not asked again while other work goes on


@dataclass
class Round:
    """What one round of filling free slots reads once: the run as the tick read it (head and state do not
    change while it fills), the queue (see `queued`), and for a fast proposer head's train.py and the history
    and research state it is shown (the round's own proposals appended to that history)."""

    run: Run
    queued: list[Experiment]
    head_source: str = ""
    history: Optional[list[TriedEdit]] = None
    state: Optional[ResearchState] = None
    no_proposal: bool = False  # the proposer had nothing for a slot: the round's other slots only take the queue


def queued(db, run: Run) -> list[Experiment]:
    """The run's queued experiments: promotion runs (a person asked for them) and confirmation runs (a change
    that passed waits on them) first, then re-queued or rebased experiments; oldest first in each."""
    with Session(db, expire_on_commit=False) as s:
        return list(s.exec(select(Experiment).where(
            Experiment.run_id == run.id, Experiment.status == "queued", Experiment.kind != "baseline")
            .order_by(Experiment.kind == "experiment", Experiment.id)).all())


def next_experiment(eng: Engine, rnd: Round, slot: Slot) -> Optional[Experiment]:
    """What the free `slot` trains next (see the module's docstring), stored; None when nothing is for it now."""
    new_allowed = not eng.reached_max()
    cls = eng.slot_class.get(slot.name)
    if rnd.run.noise_sigma is None:
        return _next_baseline(eng, rnd.run, cls) if new_allowed else None
    i = 0
    while i < len(rnd.queued):
        exp = rnd.queued[i]
        if exp.id in eng.handles or not (new_allowed or exp.kind != "experiment"):
            rnd.queued.pop(i)
            continue
        if not hardware.fits(exp.hardware, cls):
            i += 1  # another slot's class
            continue
        rnd.queued.pop(i)
        if exp.kind == "experiment" and exp.attempts == 0 and exp.parent_commit != rnd.run.head_commit:
            exp = eng.proposals.restack(rnd.run, exp)  # made for an older head: onto this one, or invalid
            if exp is None:
                eng.finished_invalid()
                new_allowed = not eng.reached_max()
                continue
        return exp
    return _propose(eng, rnd) if new_allowed and eng.proposer.fast and not rnd.no_proposal else None


def _next_baseline(eng: Engine, run: Run, cls: Optional[str]) -> Optional[Experiment]:
    """The next baseline repeat for a slot of class `cls` (loop/noise.py), stored; None when there is none
    now. Pauses the run when the baseline failed or no class ran it often enough."""
    with session_scope(eng.db) as db:
        exp = noise.next_repeat(db, run, eng.settings, cls, eng.handles, eng.workspace)
        if isinstance(exp, str):
            eng.pause_in(db, exp)
            return None
        return exp


def _propose(eng: Engine, rnd: Round) -> Optional[Experiment]:
    """A fast proposer's fresh validated proposal stored `queued`, or None. One whose proposal was invalid (a
    duplicate, say) is asked again at once, a few times, so one invalid proposal does not leave the free
    slots of this round waiting for the next tick."""
    run, proposals = rnd.run, eng.proposals
    for _ in range(FAST_RETRIES):
        if proposals.waiting():
            return None
        if rnd.history is None:
            rnd.history, rnd.state = proposals.history(run), proposals.research_state(run)
            rnd.head_source = eng.workspace.read_file(run.head_commit)
        try:
            proposal = proposals.take(run, rnd.head_source, rnd.history, rnd.state)
        except ProposalExhausted as e:
            if eng.handles or _has_queued(eng.db, run):
                proposals.wait(WAIT_S)  # queued and running work first; ask again later
            else:
                with session_scope(eng.db) as db:
                    eng.pause_in(db, f"proposer has nothing left to try: {e}")
            return None
        except ProposalAuthError as e:
            with session_scope(eng.db) as db:
                eng.pause_in(db, f"{e}")
            return None
        except ProposalRejected as e:
            proposals.succeeded()
            proposals.store_rejected(run, e)
        except ProposalError as e:
            if proposals.failed():
                with session_scope(eng.db) as db:
                    db.add(events.run_event(run, "proposer_error", f"proposer failed: {e}; retrying with back-off"))
                eng.on_change()
            return None
        else:
            proposals.succeeded()
            exp = proposals.store(run, rnd.head_source, proposal)
            if exp.status == "queued":
                return exp
        eng.finished_invalid()
        if eng.reached_max():
            return None
    return None


def _has_queued(db, run: Run) -> bool:
    with Session(db) as s:
        return s.exec(select(Experiment.id).where(Experiment.run_id == run.id,
                                                  Experiment.status == "queued")).first() is not None
