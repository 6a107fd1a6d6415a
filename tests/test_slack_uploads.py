"""Plots in Slack: the digest's progress plot and a promotion's plot uploaded with the real slack_sdk
files_upload_v2 (files.getUploadURLExternal → POST of the bytes → files.completeUploadExternal) into the post's
thread on the fake Slack; failing file endpoints never hold up later events; a restart never uploads twice."""

from __future__ import annotations

import time

import pytest
from sqlmodel import select

from bot.notifier import PLOT_MARK, Notifier
from bot.slack_app import PostSafeConnectionRetryHandler, make_client
from db.models import Promotion, Run
from db.session import session_scope
from loop import events
from loop.control import Control
from loop.promotion import judge
from tests.fakes.slack_api import (BOT_TOKEN, PNG_MAGIC, UPLOAD, api_error, fake_slack,  # noqa: F401 - fixture
                                   server_error)
from tests.test_slack_notifier import CHANNEL, add_events, make_control, posted_ids, rows

FILE_CALLS = ("files.getUploadURLExternal", UPLOAD, "files.completeUploadExternal")


def notifier(control, fake, **kw) -> Notifier:
    client = make_client(BOT_TOKEN, fake.api_url, max_retries=kw.pop("max_retries", 2))
    return Notifier(control, client, CHANNEL, backoff_s=(0.1, 0.2, 0.3), poll_s=0.1,
                    upload_backoff_s=kw.pop("upload_backoff_s", (0.0,)), **kw)


def add_promotion(control: Control, *, verdict: str = "transfers", ref=(2.00, 2.01), cand=(1.95, 1.97),
                  result: dict | None = None) -> int:
    """A finished promotion #1 to s1 of experiment #12 and its outbox event, as loop/engine.py writes them."""
    if result is None:
        result = judge(list(ref), list(cand), delta_small=-0.0300, sigma_small=0.0061,
                       params_small={"reference": 3_400_000, "candidate": 3_400_000},
                       params_large={"reference": 7_650_000, "candidate": 7_650_000},
                       overrides={"depth_mult": 1.5}).as_dict()
        verdict = result["verdict"]
    with session_scope(control.db) as s:
        run = s.exec(select(Run).where(Run.name == control.run_name)).one()
        p = Promotion(run_id=run.id, candidate_exp_id=12, candidate_commit="c" * 40, reference_commit="0" * 40,
                      scale="s1", scale_overrides={"depth_mult": 1.5}, budget_s=900.0, seeds=2, status="done",
                      verdict=verdict, result=result)
        s.add(p)
        s.flush()
        ev = events.run_event(run, "promotion", f"promotion #{p.id} to s1: {verdict.replace('_', ' ')}",
                              promotion_id=p.id, verdict=verdict, result=result, scale="s1", candidate_exp_id=12)
        s.add(ev)
        s.flush()
        return ev.id


def file_calls(fake) -> list[str]:
    return [c.method for c in fake.calls if c.method in FILE_CALLS]


def event_post(fake, event_id: int) -> dict:
    return next(m for m in fake.event_posts(CHANNEL) if m["metadata"]["event_payload"]["id"] == event_id)


def test_the_digest_plot_goes_into_the_digest_thread_through_the_external_upload(tmp_path, fake_slack):
    control = make_control(tmp_path)
    [eid] = add_events(control, ("digest", "digest for 2026-05-04"))
    n = notifier(control, fake_slack)
    assert n.deliver() == 1
    post = event_post(fake_slack, eid)
    assert "Ratchet digest · run main" in post["blocks"][0]["text"]["text"]
    # the real files_upload_v2: URL, then the bytes to that URL, then the share into the thread; after the post
    assert file_calls(fake_slack) == list(FILE_CALLS)
    methods = [c.method for c in fake_slack.calls]
    assert methods.index("chat.postMessage") < methods.index("files.getUploadURLExternal")
    [up] = fake_slack.shared_files(CHANNEL, thread_ts=post["ts"])
    assert up.data.startswith(PNG_MAGIC) and len(up.data) == up.length > 1000
    assert up.filename == f"ratchet-main-digest-{eid}.png" and up.alt_txt
    assert up.completed["channel_id"] == CHANNEL and up.completed["thread_ts"] == post["ts"]
    assert up.completed["title"].startswith("Progress · run main")
    # Slack shows it as a reply in the digest's thread, not in the channel
    reply = next(m for m in fake_slack.posts(CHANNEL) if m.get("files"))
    assert reply["thread_ts"] == post["ts"] and reply["files"][0]["id"] == up.file_id
    assert reply["files"][0]["mimetype"] == "image/png" and "Progress plot" in reply["text"]
    assert event_post(fake_slack, eid)["reply_count"] == 1
    assert rows(control)[0].delivery_ref == f"{post['ts']}{PLOT_MARK}{up.file_id}"
    assert n.uploaded == 1 and n.pending_uploads() == []
    assert n.deliver() == 0 and len(fake_slack.shared_files()) == 1  # nothing twice


def test_a_promotion_is_posted_with_its_verdict_deltas_and_plot(tmp_path, fake_slack):
    control = make_control(tmp_path)
    eid = add_promotion(control)
    n = notifier(control, fake_slack)
    assert n.deliver() == 1
    post = event_post(fake_slack, eid)
    import json

    text = json.dumps(post["blocks"], ensure_ascii=False)
    for piece in ("Promotion #1 to s1: transfers", "✅ transfers", "Δ at the loop's scale", "-0.0300 (noise σ 0.0061)",
                  "Δ at s1", "-0.0450 ± 0.0050 (2 paired seeds)", "s1 · 900 s · depth_mult 1.5", "#12",
                  "3.4M → 7.7M at s1"):
        assert piece in text, piece
    assert post["text"].startswith("⇪ promotion #1 to s1: transfers")
    actions = [e["action_id"] for b in post["blocks"] if b["type"] == "actions" for e in b["elements"]]
    assert actions == ["ratchet_diff", "ratchet_pause"]
    [up] = fake_slack.shared_files(CHANNEL, thread_ts=post["ts"])
    assert up.is_png and up.filename == f"ratchet-main-promotion-{eid}.png"
    assert up.completed["title"] == "Promotion #1 to s1" and "val_bpb at s1" in up.completed["initial_comment"]
    assert PLOT_MARK in rows(control)[0].delivery_ref


def test_a_failed_promotion_is_posted_without_a_plot(tmp_path, fake_slack):
    control = make_control(tmp_path)
    eid = add_promotion(control, verdict="", result={"reason": "no completed pair: crash CUDA OOM"})
    n = notifier(control, fake_slack)
    assert n.deliver() == 1
    post = event_post(fake_slack, eid)
    assert "Promotion #1 to s1: failed" in post["blocks"][0]["text"]["text"]
    assert "CUDA OOM" in str(post["blocks"])
    assert file_calls(fake_slack) == [] and n.pending_uploads() == []
    assert rows(control)[0].delivery_ref == post["ts"]


def test_a_failing_upload_neither_holds_up_nor_reorders_later_events_and_is_retried(tmp_path, fake_slack):
    control = make_control(tmp_path)
    ids = add_events(control, ("digest", "digest for 2026-05-04"), ("resumed", "resumed by <@U1>"))
    fake_slack.fail(UPLOAD, server_error(500))  # the bytes' POST fails (no retry handler covers it)
    n = notifier(control, fake_slack)
    assert n.deliver() == 2
    assert posted_ids(fake_slack) == ids and fake_slack.shared_files() == []
    assert n.upload_failures == 1 and "500" in n.upload_error and n.pending_uploads() == [ids[0]]
    assert all(e.delivered_at for e in rows(control)) and PLOT_MARK not in rows(control)[0].delivery_ref

    # the next try gets further and fails at the share: the plot is still owed, a new event still goes out
    ids += add_events(control, ("paused", "paused by <@U2>: lunch"))
    fake_slack.fail("files.completeUploadExternal", api_error("internal_error"))
    assert n.deliver() == 1
    assert posted_ids(fake_slack) == ids and fake_slack.shared_files() == []
    assert n.upload_failures == 2 and n.pending_uploads() == [ids[0]]

    assert n.deliver() == 0  # the third try: before uploading it looks into the thread (maybe shared after all)
    digest = event_post(fake_slack, ids[0])
    [up] = fake_slack.shared_files(CHANNEL, thread_ts=digest["ts"])
    assert up.is_png and n.pending_uploads() == [] and n.uploaded == 1
    assert fake_slack.calls_to("conversations.replies")
    assert rows(control)[0].delivery_ref == f"{digest['ts']}{PLOT_MARK}{up.file_id}"
    assert posted_ids(fake_slack) == ids  # each event once, in order


def test_while_file_endpoints_fail_the_running_notifier_keeps_posting(tmp_path, fake_slack):
    control = make_control(tmp_path)
    fake_slack.fail("files.getUploadURLExternal", *[api_error("internal_error")] * 3)
    n = notifier(control, fake_slack, upload_backoff_s=(0.05,))
    ids = add_events(control, ("digest", "digest for 2026-05-04"))
    n.start()
    try:
        for i in range(3):
            ids += add_events(control, ("discarded", f"discarded #{i} x"))
            n.wake()
            time.sleep(0.05)
        fake_slack.wait_for(lambda: fake_slack.shared_files(), timeout=20, what="the plot, after 3 failures")
        fake_slack.wait_for(lambda: all(e.delivered_at for e in rows(control)), timeout=20, what="every event")
    finally:
        n.stop()
    assert posted_ids(fake_slack) == ids
    assert len(fake_slack.calls_to("files.getUploadURLExternal")) == 4 and len(fake_slack.shared_files()) == 1
    assert n.failures == 0 and n.upload_failures == 3


def test_a_restart_after_the_upload_does_not_upload_again(tmp_path, fake_slack):
    control = make_control(tmp_path)
    [eid] = add_events(control, ("digest", "digest for 2026-05-04"))
    assert notifier(control, fake_slack).deliver() == 1
    assert len(fake_slack.shared_files()) == 1
    before = len(fake_slack.calls)

    restarted = notifier(Control(control.db, control.run_name), fake_slack)
    assert restarted.deliver() == 0
    after = [c.method for c in fake_slack.calls[before:]]
    assert "conversations.history" in after  # it looked for plots owed from before the restart ...
    assert not set(after) & set(FILE_CALLS) and "conversations.replies" not in after  # ... the record sufficed
    assert len(fake_slack.shared_files()) == 1 and restarted.pending_uploads() == []


def test_a_crash_between_the_upload_and_its_record_never_uploads_twice(tmp_path, fake_slack):
    control = make_control(tmp_path)
    [eid] = add_events(control, ("digest", "digest for 2026-05-04"))

    class CrashingControl(Control):
        """Dies (like kill -9) right after Slack shared the plot, before the upload is recorded."""

        def note_delivery(self, event_id, ref):
            if PLOT_MARK in ref:
                raise KeyboardInterrupt("killed")
            super().note_delivery(event_id, ref)

    with pytest.raises(KeyboardInterrupt):
        notifier(CrashingControl(control.db, control.run_name), fake_slack).deliver()
    [up] = fake_slack.shared_files()
    assert PLOT_MARK not in rows(control)[0].delivery_ref

    restarted = notifier(Control(control.db, control.run_name), fake_slack)
    assert restarted.deliver() == 0
    assert len(fake_slack.calls_to("files.getUploadURLExternal")) == 1  # found in the thread, not sent again
    assert restarted.uploaded == 0 and restarted.pending_uploads() == []
    assert rows(control)[0].delivery_ref == f"{event_post(fake_slack, eid)['ts']}{PLOT_MARK}{up.file_id}"
    assert len(fake_slack.shared_files()) == 1


def test_a_plot_still_owed_at_a_restart_is_uploaded_once_by_the_next_process(tmp_path, fake_slack):
    control = make_control(tmp_path)
    [eid] = add_events(control, ("digest", "digest for 2026-05-04"))
    fake_slack.fail("files.getUploadURLExternal", api_error("internal_error"))
    first = notifier(control, fake_slack)
    assert first.deliver() == 1 and first.pending_uploads() == [eid]  # then the process stops

    restarted = notifier(Control(control.db, control.run_name), fake_slack)
    assert restarted.deliver() == 0
    post = event_post(fake_slack, eid)
    [up] = fake_slack.shared_files(CHANNEL, thread_ts=post["ts"])
    assert up.is_png and restarted.uploaded == 1
    assert rows(control)[0].delivery_ref == f"{post['ts']}{PLOT_MARK}{up.file_id}"
    assert notifier(Control(control.db, control.run_name), fake_slack).deliver() == 0
    assert len(fake_slack.shared_files()) == 1


def test_a_plot_is_given_up_once_too_old(tmp_path, fake_slack, caplog):
    control = make_control(tmp_path)
    [eid] = add_events(control, ("digest", "digest for 2026-05-04"))
    fake_slack.fail(UPLOAD, server_error(503))
    n = notifier(control, fake_slack)
    n.deliver()
    assert n.pending_uploads() == [eid]
    n.upload_max_age_s = 0.0
    with caplog.at_level("ERROR", logger="ratchet.slack.notifier"):
        assert n.deliver() == 0
    assert n.pending_uploads() == [] and fake_slack.shared_files() == []
    assert "gave up on the plot of event" in caplog.text
    assert len(fake_slack.calls_to("files.getUploadURLExternal")) == 1


def test_a_kind_mapped_to_no_plot_uploads_nothing(tmp_path, fake_slack):
    control = make_control(tmp_path)
    add_events(control, ("digest", "digest for 2026-05-04"))
    assert notifier(control, fake_slack, plots={"digest": None}).deliver() == 1
    assert file_calls(fake_slack) == []


def test_the_fake_speaks_the_external_upload_flow(fake_slack):
    from slack_sdk.errors import SlackApiError

    client = make_client(BOT_TOKEN, fake_slack.api_url)
    root = client.chat_postMessage(channel=CHANNEL, text="root")["ts"]
    with pytest.raises(SlackApiError, match="invalid_arguments"):
        client.files_getUploadURLExternal(filename="x.png", length=0)
    resp = client.files_upload_v2(channel=CHANNEL, thread_ts=root, file=PNG_MAGIC + b"rest", filename="x.png",
                                  title="X")
    assert resp["file"]["id"] and resp["file"]["title"] == "X"
    [up] = fake_slack.shared_files(CHANNEL, thread_ts=root)
    assert up.data == PNG_MAGIC + b"rest"
    with pytest.raises(SlackApiError, match="file_not_found"):  # "can only be called once"
        client.files_completeUploadExternal(files=[{"id": up.file_id}], channel_id=CHANNEL)
    with pytest.raises(SlackApiError, match="thread_not_found"):
        client.files_upload_v2(channel=CHANNEL, thread_ts="1.000001", content=b"x", filename="y.png")
    # without a channel the file stays private: nothing appears in the channel
    client.files_upload_v2(content=b"private", filename="p.bin")
    assert len([m for m in fake_slack.posts(CHANNEL) if m.get("files")]) == 1


def test_a_share_that_may_have_reached_slack_is_not_retried_by_the_client():
    from urllib.error import URLError

    from slack_sdk.http_retry.request import HttpRequest
    from slack_sdk.http_retry.state import RetryState

    h = PostSafeConnectionRetryHandler(max_retry_count=2)

    def can(url, error):
        return h._can_retry(state=RetryState(), request=HttpRequest(method="POST", url=url, headers={}),
                            error=error)

    reset = ConnectionResetError("reset by peer")
    assert not can("https://slack.com/api/files.completeUploadExternal?files=%5B%5D&channel_id=C1", reset)
    assert not can("https://slack.com/api/chat.postMessage", reset)
    assert can("https://slack.com/api/files.getUploadURLExternal?filename=a", reset)
    assert can("https://slack.com/api/files.completeUploadExternal", URLError(ConnectionRefusedError()))
