"""A simulated swarm for tests and bench/swarm.py: the real engine, database, git workspace and Claude proposer
(real anthropic client) against the fake Messages API, with simulated slots (bench/scheduler_scale.py's
SimRunner). Tests and benchmarks only; nothing here trains or reaches the network."""

from __future__ import annotations

import random
import re
import threading
from pathlib import Path

from tests.fakes.anthropic_api import Reply, tool_answer, usage

KNOB = "SIM_KNOB_{:03d} = 1.0  # a constant the simulated trainer ignores"
DIRECTIONS = ("optimiser", "architecture", "schedule", "batch")
PROGRAM = "# Research program\nLower val_bpb.\n\n## Research directions\n" + "".join(
    f"- {d}: ideas about the {d}\n" for d in DIRECTIONS)


def knob_source(base: str, knobs: int) -> str:
    """`base` train.py plus `knobs` constants: one simulated idea per constant."""
    return base.rstrip() + "\n\n# ---- simulated knobs ----\n" + "".join(KNOB.format(i) + "\n" for i in range(knobs))


class KnobModel:
    """A stand-in for Claude: each answer edits one SIM_KNOB constant that the prompt does not mention (as a
    model told what is queued, training and tried would), chosen at random among the `knobs`, so two requests in
    flight at once may still pick the same one (a duplicate the engine refuses). `cache_prefix` input tokens are
    billed as a cache write on a request whose system prompt was not seen before, else as a cache read."""

    def __init__(self, knobs: int, seed: int = 0, input_tokens: int = 6000, output_tokens: int = 600,
                 cache_prefix: int = 4000):
        self.knobs, self.rng = knobs, random.Random(seed)
        self.input_tokens, self.output_tokens, self.cache_prefix = input_tokens, output_tokens, cache_prefix
        self._systems: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, body: dict) -> Reply:
        first = body["messages"][0]["content"]
        text = first if isinstance(first, str) else str(first)
        mentioned = {int(m) for m in re.findall(r"knob (\d+) ", text)}
        with self._lock:
            system = str(body.get("system"))
            cached = system in self._systems
            self._systems.add(system)
            free = [i for i in range(self.knobs) if i not in mentioned] or list(range(self.knobs))
            i = self.rng.choice(free)
            value = self.rng.choice(("0.5", "1.5", "2.0", "3.0"))
        line = KNOB.format(i)
        u = usage(self.input_tokens - self.cache_prefix, self.output_tokens,
                  cache_creation_input_tokens=0 if cached else self.cache_prefix,
                  cache_read_input_tokens=self.cache_prefix if cached else 0)
        return tool_answer([(line, line.replace("= 1.0", f"= {value}", 1))], f"knob {i} → {value}",
                           "a simulated idea", usage_=u)


def build_swarm(home: Path, fake_url: str, slots: int, run_s: float, knobs: int = 200, max_retries: int = 2,
                base: str | None = None, max_experiments: int | None = None, **settings_kw):
    """(engine, db engine) in `home`: `slots` simulated slots of `run_s` seconds, the Claude proposer on
    `fake_url`, program.md naming DIRECTIONS, the noise floor already measured; nothing started."""
    from sqlmodel import select

    from bench.scheduler_scale import SimRunner
    from db.models import Experiment, Run
    from db.session import create_tables, make_engine, session_scope
    from loop.config import Settings
    from loop.engine import Engine
    from loop.proposers.claude import ClaudeProposer, make_client
    from loop.workspace import TEMPLATE, Workspace

    settings_kw = {"noise_repeats": 2, "prune": False, "confirm_runs": 0, **settings_kw}
    settings = Settings(home=home, workspace=home / "ws", budget_s=run_s, **settings_kw)
    if not Workspace(settings.workspace).exists():  # a restart finds it as it was left
        settings.workspace.mkdir(parents=True, exist_ok=True)
        (settings.workspace / "train.py").write_text(knob_source(base or TEMPLATE.read_text(), knobs))
        (settings.workspace / "program.md").write_text(PROGRAM)
    ws = Workspace.init(settings.workspace, force=True)
    db = make_engine(settings.db_url)
    create_tables(db)
    ref: list = []
    client = make_client(api_key="test-key", base_url=fake_url, max_retries=max_retries, timeout=60)
    engine = Engine(settings, db, ws, SimRunner(slots, run_s, ref), ClaudeProposer(client, model="claude-opus-4-8"),
                    home / "data", device="cuda", max_experiments=max_experiments)
    ref.append(engine)
    engine.setup()
    with session_scope(db) as s:
        run = s.exec(select(Run)).one()
        if run.noise_sigma is None:
            run.noise_sigma, run.head_val_bpb, run.head_runs = 0.002, 1.0, [1.0]
            for seed in range(2):
                s.add(Experiment(run_id=run.id, kind="baseline", status="keep", commit=run.baseline_commit,
                                 parent_commit=run.baseline_commit, val_bpb=1.0, seed=seed))
    return engine, db
