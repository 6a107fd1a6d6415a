"""Loop overhead: N experiments at budget B through the real engine (CPU unless --device says otherwise).

    python bench/loop_overhead.py [--experiments 4] [--budget-s 60] [--device cpu]

Prints the busy fraction (Σ training_seconds ÷ wall seconds) and the overhead per experiment
(wall − training), split into harness time and engine time (proposing, validating, committing, deciding), and the
harness's own phases from each result.json: start (job handed over → clock start), export (train() returned →
artifact received), load (the scorer's weights-only load and graph checks) and score (val_bpb with the causality
check windows). Writes bench/results/loop_overhead.json.
Target: overhead ≤ 5 s per experiment (busy fraction ≥ 0.92 at B = 60 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import run_loop, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", type=int, default=4, help="experiments after the baseline repeats")
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--noise-repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    a = ap.parse_args()
    from sqlmodel import Session, select

    from db.models import Experiment

    home = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    # prune=False: a pruned run is not overhead
    _, db, run_id, wall, _ = run_loop(home, budget_s=a.budget_s, max_experiments=a.experiments,
                                      noise_repeats=a.noise_repeats, device=a.device, prune=False)
    with Session(db) as s:
        exps = [e for e in s.exec(select(Experiment).where(Experiment.run_id == run_id)).all() if e.started_at]
    first = min(e.started_at for e in exps)
    last = max(e.finished_at for e in exps)
    span = (last - first).total_seconds()  # first start → last result: what the loop itself controls
    train = sum(e.training_seconds or 0 for e in exps)
    harness = sum((e.wall_seconds or 0) - (e.training_seconds or 0) for e in exps)
    n = len(exps)
    phases: dict = {"start_s": [], "export_s": [], "load_s": [], "score_s": []}
    for e in exps:
        try:
            t = json.loads((Path(e.workdir) / "result.json").read_text()).get("timings") or {}
        except (OSError, ValueError, TypeError):
            continue
        for k in phases:
            if isinstance(t.get(k), (int, float)):
                phases[k].append(t[k])
    figures = {
        "budget_s": a.budget_s, "device": a.device, "experiments": n, "wall_seconds": span, "training_seconds": train,
        "busy_fraction": train / span, "overhead_s_per_experiment": (span - train) / n,
        "harness_overhead_s_per_experiment": harness / n,
        "engine_overhead_s_per_experiment": (span - train - harness) / n,
        "setup_seconds": wall - span,
        **{f"harness_{k}_mean": (sum(v) / len(v) if v else None) for k, v in phases.items()},
    }
    print(f"{n} experiments at {a.budget_s:g} s: busy fraction {figures['busy_fraction']:.3f}, overhead "
          f"{figures['overhead_s_per_experiment']:.2f} s/experiment (harness {figures['harness_overhead_s_per_experiment']:.2f}"
          f" s, engine {figures['engine_overhead_s_per_experiment']:.2f} s); target ≤ 5 s: "
          f"{'met' if figures['overhead_s_per_experiment'] <= 5 else 'NOT met'}")
    print("harness phases per experiment (mean s): " + ", ".join(
        f"{k.removesuffix('_s')} {figures[f'harness_{k}_mean']:.2f}" for k in phases
        if figures[f"harness_{k}_mean"] is not None))
    write_json("loop_overhead", figures)


if __name__ == "__main__":
    main()
