"""Shared bench plumbing: prepared data, a scratch home, writing the JSON figures.

Benchmarks print figures and write JSON; they never pass or fail on a time.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def ratchet_home() -> Path:
    """Where prepared data lives: $RATCHET_HOME or ~/.ratchet (shared with `ratchet serve`)."""
    return Path(os.environ.get("RATCHET_HOME", Path.home() / ".ratchet")).expanduser()


def prepared_data(corpus: str = "shakespeare", vocab_size: int | None = 4096) -> Path:
    """The prepared corpus (the default one unless named; prepared now if missing). `vocab_size` None: the
    corpus's own default."""
    from trainer.data import prepare

    out, _ = prepare(corpus, vocab_size, home=ratchet_home())
    return out


def link_data(home: Path, data_dir: Path) -> None:
    """Make a scratch home see an already prepared corpus without copying it."""
    (home / "data").mkdir(parents=True, exist_ok=True)
    link = home / "data" / data_dir.name
    if not link.exists():
        link.symlink_to(data_dir, target_is_directory=True)


def write_json(name: str, figures: dict) -> Path:
    """Write figures (plus machine facts) to bench/results/<name>.json and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    figures = {"bench": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.node(),
               "cpus": os.cpu_count(), **figures}
    path.write_text(json.dumps(figures, indent=2))
    print(f"wrote {path}")
    return path


def run_loop(home: Path, *, budget_s: float, max_experiments: int, noise_repeats: int = 3, seed: int = 0,
             eval_tokens: int | None = None, workspace: Path | None = None, device: str = "cpu", echo=print,
             **settings_kw):
    """Run the real engine (local runner, offline proposer, SQLite in `home`) on `device` (cpu | cuda | auto) until
    max_experiments are done.

    Returns (settings, db engine, run id, wall seconds, engine). Events are echoed as they are written. Raises
    RuntimeError when the run pauses first (nothing more would run).
    """
    from sqlmodel import Session, select

    from db.models import Event
    from db.session import create_tables, make_engine
    from loop.config import Settings
    from loop.engine import Engine
    from loop.proposers.offline import OfflineProposer
    from loop.runners.local import LocalRunner
    from loop.workspace import Workspace

    data_dir = prepared_data()
    link_data(home, data_dir)
    settings = Settings(home=home, workspace=workspace or home / "workspace", budget_s=budget_s,
                        noise_repeats=noise_repeats, seed=seed, eval_tokens=eval_tokens, device=device, **settings_kw)
    ws = Workspace.init(settings.workspace)
    db = make_engine(settings.db_url)
    create_tables(db)
    engine = Engine(settings, db, ws, LocalRunner(device, standby=settings.standby),
                    OfflineProposer(seed=seed, device=device), data_dir, max_experiments=max_experiments)
    run = engine.setup()
    seen = 0
    t0 = time.time()
    engine.start()
    try:
        while not engine.finished():
            time.sleep(0.5)
            with Session(db) as s:
                for ev in s.exec(select(Event).where(Event.id > seen).order_by(Event.id)).all():
                    echo(f"  [{time.time() - t0:7.1f}s] {ev.text}")
                    seen = ev.id
            if engine.idle() and not engine.finished():  # paused (a crashed baseline, say): nothing more will run
                raise RuntimeError(f"the run paused: {engine.get_run().pause_reason}")
    finally:
        engine.stop(kill=True)
    return settings, db, run.id, time.time() - t0, engine
