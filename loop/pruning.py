"""Early pruning: is a run's loss clearly behind head's at the same elapsed time? Pure functions of loss curves
([[elapsed_s, loss], …]), plus the one read of head's curves.

Both sides are averaged over the last PRUNE_WINDOW of the budget (the run over the points seen of it, head over
all its accepted runs' curves), and the run must be behind at PRUNE_CHECKS points in a row: comparing one noisy
step with one stretch of one head curve stopped good runs.
"""

from __future__ import annotations

from typing import Optional

from sqlmodel import Session, select

from db.models import Experiment, Run

PRUNE_MIN_STEPS = 20  # a run is never pruned before it has logged this many steps
PRUNE_WINDOW = 0.1  # fraction of the budget over which a run's and head's losses are averaged before comparing
PRUNE_CHECKS = 3  # consecutive points seen behind head by the margin before a run is stopped
MAX_POINTS = 200  # points kept of a run's curve: only the last window is ever read


def head_curves(db: Session, run: Run, cls: str) -> list[list[list[float]]]:
    """Head's loss curves on hardware class `cls`: those of its accepted runs there (the kept run and its
    confirm runs, or the baseline repeats), the most recent five (a loss at an elapsed time depends on the
    hardware's speed, so a run is compared with head on its own class only)."""
    curves = db.exec(select(Experiment.curve).where(
        Experiment.run_id == run.id, Experiment.commit == run.head_commit, Experiment.device_name == cls,
        Experiment.status == "keep", Experiment.kind != "promotion").order_by(Experiment.id.desc()).limit(5)).all()
    return [c for c in curves if c]


def curve_loss_at(curve: list, t: float, window_s: float) -> Optional[float]:
    """The mean loss of a curve over the window_s seconds up to elapsed time t (None when the curve ends before
    t or has no point in the window).

    A window in seconds, not points: one step's loss is noisy (a small batch moves it by several percent),
    so a run and head are compared on the same stretch of time, averaged."""
    if not curve or curve[-1][0] < t:
        return None
    pts = [loss for e, loss in curve if t - window_s < e <= t]
    return sum(pts) / len(pts) if pts else None


def observe(seen: list, progress: Optional[dict]) -> bool:
    """Add a run's latest progress ({step, elapsed_s, loss}, from its handle) to the curve `seen` of it, in
    place. Returns True when that is a new point worth judging: never before PRUNE_MIN_STEPS steps (on a slow
    or busy machine the first steps say nothing)."""
    if not progress:
        return False
    loss, t = progress.get("loss"), float(progress.get("elapsed_s", 0.0))
    if not isinstance(loss, (int, float)) or int(progress.get("step") or 0) < PRUNE_MIN_STEPS:
        return False
    if seen and seen[-1][0] > t:
        seen.clear()  # a re-run of the experiment: its clock started again
    if seen and seen[-1][0] == t:
        return False
    seen.append([t, float(loss)])
    del seen[:-MAX_POINTS]
    return True


def behind_head(seen: list, head: list, budget_s: float, prune_after: float, margin: float) -> Optional[dict]:
    """Why to stop the run whose curve so far is `seen`, or None to let it train: at each of its last
    PRUNE_CHECKS points, past `prune_after` of the budget (a fraction), its mean loss over the window was above
    head's mean over the same stretch × (1 + margin), with PRUNE_CHECKS points of its own in that window.
    Returns {reason, elapsed_s, loss, head_loss, saved_s} (seconds) for the last point."""
    window = PRUNE_WINDOW * budget_s
    if len(seen) < PRUNE_CHECKS or not head:
        return None
    for k in range(len(seen) - PRUNE_CHECKS, len(seen)):
        upto, t = seen[:k + 1], seen[k][0]
        mine = curve_loss_at(upto, t, window)
        refs = [r for r in (curve_loss_at(c, t, window) for c in head) if r is not None]
        ref = sum(refs) / len(refs) if refs else None
        if not (t >= prune_after * budget_s and mine is not None and ref is not None
                and sum(1 for e, _ in upto if e > t - window) >= PRUNE_CHECKS and mine > ref * (1 + margin)):
            return None
    return {"reason": f"pruned at {t:.0f}/{budget_s:.0f} s: loss {mine:.3f} vs head's {ref:.3f} "
                      f"(means over the last {window:.3g} s)",
            "elapsed_s": t, "loss": mine, "head_loss": ref, "saved_s": max(0.0, budget_s - t)}


class Pruner:
    """The engine's pruning state: each running experiment's curve as seen at each tick, and the experiments
    stopped for being behind (why, until their outcome is recorded as `pruned`)."""

    def __init__(self) -> None:
        self.curves: dict[int, list] = {}  # exp id → [[elapsed_s, loss], …]
        self.pruned: dict[int, dict] = {}  # exp id → {reason, …} (kill sent, outcome pending)

    def check(self, db, run: Run, handles: dict, slot_class: dict[str, str], budget_s: float, prune_after: float,
              margin: float) -> None:
        """Kill each running experiment (`handles`: exp id → runner Handle) whose loss is clearly behind head's
        on its slot's hardware class (`slot_class`: slot name → class; `db`: a SQLAlchemy engine). Head's
        curves are read once per class, and only when a run has something new to judge."""
        heads: dict = {}  # hardware class → head's curves there
        for exp_id, h in list(handles.items()):
            if h.kind != "experiment" or exp_id in self.pruned or not observe(
                    self.curves.setdefault(exp_id, []), h.progress()):
                continue
            cls = slot_class.get(h.slot.name)
            if cls is None:
                continue  # the slot's hardware is not known yet: nothing of head's to compare with
            if cls not in heads:
                with Session(db) as s:
                    heads[cls] = head_curves(s, run, cls)
            info = behind_head(self.curves[exp_id], heads[cls], budget_s, prune_after, margin)
            if info is not None:
                self.pruned[exp_id] = info
                h.kill(info["reason"])

    def forget(self, exp_id: int) -> None:
        """The experiment's result is recorded: drop what was kept of it."""
        self.curves.pop(exp_id, None)
        self.pruned.pop(exp_id, None)
