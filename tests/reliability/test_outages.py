"""What `ratchet serve` depends on goes away for a while and comes back — Slack, the Anthropic API, PostgreSQL:
the loop waits or backs off, then carries on; nothing is lost or posted twice."""

from __future__ import annotations

import signal
import time

from db.models import Event, Experiment
from loop.proposals import PROPOSAL_BACKOFF_S
from loop.workspace import Workspace
from tests.fakes.anthropic_api import FakeAnthropic, error, tool_answer
from tests.fakes.slack_api import APP_TOKEN, BOT_TOKEN, FakeSlack
from tests.reliability.conftest import (CHANNEL, PRIOR_TRAIN_PY, UNIGRAM_OFF, UNIGRAM_ON, assert_consistent,
                                        assert_posted_once_in_order, clone, gpu_rows, harness_alive, rows,
                                        settings_env, sqlite_url, wait)


def test_slack_unreachable_for_a_while(tmp_path, data_dir, serve, measured):
    """Events made while Slack is down wait; when it is back they are posted in order, each once."""
    home, ws = clone(measured, tmp_path / "c")
    url, out = sqlite_url(home), tmp_path / "out.txt"
    with FakeSlack() as fake:
        env = settings_env(home, data_dir, ws.path, SLACK_BOT_TOKEN=BOT_TOKEN, SLACK_APP_TOKEN=APP_TOKEN,
                           SLACK_API_URL=fake.api_url, SLACK_CHANNEL=CHANNEL)
        proc = serve([], env, out)
        try:
            backlog = len(rows(url, Event))  # the measured home's events, not yet posted
            fake.wait_for(lambda: len(fake.event_posts(CHANNEL)) >= backlog, timeout=120, what="the backlog posted")
            fake.down()
            posted = len(fake.event_posts(CHANNEL))
            wait(lambda: [e for e in rows(url, Experiment, kind="experiment") if e.status in ("keep", "discard")],
                 proc, what="a result while Slack is down")
            wait(lambda: "Slack delivery failed" in (home / "logs" / "ratchet.log").read_text(), proc, timeout=60,
                 what="a failed delivery")
            waiting = [ev.id for ev in rows(url, Event) if ev.delivered_at is None]
            assert waiting and len(fake.event_posts(CHANNEL)) == posted
            fake.up()
            wait(lambda: all(ev.delivered_at for ev in rows(url, Event) if ev.id <= max(waiting)), proc,
                 timeout=120, what="the waiting events posted")
            fake.wait_ack(fake.slash_command("pause end of the test"))
            wait(lambda: rows(url, Experiment, status="running") == [] and
                 all(ev.delivered_at for ev in rows(url, Event)), proc, timeout=120, what="idle, all posted")
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        assert code == 0, out.read_text()[-3000:]
        assert_consistent(url, ws)
        assert_posted_once_in_order(url, fake)


class FlakyAnthropic(FakeAnthropic):
    """The Messages API overloaded (529) and failing (500) for its first `failures` requests, then as scripted;
    `times` records when each request came."""

    def __init__(self, failures: int):
        super().__init__()
        self.failures = failures
        self.times: list[float] = []

    def _next(self, recorded):
        self.times.append(time.time())
        with self._lock:
            if self.failures > 0:
                self.failures -= 1
                self.requests.append(recorded)
                return error(529 if self.failures % 2 else 500, "Overloaded", retry_after="0")
        return super()._next(recorded)


def test_anthropic_api_failing_for_a_while(tmp_path, data_dir, serve, measured):
    """One proposal's requests fail (with the SDK's one retry): one proposer_error event, a back-off with no
    requests, then the next proposal goes through and is trained; nothing else is asked or lost."""
    home, ws = clone(measured, tmp_path / "c")
    url, out = sqlite_url(home), tmp_path / "out.txt"
    with FlakyAnthropic(failures=2) as fake:
        fake.script(tool_answer([(UNIGRAM_OFF, UNIGRAM_ON)], "unigram prior", "token frequencies beat uniform"))
        env = settings_env(home, data_dir, ws.path, ANTHROPIC_API_KEY="test-key", ANTHROPIC_BASE_URL=fake.url,
                           RATCHET_CLAUDE_MAX_RETRIES=1)
        proc = serve(["--max-experiments", "1"], env, out)
        assert proc.wait(timeout=300) == 0, out.read_text()[-3000:]
    assert len(fake.requests) == 3  # two failed tries of one proposal, then the proposal that worked
    assert fake.times[2] - fake.times[1] >= PROPOSAL_BACKOFF_S[0] - 0.5  # backed off, no busy loop
    errors = [ev for ev in rows(url, Event) if ev.kind == "proposer_error"]
    assert len(errors) == 1 and "retrying with back-off" in errors[0].text
    exps = rows(url, Experiment, kind="experiment")
    assert [(e.description, e.status, e.attempts) for e in exps] == [("unigram prior", "keep", 1)]
    assert_consistent(url, ws)


def test_postgres_restarted_while_an_experiment_trains(tmp_path, data_dir, pg_cluster, serve):
    """The database goes away while a run trains and is still away when it ends: recording its result is
    retried until PostgreSQL is back, then the loop goes on; every result and event is there."""
    (tmp_path / "workspace").mkdir()
    (tmp_path / "workspace" / "train.py").write_text(PRIOR_TRAIN_PY)
    ws = Workspace.init(tmp_path / "workspace", force=True)
    home, out, url = tmp_path / "home", tmp_path / "out.txt", pg_cluster.url
    log = home / "logs" / "ratchet.log"
    proc = serve(["--max-experiments", "1"], settings_env(home, data_dir, ws.path, RATCHET_DATABASE_URL=url), out)

    def training():
        return next((e for e in rows(url, Experiment, status="running") if harness_alive(e.pid)), None)

    wait(training, proc, what="a run to train")
    victim = training()
    pg_cluster.stop()
    try:
        wait(lambda: f"recording #{victim.id} failed" in log.read_text(), proc, timeout=120,
             what="the engine to try recording the result while the database is down")
    finally:
        pg_cluster.start()
    assert proc.wait(timeout=300) == 0, out.read_text()[-3000:]
    v = rows(url, Experiment, id=victim.id)[0]
    assert v.status == "keep" and v.attempts == 1 and v.val_bpb is not None and len(gpu_rows(url, v.id)) == 1
    exps = rows(url, Experiment)
    assert [e.kind for e in exps] == ["baseline", "baseline", "experiment"]
    assert_consistent(url, ws)
    assert "Traceback" not in out.read_text()
