"""Promotion: does a gain found at the loop's scale transfer to a larger one? Requests, the runs each needs
(queued, or aborted when the promotion is cancelled), and the verdict once they are in.

Works in the run's database; handing the runs to slots is the engine's job.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from sqlmodel import Session, select

from db.models import Experiment, Promotion, Run, utcnow
from loop import events

log = logging.getLogger("ratchet.promotion")

class PromotionError(ValueError):
    """A promotion that cannot be made as asked (unknown scale or experiment, nothing to compare)."""


def find_scale(settings, name: Optional[str]):
    """The ScaleConfig called `name` (default settings.promote_scale). Raises PromotionError naming the ladder."""
    name = name or settings.promote_scale
    for sc in settings.scales:
        if sc.name == name:
            return sc
    raise PromotionError(f"no scale {name!r}; the ladder has: {', '.join(s.name for s in settings.scales)}")


def scale_budget(sc, run_budget_s: float) -> float:
    """Training seconds at a scale: its own budget_s, else budget_mult × the run's budget."""
    return sc.budget_s if sc.budget_s is not None else sc.budget_mult * run_budget_s


def plan(db: Session, run: Run, settings, *, exp_id: Optional[int], scale: Optional[str], user: str) -> Promotion:
    """A queued Promotion of experiment `exp_id` (a keep; None = head) to `scale` against the reference (the
    last promoted commit, else the baseline). Raises PromotionError when it cannot be compared."""
    sc = find_scale(settings, scale)
    if exp_id is None:
        candidate = run.head_commit
        row = db.exec(select(Experiment).where(Experiment.run_id == run.id, Experiment.commit == candidate,
                                               Experiment.kind == "experiment", Experiment.status == "keep")).first()
        exp_id = row.id if row else None
    else:
        row = db.get(Experiment, exp_id)
        if row is None or row.run_id != run.id:
            raise PromotionError(f"no experiment #{exp_id} in run {run.name!r}")
        if row.kind != "experiment" or row.status != "keep":
            raise PromotionError(f"#{exp_id} was not kept ({row.status}); only kept changes can be promoted")
        candidate = row.commit
    reference = run.promoted_commit or run.baseline_commit
    if candidate == reference:
        raise PromotionError("nothing to compare: the candidate is the reference (baseline or last promoted)")
    return Promotion(run_id=run.id, candidate_exp_id=exp_id, candidate_commit=candidate, reference_commit=reference,
                     scale=sc.name, scale_overrides=dict(sc.scale), budget_s=scale_budget(sc, run.budget_s),
                     seeds=settings.promote_seeds, requested_by=user)


def runs_for(p: Promotion, seed_base: int = 0) -> list[Experiment]:
    """The experiments a promotion needs: reference and candidate at the scale, paired seeds."""
    out = []
    for k in range(p.seeds):
        for side, commit in (("reference", p.reference_commit), ("candidate", p.candidate_commit)):
            out.append(Experiment(run_id=p.run_id, kind="promotion", promotion_id=p.id, status="queued",
                                  parent_commit=commit, commit=commit, proposer="promotion", seed=seed_base + k,
                                  scale=p.scale, scale_overrides=dict(p.scale_overrides), budget_s=p.budget_s,
                                  description=f"promotion #{p.id} {p.scale} {side} seed {seed_base + k}",
                                  edit_key=side))
    return out


@dataclass(frozen=True)
class Transfer:
    """The comparison, val_bpb in bits per byte; Δ = candidate − reference (negative is better)."""

    verdict: str
    delta_small: Optional[float]  # at the loop's scale
    sigma_small: Optional[float]  # the run's noise floor
    delta_large: Optional[float]  # at the promotion's scale (mean of paired differences)
    se_large: Optional[float]  # standard error of delta_large
    reference_runs: list
    candidate_runs: list
    params_small: dict  # side → parameter count at the loop's scale
    params_large: dict  # side → parameter count at the promotion's scale
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def judge(ref_runs: Sequence[float], cand_runs: Sequence[float], *, delta_small: Optional[float],
          sigma_small: Optional[float], params_small: dict, params_large: dict, overrides: dict,
          z: float = 2.0, min_delta: float = 0.0003) -> Transfer:
    """The verdict. `scale_ignored` when the overrides should change the model but its parameter count
    did not move (train.py ignores ctx.scale). Otherwise, with paired seeds, Δ_large = mean(cand − ref)
    and se = stdev of the differences / √k (with one pair, σ_small·√2 stands in):
    transfers iff Δ_large < −max(min_delta, z·se); does_not_transfer iff Δ_large ≥ 0; else inconclusive.
    """
    resizes = any(k in overrides for k in ("depth", "width", "depth_mult", "width_mult"))
    same = [side for side in ("reference", "candidate")
            if side in params_small and params_small.get(side) == params_large.get(side)]
    if resizes and same:
        return Transfer("scale_ignored", delta_small, sigma_small, None, None, list(ref_runs), list(cand_runs),
                        params_small, params_large,
                        f"train.py ignores ctx.scale: the {same[0]}'s parameter count stayed at "
                        f"{params_small[same[0]]:,} under {overrides}; no verdict")
    diffs = [c - r for r, c in zip(ref_runs, cand_runs)]
    if not diffs:
        return Transfer("inconclusive", delta_small, sigma_small, None, None, list(ref_runs), list(cand_runs),
                        params_small, params_large, "no completed pair of runs")
    d = statistics.fmean(diffs)
    if len(diffs) >= 2:
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    else:
        se = (sigma_small or 0.0) * math.sqrt(2)
    threshold = max(min_delta, z * se)
    if d < -threshold:
        verdict, why = "transfers", f"Δ {d:+.4f} at scale beats −{threshold:.4f} (z·se)"
    elif d >= 0:
        verdict, why = "does_not_transfer", f"Δ {d:+.4f} at scale: no gain"
    else:
        verdict, why = "inconclusive", f"Δ {d:+.4f} at scale is within noise (needs < −{threshold:.4f}); more seeds"
    return Transfer(verdict, delta_small, sigma_small, d, se, list(ref_runs), list(cand_runs), params_small,
                    params_large, why)


def pair_on(db: Session, exp: Experiment, cls: str) -> None:
    """`exp`, one side of a promotion's seed, starts on hardware class `cls`: the other side of that seed, still
    queued and free to go anywhere, must train on `cls` too, so each pair compares like with like."""
    for other in db.exec(select(Experiment).where(Experiment.promotion_id == exp.promotion_id,
                                                  Experiment.seed == exp.seed, Experiment.id != exp.id,
                                                  Experiment.status == "queued", Experiment.hardware == "")).all():
        other.hardware = cls
        db.add(other)


def commit_stats(db: Session, run_id: int, commit: str) -> tuple[Optional[float], Optional[int]]:
    """(mean val_bpb, params) of a commit's accepted runs at the loop's own scale."""
    rows = db.exec(select(Experiment.val_bpb, Experiment.params).where(
        Experiment.run_id == run_id, Experiment.commit == commit, Experiment.status == "keep",
        Experiment.kind != "promotion")).all()
    vals = [v for v, _ in rows if v is not None]
    params = next((p for _, p in rows if p), None)
    return (statistics.fmean(vals) if vals else None), params


def promoted_ref(run: str) -> str:
    """The ref that marks a run's last promoted commit (a gain shown to transfer to a larger scale)."""
    return f"refs/ratchet/promoted/{run}"


# ---- in the run's database ----


def pending_ids(db, run: Run) -> list[int]:
    """Ids of the run's queued and cancelled promotions (one indexed query; `db` is a database engine)."""
    table = Promotion.__table__
    with db.connect() as conn:
        return list(conn.execute(select(table.c.id).where(
            table.c.run_id == run.id, table.c.status.in_(("queued", "cancelled")))).scalars().all())


def start_queued(db: Session, run: Run, settings) -> None:
    """Queued promotions get their runs (reference and candidate at the scale, paired seeds) and a
    `promotion_started` event."""
    for p in db.exec(select(Promotion).where(Promotion.run_id == run.id, Promotion.status == "queued")).all():
        for exp in runs_for(p, seed_base=settings.seed):
            db.add(exp)
        p.status = "running"
        db.add(p)
        db.add(events.run_event(run, "promotion_started", f"promotion #{p.id} started: {p.candidate_commit[:10]} "
                                f"vs {p.reference_commit[:10]} at {p.scale} ({p.budget_s:g} s, {p.seeds} seed(s) "
                                "each)", promotion_id=p.id))


def abort_cancelled(db: Session, run: Run) -> set[int]:
    """The queued runs of cancelled promotions become `aborted`. Returns the ids of the cancelled promotions
    (their runs still training are the engine's to kill)."""
    cancelled = {p.id for p in db.exec(select(Promotion).where(Promotion.run_id == run.id,
                                                                Promotion.status == "cancelled")).all()}
    if cancelled:
        for exp in db.exec(select(Experiment).where(Experiment.promotion_id.in_(cancelled),
                                                    Experiment.status == "queued")).all():
            exp.status, exp.reason, exp.finished_at = "aborted", "promotion cancelled", utcnow()
            db.add(exp)
    return cancelled


def fail(db: Session, run: Run, promotion_id: Optional[int], reason: str) -> None:
    """A running promotion that cannot go on (its scale needs more GPUs of one host than any host has): its
    queued runs end as `crash` with `reason`, the promotion `failed` with it, and a `promotion` event says so."""
    p = db.get(Promotion, promotion_id) if promotion_id is not None else None
    if p is None or p.status != "running":
        return
    for exp in db.exec(select(Experiment).where(Experiment.promotion_id == p.id,
                                                Experiment.status == "queued")).all():
        exp.status, exp.reason, exp.finished_at = "crash", reason, utcnow()
        db.add(exp)
    p.status, p.verdict, p.result, p.finished_at = "failed", "", {"reason": reason}, utcnow()
    db.add(p)
    db.add(events.run_event(run, "promotion", f"promotion #{p.id} failed: {reason}", promotion_id=p.id,
                            verdict="", result=p.result, scale=p.scale, candidate_exp_id=p.candidate_exp_id))


def judge_finished(db: Session, run: Run, promotion_id: int, settings) -> Optional[tuple[str, str]]:
    """When every run of the promotion has ended: the verdict (judge), stored and posted. A transfer advances
    the run's promoted commit; returns (run name, commit) then, for the ref to follow."""
    p = db.get(Promotion, promotion_id)
    if p is None or p.status != "running":
        return None
    exps = db.exec(select(Experiment).where(Experiment.promotion_id == p.id).order_by(Experiment.id)).all()
    if any(e.status in ("queued", "running", "proposed") for e in exps):
        return None
    by_seed: dict[int, dict[str, Experiment]] = {}
    for e in exps:
        by_seed.setdefault(e.seed, {})[e.edit_key] = e
    done = [(d["reference"], d["candidate"]) for d in by_seed.values()
            if all(x in d and d[x].status == "keep" and d[x].val_bpb is not None for x in ("reference", "candidate"))]
    # a pair is compared only on one hardware class (a side that started before its class was known may differ)
    pairs = [(r, c) for r, c in done if r.device_name == c.device_name]
    classes = sorted({r.device_name or "unnamed hardware" for r, _ in pairs})
    failed = [e for e in exps if e.status in ("crash", "timeout", "refused", "aborted")]
    ref_small, ref_params = commit_stats(db, run.id, p.reference_commit)
    cand_small, cand_params = commit_stats(db, run.id, p.candidate_commit)
    if not pairs:
        p.status, p.verdict = "failed", ""
        p.result = {"reason": f"no completed pair: {failed[0].status} {failed[0].reason}" if failed
                    else "no pair trained on one hardware class" if done else "no runs"}
        text = f"promotion #{p.id} failed: {p.result['reason']}"
    else:
        t = judge(
            [r.val_bpb for r, _ in pairs], [c.val_bpb for _, c in pairs],
            delta_small=None if ref_small is None or cand_small is None else cand_small - ref_small,
            sigma_small=run.noise_sigma,
            params_small={k: v for k, v in (("reference", ref_params), ("candidate", cand_params)) if v},
            params_large={"reference": pairs[0][0].params, "candidate": pairs[0][1].params},
            overrides=p.scale_overrides, z=settings.noise_z, min_delta=settings.min_delta)
        p.status, p.verdict = "done", t.verdict
        p.result = {**t.as_dict(), "hardware": classes, "pairs_on_other_classes": len(done) - len(pairs)}
        small = f"{t.delta_small:+.4f}" if t.delta_small is not None else "n/a"
        large = f"{t.delta_large:+.4f} ± {t.se_large:.4f}" if t.delta_large is not None else "n/a"
        text = (f"promotion #{p.id} to {p.scale}: {t.verdict.replace('_', ' ')} — Δ val_bpb {small} at the "
                f"loop's scale, {large} at {p.scale} on {', '.join(classes)}; {t.reason}")
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


def maybe_auto_promote(db: Session, run: Run, settings) -> None:
    """Every `auto_promote_every` keeps since the last promotion, promote head."""
    last = db.exec(select(Promotion.created_at).where(Promotion.run_id == run.id)
                   .order_by(Promotion.id.desc())).first()
    q = select(Experiment.id).where(Experiment.run_id == run.id, Experiment.kind == "experiment",
                                    Experiment.status == "keep")
    if last is not None:
        q = q.where(Experiment.finished_at > last)
    if len(db.exec(q).all()) < settings.auto_promote_every:
        return
    try:
        p = plan(db, run, settings, exp_id=None, scale=None, user="auto")
    except PromotionError as e:
        log.info("auto-promote skipped: %s", e)
        return
    db.add(p)
    db.flush()
    db.add(events.run_event(run, "promotion_requested", f"promotion #{p.id} of head to {p.scale} requested "
                            f"automatically (every {settings.auto_promote_every} keeps)", promotion_id=p.id))
