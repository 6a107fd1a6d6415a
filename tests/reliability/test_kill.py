"""`kill -9` of `ratchet serve` at the worst moments — while an experiment trains, inside the keep decision,
between a post and its delivery mark — then a restart: nothing lost, nothing posted twice, branch = database.

The narrow windows are hit with RATCHET_FAULT (loop/faults.py), which SIGKILLs serve at a named point."""

from __future__ import annotations

import signal

import pytest

from db.models import Event, Experiment, Run
from tests.fakes.anthropic_api import FakeAnthropic, tool_answer
from tests.fakes.slack_api import APP_TOKEN, BOT_TOKEN, FakeSlack
from tests.reliability.conftest import (CHANNEL, UNIGRAM_OFF, UNIGRAM_ON, assert_consistent,
                                        assert_posted_once_in_order, clone, gpu_rows, harness_alive, rows,
                                        settings_env, sqlite_url, wait)


def test_kill_9_while_an_experiment_trains(tmp_path, data_dir, serve, measured):
    home, ws = clone(measured, tmp_path / "c")
    url, out = sqlite_url(home), tmp_path / "out.txt"
    env = settings_env(home, data_dir, ws.path)
    proc = serve([], env, out)

    def training():
        return next((e for e in rows(url, Experiment, kind="experiment", status="running") if harness_alive(e.pid)),
                    None)

    wait(training, proc, what="an experiment to train")
    victim = training()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)  # the orphaned harness trains on (unless it just finished)

    proc = serve(["--max-experiments", "1"], env, out)
    assert proc.wait(timeout=300) == 0, out.read_text()[-3000:]
    assert not harness_alive(victim.pid)  # the restart killed the orphan before re-running its experiment
    again = rows(url, Experiment, id=victim.id)[0]
    assert again.status in ("keep", "discard") and again.attempts == 2 and again.val_bpb is not None
    assert len(gpu_rows(url, victim.id)) == 1  # the run cut short booked nothing; the re-run booked once
    assert_consistent(url, ws)
    assert f"#{victim.id} " in out.read_text().split("re-run")[-1]


@pytest.mark.parametrize("point", ["decision.before_commit:keep", "decision.after_commit:keep"])
def test_kill_9_inside_the_keep_decision(tmp_path, data_dir, serve, measured, point):
    """The keep is decided when the change's confirm run is recorded. before_commit: that decision is lost
    with the process, so the confirm run is re-run and the change kept then. after_commit: the keep is in
    the database but the branch has not moved; the restart moves it."""
    home, ws = clone(measured, tmp_path / "c")
    url, out = sqlite_url(home), tmp_path / "out.txt"
    env = settings_env(home, data_dir, ws.path)
    base_tip = ws.branch_tip("main")
    with FakeAnthropic() as fake:
        fake.script(tool_answer([(UNIGRAM_OFF, UNIGRAM_ON)], "unigram prior", "token frequencies beat uniform"))
        proc = serve(["--max-experiments", "1"], {**env, "ANTHROPIC_API_KEY": "test-key",
                                                   "ANTHROPIC_BASE_URL": fake.url, "RATCHET_FAULT": point}, out)
        assert proc.wait(timeout=300) == -signal.SIGKILL, out.read_text()[-3000:]
    exp = rows(url, Experiment, kind="experiment")[0]
    run = rows(url, Run)[0]
    confirm = rows(url, Experiment, kind="confirm")[0]
    assert confirm.confirms_id == exp.id and confirm.commit == exp.commit
    if point.startswith("decision.before_commit"):  # nothing of the decision was written
        assert (exp.status, confirm.status) == ("confirming", "running") and run.head_commit == base_tip
    else:
        assert exp.status == "keep" and run.head_commit == exp.commit and ws.branch_tip("main") == base_tip

    proc = serve(["--max-experiments", "1"], env, out)  # offline proposer from here on
    assert proc.wait(timeout=300) == 0, out.read_text()[-3000:]
    exp = rows(url, Experiment, id=exp.id)[0]
    assert exp.status == "keep" and exp.description == "unigram prior"
    assert exp.attempts == 1 and len(gpu_rows(url, exp.id)) == 1
    confirm = rows(url, Experiment, id=confirm.id)[0]
    assert confirm.status == "keep" and confirm.attempts == (2 if "before" in point else 1)
    assert len(gpu_rows(url, confirm.id)) == 1 and exp.decision["runs"] == [exp.val_bpb, confirm.val_bpb]
    run = assert_consistent(url, ws)
    assert ws.read_file(ws.branch_tip("main")).count(UNIGRAM_ON) == 1  # the kept change is on the branch
    kept = [ev for ev in rows(url, Event) if ev.kind == "kept" and ev.experiment_id == exp.id]
    assert len(kept) == 1 and out.read_text().count(kept[0].text) == 1  # one decision, announced once


def test_kill_9_between_printing_an_event_and_marking_it(tmp_path, data_dir, serve, measured):
    """The shell is at-least-once: the event printed just before the crash is printed again, no other."""
    home, ws = clone(measured, tmp_path / "c")
    url, out = sqlite_url(home), tmp_path / "out.txt"
    env = settings_env(home, data_dir, ws.path)
    proc = serve([], {**env, "RATCHET_FAULT": "deliver.before_mark"}, out)
    assert proc.wait(timeout=120) == -signal.SIGKILL, out.read_text()[-3000:]
    victim = rows(url, Event)[0]
    assert victim.delivered_at is None and victim.text in out.read_text()

    proc = serve(["--max-experiments", "1"], env, out)
    assert proc.wait(timeout=300) == 0, out.read_text()[-3000:]
    assert_consistent(url, ws)
    text = out.read_text()
    for ev in rows(url, Event):
        assert text.count(ev.text) == (2 if ev.id == victim.id else 1), ev.text


def test_kill_9_between_a_slack_post_and_its_mark_posts_nothing_twice(tmp_path, data_dir, serve, measured):
    """Slack is exactly-once: after the restart the notifier finds the post by its event id in the channel."""
    home, ws = clone(measured, tmp_path / "c")
    url, out = sqlite_url(home), tmp_path / "out.txt"
    with FakeSlack() as fake:
        env = settings_env(home, data_dir, ws.path, SLACK_BOT_TOKEN=BOT_TOKEN, SLACK_APP_TOKEN=APP_TOKEN,
                           SLACK_API_URL=fake.api_url, SLACK_CHANNEL=CHANNEL)
        proc = serve([], {**env, "RATCHET_FAULT": "deliver.before_mark"}, out)
        assert proc.wait(timeout=120) == -signal.SIGKILL, out.read_text()[-3000:]
        victim = rows(url, Event)[0]
        assert victim.delivered_at is None and len(fake.event_posts(CHANNEL)) == 1

        proc = serve(["--max-experiments", "1"], env, out)
        assert proc.wait(timeout=300) == 0, out.read_text()[-3000:]
        assert_consistent(url, ws)
        assert_posted_once_in_order(url, fake)
