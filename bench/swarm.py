"""The swarm: does a Claude-fed fleet wait on the API? The real engine, database, git workspace and Claude proposer
(real anthropic client) against a fake Messages API that answers after a set latency, with simulated slots.

    nice python bench/swarm.py [--fleets 16:20:10 64:60:30] [--seconds 120 240] [--single | --swarm] [--ideas N]

A fleet is SLOTS:RUN_S:LATENCY_S. The fake answers each request after LATENCY_S with an edit to one of many
constants of the simulated train.py that the prompt does not mention (as a model told what is queued, training and
tried would; two requests in flight at once may still pick the same one), with token usage of a realistic prompt
(14 000 input tokens of which 4 000 are the cached static prefix, 1 500 output) on claude-opus-4-8 prices.
Measured after the first fill of every slot (or, when that never comes, after RUN_S + 2 × LATENCY_S), for
--seconds: slot idle fraction, requests in flight (mean / peak), duplicate-idea rate, USD per experiment, and the
share of proposals that read the prompt cache. --single runs with one request in flight (the engine before the
swarm), --swarm only the swarm; by default each fleet runs both ways, side by side. --ideas: how many constants
the stand-in model picks from (fewer ideas, more collisions between requests in flight).
Target (issue 19): slot idle < 5% after the first fill at 16 slots × 20 s runs / 10 s latency and at
64 slots × 60 s runs / 30 s latency. Writes bench/results/swarm.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_json  # noqa: E402


def measure(slots: int, run_s: float, latency_s: float, seconds: float, single: bool, ideas: int = 2000) -> dict:
    from sqlmodel import Session, func, select

    from db.models import Experiment, utcnow
    from loop import swarm
    from tests.fakes.anthropic_api import FakeAnthropic
    from tests.fakes.swarm import KnobModel, build_swarm

    model = KnobModel(knobs=ideas, input_tokens=14_000, output_tokens=1_500, cache_prefix=4_000)
    home = Path(tempfile.mkdtemp(prefix="bench-swarm-"))
    with FakeAnthropic(respond=model, latency_s=latency_s) as fake:
        engine, db = build_swarm(home, fake.url, slots, run_s, knobs=ideas,
                                 proposer_concurrency=1 if single else None)
        t_start = time.time()
        engine.start()
        while len(engine.handles) < slots and time.time() - t_start < run_s + 2 * latency_s:
            time.sleep(0.05)
        warmup = time.time() - t_start
        filled = len(engine.handles) == slots
        window_start = utcnow()
        t0 = last = time.time()
        busy_area = flight_area = 0.0
        peak = 0
        while time.time() - t0 < seconds:
            time.sleep(0.1)
            now = time.time()
            n = engine.proposals.in_flight()
            busy_area += len(engine.handles) * (now - last)
            flight_area += n * (now - last)
            peak = max(peak, n)
            last = now
        wall = time.time() - t0
        engine.stop(kill=True)
        engine.proposals.close(wait=True)
        with Session(db) as s:
            made = s.exec(select(Experiment.usage, Experiment.reason, Experiment.cost_usd).where(
                Experiment.kind == "experiment", Experiment.created_at >= window_start)).all()
            done = s.exec(select(Experiment.status, Experiment.cost_usd).where(
                Experiment.kind == "experiment", Experiment.finished_at >= window_start)).all()
            by_status = dict(s.exec(select(Experiment.status, func.count()).where(
                Experiment.kind == "experiment", Experiment.finished_at >= window_start)
                .group_by(Experiment.status)).all())
        db.dispose()
    shutil.rmtree(home, ignore_errors=True)
    # what the experiments that finished cost to propose (invalid answers included: they were paid for), per
    # experiment trained; proposals still queued at the end are the pipeline's stock, not spend per experiment
    usd = sum(c for _, c in done)
    finished = sum(1 for st, _ in done if st != "invalid")
    cached = sum(1 for u, _, _ in made if (u or {}).get("cache_read_input_tokens"))
    dup = swarm.duplicate_rate((u, r) for u, r, _ in made)
    return {
        "slots": slots, "run_s": run_s, "ideas": ideas, "latency_s": latency_s, "mode": "single" if single else "swarm",
        "concurrency": 1 if single else swarm.default_concurrency(slots), "first_fill": filled,
        "warmup_seconds": warmup, "wall_seconds": wall, "slot_idle_fraction": 1 - busy_area / (slots * wall),
        "in_flight_mean": flight_area / wall, "in_flight_peak": peak, "proposals": len(made),
        "experiments_finished": finished, "experiments_per_hour": 3600 * finished / wall,
        "duplicate_rate": dup, "usd_per_experiment": usd / finished if finished else None,
        "cache_read_share": cached / len(made) if made else None, "by_status": by_status,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleets", nargs="+", default=["16:20:10", "64:60:30"], help="SLOTS:RUN_S:LATENCY_S")
    ap.add_argument("--seconds", type=float, nargs="+", default=[120.0, 240.0],
                    help="measured wall time per fleet (one value, or one per fleet)")
    ap.add_argument("--ideas", type=int, default=2000, help="constants the stand-in model picks its edits from "
                                                             "(fewer: more duplicate ideas)")
    ap.add_argument("--name", default="swarm", help="bench/results/<name>.json")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--single", action="store_true", help="one request in flight only")
    mode.add_argument("--swarm", action="store_true", help="the swarm only")
    a = ap.parse_args()
    modes = [True] if a.single else [False] if a.swarm else [False, True]
    rows = []
    for i, fleet in enumerate(a.fleets):
        slots, run_s, latency_s = (float(x) for x in fleet.split(":"))
        seconds = a.seconds[min(i, len(a.seconds) - 1)]
        for single in modes:
            r = measure(int(slots), run_s, latency_s, seconds, single, a.ideas)
            rows.append(r)
            dup = "—" if r["duplicate_rate"] is None else f"{100 * r['duplicate_rate']:.1f}%"
            usd = "—" if r["usd_per_experiment"] is None else f"${r['usd_per_experiment']:.3f}"
            print(f"{int(slots):3d} slots × {run_s:g} s runs, {latency_s:g} s latency, {r['mode']:6s}: "
                  f"slot idle {100 * r['slot_idle_fraction']:5.1f}%, in flight mean {r['in_flight_mean']:.1f} / "
                  f"peak {r['in_flight_peak']}, {r['experiments_per_hour']:.0f} experiments/h, duplicate ideas "
                  f"{dup}, {usd} per experiment, cache read on {100 * (r['cache_read_share'] or 0):.0f}% "
                  f"(first fill {'in' if r['first_fill'] else 'NOT in'} {r['warmup_seconds']:.0f} s)", flush=True)
    for r in rows:
        if r["mode"] == "swarm":
            ok = r["slot_idle_fraction"] < 0.05
            print(f"target {r['slots']} × {r['run_s']:g} s at {r['latency_s']:g} s (idle < 5%): "
                  f"{'met' if ok else 'NOT met'}")
    write_json(a.name, {"runs": rows})


if __name__ == "__main__":
    main()
