"""Digest benchmark: text and progress plot over N experiments in the database.

    python bench/digest.py [--experiments 100000] [--database-url URL]

Prints seconds to build the numbers, the text and the PNG; writes bench/results/digest.json.
Target: < 2 s for 100 000 experiments.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_json  # noqa: E402


def fill(db, n: int, seed: int = 0, keep_percent: float = 0.2) -> None:
    """One run with 3 baseline repeats and n experiments over the last 30 days, bulk-inserted; each keep
    has a confirm run and is judged on the mean of the two."""
    from sqlalchemy import insert

    from db.models import BudgetLedger, Experiment, Run, utcnow
    from db.session import session_scope

    rng = random.Random(seed)
    now = utcnow()
    with session_scope(db) as s:
        run = Run(name="main", branch="ratchet/main", workspace="/w", baseline_commit="b" * 40, head_commit="b" * 40,
                  budget_s=300.0, noise_sigma=0.002)
        s.add(run)
        s.flush()
        run_id = run.id
    head = 1.000
    rows, ledger = [], []
    for i in range(n + 3):
        base = i < 3
        at = now - timedelta(days=30) + timedelta(seconds=i * 30 * 86400 / (n + 3))
        st = "keep" if base else rng.choices(["keep", "discard", "crash", "invalid"], [keep_percent, 83 - keep_percent, 10, 7])[0]
        v = None if st in ("crash", "invalid") else (head + rng.gauss(0, 0.002) if base else
                                                     head - abs(rng.gauss(0, 0.002)) if st == "keep"
                                                     else head + abs(rng.gauss(0.002, 0.01)))
        confirm = None
        if st == "keep" and not base:  # kept on the mean of its run and one confirm run, as the engine does
            confirm = head - abs(rng.gauss(0, 0.002))  # both runs beat head, as a keep's mean must
            mean = (v + confirm) / 2
            d = {"verdict": "keep", "delta": mean - head, "val_bpb": mean, "runs": [v, confirm]}
            head = mean
        else:
            d = {}
        common = dict(run_id=run_id, created_at=at, finished_at=at, reason="", diff="", hypothesis="", log_tail="",
                      usage={})
        rows.append(dict(common, kind="baseline" if base else "experiment", status=st, val_bpb=v,
                         description=f"change {i}", decision=d))
        ledger.append(dict(run_id=run_id, day=at.date().isoformat(), kind="gpu_seconds", amount=310.0, created_at=at))
        if confirm is not None:
            rows.append(dict(common, kind="confirm", status="keep", val_bpb=confirm, description=f"confirm {i}",
                             decision={}))
            ledger.append(dict(ledger[-1]))
    with session_scope(db) as s:
        for k in range(0, len(rows), 20000):
            s.execute(insert(Experiment), rows[k:k + 20000])
            s.execute(insert(BudgetLedger), ledger[k:k + 20000])
        r = s.get(Run, run_id)
        r.head_val_bpb = head
        s.add(r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", type=int, default=100_000)
    ap.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    a = ap.parse_args()
    from bot.digest import digest_text, render_plot
    from db.session import create_tables, make_engine
    from loop.config import Settings
    from loop.digest import build_digest

    tmp = Path(tempfile.mkdtemp(prefix="bench-digest-"))
    db = make_engine(a.database_url or f"sqlite:///{tmp / 'ratchet.db'}")
    create_tables(db)
    t = time.perf_counter()
    fill(db, a.experiments)
    fill_s = time.perf_counter() - t
    settings = Settings(home=tmp, budget_gpu_hours_per_day=24)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        d = build_digest(db, "main", settings)
        t1 = time.perf_counter()
        text = digest_text(d)
        t2 = time.perf_counter()
        render_plot(d, tmp / "digest.png")
        t3 = time.perf_counter()
        times.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
    best = min(times, key=lambda x: x[3])
    figures = {"experiments": a.experiments, "database": db.url.get_backend_name(), "fill_seconds": fill_s,
               "numbers_seconds": best[0], "text_seconds": best[1], "plot_seconds": best[2], "total_seconds": best[3],
               "all_runs_total_seconds": [x[3] for x in times], "points_plotted": len(d.plot.points),
               "png_bytes": (tmp / "digest.png").stat().st_size}
    print(text)
    print(f"\n{a.experiments:,} experiments ({figures['database']}): numbers {best[0]:.3f} s + text {best[1]:.3f} s + "
          f"plot {best[2]:.3f} s = {best[3]:.3f} s (best of 3); target < 2 s: {'met' if best[3] < 2 else 'NOT met'}")
    write_json("digest", figures)


if __name__ == "__main__":
    main()
