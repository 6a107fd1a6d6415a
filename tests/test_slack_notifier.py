"""Outbox delivery to the fake Slack with the real slack_sdk WebClient: order, stored ts, 429 / 500 / outage /
invalid_auth, a crash between posting and marking, the daily thread."""

from __future__ import annotations

import time

import pytest
from sqlmodel import Session, select

from bot.notifier import Notifier
from bot.slack_app import make_client
from db.models import Event, Run
from db.session import create_tables, make_engine, session_scope
from loop import events
from loop.control import Control
from tests.fakes.slack_api import BOT_TOKEN, api_error, fake_slack, ratelimited, server_error  # noqa: F401 - fixture

CHANNEL = "C0RATCHET"


def make_control(tmp_path, run: str = "main") -> Control:
    """A Control over a fresh SQLite database holding one run (no engine: delivery needs none)."""
    db = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    create_tables(db)
    with session_scope(db) as s:
        s.add(Run(name=run, branch=f"ratchet/{run}", workspace=str(tmp_path), baseline_commit="0" * 40,
                  head_commit="0" * 40, budget_s=1.0))
    return Control(db, run)


def add_events(control: Control, *specs: tuple[str, str]) -> list[int]:
    """Write events (kind, text) to the outbox as the loop would; returns their ids."""
    ids = []
    with session_scope(control.db) as s:
        run = s.exec(select(Run).where(Run.name == control.run_name)).one()
        for kind, text in specs:
            ev = events.run_event(run, kind, text)
            s.add(ev)
            s.flush()
            ids.append(ev.id)
    return ids


def rows(control: Control) -> list[Event]:
    with Session(control.db) as s:
        return list(s.exec(select(Event).order_by(Event.id)).all())


def notifier(control, fake, **kw) -> Notifier:
    client = make_client(BOT_TOKEN, fake.api_url, max_retries=kw.pop("max_retries", 2))
    return Notifier(control, client, CHANNEL, backoff_s=kw.pop("backoff_s", (0.1, 0.2, 0.3)), poll_s=0.2, **kw)


def posted_ids(fake) -> list[int]:
    return [m["metadata"]["event_payload"]["id"] for m in fake.event_posts(CHANNEL)]


def test_events_are_posted_in_order_with_their_ts_stored(tmp_path, fake_slack):
    control = make_control(tmp_path)
    ids = add_events(control, ("paused", "paused by <@U1>: lunch"), ("resumed", "resumed by <@U1>"),
                     ("discarded", "discarded #4 LR: val_bpb 2.2 vs head 2.1"))
    n = notifier(control, fake_slack)
    assert n.deliver() == 3
    assert posted_ids(fake_slack) == ids
    posts = fake_slack.event_posts(CHANNEL)
    for ev, m in zip(rows(control), posts):
        assert ev.delivered_at is not None and ev.delivery_ref == m["ts"] and ev.attempts == 1
        assert m["metadata"]["event_payload"]["run"] == "main" and m["blocks"]
    assert "paused by <@U1>: lunch" in posts[0]["text"]
    assert n.deliver() == 0 and len(fake_slack.event_posts()) == 3  # nothing twice


def test_429_then_success_waits_retry_after_and_posts_once(tmp_path, fake_slack):
    control = make_control(tmp_path)
    [eid] = add_events(control, ("resumed", "resumed by <@U1>"))
    fake_slack.fail("chat.postMessage", ratelimited(retry_after=1))
    n = notifier(control, fake_slack)
    t0 = time.time()
    assert n.deliver() == 1
    assert time.time() - t0 >= 1.0  # Retry-After honoured by slack_sdk's RateLimitErrorRetryHandler
    calls = fake_slack.calls_to("chat.postMessage")
    assert [c.status for c in calls] == [429, 200]
    assert posted_ids(fake_slack) == [eid] and rows(control)[0].delivery_ref == calls[1].reply["ts"]


def test_a_500_is_retried_by_the_client(tmp_path, fake_slack):
    control = make_control(tmp_path)
    [eid] = add_events(control, ("resumed", "resumed"))
    fake_slack.fail("chat.postMessage", server_error(500))
    assert notifier(control, fake_slack).deliver() == 1
    assert [c.status for c in fake_slack.calls_to("chat.postMessage")] == [500, 200]
    assert posted_ids(fake_slack) == [eid]


def test_an_outage_holds_events_in_order_and_flushes_them_once(tmp_path, fake_slack):
    control = make_control(tmp_path)
    first = add_events(control, ("resumed", "before the outage"))
    n = notifier(control, fake_slack, max_retries=1)
    n.start()
    try:
        fake_slack.wait_for(lambda: rows(control)[0].delivered_at, what="the first post")
        fake_slack.down()
        later = add_events(control, *[("discarded", f"discarded #{i} during the outage") for i in range(4)])
        n.wake()
        deadline = time.time() + 20
        while n.failures < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert n.failures >= 2 and ("URLError" in n.last_error or "Connection" in n.last_error), n.last_error
        assert all(e.delivered_at is None for e in rows(control)[1:])  # waiting, not dropped
        fake_slack.up()
        fake_slack.wait_for(lambda: all(e.delivered_at for e in rows(control)), timeout=20, what="the flush")
    finally:
        n.stop()
    assert posted_ids(fake_slack) == first + later  # in order, each exactly once
    assert n.failures == 0


def test_a_crash_between_posting_and_marking_never_posts_twice(tmp_path, fake_slack):
    control = make_control(tmp_path)
    ids = add_events(control, *[("hint", f"hint #{i}") for i in range(4)]) + \
        add_events(control, ("discarded", "discarded #9 x"))

    class CrashingControl(Control):
        """Dies (like kill -9) right after Slack accepted the third post, before its ts is stored."""

        def mark_delivered(self, event_id, backend, ref=""):
            if event_id == ids[2]:
                raise KeyboardInterrupt("killed")
            super().mark_delivered(event_id, backend, ref)

    dying = notifier(CrashingControl(control.db, control.run_name), fake_slack, daily_thread=True)
    with pytest.raises(KeyboardInterrupt):
        dying.deliver()
    assert posted_ids(fake_slack) == ids[:3] and rows(control)[2].delivered_at is None

    restarted = notifier(Control(control.db, control.run_name), fake_slack, daily_thread=True)
    assert restarted.deliver() == 2  # the fourth hint and the discarded line; the third was found
    assert restarted.recovered == 1
    assert posted_ids(fake_slack) == ids
    third = next(m for m in fake_slack.event_posts() if m["metadata"]["event_payload"]["id"] == ids[2])
    assert rows(control)[2].delivery_ref == third["ts"]
    assert any(c.method == "conversations.history" for c in fake_slack.calls)


def test_daily_thread_collects_compact_lines_and_survives_a_restart(tmp_path, fake_slack):
    control = make_control(tmp_path)
    add_events(control, ("discarded", "discarded #1 a"), ("kept", "kept #2"), ("crashed", "crash #3 b"))
    assert notifier(control, fake_slack, daily_thread=True).deliver() == 3
    add_events(control, ("invalid", "invalid #4 c"))
    assert notifier(control, fake_slack, daily_thread=True).deliver() == 1  # a new process: same thread
    top = [m for m in fake_slack.posts(CHANNEL) if "thread_ts" not in m or m["thread_ts"] == m["ts"]]
    parents = [m for m in top if m.get("metadata", {}).get("event_type") == "ratchet_daily"]
    assert len(parents) == 1
    replies = [m for m in fake_slack.posts(CHANNEL) if m.get("thread_ts") == parents[0]["ts"] and m is not parents[0]]
    assert [m["text"].split(" ", 2)[1] for m in replies] == ["discarded", "crash", "invalid"]
    assert [m["text"] for m in top if m.get("metadata", {}).get("event_type") == "ratchet_event"] == ["✓ kept #2"]


def test_a_payload_slack_refuses_goes_out_as_plain_text(tmp_path, fake_slack):
    control = make_control(tmp_path)
    [eid] = add_events(control, ("resumed", "resumed"))
    fake_slack.fail("chat.postMessage", api_error("invalid_blocks"))
    assert notifier(control, fake_slack).deliver() == 1
    m = fake_slack.event_posts()[0]
    assert "blocks" not in m and m["metadata"]["event_payload"]["id"] == eid


def test_rejected_token_keeps_events_waiting(tmp_path, fake_slack):
    control = make_control(tmp_path)
    add_events(control, ("resumed", "resumed"))
    fake_slack.fail("chat.postMessage", api_error("invalid_auth"))
    n = notifier(control, fake_slack)
    from bot.notifier import DeliveryError

    with pytest.raises(DeliveryError, match="invalid_auth"):
        n.deliver()
    assert rows(control)[0].delivered_at is None
    assert n.deliver() == 1 and len(fake_slack.event_posts()) == 1


def test_the_daily_thread_follows_the_teams_day():
    from datetime import datetime, timezone

    from bot.notifier import local_day

    late = datetime(2026, 5, 4, 23, 30, tzinfo=timezone.utc)
    assert local_day(late) == "2026-05-04" and local_day(late, "Asia/Tokyo") == "2026-05-05"
    assert local_day(late.replace(tzinfo=None), "America/New_York") == "2026-05-04"  # naive = UTC (SQLite)


def test_a_digest_is_posted_with_its_text_and_its_follow_up_runs(tmp_path, fake_slack):
    control = make_control(tmp_path)
    [eid] = add_events(control, ("digest", "digest for 2026-05-04"))
    seen = []
    n = notifier(control, fake_slack, followups={"digest": lambda notifier_, ev, ts: seen.append((ev.id, ts))})
    assert n.deliver() == 1
    [post] = fake_slack.event_posts(CHANNEL)
    assert "Ratchet digest · run main" in post["blocks"][0]["text"]["text"] and post["text"].startswith("📈")
    assert seen == [(eid, post["ts"])]


def test_a_broken_renderer_or_follow_up_never_blocks_delivery(tmp_path, fake_slack):
    control = make_control(tmp_path)
    add_events(control, ("digest", "digest for 2026-05-04"), ("resumed", "resumed"))

    def broken(*_):
        raise RuntimeError("bug")

    n = notifier(control, fake_slack, renderers={"digest": broken}, followups={"digest": broken})
    assert n.deliver() == 2
    assert [m["text"] for m in fake_slack.event_posts(CHANNEL)] == ["📈 digest for 2026-05-04", "▶ resumed"]
