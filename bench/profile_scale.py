"""Profile the engine thread of bench/scheduler_scale.py: where one decision's time goes.

    python bench/profile_scale.py [--slots 1024] [--trainer-s 60] [--seconds 120] [--top 35] [--knobs 100]

Builds the same simulated fleet (SimRunner, real engine, SQLite, dulwich workspace, offline proposer),
runs the engine's own thread with every tick() after the first fill of every slot under cProfile, and prints: ticks, the share of wall time
spent inside tick(), per-decision cost, slot idle fraction, and the top functions by cumulative and by
own time. Only the engine's ticks are profiled; the simulated trainer's clock thread is not.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scheduler_scale import KNOBS, build  # noqa: E402


def profile(n_slots: int, trainer_s: float, seconds: float, top: int, dump: str = "", knobs: int = KNOBS) -> None:
    """Run the engine for `seconds` (wall) with its ticks under cProfile and print what it measured; with `dump`,
    also write the raw stats to `<dump>.<n_slots>` (for pstats). Raises nothing new."""
    from sqlmodel import Session, select

    from db.models import Experiment
    from loop.proposers.base import ProposalExhausted

    engine, db = build(n_slots, trainer_s, knobs=knobs, prefix="bench-profile-")
    exhausted = [0]
    propose = engine.proposer.propose

    def counted(*a, **kw):  # how often the proposer had nothing left on head: slots then wait a TICK_S
        try:
            return propose(*a, **kw)
        except ProposalExhausted:
            exhausted[0] += 1
            raise

    engine.proposer.propose = counted
    prof = cProfile.Profile()
    stats = {"ticks": 0, "tick_s": 0.0, "max_tick_s": 0.0}
    tick = engine.tick

    measuring = [False]  # the first fill of every slot is not profiled: the steady state after it is

    def profiled_tick():  # runs on the engine's thread
        if not measuring[0]:
            return tick()
        t = time.perf_counter()
        prof.runcall(tick)
        dt = time.perf_counter() - t
        stats["ticks"] += 1
        stats["tick_s"] += dt
        stats["max_tick_s"] = max(stats["max_tick_s"], dt)

    engine.tick = profiled_tick
    engine.start()
    t_start = time.time()
    while len(engine.handles) < n_slots and time.time() - t_start < 300:
        time.sleep(0.01)
    with Session(db) as s:
        done_before = len(s.exec(select(Experiment.id).where(Experiment.kind == "experiment",
                                                              Experiment.finished_at.is_not(None))).all())
    measuring[0] = True
    t0 = last = time.time()
    busy_area = 0.0
    while time.time() - t0 < seconds:
        time.sleep(0.1)
        now = time.time()
        busy_area += len(engine.handles) * (now - last)
        last = now
    wall = time.time() - t0
    engine.stop(kill=True)
    with Session(db) as s:
        statuses = s.exec(select(Experiment.status).where(Experiment.kind == "experiment",
                                                          Experiment.finished_at.is_not(None))).all()
    n_done = len(statuses) - done_before
    by_status = {k: statuses.count(k) for k in sorted(set(statuses))}
    db.dispose()
    shutil.rmtree(engine.settings.home, ignore_errors=True)
    print(f"\n=== {n_slots} slots × {trainer_s:g} s trainer, {wall:.1f} s wall ===")
    print(f"decisions {n_done} ({n_done / wall:.1f}/s), slot idle {100 * (1 - busy_area / (n_slots * wall)):.1f}%, "
          f"ticks {stats['ticks']} (longest {stats['max_tick_s']:.2f} s)")
    print(f"outcomes since the start {by_status}; proposer exhausted {exhausted[0]} times")
    print(f"engine thread: {100 * stats['tick_s'] / wall:.0f}% of the wall time in tick(); "
          f"{1000 * stats['tick_s'] / max(1, n_done):.1f} ms of tick() per decision (profiler overhead included)")
    if dump:
        prof.dump_stats(f"{dump}.{n_slots}")
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(top)
        print(f"--- top {top} by {key} ---")
        print("\n".join(buf.getvalue().splitlines()[6:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, nargs="+", default=[1024])
    ap.add_argument("--trainer-s", type=float, default=60.0)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--knobs", type=int, default=KNOBS, help="extra constants in the simulated train.py (see scheduler_scale)")
    ap.add_argument("--dump", default="", help="write raw cProfile stats to DUMP.<slots>")
    a = ap.parse_args()
    for n in a.slots:
        profile(n, a.trainer_s, a.seconds, a.top, a.dump, a.knobs)


if __name__ == "__main__":
    main()
