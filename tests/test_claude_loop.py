"""The Claude proposer inside the loop: real anthropic client → fake Messages API on 127.0.0.1, real engine,
real runner. Usage and USD reach the database and ledger; a rejected key pauses; an outage backs off. Each test
starts from a copy of a home whose noise floor is measured (the `measured` fixture), so no test pays for its own
baseline repeats."""

from __future__ import annotations

import subprocess
import sys
import time

from db.models import BudgetLedger, Event, Experiment, Run
from loop.proposers.claude import ClaudeProposer, make_client
from tests.fakes.anthropic_api import error, fake_anthropic, tool_answer, usage  # noqa: F401
from tests.reliability.conftest import clone, measured_settings, settings_env
from tests.test_engine import rows, tick_until
from tests.test_serve import REPO, db_rows, serve_env, start

SMOOTHING = "SMOOTHING = 1.0  # add-k smoothing of the counts"
BATCH = "BATCH_SIZE = 4  # sequences per batch"


def measured_engine(tmp_path, data_dir, measured, fake, **kw):
    """An Engine with the Claude proposer on a copy of the measured home (noise floor known, no training yet)."""
    from db.session import make_engine
    from loop.engine import Engine
    from loop.runners.local import LocalRunner

    home, ws = clone(measured, tmp_path / "m")
    client = make_client(api_key="test-key", base_url=fake.url, max_retries=kw.pop("max_retries", 1))
    settings = measured_settings(home, ws.path)
    db = make_engine(settings.db_url)
    eng = Engine(settings, db, ws, LocalRunner("cpu"), ClaudeProposer(client), home / "data" / data_dir.name)
    eng.setup()
    assert eng.get_run().noise_sigma is not None
    return eng, db


def test_serve_with_claude_records_usage_and_cost(tmp_path, data_dir, measured, fake_anthropic):
    fake_anthropic.script(
        tool_answer([(SMOOTHING, SMOOTHING.replace("1.0", "2.0"))], "SMOOTHING 1.0 → 2.0",
                    "smoother counts", usage_=usage(2000, 400, cache_creation_input_tokens=1500)),
        tool_answer([(BATCH, BATCH.replace("4", "8"))], "BATCH_SIZE 4 → 8",
                    "more tokens counted", usage_=usage(2000, 400, cache_read_input_tokens=1500)),
    )
    home, ws = clone(measured, tmp_path / "m")
    out = tmp_path / "out.txt"
    env = settings_env(home, data_dir, ws.path, ANTHROPIC_API_KEY="test-key", ANTHROPIC_BASE_URL=fake_anthropic.url)
    proc = start(["--max-experiments", "2"], env, out)
    assert proc.wait(timeout=300) == 0, out.read_text()[-3000:]
    assert "proposer claude" in out.read_text()
    search = [e for e in db_rows(home, Experiment) if e.kind == "experiment"]
    assert [e.description for e in search] == ["SMOOTHING 1.0 → 2.0", "BATCH_SIZE 4 → 8"]
    assert all(e.proposer == "claude" and e.cost_usd > 0 for e in search)
    assert search[0].usage["cache_creation_input_tokens"] == 1500 and search[1].usage["cache_read_input_tokens"] == 1500
    assert search[1].cost_usd < search[0].cost_usd  # a cache read costs less than a cache write
    ledger = [r for r in db_rows(home, BudgetLedger) if r.kind == "claude_usd"]
    assert sum(r.amount for r in ledger) == sum(e.cost_usd for e in search)
    assert fake_anthropic.bodies[0]["system"][-1]["cache_control"] == {"type": "ephemeral"}


def test_a_rejected_key_pauses_the_run(tmp_path, data_dir, measured, fake_anthropic):
    fake_anthropic.script(error(401, "invalid x-api-key", error_type="authentication_error"))
    eng, db = measured_engine(tmp_path, data_dir, measured, fake_anthropic)
    tick_until(eng, lambda: eng.get_run().state == "paused", timeout=30)
    run = rows(db, Run)[0]
    assert run.pause_reason == "Anthropic API key rejected"
    assert any(ev.kind == "paused" and "Anthropic API key rejected" in ev.text for ev in rows(db, Event))
    seen = len(fake_anthropic.requests)  # the requests in flight when the 401 came (a 401 is not retried)
    for _ in range(10):
        eng.tick()
        time.sleep(0.05)
    assert len(fake_anthropic.requests) == seen  # paused: no new request starts


def test_an_api_outage_backs_off_without_a_busy_loop(tmp_path, data_dir, measured, fake_anthropic):
    fake_anthropic.script(*[error(529, "Overloaded", retry_after="0") for _ in range(10)])
    eng, db = measured_engine(tmp_path, data_dir, measured, fake_anthropic, max_retries=1)
    tick_until(eng, lambda: any(ev.kind == "proposer_error" for ev in rows(db, Event)), timeout=30)
    seen = len(fake_anthropic.requests)
    assert seen == 2  # one try plus the SDK's one retry
    for _ in range(20):  # the engine keeps ticking but waits out the back-off
        eng.tick()
        time.sleep(0.05)
    assert len(fake_anthropic.requests) == seen
    assert [ev.kind for ev in rows(db, Event)].count("proposer_error") == 1  # one event, not one per tick
    assert eng.get_run().state == "running" and not [e for e in rows(db) if e.kind == "experiment"]


def test_propose_dry_run_prints_the_next_proposal(tmp_path, data_dir, tiny_workspace, fake_anthropic):
    fake_anthropic.script(tool_answer([("LR = 0.02  # AdamW learning rate", "LR = 0.01  # AdamW learning rate")],
                                      "LR 0.02 → 0.01", "more stable updates"))
    env = serve_env(tmp_path / "home", data_dir, tiny_workspace.path, ANTHROPIC_API_KEY="test-key",
                    ANTHROPIC_BASE_URL=fake_anthropic.url)
    p = subprocess.run([sys.executable, "-m", "bot.cli", "propose", "--dry-run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "description: LR 0.02 → 0.01" in p.stdout and "validation: ok" in p.stdout
    assert "-LR = 0.02" in p.stdout and "+LR = 0.01" in p.stdout and "cost: $" in p.stdout
    assert db_rows(tmp_path / "home", Experiment) == []  # nothing was run or stored
