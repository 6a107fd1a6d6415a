"""`ratchet serve` as a person runs it: the real CLI in a subprocess, real text, the shell chat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from db.models import CommandLog, Event, Experiment, Run
from db.session import make_engine
from loop.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]


def serve_env(home: Path, data_dir: Path, workspace: Path | None = None, **extra) -> dict:
    """Environment for a serve in `home`, reusing the session's prepared corpus (no new download)."""
    (home / "data").mkdir(parents=True, exist_ok=True)
    link = home / "data" / data_dir.name
    if not link.exists():
        link.symlink_to(data_dir, target_is_directory=True)
    env = {**os.environ, "RATCHET_HOME": str(home), "RATCHET_EVAL_TOKENS": "4096", "RATCHET_DEVICE": "cpu",
           "RATCHET_GRACE_S": "60", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    env.pop("ANTHROPIC_API_KEY", None)
    if workspace is not None:
        env["RATCHET_WORKSPACE"] = str(workspace)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(args, env, out: Path, stdin=subprocess.DEVNULL):
    return subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", *args], cwd=REPO, env=env, stdin=stdin,
                            stdout=open(out, "ab"), stderr=subprocess.STDOUT)


def db_rows(home: Path, model):
    with Session(make_engine(f"sqlite:///{home / 'ratchet.db'}")) as s:
        return s.exec(select(model).order_by(model.id)).all()


def wait_for(cond, timeout=180, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if cond():
                return
        except Exception:  # the database may not exist yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_main_command_runs_baseline_and_an_experiment(tmp_path, data_dir):
    """The README's main command on a fresh home: template train.py, real text, CPU, offline proposer."""
    home = tmp_path / "home"
    out = tmp_path / "out.txt"
    proc = start(["--max-experiments", "1", "--budget-s", "2"], serve_env(home, data_dir), out)
    assert proc.wait(timeout=600) == 0, out.read_text()[-3000:]
    exps = db_rows(home, Experiment)
    base = [e for e in exps if e.kind == "baseline"]
    search = [e for e in exps if e.kind == "experiment"]
    assert [e.status for e in base] == ["keep"] * 3
    assert len(search) == 1
    for e in search:
        assert e.status in ("keep", "discard", "crash", "timeout", "invalid") and e.diff and e.description
        if e.status in ("keep", "discard"):
            assert e.val_bpb > 0 and e.training_seconds >= 2 and e.decision["verdict"] == e.status
    run = db_rows(home, Run)[0]
    kept = [e for e in search if e.status == "keep"]
    assert run.head_commit == (kept[-1].commit if kept else run.baseline_commit)
    assert Workspace(home / "workspace").branch_tip("main") == run.head_commit
    text = out.read_text()
    assert text.count("baseline run #") == 3 and "baseline measured" in text
    for e in search:  # the shell printed each event
        assert f"#{e.id} " in text
    assert all(ev.delivered_at is not None for ev in db_rows(home, Event))


def test_pause_typed_in_the_shell_takes_effect_before_the_next_experiment(tmp_path, data_dir, tiny_workspace):
    home = tmp_path / "home"
    out = tmp_path / "out.txt"
    env = serve_env(home, data_dir, tiny_workspace.path, RATCHET_NOISE_REPEATS=2, USER="dana")
    proc = start(["--budget-s", "3"], env, out, stdin=subprocess.PIPE)
    wait_for(lambda: any(e.status == "running" for e in db_rows(home, Experiment)), what="the first run")
    proc.stdin.write(b"frobnicate\npause lunch break\n")
    proc.stdin.flush()
    wait_for(lambda: "paused by dana: lunch break" in out.read_text(), timeout=30, what="the pause reply")
    wait_for(lambda: all(e.status != "running" for e in db_rows(home, Experiment)), timeout=60, what="idle")
    time.sleep(3)
    exps = db_rows(home, Experiment)
    assert len(exps) == 1 and exps[0].status == "keep"  # the running one finished; no new one started
    proc.stdin.write(b"status\nresume\n")
    proc.stdin.flush()
    wait_for(lambda: len(db_rows(home, Experiment)) >= 2, timeout=30, what="a start after resume")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    text = out.read_text()
    assert "unknown command 'frobnicate'" in text and "pause [now] [reason]" in text  # help text
    assert "run main: paused (lunch break)" in text and "resumed by dana" in text
    audit = db_rows(home, CommandLog)
    assert [(a.user, a.command) for a in audit] == [("dana", ""), ("dana", "pause"), ("dana", "status"),
                                                    ("dana", "resume")]


def test_a_bounded_serve_that_nothing_can_resume_stops_with_the_reason(tmp_path, data_dir):
    """--max-experiments with stdin closed and no Slack: a pause (here a crashing baseline) cannot be lifted, so
    serve stops with STRANDED and says why, instead of waiting for ever. With stdin open it waits for `resume`."""
    from bot.serve import STRANDED
    from tests.conftest import TINY_TRAIN_PY

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "train.py").write_text(TINY_TRAIN_PY.replace("    step = 0\n", "    step = 0\n    raise RuntimeError('exploded')\n"))
    Workspace.init(ws, force=True)
    home, out = tmp_path / "home", tmp_path / "out.txt"
    env = serve_env(home, data_dir, ws, RATCHET_NOISE_REPEATS=2)
    proc = start(["--max-experiments", "1", "--budget-s", "1"], env, out, stdin=subprocess.PIPE)
    wait_for(lambda: db_rows(home, Run)[0].state == "paused", what="the pause")
    time.sleep(1)
    assert proc.poll() is None  # a person at the pipe may still type `resume`
    proc.stdin.close()
    assert proc.wait(timeout=60) == STRANDED, out.read_text()[-3000:]
    text = out.read_text()
    assert "is paused (baseline crash: RuntimeError: exploded" in text and "nothing here can resume it" in text
    assert [e.kind for e in db_rows(home, Experiment)] == ["baseline"]  # nothing was lost or started


def test_only_a_daily_budget_pause_lifts_at_the_rollover():
    from loop import budget

    day = budget.Cap("gpu", "day", 90_000.0, 86_400.0)
    assert budget.lifts_at_rollover(budget.pause_reason(day))
    assert not budget.lifts_at_rollover(budget.pause_reason(budget.Cap("claude", "total", 301.0, 300.0)))
    assert not budget.lifts_at_rollover("baseline crash: RuntimeError: exploded")
    assert not budget.lifts_at_rollover("paused by dana: budget: gpu/day is tight")
