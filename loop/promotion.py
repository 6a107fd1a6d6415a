"""Promotion: does a gain found at the loop's scale transfer to a larger one? Requests, the runs each needs,
and the verdict from their results.

Decides from numbers only; scheduling the runs is the engine's job.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from sqlmodel import Session, select

from db.models import Experiment, Promotion, Run

VERDICTS = ("transfers", "does_not_transfer", "inconclusive", "scale_ignored")


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


def commit_stats(db: Session, run_id: int, commit: str) -> tuple[Optional[float], Optional[int]]:
    """(mean val_bpb, params) of a commit's accepted runs at the loop's own scale."""
    rows = db.exec(select(Experiment.val_bpb, Experiment.params).where(
        Experiment.run_id == run_id, Experiment.commit == commit, Experiment.status == "keep",
        Experiment.kind != "promotion")).all()
    vals = [v for v, _ in rows if v is not None]
    params = next((p for _, p in rows if p), None)
    return (statistics.fmean(vals) if vals else None), params
