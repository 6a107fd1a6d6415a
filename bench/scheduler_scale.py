"""Scheduler scale: a simulated fleet through the real engine, database, git workspace and offline proposer.

    python bench/scheduler_scale.py [--slots 64 256 1024] [--trainer-s 60] [--seconds 120] [--knobs 100]

The trainer is simulated (each "experiment" returns after --trainer-s seconds with a plausible
val_bpb: head's value plus noise, sometimes better), so what is measured is the loop itself. The
simulated train.py is the template plus --knobs constants, and the offline proposer scales each number
by one of FACTORS, so that it has an untried edit for every experiment the largest fleet trains on one
head (the template's two dozen constants give too few; a fleet that size would run the Claude
proposer). The file stays close to the template's size, as a Claude proposal is: validating a proposal
costs in proportion to its length, so a file padded to several times that would measure the padding.
Prints decisions per second, database time per experiment, slot idle fraction and the engine
process's CPU (% of one core); writes bench/results/scheduler_scale.json.
Target: at 1,024 slots with 60 s runs, slot idle fraction < 1% and engine CPU < 25% of one core.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_json  # noqa: E402
from loop.runners.base import Handle, Outcome, Runner, Slot  # noqa: E402


JITTER = 0.1  # a simulated run lasts trainer_s × U(1 - JITTER, 1 + JITTER)
KNOBS = 100  # constants appended to the template's train.py by default (--knobs; bench/profile_scale.py too)
# The offline proposer's scale factors: 40 steps of 2^(1/20) from 0.5 to 2, so KNOBS (100) give 4,000 edits per head,
# more than the ~3,000 experiments a 1,024-slot fleet trains on one head in a measurement.
FACTORS = tuple(round(2 ** (k / 20), 4) for k in range(-20, 21) if k)


class SimHandle(Handle):
    """A simulated experiment: done `seconds` after it started, with a result drawn around the current head;
    about 5% of train.py sources (the same ones on every run of them) are 0.01 better than head."""

    def __init__(self, job, slot, seconds: float, rng: random.Random, head_bpb: float):
        from trainer.result import Result

        self.exp_id, self.slot, self.pid, self.kind, self.description = job.exp_id, slot, None, "experiment", ""
        self.started = time.time()
        # Whether a change helps is a property of its code, not of one run: a confirmation run of the same
        # commit (new seed) must see the same gain, or no keep would ever hold up and head would never move.
        better = hashlib.sha256(job.source.encode()).digest()[0] < 13  # 13/256 ≈ 5% of changes
        v = head_bpb - (0.01 if better else 0.0) + rng.gauss(0, 0.002)
        res = Result(status="ok", val_bpb=v, training_seconds=seconds, total_seconds=seconds + 0.5, tokens=10_000,
                     steps=100, params=1_000_000, device="sim", seed=job.seed)
        curve = [[seconds * i / 10, 8.0 - 0.3 * i] for i in range(11)]
        self._ready = Outcome(result=res, slot=slot.name, host=slot.host, wall_seconds=seconds, curve=curve)
        self._outcome = None
        self.killed = False

    def done(self):
        return self._outcome is not None

    def outcome(self):
        return self._outcome

    def kill(self, reason):
        self.killed = True

    def progress(self):
        return None


class SimRunner(Runner):
    """N simulated slots on N/8 hosts. One clock thread finishes the runs that are due, as the fleet runners
    (SSH, Ray) watch all their runs from one thread: a thread per run would measure thread start-up under
    the GIL (milliseconds each when the engine is busy), not the engine."""

    name = "sim"

    def __init__(self, n: int, seconds: float, engine_ref: list):
        self._slots = [Slot(f"sim{i // 8}:gpu{i % 8}", f"sim{i // 8}") for i in range(n)]
        self.seconds, self.rng, self.engine_ref = seconds, random.Random(0), engine_ref
        self.busy_s = 0.0
        self._head, self._head_at = 1.0, 0.0
        self._due: list = []  # heap of (due time, sequence, handle, on_done)
        self._seq = 0
        self._cv = threading.Condition()
        threading.Thread(target=self._clock, name="sim-clock", daemon=True).start()

    def slots(self):
        return list(self._slots)

    def start(self, job, slot, on_done):
        now = time.time()
        if now - self._head_at > 0.5:  # the simulation's own reads stay out of the engine's figures
            self._head, self._head_at = self.engine_ref[0].get_run().head_val_bpb or 1.0, now
        # ±JITTER: real runs of one time budget end seconds apart (start-up, evaluation), so a fleet started
        # at once does not stay in lock-step; with none, every slot would finish in the same instant forever.
        seconds = self.seconds * self.rng.uniform(1 - JITTER, 1 + JITTER)
        self.busy_s += seconds
        h = SimHandle(job, slot, seconds, self.rng, self._head)
        with self._cv:
            self._seq += 1
            heapq.heappush(self._due, (now + seconds, self._seq, h, on_done))
            self._cv.notify()
        return h

    def _clock(self):
        while True:
            with self._cv:
                while not self._due or self._due[0][0] > time.time():
                    self._cv.wait(None if not self._due else self._due[0][0] - time.time())
                _, _, h, on_done = heapq.heappop(self._due)
            if not h.killed:
                h._outcome = h._ready
                on_done()


def build(n_slots: int, trainer_s: float, knobs: int = 0, prefix: str = "bench-scale-"):
    """The simulated fleet set up in a new temporary home: (engine, db engine), with the noise floor already
    measured (the simulation is about the steady state, not the baseline) and nothing started. knobs: extra
    constants appended to the template's train.py."""
    from sqlmodel import select

    from db.models import Experiment, Run
    from db.session import create_tables, make_engine, session_scope
    from loop.config import Settings
    from loop.engine import Engine
    from loop.proposers.offline import OfflineProposer
    from loop.workspace import TEMPLATE, Workspace

    home = Path(tempfile.mkdtemp(prefix=prefix))
    settings = Settings(home=home, workspace=home / "ws", budget_s=trainer_s, noise_repeats=2, prune=False)
    if knobs:  # more constants, so the offline proposer has an untried edit for every slot of a large fleet
        settings.workspace.mkdir(parents=True)
        (settings.workspace / "train.py").write_text(TEMPLATE.read_text() + "\n# ---- simulated knobs ----\n" + "".join(
            f"SIM_KNOB_{i:03d} = 1.0  # a constant the simulated trainer ignores\n" for i in range(knobs)))
    ws = Workspace.init(settings.workspace, force=True)
    db = make_engine(settings.db_url)
    create_tables(db)
    ref: list = []
    runner = SimRunner(n_slots, trainer_s, ref)
    engine = Engine(settings, db, ws, runner, OfflineProposer(seed=0, device="cuda", factors=FACTORS),
                    home / "data", device="cuda")
    ref.append(engine)
    engine.setup()
    with session_scope(db) as s:
        run = s.exec(select(Run)).one()
        run.noise_sigma, run.head_val_bpb, run.head_runs = 0.002, 1.0, [1.0]
        for seed in range(2):
            s.add(Experiment(run_id=run.id, kind="baseline", status="keep", commit=run.baseline_commit,
                             parent_commit=run.baseline_commit, val_bpb=1.0, seed=seed))
    return engine, db


def measure(n_slots: int, trainer_s: float, seconds: float, knobs: int = 0) -> dict:
    from sqlalchemy import event, func
    from sqlmodel import Session, select

    from db.models import Experiment, utcnow

    engine, db = build(n_slots, trainer_s, knobs)
    train_py_bytes = len(engine.workspace.read_file(engine.get_run().head_commit).encode())
    db_time = [0.0]

    @event.listens_for(db, "before_cursor_execute")
    def _t0(conn, cursor, statement, params, context, executemany):
        context._t0 = time.perf_counter()

    @event.listens_for(db, "after_cursor_execute")
    def _t1(conn, cursor, statement, params, context, executemany):
        db_time[0] += time.perf_counter() - context._t0

    # Warm-up: the first fill of every slot is measured on its own (one large round); the figures below are
    # the steady state that follows, which is what a fleet running for days sees.
    t_start = time.time()
    engine.start()
    while len(engine.handles) < n_slots and time.time() - t_start < 300:
        time.sleep(0.01)
    warmup = time.time() - t_start
    db_time[0] = 0.0
    finished = (select(func.count()).select_from(Experiment)
                .where(Experiment.kind == "experiment", Experiment.finished_at.is_not(None)))
    with Session(db) as s:
        done_before = s.exec(finished).one()
    window_start = utcnow()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.time()
    busy_area = 0.0
    last = t0
    while time.time() - t0 < seconds:
        time.sleep(0.1)
        now = time.time()
        busy_area += len(engine.handles) * (now - last)
        last = now
    wall = time.time() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    engine.stop(kill=True)
    with Session(db) as s:
        n_done = s.exec(finished).one() - done_before
        by_status = dict(s.exec(select(Experiment.status, func.count()).where(
            Experiment.kind == "experiment", Experiment.finished_at >= window_start).group_by(Experiment.status)).all())
    db.dispose()
    shutil.rmtree(engine.settings.home, ignore_errors=True)
    user, system = cpu1.ru_utime - cpu0.ru_utime, cpu1.ru_stime - cpu0.ru_stime
    cpu = user + system
    return {
        "slots": n_slots, "trainer_s": trainer_s, "wall_seconds": wall, "decisions": n_done,
        "decisions_per_s": n_done / wall, "db_seconds_per_experiment": db_time[0] / max(1, n_done),
        "slot_idle_fraction": 1 - busy_area / (n_slots * wall), "engine_cpu_percent_of_one_core": 100 * cpu / wall,
        "engine_cpu_user_percent": 100 * user / wall, "engine_cpu_system_percent": 100 * system / wall,
        "kept": by_status.get("keep", 0), "invalid": by_status.get("invalid", 0),
        "knobs": knobs, "factors": len(FACTORS), "train_py_bytes": train_py_bytes, "warmup_seconds": warmup,
        "jitter": JITTER,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--trainer-s", type=float, default=60.0, help="length of a simulated run, seconds")
    ap.add_argument("--seconds", type=float, default=120.0, help="measured wall time per fleet size")
    ap.add_argument("--knobs", type=int, default=KNOBS, help="extra constants in the simulated train.py")
    a = ap.parse_args()
    rows = []
    for n in a.slots:
        r = measure(n, a.trainer_s, a.seconds, a.knobs)
        rows.append(r)
        print(f"{n:4d} slots × {a.trainer_s:g} s trainer: {r['decisions_per_s']:6.1f} decisions/s, "
              f"DB {1000 * r['db_seconds_per_experiment']:.1f} ms/experiment, slot idle {100 * r['slot_idle_fraction']:.1f}%, "
              f"engine CPU {r['engine_cpu_percent_of_one_core']:.0f}% of a core (user {r['engine_cpu_user_percent']:.0f}%, "
              f"system {r['engine_cpu_system_percent']:.0f}%; {r['decisions']} decisions, "
              f"{r['kept']} kept, {r['invalid']} invalid; first fill of all slots {r['warmup_seconds']:.1f} s)")
    big = [r for r in rows if r["slots"] == 1024]
    if big:
        ok = big[0]["slot_idle_fraction"] < 0.01 and big[0]["engine_cpu_percent_of_one_core"] < 25
        print(f"target at 1,024 slots (idle < 1%, CPU < 25%): {'met' if ok else 'NOT met'}")
    write_json("scheduler_scale", {"runs": rows})


if __name__ == "__main__":
    main()
