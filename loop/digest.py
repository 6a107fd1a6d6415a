"""The digest's numbers: what improved in a window, spend against budget, and the points of the progress plot.

Reads the database only (column queries, so 100 000 experiments stay fast); rendering is bot/digest.py's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Optional

from sqlmodel import Session, select

from db.models import Experiment, Promotion, Run, utcnow
from loop import budget, swarm

PLOTTED_STATUSES = ("keep", "discard", "crash", "timeout", "refused", "pruned")


@dataclass(frozen=True)
class KeptChange:
    """A kept experiment: val_bpb in bits per byte, delta vs the head it beat (negative is better)."""

    id: int
    description: str
    val_bpb: float
    delta: Optional[float]
    finished_at: Optional[datetime]
    hardware: str = ""  # the hardware class it was judged on (its device_name)


@dataclass
class PlotData:
    """What the progress plot draws, in experiment order (x = position in the run, 0-based).

    points: (x, val_bpb, status) for every experiment with a score; head: the running best as a
    step line, (x, val_bpb) at the baseline and at each keep; labels: (x, val_bpb, description) of keeps.
    """

    points: list[tuple[int, float, str]] = field(default_factory=list)
    head: list[tuple[int, float]] = field(default_factory=list)
    labels: list[tuple[int, float, str]] = field(default_factory=list)


@dataclass
class Digest:
    """A run over [since, until): improvements, counts, spend, candidates to promote, the plot's data."""

    run: str
    since: datetime
    until: datetime
    kept: list[KeptChange]
    best_then: Optional[float]
    best_now: Optional[float]
    baseline: Optional[float]
    counts: dict[str, int]
    caps: list[budget.Cap]
    candidates: list[KeptChange]
    plot: PlotData
    total_experiments: int = 0
    pruned_saved_s: float = 0.0  # GPU-seconds early pruning saved in the window
    promotions: list = field(default_factory=list)  # (id, scale, status, verdict) finished in or still open
    # research direction → (experiments finished in the window, kept), for runs whose program.md names directions
    by_direction: dict = field(default_factory=dict)
    duplicate_rate: Optional[float] = None  # share of the window's Claude proposals that repeated an idea

    @property
    def finished(self) -> int:
        return sum(n for s, n in self.counts.items() if s not in ("queued", "running", "proposed"))

    @property
    def keep_rate(self) -> Optional[float]:
        """Kept ÷ finished in the window (invalid ones included: they cost a proposal)."""
        return self.counts.get("keep", 0) / self.finished if self.finished else None

    @property
    def improvement_pct(self) -> Optional[float]:
        """% lower val_bpb than the run's baseline, now."""
        if self.baseline and self.best_now is not None:
            return 100.0 * (self.baseline - self.best_now) / self.baseline
        return None


def _aware(t: Optional[datetime]) -> Optional[datetime]:
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def build_digest(db_engine, run_name: str, settings, *, now: Optional[datetime] = None, hours: float = 24.0,
                 candidates: int = 3) -> Digest:
    """Compute the digest of `run_name` for the `hours` before `now`. Raises LookupError for an unknown run."""
    until = now or utcnow()
    since = until - timedelta(hours=hours)
    with Session(db_engine) as db:
        run = db.exec(select(Run).where(Run.name == run_name)).first()
        if run is None:
            raise LookupError(f"no run named {run_name!r}")
        rows = db.exec(select(Experiment.id, Experiment.kind, Experiment.status, Experiment.val_bpb,
                              Experiment.finished_at, Experiment.description)
                       .where(Experiment.run_id == run.id).order_by(Experiment.id)).all()
        directed = db.exec(select(Experiment.direction, Experiment.status, Experiment.finished_at).where(
            Experiment.run_id == run.id, Experiment.kind == "experiment", Experiment.direction != "",
            Experiment.finished_at.is_not(None), Experiment.finished_at >= since)).all()
        claude = db.exec(select(Experiment.usage, Experiment.reason).where(
            Experiment.run_id == run.id, Experiment.kind == "experiment", Experiment.proposer == "claude",
            Experiment.created_at >= since, Experiment.created_at < until)).all()
        kept_rows = db.exec(select(Experiment.id, Experiment.description, Experiment.val_bpb, Experiment.decision,
                                   Experiment.finished_at, Experiment.device_name)
                            .where(Experiment.run_id == run.id, Experiment.kind == "experiment",
                                   Experiment.status == "keep").order_by(Experiment.id)).all()
        caps = budget.caps(db, run.id, settings, until)
        pruned = db.exec(select(Experiment.decision, Experiment.finished_at)
                         .where(Experiment.run_id == run.id, Experiment.status == "pruned")).all()
        promos = db.exec(select(Promotion.id, Promotion.scale, Promotion.status, Promotion.verdict,
                                Promotion.finished_at).where(Promotion.run_id == run.id)).all()
    saved = sum(float((dec or {}).get("pruned", {}).get("saved_s", 0.0)) for dec, fin in pruned
                if fin is not None and since <= _aware(fin) < until)
    promo_rows = [(i, sc, st, v) for i, sc, st, v, fin in promos
                  if fin is None or since <= _aware(fin) < until]
    # a confirmed keep's val_bpb is the mean of its runs (the rule's input), not its first run alone
    kept_all = [KeptChange(i, d, (dec or {}).get("val_bpb", v), (dec or {}).get("delta"), _aware(f), hw)
                for i, d, v, dec, f, hw in kept_rows]
    base_vals = [v for _, kind, st, v, _, _ in rows if kind == "baseline" and st == "keep" and v is not None]
    baseline = statistics.fmean(base_vals) if base_vals else None

    counts: dict[str, int] = {}
    for _, kind, st, _, fin, _ in rows:
        fin = _aware(fin)
        if kind == "experiment" and fin is not None and since <= fin < until:
            counts[st] = counts.get(st, 0) + 1
    kept = [k for k in kept_all if k.finished_at is not None and since <= k.finished_at < until]
    before = [k for k in kept_all if k.finished_at is not None and k.finished_at < since]
    best_then = before[-1].val_bpb if before else baseline

    plot = PlotData()
    kept_val = {k.id: k.val_bpb for k in kept_all}
    kept_ids = set(kept_val)
    best = baseline
    x = 0
    for exp_id, kind, st, v, _, desc in rows:
        if v is None or st not in PLOTTED_STATUSES or kind == "confirm":  # a re-run is not a new point
            continue
        plot.points.append((x, v, "baseline" if kind == "baseline" else st))
        if kind == "baseline" and best is not None and not plot.head:
            plot.head.append((x, best))
        if exp_id in kept_ids:
            best = kept_val[exp_id]
            plot.head.append((x, best))
            plot.labels.append((x, best, desc))
        x += 1
    if plot.head and x:
        plot.head.append((x - 1, plot.head[-1][1]))  # carry the step line to the last experiment
    by_direction: dict[str, tuple[int, int]] = {}
    for direction, st, fin in directed:
        if _aware(fin) < until:
            n, k = by_direction.get(direction, (0, 0))
            by_direction[direction] = (n + 1, k + (st == "keep"))
    top = sorted((k for k in kept_all if k.delta is not None), key=lambda k: k.delta)[:candidates]
    return Digest(run=run.name, since=since, until=until, kept=kept, best_then=best_then,
                  best_now=run.head_val_bpb, baseline=baseline, counts=counts, caps=caps, candidates=top, plot=plot,
                  total_experiments=sum(1 for r in rows if r[1] == "experiment"), pruned_saved_s=saved,
                  promotions=promo_rows, by_direction=by_direction, duplicate_rate=swarm.duplicate_rate(claude))
