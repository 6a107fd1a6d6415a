"""A simulated fleet through the real engine, keep policy, git workspace and SQLite: hosts of given speed and
hardware class, runs that finish at once with a val_bpb drawn from the code's true value, the host's speed and
noise. No training. Used by tests/test_hardware.py and bench/search.py --simulated.

The truth: the simulated train.py is the template plus constants `SIM_EDIT_<k> = 0` (each on its own line between
comments, so that two edits merge); a proposal sets one of them to 1. A fixed fraction of the k (chosen by a
seeded hash, the same on every run of them) are real gains of `gain` bpb, the rest do nothing.
A code's true val_bpb is BASE − gain × (real gains in its source), so a kept change carries its gain to its
descendants and a confirmation run of the same commit sees the same gain.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from loop.proposers.base import Proposal, Proposer
from loop.runners.base import Handle, Outcome, Runner, Slot
from trainer.result import Result

BASE = 1.0  # true val_bpb of the baseline on hardware of speed 1
# bpb per e-fold of speed: a host twice as fast trains twice the steps in the budget and lands 0.02 lower
SPEED_SLOPE = 0.02 / math.log(2)
EDIT = re.compile(r"^SIM_EDIT_(\d+) = 1", re.M)


def is_gain(k: int, fraction: float, seed: int = 0) -> bool:
    """Whether edit k is a real gain: a seeded hash, the same for every run and every process."""
    h = hashlib.sha256(f"{seed}:{k}".encode()).digest()
    return int.from_bytes(h[:4], "big") / 2 ** 32 < fraction


def edits(source: str) -> list[int]:
    return [int(m) for m in EDIT.findall(source)]


@dataclass
class SimHost:
    """A host: its slots train at `speed` (1 = the reference) and report `device_name`; `sigma` its own run-to-run
    noise (None: the fleet's)."""

    name: str
    device_name: str
    speed: float = 1.0
    slots: int = 1
    sigma: Optional[float] = None


class SimHandle(Handle):
    def __init__(self, exp_id: int, slot: Slot, outcome: Outcome):
        self.exp_id, self.slot, self.pid, self.started = exp_id, slot, None, time.time()
        self._outcome = outcome

    def done(self):
        return True

    def outcome(self):
        return self._outcome

    def kill(self, reason):
        pass

    def progress(self):
        return None


class SimFleet(Runner):
    """Simulated slots whose runs finish at once (the engine collects them at its next tick).

    val_bpb = true value of the code − SPEED_SLOPE·ln(speed) + N(0, sigma²), where speed is the host's times a
    drift factor that falls linearly from 1 to 1 − drift over the first `horizon` runs started. `report_hardware`
    False: every host reports "" (a fleet whose runner names no hardware, i.e. the class-blind rule)."""

    name = "sim"

    def __init__(self, hosts: list[SimHost], *, gain: float = 0.01, gain_fraction: float = 0.1, sigma: float = 0.002,
                 drift: float = 0.0, horizon: int = 100, seed: int = 0, report_hardware: bool = True,
                 epochs: float = 0.1):
        self.set_hosts(hosts)
        self.epochs = epochs  # passes over the training split each run reports
        self.gain, self.gain_fraction, self.sigma = gain, gain_fraction, sigma
        self.drift, self.horizon, self.seed, self.report_hardware = drift, horizon, seed, report_hardware
        self.rng = random.Random(seed)
        self.started = 0
        self.log: list[dict] = []  # one row per run: exp id, host, speed, true value, val_bpb

    def set_hosts(self, hosts: list[SimHost]) -> None:
        """The fleet from now on (a test moves experiments onto other hardware)."""
        self.hosts = {h.name: h for h in hosts}
        self._slots = [Slot(f"{h.name}:gpu{i}", h.name) for h in hosts for i in range(h.slots)]

    def slots(self):
        return list(self._slots)

    def true_bpb(self, source: str) -> float:
        return BASE - self.gain * sum(is_gain(k, self.gain_fraction, self.seed) for k in edits(source))

    def speed(self, host: SimHost) -> float:
        return host.speed * (1 - self.drift * min(1.0, self.started / self.horizon))

    def start(self, job, slot, on_done):
        host = self.hosts[slot.host]
        speed = self.speed(host)
        self.started += 1
        truth = self.true_bpb(job.source)
        v = truth - SPEED_SLOPE * math.log(speed) + self.rng.gauss(0, self.sigma if host.sigma is None else host.sigma)
        res = Result(status="ok", val_bpb=v, training_seconds=job.budget_s, total_seconds=job.budget_s + 1,
                     tokens=int(10_000 * speed), epochs=self.epochs, steps=int(100 * speed), params=1_000_000,
                     device="cuda", device_name=host.device_name if self.report_hardware else "", seed=job.seed)
        self.log.append({"exp_id": job.exp_id, "host": host.name, "speed": speed, "true": truth, "val_bpb": v})
        out = Outcome(result=res, slot=slot.name, host=slot.host, wall_seconds=job.budget_s,
                      curve=[[job.budget_s * i / 4, 5.0 - i] for i in range(5)])
        on_done()
        return SimHandle(job.exp_id, slot, out)


class SimProposer(Proposer):
    """Proposes `SIM_EDIT_<k> = 1` in head's train.py, k = 1, 2, … up to `limit` (the constants build() wrote);
    `order` fixes which k come first (tests choose a real gain or a null change)."""

    name = "sim"
    fast = True

    def __init__(self, order: Optional[list[int]] = None, limit: int = 400):
        self.order, self.next_k, self.limit = list(order or []), 1, limit

    def propose(self, head_source, parent, history, state=None):
        from loop.proposers.base import ProposalExhausted

        if self.order:
            k = self.order.pop(0)
        else:
            k, self.next_k = self.next_k, self.next_k + 1
        if k > self.limit:
            raise ProposalExhausted("the simulation's edits are used up")
        src = head_source.replace(f"\nSIM_EDIT_{k} = 0\n", f"\nSIM_EDIT_{k} = 1\n")
        return Proposal(source=src, description=f"sim edit {k}", hypothesis="simulated", proposer="sim",
                        edit_key=f"SIM_EDIT_{k}")


def build(home: Path, fleet: SimFleet, proposer: Optional[Proposer] = None, *, max_experiments: int = 20,
          knobs: int = 400, **settings):
    """An Engine over `fleet` in `home` (a git workspace: the template plus `knobs` SIM_EDIT constants, SQLite),
    set up and not started. `settings`: Settings overrides (confirm, confirm_runs, hardware, noise_repeats, …).
    Returns (engine, db)."""
    from db.session import create_tables, make_engine
    from loop.config import Settings
    from loop.engine import Engine
    from loop.workspace import TEMPLATE, Workspace

    home = Path(home)
    s = Settings(home=home, workspace=home / "ws", budget_s=60.0, prune=False, **settings)
    s.workspace.mkdir(parents=True)
    (s.workspace / "train.py").write_text(TEMPLATE.read_text() + "\n# ---- simulated edits ----\n" + "".join(
        f"SIM_EDIT_{k} = 0\n# (simulated)\n" for k in range(1, knobs + 1)))
    ws = Workspace.init(s.workspace, force=True)
    db = make_engine(f"sqlite:///{home / 'sim.db'}")
    create_tables(db)
    eng = Engine(s, db, ws, fleet, proposer or SimProposer(limit=knobs), home / "data", max_experiments=max_experiments,
                 device="cuda")
    eng.setup()
    return eng, db


def run_until_finished(eng, max_ticks: int = 100_000) -> None:
    """Tick the engine until its bounded run is finished (max_experiments decided, nothing training, no
    confirmation owed). Raises AssertionError when it does not finish in max_ticks."""
    for _ in range(max_ticks):
        eng.tick()
        if eng.idle() or (eng.finished() and not owed(eng)):
            return
    raise AssertionError("the simulated run did not finish")


def owed(eng) -> bool:
    from sqlmodel import Session, select

    from db.models import Experiment

    with Session(eng.db) as s:
        return s.exec(select(Experiment.id).where(Experiment.run_id == eng.run_id,
                                                  Experiment.status.in_(("queued", "confirming")),
                                                  Experiment.kind != "experiment").limit(1)).first() is not None


def score(db, fleet: SimFleet) -> dict:
    """What the rule decided against the truth, per idea (edit k; a rebased change is the same idea): false keeps
    (a change that does nothing, kept), real gains decided, and missed gains (decided, never kept). An idea
    still waiting when the bounded run stopped (a rebased change queued, a confirmation owed) is `pending`,
    not decided."""
    from sqlmodel import Session, select

    from db.models import Experiment

    with Session(db) as s:
        exps = s.exec(select(Experiment).where(Experiment.kind == "experiment")).all()
    ideas: dict[int, set] = {}
    for e in exps:
        if e.edit_key.startswith("SIM_EDIT_"):
            ideas.setdefault(int(e.edit_key.split("@")[0].removeprefix("SIM_EDIT_")), set()).add(e.status)
    pending = {k for k, st in ideas.items() if "keep" not in st and st & {"queued", "running", "confirming"}}
    ideas = {k: st for k, st in ideas.items() if k not in pending and st & {"keep", "discard"}}
    gains = [k for k in ideas if is_gain(k, fleet.gain_fraction, fleet.seed)]
    kept = [k for k, st in ideas.items() if "keep" in st]
    return {"decided": len(ideas), "pending": len(pending), "kept": len(kept), "real_gains": len(gains),
            "false_keeps": sum(1 for k in kept if k not in gains),
            "missed_gains": sum(1 for k in gains if k not in kept)}
