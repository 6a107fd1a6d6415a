"""The noise floor: baseline repeats of the run's first commit, and σ measured from them per hardware class
(only runs of one class are compared, so only their spread is noise). The keep rule (loop/rule.py) needs σ
before any experiment is judged.
"""

from __future__ import annotations

import statistics
from collections.abc import Container
from typing import Optional, Union

from sqlmodel import Session, select

from db.models import Event, Experiment, Run, utcnow
from loop import events, hardware
from loop.config import Settings
from loop.validate import normalised_ast_hash
from loop.workspace import Workspace


def next_repeat(db: Session, run: Run, settings: Settings, cls: Optional[str], running: Container[int],
                workspace: Workspace) -> Union[Experiment, str, None]:
    """The next baseline repeat for a slot of hardware class `cls` (None: not known yet), stored `queued` in the
    open transaction `db`; None when there is none for that slot now (`running`: ids of experiments training);
    a pause reason (str) when the baseline failed, or no class ran it twice in 4 × noise_repeats repeats.

    σ is measured within classes, so repeats go on past noise_repeats, on the class with the most runs, until
    they give noise_repeats − 1 degrees of freedom within classes (see measure)."""
    base = db.exec(select(Experiment).where(Experiment.run_id == run.id, Experiment.kind == "baseline")
                   .order_by(Experiment.id)).all()
    failed = [e for e in base if e.status in ("crash", "timeout", "refused")]
    if failed:
        return f"baseline {failed[0].status}: {failed[0].reason}"
    for e in base:
        if e.status == "queued" and e.id not in running and hardware.fits(e.hardware, cls):
            return e
    want = ""
    if len(base) >= settings.noise_repeats:
        if any(e.status != "keep" for e in base):
            return None  # the remaining repeats are training
        if len(base) >= 4 * settings.noise_repeats:
            return f"baseline: no hardware class ran it twice in {len(base)} repeats"
        counts: dict[str, int] = {}
        for e in base:
            counts[e.device_name] = counts.get(e.device_name, 0) + 1
        want = max(counts, key=counts.get)  # one more on the class with the most runs
        if not hardware.fits(want, cls):
            return None
    exp = Experiment(run_id=run.id, kind="baseline", status="queued", parent_commit=run.baseline_commit,
                     commit=run.baseline_commit, proposer="baseline", seed=settings.seed + len(base),
                     description=f"baseline repeat {len(base) + 1}/{settings.noise_repeats}", hardware=want,
                     ast_hash=normalised_ast_hash(workspace.read_file(run.baseline_commit)))
    db.add(exp)
    db.flush()
    return exp


def baseline_runs(db: Session, run: Run) -> list[tuple[float, str]]:
    """(val_bpb, hardware class) of each finished baseline repeat of the run."""
    return [(v, c) for v, c in db.exec(select(Experiment.val_bpb, Experiment.device_name).where(
        Experiment.run_id == run.id, Experiment.kind == "baseline", Experiment.status == "keep")).all()
        if v is not None]


def measure(db: Session, run: Run, settings: Settings) -> None:
    """Once every baseline repeat is in and they give noise_repeats − 1 degrees of freedom within hardware
    classes (as many as noise_repeats runs on one class): σ per class (loop/hardware.py), head's val_bpb (the
    mean over every class, shown), and a `baseline` event. Until then nothing is set: next_repeat adds repeats
    on the class with the most runs."""
    done = baseline_runs(db, run)
    if len(done) < settings.noise_repeats or run.noise_sigma is not None:
        return
    if dof(done) < settings.noise_repeats - 1:
        return
    measured = {c: e for c in sorted({c for _, c in done}) if (e := hardware.measure_class(db, run, c))}
    vals = [v for v, _ in done]
    run.head_val_bpb, run.head_runs, run.updated_at = statistics.fmean(vals), vals, utcnow()
    db.add(run)
    per = "; ".join(f"{c or 'unnamed hardware'}: σ {e['sigma']:.4f}" for c, e in measured.items())
    db.add(events.run_event(run, "baseline", f"baseline measured: val_bpb {run.head_val_bpb:.4f}, noise σ "
                            f"{run.noise_sigma:.4f} over {len(done)} runs ({per}); keep threshold "
                            f"{max(settings.min_delta, settings.noise_z * run.noise_sigma):.4f}",
                            val_bpb=run.head_val_bpb, sigma=run.noise_sigma, runs=vals,
                            class_sigma={c: e["sigma"] for c, e in measured.items()}))


# Passes over the training split past which a baseline mostly memorises: its val_bpb then gets worse with more
# training, so the rule would reward changes that train less, not better (our bound: a few passes still help).
MAX_EPOCHS = 4.0


def corpus_check(db: Session, run: Run, epochs: float) -> None:
    """Once per run, a `corpus_small` event when a baseline run saw the training split more than MAX_EPOCHS
    times (`epochs`: its tokens ÷ the split's): the corpus is too small for this device and budget."""
    if epochs <= MAX_EPOCHS or db.exec(select(Event.id).where(Event.run_id == run.id,
                                                              Event.kind == "corpus_small")).first():
        return
    db.add(events.run_event(run, "corpus_small", f"corpus too small: a baseline run saw the training split "
                            f"{epochs:.0f} times in {run.budget_s:g} s, so val_bpb rewards changes that train less "
                            "rather than better; prepare a larger corpus (`ratchet data prepare --corpus "
                            "climbmix:10`) and set `corpus` to it", epochs=epochs))


def dof(done: list[tuple[float, str]]) -> int:
    """Degrees of freedom of the baseline repeats within classes: Σ_c (runs on c − 1)."""
    per: dict[str, int] = {}
    for _, c in done:
        per[c] = per.get(c, 0) + 1
    return sum(n - 1 for n in per.values())
