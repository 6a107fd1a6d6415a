"""The keep policy around the ratchet rule (loop/rule.py): record a result, compare it with head's runs on its
own hardware class (running head there first when it has none), confirm a passing change (a paired run of it
and head, or new seeds), re-pool σ per class, rebase a result whose parent is no longer head, revert a keep.

Every function works inside the caller's transaction `db` and never moves a branch: the caller commits,
then the branch follows the database (Recorded.keep_move).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Optional

from sqlmodel import Session, select

from db.models import FINAL_STATUSES, BudgetLedger, Experiment, Run, utcnow
from loop import budget, events, hardware, noise, promotion
from loop.config import Settings
from loop.hosts import disk_full_reason
from loop.rule import Decision, decide, decide_paired
from loop.runners.base import Outcome
from loop.validate import validate_proposal
from loop.workspace import Workspace

log = logging.getLogger("ratchet.decision")

MAX_ATTEMPTS = 3  # starts of one experiment before an infrastructure fault counts as a crash
# Runs of head queued on a class where it has none: a result compared with the mean of n runs has a difference of
# variance σ²(1 + 1/n), so a reference of one run would need a margin √2 × σ's, of two √1.5 ×.
CONTROL_RUNS = 2


@dataclass(frozen=True)
class Recorded:
    """What recording a result decided, for the caller to apply after its transaction commits."""

    status: str  # the experiment's new status
    counted: int  # experiments that reached their final status (this one, the candidates it confirmed)
    keep_move: Optional[tuple[str, str, str]] = None  # (run name, new head, old head): the branch to move
    promoted: Optional[tuple[str, str]] = None  # (run name, commit): a promotion transferred
    pause: str = ""  # why the run must pause now (`disk full: …`), or ""


def record(db: Session, exp_id: int, outcome: Optional[Outcome], *, settings: Settings, workspace: Workspace,
           seen_hashes, infra_error: str = "", disk_full: str = "", pruned: Optional[dict] = None, gpus: int = 1
           ) -> Optional[Recorded]:
    """Record one result and apply the rule to it. `outcome` None: the run never started (`infra_error` says
    why); `pruned`: why the engine stopped it early, when it did; `seen_hashes`: the run's normalised-AST hashes
    (`in`), for a change rebased onto a new head; `gpus`: the slots it held (the ledger books gpus × its wall
    seconds). Returns None when the experiment is gone or no longer running (its result was recorded by an
    earlier try). A run that failed for want of disk space is re-queued
    (Recorded.pause says why the run must pause) instead of counting against the idea."""
    exp = db.get(Experiment, exp_id)
    if exp is None:  # its row was deleted while it trained (by hand): nothing left to record it in
        log.warning("experiment #%s finished but is no longer in the database; its result is dropped", exp_id)
        return None
    if exp.status != "running":
        return None
    run = db.get(Run, exp.run_id)
    head_before = run.head_val_bpb
    disk_full = disk_full or disk_full_reason(exp.workdir, outcome, local=(exp.host or "local") == "local")
    keep_move = promoted = None
    exp.finished_at, exp.pid = utcnow(), None
    if outcome is not None:
        r = outcome.result
        exp.val_bpb, exp.training_seconds, exp.total_seconds = r.val_bpb, r.training_seconds, r.total_seconds
        exp.peak_memory_mb, exp.mfu_percent, exp.tokens = r.peak_memory_mb, r.mfu_percent, r.tokens
        exp.steps, exp.params, exp.wall_seconds = r.steps, r.params, outcome.wall_seconds
        exp.device_name = r.device_name or ""
        exp.curve = outcome.curve or []
        exp.log_tail = "\n".join((r.log_tail or [])[-15:] + ["--- log ---"] + outcome.log_tail[-15:]) \
            if r.status != "ok" else ""
        db.add(BudgetLedger(day=budget.budget_day(None, settings.timezone), run_id=run.id, experiment_id=exp.id,
                            kind="gpu_seconds", amount=gpus * outcome.wall_seconds))
        infra_error = infra_error or (f"infrastructure failure on {outcome.slot}: {r.error}"
                                      if outcome.infra_failed else "")
    # only a measurement is re-queued for its hardware: a crash is the idea's wherever it ran
    wrong = wrong_hardware(exp, settings) if (outcome is not None and not infra_error and not outcome.aborted
                                              and outcome.result.status == "ok") else ""
    if disk_full:
        exp.status, exp.reason = "queued", f"re-queued: {disk_full}"  # the idea is not at fault
    elif wrong:  # measured on a class it may not be compared on: the slot's class is known now, train it again
        exp.status, exp.reason, exp.val_bpb, exp.device_name = "queued", f"re-queued: {wrong}", None, ""
    elif infra_error:
        if exp.attempts < MAX_ATTEMPTS:
            exp.status, exp.reason = "queued", infra_error  # never counts against the idea
            db.add(events.run_event(run, "infra_failed", f"#{exp.id} re-queued: {infra_error}", experiment_id=exp.id))
        else:
            exp.status, exp.reason = "crash", f"{infra_error} (after {exp.attempts} attempts)"
            db.add(events.experiment_event(exp, run, head_before))
    elif outcome.aborted and pruned is not None:
        exp.status, exp.reason, exp.val_bpb = "pruned", pruned["reason"], None
        exp.decision = {"pruned": pruned}
        db.add(events.experiment_event(exp, run, head_before))
    elif outcome.aborted and exp.kind == "confirm":
        exp.status, exp.reason, exp.val_bpb = "queued", f"re-queued: {outcome.aborted}", None  # still owed
    elif outcome.aborted:
        exp.status, exp.reason, exp.val_bpb = "aborted", outcome.aborted, None
        db.add(events.experiment_event(exp, run, head_before))
    elif outcome.result.status != "ok":
        exp.status, exp.reason, exp.val_bpb = outcome.result.status, outcome.result.error, None
        if exp.kind != "confirm":  # a failed confirmation is told in its candidate's discard
            db.add(events.experiment_event(exp, run, head_before))
    elif exp.kind == "baseline":
        exp.status = "keep"
        db.add(events.experiment_event(exp, run))
        noise.corpus_check(db, run, outcome.result.epochs)
        db.flush()
        noise.measure(db, run, settings)
    elif exp.kind in ("promotion", "confirm"):
        exp.status = "keep"  # measured (a confirm run's verdict is its candidate's, set below)
    elif exp.parent_commit != run.head_commit:
        rebase_or_discard(db, run, exp, settings, workspace, seen_hashes)
    else:
        db.flush()
        keep_move = screen(db, run, exp, settings)
    db.add(exp)
    counted = int(exp.kind == "experiment" and exp.status in FINAL_STATUSES)
    if exp.kind == "confirm" and exp.status in FINAL_STATUSES:
        db.flush()
        resolved = resolve_confirmation(db, run, exp, settings, workspace, seen_hashes)
        if resolved is not None:
            counted, keep_move = 1, resolved
        if exp.commit == exp.parent_commit:  # a control run: other candidates may wait on it too
            n, move = resolve_waiters(db, run, exp, settings, workspace, seen_hashes)
            counted, keep_move = counted + n, keep_move or move
    if exp.kind == "promotion" and exp.status != "queued":
        db.flush()
        promoted = promotion.judge_finished(db, run, exp.promotion_id, settings)
    if keep_move and settings.auto_promote_every:
        promotion.maybe_auto_promote(db, run, settings)
    return Recorded(exp.status, counted, keep_move or None, promoted, disk_full)


def advance_head(db: Session, run: Run, exp: Experiment, runs: list[float]) -> tuple[str, str, str]:
    """Make `exp` head in the database (val_bpb = the mean of its runs); returns the branch move
    (run name, new head, old head) for the caller to apply after its commit."""
    move = (run.name, exp.commit, run.head_commit)
    run.head_commit, run.head_val_bpb, run.head_runs = exp.commit, statistics.fmean(runs), list(runs)
    run.updated_at = utcnow()
    db.add(run)
    return move


def wrong_hardware(exp: Experiment, settings: Settings) -> str:
    """Why a result may not be used as measured (it trained on another class than its pair, or outside the run's
    pin `hardware`), or "" when it may."""
    if exp.hardware and exp.device_name != exp.hardware:
        return f"trained on {exp.device_name or 'unnamed hardware'}, its pair is on {exp.hardware}"
    if hardware.allowed(settings.hardware, exp.device_name, exp.host or "") is False:
        return f"trained on {exp.device_name or 'unnamed hardware'}, the run is pinned to {settings.hardware}"
    return ""


# ---- the rule, like with like ----


def screen(db: Session, run: Run, exp: Experiment, settings: Settings) -> Optional[tuple]:
    """Judge a result whose parent is head against head's runs on the result's own hardware class, with that
    class's σ. Head has none there yet: head is queued there first (a control run) and the result waits
    (`confirming`). A pass is confirmed (settings.confirm: a paired run of it and head, or new seeds) unless
    confirmation is off, when it is kept at once. Returns the branch move of a keep, else None."""
    cls = exp.device_name
    # paired: head's reference must be unselected runs (a kept change's own runs are biased low), else made now
    ref = hardware.runs_on(db, run.id, run.head_commit, cls, unselected=settings.confirm == "paired")
    if not ref:
        pending = db.exec(select(Experiment.id).where(
            Experiment.run_id == run.id, Experiment.kind == "confirm", Experiment.commit == run.head_commit,
            Experiment.parent_commit == run.head_commit, Experiment.hardware == cls,
            Experiment.status.in_(("queued", "running"))).order_by(Experiment.id.desc())).first()
        if pending is not None:  # another result already asked for head there: wait for the same (last) run
            exp.status = "confirming"
            exp.decision = {**(exp.decision or {}), "stage": "control", "control": [pending]}
        else:
            queue_runs(db, run, exp, "control", cand=0, head=CONTROL_RUNS)
        return None
    d = decide(exp.val_bpb, statistics.fmean(ref), hardware.sigma_for(run, cls), min_delta=settings.min_delta,
               z=settings.noise_z, head_n=len(ref))
    exp.decision = {**(exp.decision or {}), **d.as_dict(), "hardware": cls, "reference_runs": ref}
    exp.status = d.verdict
    n = settings.confirm_runs if settings.confirm != "none" else 0
    if d.verdict == "keep" and n:
        if settings.confirm == "paired":
            queue_runs(db, run, exp, "paired", cand=n, head=n)
        else:
            queue_runs(db, run, exp, "seeds", cand=n, head=0)
        return None
    move = advance_head(db, run, exp, [exp.val_bpb]) if d.verdict == "keep" else None
    db.add(events.experiment_event(exp, run, d.head_val_bpb))
    return move


# ---- confirmation ----


def queue_runs(db: Session, run: Run, exp: Experiment, stage: str, *, cand: int, head: int) -> None:
    """Queue runs that decide `exp` (status `confirming`), all on its hardware class, ahead of fresh proposals:
    `cand` re-runs of its commit (new seeds) and `head` runs of its parent (head), alternating so that each pair
    is queued, and started, together. Their ids go to exp.decision[stage]: [[cand, head], …] for `paired`,
    [ids] for `seeds` and `control`.

    stage `control`: head has no run on this class yet, so one is made before the result is judged.
    stage `seeds`: the best of many noisy tries is biased low (the winner's curse), so a keep on one seed is
    often luck; a fresh seed's run is not selected and pulls the estimate back to the truth.
    stage `paired`: the same, and the pair's head run sees the same host speed and the same moment of its drift
    as the candidate's, so both cancel in the difference: one more run per passing change than `seeds`.
    """
    cls = exp.device_name
    exp.status = "confirming"
    rows = []
    for i in range(max(cand, head)):
        for side, n, commit in (("candidate", cand, exp.commit), ("head", head, exp.parent_commit)):
            if i < n:
                what = f"confirm #{exp.id}" if side == "candidate" else f"control for #{exp.id} (head)"
                rows.append(Experiment(run_id=run.id, kind="confirm", confirms_id=exp.id, status="queued",
                                       parent_commit=exp.parent_commit, commit=commit, proposer=exp.proposer,
                                       description=f"{what}: {exp.description}", edit_key=exp.edit_key,
                                       hardware=cls))
    for r in rows:
        db.add(r)
    db.flush()
    ids = [r.id for r in rows]
    exp.decision = {**(exp.decision or {}), "stage": stage,
                    stage: [ids[i:i + 2] for i in range(0, len(ids), 2)] if stage == "paired" else ids}
    on = cls or "unnamed hardware"
    what = f"#{exp.id} {exp.description or exp.edit_key}"
    listed = ", ".join(f"#{i}" for i in ids)
    if stage == "control":
        text = (f"{what}: val_bpb {exp.val_bpb:.4f} on {on}, where head has no run yet: training head there "
                f"({listed}) to compare like with like")
    else:
        d = exp.decision
        how = (f"a run of it and of head started together on {on} ({listed})" if stage == "paired"
               else f"{len(rows)} new seed{'s' if len(rows) > 1 else ''} on {on} ({listed})")
        text = (f"{what}: val_bpb {exp.val_bpb:.4f} vs head {d['head_val_bpb']:.4f} on {on} ({d['delta']:+.4f}) "
                f"passes; confirming with {how} before it becomes head")
    ev = events.run_event(run, "confirming", text, val_bpb=exp.val_bpb, head_val_bpb=exp.decision.get("head_val_bpb"),
                          confirm_ids=ids, description=exp.description, stage=stage, hardware=cls)
    ev.experiment_id = exp.id
    db.add(ev)


def resolve_confirmation(db: Session, run: Run, confirm: Experiment, settings: Settings, workspace: Workspace,
                         seen_hashes) -> Optional[tuple]:
    """After a confirm run (or control run) is recorded: once the runs its candidate waits on are all in (or one
    failed), the candidate's next step. A failed run discards it. After `control`: the candidate is judged
    against head's runs on its class (screen). After `paired`: keep iff the mean paired difference passes
    (rule.decide_paired). After `seeds`: keep iff the mean of its runs passes against head's runs on its
    class. σ of the class is re-pooled first; a head that moved on meanwhile gets the stale-parent treatment.
    Confirm runs of the candidate take its verdict; control runs stay measured runs of head. Returns the branch
    move of a keep, () for a verdict that moves nothing, or None while the candidate still waits."""
    cand = db.get(Experiment, confirm.confirms_id) if confirm.confirms_id else None
    if cand is None or cand.status != "confirming":
        if cand is not None and confirm.status == "keep" and cand.status != "keep" and confirm.commit == cand.commit:
            confirm.status = "discard"  # a late sibling of a candidate already discarded
        return None
    rows = list(db.exec(select(Experiment).where(Experiment.confirms_id == cand.id)).all())
    failed = next((r for r in rows if r.status in FINAL_STATUSES and r.status != "keep"), None)
    if failed is None and any(r.status not in FINAL_STATUSES for r in rows):
        return None
    head_before, dec, move, cls = run.head_val_bpb, dict(cand.decision or {}), (), cand.device_name
    stage = dec.get("stage", "seeds")
    first = {k: v for k, v in dec.items() if k not in ("stage", "control", "paired", "seeds")}
    if failed is not None:
        cand.status = "discard"
        cand.reason = f"its confirmation run #{failed.id} {failed.status}: {failed.reason}"
        cand.decision = {**dec, "verdict": "discard", "first_run": first, "confirm_failed": failed.id}
        db.add(events.experiment_event(cand, run, head_before))
    elif stage == "control":
        hardware.measure_class(db, run, cls)
        if cand.parent_commit != run.head_commit:
            rebase_or_discard(db, run, cand, settings, workspace, seen_hashes)
        else:
            move = screen(db, run, cand, settings) or ()
            if cand.status == "confirming":
                return None  # its confirmation runs are queued now
    else:
        hardware.measure_class(db, run, cls)
        by_id = {r.id: r for r in rows}
        sigma = hardware.sigma_for(run, cls)
        if stage == "paired":
            pairs = [(by_id[c].val_bpb, by_id[h].val_bpb) for c, h in dec["paired"]]
            d = decide_paired([c for c, _ in pairs], [h for _, h in pairs], sigma, min_delta=settings.min_delta,
                              z=settings.noise_z)
            runs = [cand.val_bpb] + [c for c, _ in pairs]
            extra = {"runs": runs, "paired_head_runs": [h for _, h in pairs], "paired": dec["paired"]}
            why = f"paired with head on {cls or 'unnamed hardware'}, Δ {d.delta:+.4f} (needs < −{d.threshold:.4f})"
        else:
            runs = [cand.val_bpb] + [r.val_bpb for r in rows if r.commit == cand.commit]
            ref = hardware.runs_on(db, run.id, run.head_commit, cls) or [run.head_val_bpb]
            d = decide(statistics.fmean(runs), statistics.fmean(ref), sigma, min_delta=settings.min_delta,
                       z=settings.noise_z)
            extra = {"runs": runs}
            why = f"{len(runs)} runs average {d.val_bpb:.4f} vs head {d.head_val_bpb:.4f} (first run {cand.val_bpb:.4f})"
        extra.update(hardware=cls, first_run=first)
        if cand.parent_commit != run.head_commit:  # judged against its parent: the pairs' head runs are its
            rebase_or_discard(db, run, cand, settings, workspace, seen_hashes, val_bpb=statistics.fmean(runs),
                              d=d if stage == "paired" else None, **extra)  # adds the event
        else:
            cand.status = d.verdict
            cand.decision = {**d.as_dict(), "stage": stage, **extra}
            if d.verdict == "keep":
                move = advance_head(db, run, cand, runs)
            else:
                cand.reason = f"did not hold up: {why}"
            db.add(events.experiment_event(cand, run, d.head_val_bpb if stage == "seeds" else head_before))
    for r in rows:
        if r.status == "queued" and not waiters(db, run, r):  # a sibling run no longer needed
            r.status, r.reason = "aborted", f"#{cand.id} was discarded"
        elif r.status == "keep" and r.commit == cand.commit:
            r.status = "keep" if cand.status == "keep" else "discard"
        db.add(r)
    db.add(cand)
    return move


def waiters(db: Session, run: Run, control: Experiment) -> list[Experiment]:
    """Candidates other than its own that wait (stage `control`) for this run of head on its class."""
    if control.commit != control.parent_commit or not control.hardware:
        return []  # a run of a candidate, not of head
    return [c for c in db.exec(select(Experiment).where(
        Experiment.run_id == run.id, Experiment.kind == "experiment", Experiment.status == "confirming",
        Experiment.parent_commit == control.commit, Experiment.device_name == control.hardware,
        Experiment.id != control.confirms_id).order_by(Experiment.id)).all()
        if (c.decision or {}).get("stage") == "control" and control.id in (c.decision or {}).get("control", [])]


def resolve_waiters(db: Session, run: Run, control: Experiment, settings: Settings, workspace: Workspace,
                    seen_hashes) -> tuple[int, tuple]:
    """After a control run of head is recorded: candidates other than its own that waited for it (stage
    `control`, the same class) are screened now (or take the stale-parent path; a failed control sends them to
    screen again, which asks for another). Returns (candidates that reached a final status, the branch move of a
    keep or ())."""
    counted, move = 0, ()
    for cand in waiters(db, run, control):
        if cand.parent_commit != run.head_commit:
            hardware.measure_class(db, run, cand.device_name)
            rebase_or_discard(db, run, cand, settings, workspace, seen_hashes)
        else:
            move = screen(db, run, cand, settings) or move
        counted += cand.status in FINAL_STATUSES
        db.add(cand)
    return counted, move


# ---- a result whose parent is no longer head ----


def rebase_or_discard(db: Session, run: Run, exp: Experiment, settings: Settings, workspace: Workspace,
                      seen_hashes, val_bpb: Optional[float] = None, d: Optional[Decision] = None, **extra) -> None:
    """A result whose parent is no longer head (another slot kept meanwhile). If it beat its own parent by the
    rule, its change is rebased onto the new head and queued as a new experiment that must confirm the gain
    there; so the ratchet stays monotone and two results never both advance the branch from the same parent.
    Otherwise it is discarded. It is compared with its parent's runs on its own hardware class (all of the
    parent's runs when it has none there: the rebased change is judged like with like on the new head anyway).
    val_bpb: the value judged (default the experiment's own; the mean of its runs after a confirmation);
    d: the verdict against the parent already taken (a paired confirmation's); extra: stored with the decision.
    Raises WorkspaceError when git fails."""
    cls = exp.device_name
    on_class = hardware.runs_on(db, run.id, exp.parent_commit, cls)
    parent_bpb = statistics.fmean(on_class) if on_class else promotion.commit_stats(db, run.id, exp.parent_commit)[0]
    if d is None:
        d = decide(exp.val_bpb if val_bpb is None else val_bpb,
                   parent_bpb if parent_bpb is not None else run.head_val_bpb, hardware.sigma_for(run, cls),
                   min_delta=settings.min_delta, z=settings.noise_z)
    parent_bpb = d.head_val_bpb
    exp.decision = {**d.as_dict(), "compared_with": "parent", "stale_parent": True, **extra}
    exp.status = "discard"
    if d.verdict != "keep":
        exp.reason = f"head moved on while it trained, and it did not beat its parent ({d.delta:+.4f})"
        db.add(events.experiment_event(exp, run, parent_bpb))
        return
    head_src = workspace.read_file(run.head_commit)
    merged = workspace.merge_text(workspace.read_file(exp.parent_commit), head_src, workspace.read_file(exp.commit))
    verdict = validate_proposal(head_src, {"train.py": merged}, seen_hashes=seen_hashes) \
        if merged is not None else None
    if verdict is None or not verdict.ok:
        why = "does not apply to the new head" if verdict is None else f"rebased change is invalid: {verdict.reason}"
        exp.reason = f"beat its parent ({d.delta:+.4f}) but {why}"
        db.add(events.experiment_event(exp, run, parent_bpb))
        return
    rebased = Experiment(run_id=run.id, kind="experiment", parent_commit=run.head_commit, proposer=exp.proposer,
                         description=f"{exp.description} (rebased, confirms #{exp.id})",
                         hypothesis=exp.hypothesis, diff=verdict.diff, edit_key=f"{exp.edit_key}@{exp.id}",
                         ast_hash=verdict.ast_hash, status="queued")
    db.add(rebased)
    db.flush()
    rebased.commit = workspace.commit_experiment(rebased.id, run.head_commit, merged,
                                                 f"exp {rebased.id}: rebase of #{exp.id}")
    db.add(rebased)
    exp.reason = f"beat its parent ({d.delta:+.4f}) while head moved on: rebased as #{rebased.id} to confirm"
    db.add(events.run_event(run, "rebased", f"#{exp.id} {exp.description}: beat its parent, rebased onto head as "
                            f"#{rebased.id} to confirm", experiment_id=exp.id, confirm_id=rebased.id))


# ---- revert ----


def revert(db: Session, run: Run, exp: Experiment, user: str) -> str:
    """Undo the keep of `exp`, head's experiment: head moves back to its parent, whose val_bpb becomes the mean
    of the parent's recorded runs at the loop's own scale (promotion runs, at a larger one, left out); `exp`
    becomes `discard` (reason and decision["reverted"] say who and when), with a "reverted" event. Returns the
    announcement line. Raises ValueError when the parent has no recorded val_bpb."""
    parent = exp.parent_commit
    runs = [v for v in db.exec(select(Experiment.val_bpb).where(
        Experiment.run_id == run.id, Experiment.commit == parent, Experiment.id != exp.id,
        Experiment.kind != "promotion", Experiment.val_bpb.is_not(None))).all()]
    if not runs:
        raise ValueError(f"#{exp.id}'s parent {parent[:10]} has no recorded val_bpb; cannot revert")
    before = run.head_val_bpb
    run.head_commit, run.head_runs = parent, runs
    run.head_val_bpb, run.updated_at = sum(runs) / len(runs), utcnow()
    exp.status = "discard"
    exp.reason = f"reverted by {user}"
    exp.decision = {**(exp.decision or {}), "reverted": {"by": user, "at": utcnow().isoformat()}}
    what = exp.description or exp.edit_key or f"experiment {exp.id}"
    text = (f"reverted #{exp.id} {what} by {user}: head back to {parent[:10]}, "
            f"val_bpb {before:.4f} → {run.head_val_bpb:.4f}")
    db.add(run)
    db.add(exp)
    ev = events.run_event(run, "reverted", text, by=user, val_bpb=before, head_val_bpb=run.head_val_bpb,
                          commit=exp.commit, parent_commit=parent, description=exp.description)
    ev.experiment_id = exp.id
    db.add(ev)
    return text
