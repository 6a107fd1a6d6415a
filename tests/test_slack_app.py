"""The Slack front end to end in Socket Mode: the real bolt App, slack_sdk's Socket Mode client and WebClient
against the fake Slack; a real Engine / Control on SQLite and a real git workspace behind them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from sqlmodel import Session, select

from bot import blocks
from bot.slack_app import SlackBackend, SlackConfig
from db.models import CommandLog, Event, Experiment, Hint, Run
from db.session import session_scope
from loop import events
from loop.control import Control
from tests.fakes.slack_api import APP_TOKEN, BOT_TOKEN, FakeSlack
from tests.test_engine import make_engine_for

CHANNEL = "C0RATCHET"
VIEWER, OPERATOR, GROUPIE, ADMIN = "U0VIEWER", "U0OPS", "U0GROUPIE", "U0ADMIN"
ROLES = {"operator": [OPERATOR, "S0ONCALL"], "admin": [ADMIN]}


@dataclass
class World:
    fake: FakeSlack
    control: Control
    backend: SlackBackend
    engine: object
    kept: Experiment

    def run(self) -> Run:
        with Session(self.control.db) as s:
            return s.exec(select(Run)).one()

    def audit(self) -> list[CommandLog]:
        with Session(self.control.db) as s:
            return list(s.exec(select(CommandLog).order_by(CommandLog.id)).all())

    def post_with(self, text: str, timeout: float = 10) -> dict:
        """The channel post (not a thread reply) whose fallback text contains `text`."""
        return self.fake.wait_for(lambda: next((m for m in self.fake.event_posts(CHANNEL) if text in m["text"]), None),
                                  timeout, f"a post with {text!r}")

    def answer(self, n: int = 1, timeout: float = 10) -> list[dict]:
        """The first n ephemeral answers sent through response_url."""
        return self.fake.wait_for(lambda: self.fake.responses[:n] if len(self.fake.responses) >= n else None,
                                  timeout, f"{n} answer(s)")


def seed_kept(eng, ws) -> Experiment:
    """A measured baseline (two runs) and one kept experiment at head, as the engine records them."""
    base = eng.get_run().baseline_commit
    src = ws.read_file(base).replace("LR = 0.02", "LR = 0.03")
    with session_scope(eng.db) as s:
        run = s.get(Run, eng.run_id)
        for i, v in enumerate((2.10, 2.12)):
            s.add(Experiment(run_id=run.id, kind="baseline", status="keep", commit=base, parent_commit=base,
                             val_bpb=v, seed=i, description=f"baseline repeat {i + 1}/2"))
        run.noise_sigma, run.head_val_bpb, run.head_runs = 0.01, 2.11, [2.10, 2.12]
        exp = Experiment(run_id=run.id, kind="experiment", status="proposed", parent_commit=base,
                         description="LR 0.02 → 0.03", hypothesis="a larger step size converges faster")
        s.add(exp)
        s.flush()
        exp.commit = ws.commit_experiment(exp.id, base, src, f"exp {exp.id}: LR 0.02 → 0.03")
        exp.diff = ws.diff(base, exp.commit)
        exp.status, exp.val_bpb, exp.training_seconds, exp.host, exp.slot = "keep", 2.05, 1.0, "localhost", "cpu"
        exp.decision = {"verdict": "keep", "val_bpb": 2.05, "head_val_bpb": 2.11, "delta": -0.06, "threshold": 0.02,
                        "min_delta": 0.0003, "z": 2.0, "sigma": 0.01}
        run.head_commit, run.head_val_bpb, run.head_runs = exp.commit, 2.05, [2.05]
        s.add(events.experiment_event(exp, run, 2.11))
        s.add(run)
        s.add(exp)
        s.flush()
        s.expunge(exp)
    ws.fast_forward(run.name, exp.commit, base)
    return exp


@pytest.fixture
def world(tmp_path, data_dir, tiny_workspace):
    with FakeSlack(usergroups={"S0ONCALL": [GROUPIE]}) as fake:
        eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace)
        control = Control(db, eng.settings.run, eng)
        kept = seed_kept(eng, tiny_workspace)
        cfg = SlackConfig(bot_token=BOT_TOKEN, app_token=APP_TOKEN, channel=CHANNEL, api_url=fake.api_url,
                          roles=ROLES)
        backend = SlackBackend(cfg, control, notifier_backoff_s=(0.1, 0.2))
        eng.on_change = backend.deliver
        backend.start()
        fake.wait_connected()
        w = World(fake, control, backend, eng, kept)
        w.post_with("kept #")  # the seeded keep reached the channel
        try:
            yield w
        finally:
            backend.stop(2)


def test_slash_command_is_acked_then_answered_only_to_the_user_and_audited(world):
    eid = world.fake.slash_command("status", user=VIEWER)
    assert world.fake.wait_ack(eid) == {}
    [answer] = world.answer()
    assert answer["response_type"] == "ephemeral" and answer["replace_original"] is False
    assert "run main: running" in answer["text"] and answer["text"].startswith("```")
    row = world.fake.wait_for(lambda: world.audit(), what="the audit row")[0]
    assert (row.user, row.backend, row.command, row.allowed) == (f"<@{VIEWER}>", "slack", "status", True)
    assert world.fake.calls_to("auth.test") and world.fake.connections_opened == 1


def test_anyone_may_pause_and_the_channel_is_told(world):
    world.fake.wait_ack(world.fake.slash_command("pause lunch break", user=VIEWER))
    post = world.post_with("paused by <@U0VIEWER>: lunch break")
    assert world.run().state == "paused" and world.run().pause_reason == "lunch break"
    assert [e["action_id"] for b in post["blocks"] if b["type"] == "actions" for e in b["elements"]] == \
        [blocks.RESUME, blocks.PAUSE]
    assert "paused by" in world.answer()[0]["text"]


def test_unauthorised_resume_is_refused_naming_the_role_and_a_group_member_may(world):
    world.control.pause("<@U0ADMIN>", reason="maintenance")
    world.fake.wait_ack(world.fake.slash_command("resume", user=VIEWER))
    [refusal] = world.answer()
    assert "`resume` needs the operator role; you are viewer" in refusal["text"]
    assert world.run().state == "paused"
    world.fake.wait_ack(world.fake.slash_command("resume", user=GROUPIE))  # operator through user group S0ONCALL
    world.post_with("resumed by <@U0GROUPIE>")
    assert world.run().state == "running"
    # the post comes from the event the command wrote; its audit row is written just after, so wait for it
    audit = world.fake.wait_for(lambda: (a := world.audit()) and len(a) >= 2 and a, what="two audit rows")
    assert [(a.user, a.command, a.allowed) for a in audit] == [(f"<@{VIEWER}>", "resume", False),
                                                               (f"<@{GROUPIE}>", "resume", True)]
    assert "needs the operator role" in audit[0].result
    assert [c.args["usergroup"] for c in world.fake.calls_to("usergroups.users.list")] == ["S0ONCALL"]


def test_pause_button_after_its_confirm_dialog_pauses(world):
    post = world.post_with("kept #")
    world.fake.wait_ack(world.fake.block_action(post, blocks.PAUSE, user=VIEWER))
    world.post_with("paused by <@U0VIEWER>")
    assert world.run().state == "paused"
    # the post can arrive before the audit row, which is written once the command has returned
    assert world.fake.wait_for(lambda: world.audit(), what="the audit row")[-1].command == "pause"


def test_show_diff_posts_the_diff_in_the_posts_thread(world):
    post = world.post_with("kept #")
    world.fake.wait_ack(world.fake.block_action(post, blocks.SHOW_DIFF, user=VIEWER))
    reply = world.fake.wait_for(lambda: next((m for m in world.fake.posts(CHANNEL)
                                              if m.get("thread_ts") == post["ts"] != m["ts"]), None),
                                    what="the diff reply")
    assert f"diff of #{world.kept.id}" in reply["text"] and "+LR = 0.03" in reply["text"]
    assert world.fake.wait_for(lambda: world.audit(), what="the audit row")[-1].command == "diff"


def test_promote_button_runs_promote_through_the_shared_grammar(world):
    post = world.post_with("kept #")
    world.fake.wait_ack(world.fake.block_action(post, blocks.PROMOTE, user=VIEWER))
    assert "`promote` needs the operator role" in world.answer()[0]["text"]
    world.fake.wait_ack(world.fake.block_action(post, blocks.PROMOTE, user=OPERATOR))
    assert "needs the operator role" not in world.answer(2)[1]["text"]  # whatever promote answers, to the user
    assert [(a.user, a.text, a.command, a.allowed) for a in world.audit()] == [
        (f"<@{VIEWER}>", f"promote {world.kept.id}", "promote", False),
        (f"<@{OPERATOR}>", f"promote {world.kept.id}", "promote", True)]


def test_revert_button_needs_an_operator_and_moves_head_back(world, tiny_workspace):
    post = world.post_with("kept #")
    base = world.run().baseline_commit
    world.fake.wait_ack(world.fake.block_action(post, blocks.REVERT, user=VIEWER))
    assert "`revert` needs the operator role" in world.answer()[0]["text"]
    assert world.run().head_commit == world.kept.commit

    world.fake.wait_ack(world.fake.block_action(post, blocks.REVERT, user=OPERATOR))
    world.post_with(f"reverted #{world.kept.id}")
    run = world.run()
    assert run.head_commit == base and run.head_val_bpb == pytest.approx(2.11) and run.head_runs == [2.10, 2.12]
    assert tiny_workspace.branch_tip("main") == base
    update = world.fake.wait_for(lambda: world.fake.calls_to("chat.update"), what="the kept post's update")[0]
    assert update.args["ts"] == post["ts"]
    actions = [e["action_id"] for b in world.fake.posts(CHANNEL)[0]["blocks"] if b["type"] == "actions"
               for e in b["elements"]]
    assert blocks.REVERT not in actions and blocks.PAUSE in actions
    with Session(world.control.db) as s:
        exp = s.get(Experiment, world.kept.id)
        assert exp.status == "discard" and exp.reason == f"reverted by <@{OPERATOR}>"
        assert s.exec(select(Event).where(Event.kind == "reverted")).one().experiment_id == exp.id


def test_mention_runs_the_same_grammar_and_answers_ephemerally(world):
    world.fake.wait_ack(world.fake.app_mention("history 5", user=VIEWER))
    eph = world.fake.wait_for(lambda: world.fake.ephemerals, what="an ephemeral answer")[0]
    assert eph["user"] == VIEWER and eph["channel"] == CHANNEL and f"#{world.kept.id}" in eph["text"]
    world.fake.wait_ack(world.fake.app_mention("frobnicate", user=VIEWER))
    eph = world.fake.wait_for(lambda: world.fake.ephemerals[1:], what="the help text")[0]
    assert "unknown command 'frobnicate'" in eph["text"] and "pause [now] [reason]" in eph["text"]


def test_a_slack_retry_of_the_same_request_is_not_executed_twice(world):
    first = world.fake.slash_command("hint try a longer warmup", user=VIEWER, trigger_id="trig.same.1")
    again = world.fake.slash_command("hint try a longer warmup", user=VIEWER, trigger_id="trig.same.1")
    ev1 = world.fake.app_mention("hint use a cosine schedule", user=VIEWER, event_id="Ev0SAME")
    ev2 = world.fake.app_mention("hint use a cosine schedule", user=VIEWER, event_id="Ev0SAME", retry_attempt=1)
    for eid in (first, again, ev1, ev2):
        world.fake.wait_ack(eid)  # every delivery is acked, so Slack stops retrying
    world.post_with("hint #2")
    world.fake.wait_for(lambda: len(world.audit()) >= 2, what="two audit rows")
    with Session(world.control.db) as s:
        hints = [h.text for h in s.exec(select(Hint).order_by(Hint.id)).all()]
    assert sorted(hints) == ["try a longer warmup", "use a cosine schedule"]  # each once (order: concurrent)
    assert [a.command for a in world.audit()] == ["hint", "hint"]
