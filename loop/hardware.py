"""Hardware classes: the rule compares a result only with runs on the same hardware, because a time budget buys
as many steps as the hardware gives. A result's class is its `device_name` as the harness reported it
(`NVIDIA H100 80GB HBM3 x1`, or the CPU model); "" (an older harness, a simulated runner that sets none) is one
class of its own. Queries on the run's experiments and pure helpers; no verdicts (loop/decision.py takes them).
"""

from __future__ import annotations

import fnmatch
from typing import Optional

from sqlmodel import Session, select

from db.models import Experiment, Run
from loop.rule import pooled_sigma

# Runs that were not selected: baseline repeats and control runs (head trained next to a candidate; a run of
# its parent, commit == parent_commit), which count whatever they measure. A proposal's first run passed the rule
# among many tries, and a kept change's confirmation runs passed it too, so both are biased low (the winner's
# curse): with them, head's reference would come out too low and σ (their spread around later runs of the same
# commit) too high. Confirmation runs of one candidate (seeds) still form a group of their own for σ.
UNSELECTED = ("baseline", "confirm")
# head's reference on a class: its latest unselected runs there (older ones may predate a drift of the host)
REFERENCE_RUNS = 4
# A class's own σ is used once it rests on this many degrees of freedom; before, the run's σ (every class's groups
# pooled) stands in: a σ from one or two pairs of runs can come out far too small by chance, and a too small σ
# keeps noise.
MIN_CLASS_DOF = 4


def runs_on(db: Session, run_id: int, commit: str, cls: str, *, unselected: bool = False) -> list[float]:
    """val_bpb of the accepted runs of `commit` on hardware class `cls`, oldest first: its latest REFERENCE_RUNS
    baseline repeats and control runs (UNSELECTED); when it has none there, [] with `unselected`, else its own
    first run and confirmation runs. Promotion runs (another scale) are left out."""
    rows = db.exec(select(Experiment.kind, Experiment.val_bpb, Experiment.parent_commit).where(
        Experiment.run_id == run_id, Experiment.commit == commit, Experiment.device_name == cls,
        Experiment.status == "keep", Experiment.kind != "promotion", Experiment.val_bpb.is_not(None))
        .order_by(Experiment.id)).all()
    clean = [v for k, v, parent in rows if k in UNSELECTED and parent == commit][-REFERENCE_RUNS:]
    return clean if clean or unselected else [v for _, v, _ in rows]


def class_groups(db: Session, run_id: int, cls: str) -> list[list[float]]:
    """Runs of one class that repeat the same code, whatever their verdict: the baseline repeats and control runs
    of each commit (UNSELECTED), and the confirmation runs of each candidate, each a group; groups of two runs or
    more only."""
    q = select(Experiment.commit, Experiment.parent_commit, Experiment.val_bpb).where(
        Experiment.run_id == run_id, Experiment.device_name == cls, Experiment.kind.in_(UNSELECTED),
        Experiment.val_bpb.is_not(None))
    groups: dict[tuple, list[float]] = {}
    for commit, parent, v in db.exec(q.order_by(Experiment.id)).all():
        groups.setdefault((commit, commit == parent), []).append(v)
    return [g for g in groups.values() if len(g) >= 2]


def measure_class(db: Session, run: Run, cls: str) -> Optional[dict]:
    """σ of class `cls` (rule.pooled_sigma over its groups) stored in run.class_sigma[cls] as {sigma, dof}, and
    run.noise_sigma re-pooled over every class (dof-weighted). Returns the entry, or None (no group of two yet,
    nothing stored)."""
    groups = class_groups(db, run.id, cls)
    if not groups:
        return None
    entry = {"sigma": pooled_sigma(groups), "dof": sum(len(g) - 1 for g in groups)}
    table = dict(run.class_sigma or {})
    table[cls] = entry
    run.class_sigma = table  # a new dict: the JSON column is saved only when it is assigned
    run.noise_sigma = overall_sigma(table)
    db.add(run)
    return entry


def overall_sigma(table: dict) -> float:
    """The classes' σ pooled: sqrt(Σ σ_c²·dof_c / Σ dof_c). `table`: class → {sigma, dof}, not empty."""
    dof = sum(e["dof"] for e in table.values())
    return (sum(e["sigma"] ** 2 * e["dof"] for e in table.values()) / dof) ** 0.5


def sigma_for(run: Run, cls: str) -> float:
    """The noise floor a result on class `cls` is judged with: the class's own σ once it rests on MIN_CLASS_DOF
    degrees of freedom, else the run's (every class's groups pooled). Raises ValueError when the run has no σ
    yet (the baseline is still running)."""
    entry = (run.class_sigma or {}).get(cls)
    if entry is not None and entry["dof"] >= MIN_CLASS_DOF:
        return entry["sigma"]
    if run.noise_sigma is None:
        raise ValueError("no noise floor yet")
    return run.noise_sigma


def allowed(pin: str, cls: Optional[str], host: str) -> Optional[bool]:
    """May a slot train the run's experiments under the pin `hardware = pin` (an fnmatch glob on the class or
    the host name)? True / False, or None while the slot's class is not known yet (it has reported no result)
    and its host does not match: its first result tells."""
    if not pin or fnmatch.fnmatchcase(host, pin):
        return True
    if cls is None:
        return None
    return fnmatch.fnmatchcase(cls, pin)


def fits(required: str, cls: Optional[str]) -> bool:
    """Can a slot of class `cls` (None: not known yet) take an experiment that must train on `required`
    ("" = any class)?"""
    return not required or required == cls
