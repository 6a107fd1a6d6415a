"""Bot latency: K concurrent `/ratchet` slash commands through the fake Socket Mode server while an experiment
keeps the CPU busy, with the real bolt App, slack_sdk clients, engine and control API.

    python bench/bot_latency.py [--commands 50] [--rounds 3] [--budget-s 60]

Prints the ack latency (envelope sent → ack received) p50 / p99, the answer latency (→ the ephemeral reply
on the response_url), and pause-to-effect: from sending `/ratchet pause` to the moment the run is paused in
the database (what the engine checks, under its lock, before it starts an experiment). Writes
bench/results/bot_latency.json. Targets: p99 ack < 300 ms; pause effective < 1 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import link_data, prepared_data, write_json  # noqa: E402

COMMANDS = ("status", "history 5", "help", "show 1")  # read-only commands, cycled


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation, of a non-empty list."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commands", type=int, default=50, help="K: slash commands sent at once per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=60.0, help="training budget of the experiment keeping the CPU busy")
    a = ap.parse_args()

    from sqlmodel import Session, select

    from bot.slack_app import SlackBackend, SlackConfig
    from db.models import Run
    from db.session import create_tables, make_engine
    from loop.config import Settings
    from loop.control import Control
    from loop.engine import Engine
    from loop.proposers.offline import OfflineProposer
    from loop.runners.local import LocalRunner
    from loop.workspace import Workspace
    from tests.fakes.slack_api import APP_TOKEN, BOT_TOKEN, FakeSlack

    data_dir = prepared_data()
    home = Path(tempfile.mkdtemp(prefix="bench-bot-"))
    link_data(home, data_dir)
    settings = Settings(home=home, budget_s=a.budget_s, noise_repeats=2, eval_tokens=4096, device="cpu", grace_s=60)
    ws = Workspace.init(settings.workspace)  # the baseline template: a real model that uses every core
    db = make_engine(settings.db_url)
    create_tables(db)
    engine = Engine(settings, db, ws, LocalRunner("cpu"), OfflineProposer(seed=0, device="cpu"), data_dir)
    run = engine.setup()
    control = Control(db, run.name, engine)

    with FakeSlack() as fake:
        cfg = SlackConfig(bot_token=BOT_TOKEN, app_token=APP_TOKEN, channel="C0BENCH", api_url=fake.api_url)
        backend = SlackBackend(cfg, control)
        engine.on_change = backend.deliver
        backend.start()
        engine.start()
        try:
            fake.wait_connected()
            pause_ack = float("nan")
            t0 = time.time()
            while not any((r.elapsed_s or 0) > 0 for r in engine.running()):  # training, not starting up
                if time.time() - t0 > 300:
                    raise SystemExit("no experiment started training within 5 minutes")
                time.sleep(0.2)
            print(f"an experiment is training (budget {a.budget_s:g} s); load average {os.getloadavg()[0]:.2f} "
                  f"on {os.cpu_count()} CPUs")

            acks, answers = [], []
            for rnd in range(a.rounds):
                payloads = [fake.slash_payload(COMMANDS[i % len(COMMANDS)], user=f"U0BENCH{i:03d}")
                            for i in range(a.commands)]
                n_before = len(fake.responses)
                start = threading.Barrier(a.commands)

                def send(p):
                    start.wait()
                    return p, fake.push("slash_commands", p, accepts_response_payload=True)

                with ThreadPoolExecutor(max_workers=a.commands) as pool:
                    sent = list(pool.map(send, payloads))
                for _, eid in sent:
                    fake.wait_ack(eid, timeout=30)
                fake.wait_for(lambda: len(fake.responses) >= n_before + a.commands, timeout=120, what="answers")
                answered = {r["path"]: r["at"] for r in fake.responses}
                for p, eid in sent:
                    acks.append(fake.ack_latency(eid))
                    path = "/" + p["response_url"].split("/", 3)[3]
                    answers.append(answered[path] - fake.sent_at[eid])
                print(f"round {rnd + 1}: {a.commands} commands, ack p50 {1000 * pct(acks[-a.commands:], 50):.1f} ms, "
                      f"p99 {1000 * pct(acks[-a.commands:], 99):.1f} ms; load {os.getloadavg()[0]:.2f}")

            # pause-to-effect: from the command to the run being paused in the database
            still_training = bool(engine.running())
            t_send = time.time()
            pause_env = fake.push("slash_commands", fake.slash_payload("pause bench", user="U0BENCHOPS"),
                                  accepts_response_payload=True)
            effect = None
            while time.time() - t_send < 30:
                with Session(db) as s:
                    if s.exec(select(Run.state).where(Run.id == run.id)).one() == "paused":
                        effect = time.time() - t_send
                        break
                time.sleep(0.002)
            started_before = len(engine.handles)
            fake.wait_ack(pause_env, timeout=30)
            pause_ack = fake.ack_latency(pause_env)
        finally:
            engine.stop(kill=True)
            backend.stop(2)

    figures = {
        "commands_per_round": a.commands, "rounds": a.rounds, "budget_s": a.budget_s,
        "ack_p50_ms": 1000 * pct(acks, 50), "ack_p99_ms": 1000 * pct(acks, 99), "ack_max_ms": 1000 * max(acks),
        "answer_p50_ms": 1000 * pct(answers, 50), "answer_p99_ms": 1000 * pct(answers, 99),
        "pause_to_effect_ms": None if effect is None else 1000 * effect, "pause_ack_ms": 1000 * pause_ack,
        "experiment_training_during_pause": still_training, "slots_busy_at_pause": started_before,
        "load_average_1m": os.getloadavg()[0],
    }
    print(f"ack latency over {len(acks)} commands: p50 {figures['ack_p50_ms']:.1f} ms, p99 {figures['ack_p99_ms']:.1f} ms "
          f"(max {figures['ack_max_ms']:.1f}); target p99 < 300 ms: {'met' if figures['ack_p99_ms'] < 300 else 'NOT met'}")
    print(f"answer latency: p50 {figures['answer_p50_ms']:.1f} ms, p99 {figures['answer_p99_ms']:.1f} ms")
    if effect is None:
        print("pause did not take effect within 30 s")
    else:
        print(f"pause-to-effect: {1000 * effect:.1f} ms; target < 1 s: {'met' if effect < 1 else 'NOT met'}")
    write_json("bot_latency", figures)


if __name__ == "__main__":
    main()
