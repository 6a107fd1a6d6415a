"""Search quality: the offline proposer for N experiments at budget B on CPU, then a false-keep check.

    python bench/search.py [--experiments 30] [--budget-s 60] [--recheck 3]

Prints the baseline and final head val_bpb, the % improvement, the number kept, and whether head
reproduces: head re-trained with new seeds must land within 2σ of its recorded val_bpb.
Writes bench/results/search.json. Target: ≥ 3% lower val_bpb than the baseline, and head reproduces.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import prepared_data, run_loop, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--recheck", type=int, default=3, help="new-seed re-runs of the final head")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from sqlmodel import Session, select

    from db.models import Experiment, Run
    from loop.runners.base import Job
    from loop.runners.local import LocalRunner
    from loop.workspace import Workspace

    home = Path(tempfile.mkdtemp(prefix="bench-search-"))
    settings, db, run_id, wall, _ = run_loop(home, budget_s=a.budget_s, max_experiments=a.experiments, seed=a.seed)
    with Session(db) as s:
        run = s.get(Run, run_id)
        exps = s.exec(select(Experiment).where(Experiment.run_id == run_id)).all()
    base = statistics.fmean(e.val_bpb for e in exps if e.kind == "baseline" and e.status == "keep")
    kept = [e for e in exps if e.kind == "experiment" and e.status == "keep"]
    by_status: dict = {}
    for e in exps:
        if e.kind == "experiment":
            by_status[e.status] = by_status.get(e.status, 0) + 1

    # False-keep check: train head again with seeds never used in the search, through the same runner (standby
    # harnesses and sandbox included) so the re-runs train under the conditions the search's runs had.
    head_src = Workspace(settings.workspace).read_file(run.head_commit)
    runner = LocalRunner("cpu", standby=settings.standby)
    rechecks = []
    try:
        for i in range(a.recheck):
            done = threading.Event()
            job = Job(exp_id=100_000 + i, source=head_src, workdir=home / f"recheck-{i}", data_dir=prepared_data(),
                      budget_s=a.budget_s, seed=100_000 + i, eval_tokens=settings.eval_tokens, device="cpu")
            handle = runner.start(job, runner.slots()[0], done.set)
            done.wait()
            r = handle.outcome().result
            if r.status == "ok":
                rechecks.append(r.val_bpb)
    finally:
        runner.close()
    recheck_mean = statistics.fmean(rechecks) if rechecks else None
    reproduces = recheck_mean is not None and abs(recheck_mean - run.head_val_bpb) <= 2 * run.noise_sigma
    improvement = 100 * (base - run.head_val_bpb) / base
    figures = {
        "budget_s": a.budget_s, "experiments": a.experiments, "wall_seconds": wall,
        "baseline_val_bpb": base, "noise_sigma": run.noise_sigma, "head_val_bpb": run.head_val_bpb,
        "improvement_percent": improvement, "kept": len(kept), "by_status": by_status,
        "kept_changes": [e.description for e in kept], "recheck_val_bpb": rechecks, "recheck_mean": recheck_mean,
        "head_reproduces_within_2sigma": reproduces,
    }
    print(f"baseline val_bpb {base:.4f} (σ {run.noise_sigma:.4f}) → head {run.head_val_bpb:.4f}: "
          f"{improvement:.2f}% lower, {len(kept)} kept of {a.experiments} ({by_status})")
    for d in figures["kept_changes"]:
        print(f"  kept: {d}")
    print(f"head re-run with new seeds: {', '.join(f'{v:.4f}' for v in rechecks)} (mean "
          f"{recheck_mean if recheck_mean is None else round(recheck_mean, 4)}): "
          f"{'reproduces' if reproduces else 'does NOT reproduce'} within 2σ")
    print(f"target ≥ 3% and head reproduces: {'met' if improvement >= 3 and reproduces else 'NOT met'}")
    write_json("search", figures)


if __name__ == "__main__":
    main()
