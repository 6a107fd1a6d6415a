"""`ratchet serve` with Slack tokens set: the real CLI in a subprocess talks to the fake Slack (Socket Mode),
posts the loop's events to the channel and answers `/ratchet` commands."""

from __future__ import annotations

import signal
import time

from bot.notifier import post_ts
from db.models import CommandLog, Event, Run
from tests.fakes.slack_api import APP_TOKEN, BOT_TOKEN, FakeSlack
from tests.test_serve import db_rows, serve_env, start

CHANNEL = "C0RATCHET"


def test_serve_uses_slack_when_its_tokens_are_set(tmp_path, data_dir, tiny_workspace):
    home, out = tmp_path / "home", tmp_path / "out.txt"
    with FakeSlack() as fake:
        env = serve_env(home, data_dir, tiny_workspace.path, RATCHET_NOISE_REPEATS=2, SLACK_BOT_TOKEN=BOT_TOKEN,
                        SLACK_APP_TOKEN=APP_TOKEN, SLACK_API_URL=fake.api_url, SLACK_CHANNEL=CHANNEL)
        proc = start(["--budget-s", "1"], env, out)
        try:
            fake.wait_connected(timeout=120)
            fake.wait_for(lambda: any("baseline run #" in m["text"] for m in fake.event_posts(CHANNEL)), timeout=120,
                          what="a baseline run posted")
            fake.wait_ack(fake.slash_command("pause for the test", user="U0VIEWER"))
            # each command answers from its own worker: wait for pause's answer so status's comes second
            fake.wait_for(lambda: fake.responses, timeout=30, what="the pause answered")
            fake.wait_for(lambda: any("paused by <@U0VIEWER>: for the test" in m["text"]
                                      for m in fake.event_posts(CHANNEL)), timeout=30, what="the pause announced")
            fake.wait_ack(fake.slash_command("status", user="U0VIEWER"))
            fake.wait_for(lambda: len(fake.responses) >= 2, timeout=30, what="two answers")
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
        assert code == 0, out.read_text()[-3000:]
    text = out.read_text()
    assert "slack: Socket Mode, posting to C0RATCHET" in text and "→ slack: baseline run #" in text
    assert "paused by <@U0VIEWER>: for the test" in fake.responses[0]["text"]
    assert "run main: paused (for the test)" in fake.responses[1]["text"]
    assert db_rows(home, Run)[0].state == "paused"
    evs = db_rows(home, Event)
    posted = {m["metadata"]["event_payload"]["id"]: m["ts"] for m in fake.event_posts(CHANNEL)}
    delivered = [e for e in evs if e.delivered_at is not None]
    assert delivered and all(posted.get(e.id) == post_ts(e.delivery_ref) for e in delivered)
    assert len(posted) == len(fake.event_posts(CHANNEL))  # no event posted twice
    assert [(a.user, a.backend, a.command) for a in db_rows(home, CommandLog)] == \
        [("<@U0VIEWER>", "slack", "pause"), ("<@U0VIEWER>", "slack", "status")]


def test_serve_refuses_slack_without_a_channel(tmp_path, data_dir, tiny_workspace):
    home, out = tmp_path / "home", tmp_path / "out.txt"
    env = serve_env(home, data_dir, tiny_workspace.path, SLACK_BOT_TOKEN=BOT_TOKEN, SLACK_APP_TOKEN=APP_TOKEN)
    env.pop("SLACK_CHANNEL", None)
    t0 = time.time()
    proc = start(["--budget-s", "1"], env, out)
    assert proc.wait(timeout=120) == 2
    assert "Slack needs a channel for posts" in out.read_text() and time.time() - t0 < 120
