"""The swarm (issue 19): many Claude requests in flight. The real engine, database, git workspace and Claude
proposer (real anthropic client) against the fake Messages API on 127.0.0.1, with simulated slots (no training):
the concurrency bound, demand sized by latency, AIMD on 429s, the budget with requests in flight, pause, kill -9,
what each request is told, and a head that moves while requests are in flight."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select

from db.models import Event, Experiment, Run
from db.session import session_scope
from loop import swarm
from loop.control import Control
from tests.fakes.anthropic_api import FakeAnthropic, error
from tests.fakes.swarm import DIRECTIONS, KNOB, KnobModel, build_swarm

REPO = Path(__file__).resolve().parents[1]
LONG_S = 600.0  # a simulated run that does not end during a test


def wait_for(cond, eng=None, timeout=20.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        if eng is not None:
            eng.tick()
        time.sleep(0.02)


def experiments(db) -> list[Experiment]:
    with Session(db) as s:
        return list(s.exec(select(Experiment).where(Experiment.kind == "experiment").order_by(Experiment.id)).all())


def events(db, kind) -> list[Event]:
    with Session(db) as s:
        return list(s.exec(select(Event).where(Event.kind == kind)).all())


@pytest.fixture
def fake():
    with FakeAnthropic(respond=KnobModel(knobs=200)) as f:
        yield f


def swarm_engine(tmp_path, fake, slots=8, run_s=LONG_S, **kw):
    eng, db = build_swarm(tmp_path / "home", fake.url, slots, run_s, **kw)
    return eng, db


# ---- pure parts ----

def test_demand_aimd_and_directions():
    assert swarm.demand(free=3, remaining_s=[5, 50, 100], latency_s=30, ready=1) == 3  # 3 free + 1 soon − 1 ready
    assert swarm.demand(free=0, remaining_s=[100], latency_s=30, ready=2) == 0
    assert swarm.to_start(need=10, in_flight=2, limit=4) == 2 and swarm.to_start(need=3, in_flight=2, limit=8) == 1
    assert swarm.to_start(need=10, in_flight=2, limit=8, left=3) == 1
    assert swarm.default_concurrency(16) == 16 and swarm.default_concurrency(1000) == swarm.MAX_CONCURRENCY

    a = swarm.Aimd(16, cooldown_s=5)
    assert a.throttled(100.0) and a.limit == 8  # the first halving of a back-off: one event
    assert not a.throttled(101.0) and a.limit == 8  # the same burst: no second halving, no second event
    assert not a.throttled(106.0) and a.limit == 4  # still throttled later: halved again, same episode
    for _ in range(4):
        a.answered()
    assert a.limit == 4 < a.value < 6  # grows back slowly (1 / limit per answer)
    while a.backing_off:
        a.answered()
    assert a.limit == 16 and a.throttled(200.0)  # back at the cap: the next throttle is a new episode

    program = "# P\n## Research directions\n- optimiser: Muon, Adam betas\n- **schedule** — warmup\n\n## Other\n- x: y"
    ds = swarm.parse_directions(program)
    assert [d.name for d in ds] == ["optimiser", "schedule"] and ds[0].text == "Muon, Adam betas"
    assert swarm.parse_directions("# nothing here") == []
    assert swarm.pick_direction(ds, {"optimiser": 2}, {}) == "schedule"
    assert swarm.pick_direction(ds, {}, {"optimiser": 5, "schedule": 1}) == "schedule"


# ---- in the engine ----

def test_concurrency_bound_and_latency_sized_demand(tmp_path, fake):
    fake.gate.clear()  # hold every answer: requests stay in flight
    eng, db = swarm_engine(tmp_path, fake, slots=8, proposer_concurrency=3)
    try:
        for _ in range(5):
            eng.tick()
        wait_for(lambda: fake.in_flight == 3)
        for _ in range(5):
            eng.tick()
        assert eng.proposals.in_flight() == 3 and fake.peak_in_flight == 3  # 8 free slots, 3 allowed
        from bot.commands import format_status

        assert "proposals being written: 3 (at most 3 at once)" in format_status(Control(db, "main", eng).status())
        fake.gate.set()
        wait_for(lambda: len(eng.handles) == 8, eng)  # every slot fed, one answer each
        for _ in range(10):  # slots train for 600 s, answers take well under a second: nothing more is needed
            eng.tick()
            time.sleep(0.02)
        assert eng.proposals.requests == 8 and fake.in_flight == 0
        assert [e.status for e in experiments(db)] == ["running"] * 8

        eng.proposals.latency = swarm.Latency(default_s=10 * LONG_S)  # answers now take longer than the runs
        fake.gate.clear()
        eng.tick()
        wait_for(lambda: fake.in_flight == 3)  # every training slot frees up within the latency: asked ahead
        assert eng.proposals.in_flight() == 3
    finally:
        fake.gate.set()
        eng.proposals.close(wait=True)
        eng.stop()


def test_aimd_on_a_burst_of_429s(tmp_path, fake):
    fake.script(*[error(429, "rate limited", retry_after="0")] * 8)
    fake.gate.clear()
    eng, db = swarm_engine(tmp_path, fake, slots=8, proposer_concurrency=8)
    try:
        eng.tick()
        wait_for(lambda: fake.in_flight == 8)
        fake.gate.set()  # all 8 are answered 429, retried by the SDK, then answered
        wait_for(lambda: len(experiments(db)) == 8, eng)
        eng.tick()
        [ev] = events(db, "proposer_throttled")  # one event for the back-off, not one per request
        assert "429" in ev.text and "8 → 4" in ev.text
        assert eng.proposals.throttles == 8 and eng.proposals.limit() < 8  # halved once, growing back slowly
        assert not events(db, "proposer_error")  # the SDK's retries succeeded
    finally:
        eng.proposals.close(wait=True)
        eng.stop()


def test_budget_cap_never_exceeded_with_requests_in_flight(tmp_path):
    model = KnobModel(knobs=200, input_tokens=20_000, output_tokens=4_000, cache_prefix=0)  # $0.20 a proposal
    with FakeAnthropic(respond=model, latency_s=0.05) as fake:
        eng, db = swarm_engine(tmp_path, fake, slots=8, run_s=0.2, proposer_concurrency=8,
                               budget_claude_usd_total=1.0)
        try:
            wait_for(lambda: eng.get_run().state == "paused", eng)
            wait_for(lambda: eng.proposals.in_flight() == 0)
            spent = sum(e.cost_usd for e in experiments(db))
            assert spent <= 1.0 and spent == pytest.approx(1.0)  # five proposals reach the cap; none passes it
            assert eng.get_run().pause_reason.startswith("budget: claude/total")
            # the first round started three, not eight: the expected cost of those in flight counted
            assert fake.peak_in_flight <= 3
        finally:
            eng.proposals.close(wait=True)
            eng.stop()


def test_pause_with_requests_in_flight(tmp_path, fake):
    fake.gate.clear()
    eng, db = swarm_engine(tmp_path, fake, slots=4, proposer_concurrency=4)
    control = Control(db, "main", eng)
    try:
        eng.tick()
        wait_for(lambda: fake.in_flight == 4)
        control.pause("alice", reason="lunch")
        fake.gate.set()
        wait_for(lambda: eng.proposals.in_flight() == 0)
        for _ in range(10):
            eng.tick()
            time.sleep(0.02)
        assert [e.status for e in experiments(db)] == ["queued"] * 4  # the paid answers are stored
        assert len(fake.requests) == 4 and not eng.handles  # nothing new asked, nothing started
        control.resume("alice")
        wait_for(lambda: len(eng.handles) == 4, eng)
    finally:
        eng.proposals.close(wait=True)
        eng.stop()


def test_in_flight_ideas_and_directions_appear_in_a_request(tmp_path, fake):
    eng, db = swarm_engine(tmp_path, fake, slots=2, proposer_concurrency=2)
    try:
        fake.gate.clear()
        eng.tick()
        wait_for(lambda: fake.in_flight == 2)
        fake.gate.set()
        wait_for(lambda: len(eng.handles) == 2, eng)
        first, second = fake.bodies[0]["messages"][0]["content"], fake.bodies[1]["messages"][0]["content"]
        dirs = sorted(e.direction for e in experiments(db))
        assert dirs == sorted(DIRECTIONS[:2])  # concurrent requests spread over the directions
        assert any("other request(s), in the directions" in t for t in (first, second))
        assert all(f"Your research direction for this proposal: {d}" in first + second for d in dirs)

        # a slot frees up: the next request lists what is training, and asks for something different
        exp = experiments(db)[0]
        eng.handles[exp.id]._outcome = eng.handles[exp.id]._ready
        wait_for(lambda: len(fake.requests) >= 3, eng)
        third = fake.bodies[2]["messages"][0]["content"]
        running = experiments(db)[1]
        assert "# Being tried right now" in third and f"#{running.id} {running.description}" in third
        assert "Propose something different" in third
        assert "| steps | tok/s | peak MiB | MFU % |" in third
    finally:
        eng.proposals.close(wait=True)
        eng.stop()


def _move_head(eng, db, edit):
    """Head advances (as a keep would): a commit with `edit` applied to head's train.py."""
    run = eng.get_run()
    src = eng.workspace.read_file(run.head_commit)
    new = eng.workspace.commit_experiment(999, run.head_commit, src.replace(*edit, 1), "a kept change")
    with session_scope(db) as s:
        row = s.get(Run, run.id)
        row.head_commit = new
        s.add(row)
    eng.workspace.set_branch(run.name, new)
    return new


def test_stale_head_merge(tmp_path, fake):
    eng, db = swarm_engine(tmp_path, fake, slots=2, proposer_concurrency=2)
    try:
        # an answer made for the old head lands after head moved: merged onto the new head when stored
        fake.gate.clear()
        eng.tick()
        wait_for(lambda: fake.in_flight == 2)
        old = eng.get_run().head_commit
        k = KNOB.format(199)
        new = _move_head(eng, db, (k, k.replace("= 1.0", "= 9.0")))
        with eng.lock:
            fake.gate.set()
            wait_for(lambda: eng.proposals.in_flight() == 0)
        for e in experiments(db):
            assert e.parent_commit == new and e.status == "queued"
            assert "SIM_KNOB_199 = 9.0" in eng.workspace.read_file(e.commit)  # the new head's change is kept
        assert old != new

        # a queued proposal for an older head is moved onto head before it trains, or refused when it clashes
        a, b = experiments(db)
        with eng.lock:
            ka, kb = (re.search(r"knob (\d+) ", e.description + " ").group(1) for e in (a, b))
            la, lb = KNOB.format(int(ka)), KNOB.format(int(kb))
            newer = _move_head(eng, db, (lb, lb.replace("= 1.0", "= 7.0")))  # clashes with b's edit
            eng.tick()
        a, b = experiments(db)
        assert a.status == "running" and a.parent_commit == newer
        src = eng.workspace.read_file(a.commit)
        assert "= 7.0" in src and la not in src  # both changes, validated on the head it trains on
        assert b.status == "invalid" and "does not apply on the new head" in b.reason
    finally:
        fake.gate.set()
        eng.proposals.close(wait=True)
        eng.stop()


CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from tests.fakes.swarm import build_swarm
eng, db = build_swarm(Path({home!r}), {url!r}, 4, 0.5, proposer_concurrency=4)
eng.start()
time.sleep(600)
"""


def test_kill_9_with_requests_in_flight_loses_no_stored_proposal_and_doubles_none(tmp_path):
    home = tmp_path / "home"
    with FakeAnthropic(respond=KnobModel(knobs=200), latency_s=0.3) as fake:
        child = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), home=str(home), url=fake.url)],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            from db.session import make_engine

            db = None

            def stored():
                nonlocal db
                if db is None and (home / "ratchet.db").exists():
                    db = make_engine(f"sqlite:///{home / 'ratchet.db'}")
                try:
                    return db is not None and len(experiments(db)) >= 2 and fake.in_flight > 0
                except Exception:  # noqa: BLE001 - tables not made yet
                    return False

            wait_for(lambda: stored() or child.poll() is not None, timeout=60)
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
        # A kill inside a commit leaves git's ref lock behind: a later store waits until it is stale (30 s, then it
        # is removed; see loop/workspace.py) rather than dropping a paid answer. Age it instead of waiting.
        lock = home / "ws" / ".git" / "refs" / "ratchet" / "experiments.lock"
        if lock.exists():
            os.utime(lock, (time.time() - 60, time.time() - 60))
        # (a queued one may be moved onto a newer head before it trains: its commit changes, not its idea)
        before = {e.id: (e.description, e.edit_key, e.cost_usd) for e in experiments(db)}

        eng, db = build_swarm(home, fake.url, 4, LONG_S, proposer_concurrency=4)  # the restart
        try:
            wait_for(lambda: len(eng.handles) == 4 and eng.proposals.in_flight() == 0, eng)
            after = experiments(db)
            assert {e.id: (e.description, e.edit_key, e.cost_usd) for e in after if e.id in before} == before
            hashes = [e.ast_hash for e in after if e.ast_hash and e.status != "invalid"]
            assert len(hashes) == len(set(hashes))  # none doubled (a refused duplicate is stored invalid)
            for e in after:
                assert eng.workspace.read_file(e.commit)  # every stored commit is in the repository
        finally:
            eng.proposals.close(wait=True)
            eng.stop()



def test_digest_counts_keeps_per_direction_and_duplicate_ideas(tmp_path):
    from bot.digest import digest_text
    from db.models import utcnow
    from db.session import create_tables, make_engine
    from loop.config import Settings
    from loop.digest import build_digest

    db = make_engine(f"sqlite:///{tmp_path / 'd.db'}")
    create_tables(db)
    now = utcnow()
    with session_scope(db) as s:
        run = Run(name="main", branch="ratchet/main", workspace="/w", baseline_commit="a" * 40, head_commit="a" * 40,
                  budget_s=60)
        s.add(run)
        s.flush()
        for direction, status, usage_ in [("optimiser", "keep", {}), ("optimiser", "discard", {"duplicate_turns": 1}),
                                          ("schedule", "discard", {}), ("schedule", "queued", {})]:
            s.add(Experiment(run_id=run.id, direction=direction, status=status, proposer="claude", usage=usage_,
                             description=f"{direction} idea", val_bpb=1.0 if status != "queued" else None,
                             finished_at=None if status == "queued" else now))
        s.add(Experiment(run_id=run.id, status="invalid", proposer="claude", finished_at=now,
                         reason="duplicate of an earlier experiment (same normalised AST)"))
    d = build_digest(db, "main", Settings(home=tmp_path), now=now + timedelta(seconds=1))
    assert d.by_direction == {"optimiser": (2, 1), "schedule": (1, 0)}
    assert d.duplicate_rate == pytest.approx(2 / 5)
    text = digest_text(d)
    assert "keeps by direction: optimiser 1/2, schedule 0/1" in text and "duplicate ideas: 40%" in text
