"""HTTP mode: real requests (httpx) to the bolt app served by uvicorn through bolt's ASGI adapter; signatures
checked (forged and stale ones rejected), Events API retries (X-Slack-Retry-Num) not executed twice."""

from __future__ import annotations

import json
import time
import urllib.parse

import httpx
import pytest
from slack_sdk.signature import SignatureVerifier
from sqlmodel import Session, select

from bot.slack_app import SlackBackend, SlackConfig
from db.models import CommandLog, Hint, Run
from tests.fakes.slack_api import BOT_TOKEN, FakeSlack
from tests.test_slack_notifier import make_control

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
CHANNEL = "C0RATCHET"


def signed(body: bytes, *, secret: str = SECRET, ts: int | None = None, ctype: str = "form", **extra) -> dict:
    """Headers Slack sends: X-Slack-Request-Timestamp and the v0 HMAC-SHA256 signature of `v0:ts:body`."""
    ts_s = str(int(time.time()) if ts is None else ts)
    sig = SignatureVerifier(secret).generate_signature(timestamp=ts_s, body=body)
    ctype = "application/json" if ctype == "json" else "application/x-www-form-urlencoded"
    return {"X-Slack-Request-Timestamp": ts_s, "X-Slack-Signature": sig, "Content-Type": ctype, **extra}


@pytest.fixture
def http_world(tmp_path):
    with FakeSlack() as fake:
        control = make_control(tmp_path)
        cfg = SlackConfig(bot_token=BOT_TOKEN, channel=CHANNEL, signing_secret=SECRET, api_url=fake.api_url,
                          mode="http", http_host="127.0.0.1", http_port=0)
        backend = SlackBackend(cfg, control, notifier_backoff_s=(0.1, 0.2))
        backend.start()
        try:
            with httpx.Client(timeout=10) as http:
                yield fake, control, backend, http
        finally:
            backend.stop(2)


def audit(control) -> list[CommandLog]:
    with Session(control.db) as s:
        return list(s.exec(select(CommandLog)).all())


def test_a_correctly_signed_slash_command_is_acked_and_run(http_world):
    fake, control, backend, http = http_world
    body = urllib.parse.urlencode(fake.slash_payload("pause deploy window", user="U0VIEWER")).encode()
    t0 = time.time()
    r = http.post(backend.server.url, content=body, headers=signed(body))
    assert r.status_code == 200 and time.time() - t0 < 3
    fake.wait_for(lambda: fake.responses, what="the ephemeral answer")
    assert "paused by <@U0VIEWER>: deploy window" in fake.responses[0]["text"]
    fake.wait_for(lambda: fake.event_posts(CHANNEL), what="the announcement")
    with Session(control.db) as s:
        assert s.exec(select(Run)).one().state == "paused"


def test_a_forged_signature_is_rejected_and_nothing_runs(http_world):
    fake, control, backend, http = http_world
    body = urllib.parse.urlencode(fake.slash_payload("pause", user="U0EVIL")).encode()
    forged = signed(body, secret="not-the-secret")
    r = http.post(backend.server.url, content=body, headers=forged)
    assert r.status_code == 401
    tampered = signed(urllib.parse.urlencode(fake.slash_payload("status")).encode())  # signature of another body
    assert http.post(backend.server.url, content=body, headers=tampered).status_code == 401
    assert http.post(backend.server.url, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
                     ).status_code == 401
    time.sleep(0.3)
    assert audit(control) == [] and fake.responses == []


def test_a_stale_signature_is_rejected(http_world):
    fake, control, backend, http = http_world
    body = urllib.parse.urlencode(fake.slash_payload("pause", user="U0VIEWER")).encode()
    old = signed(body, ts=int(time.time()) - 10 * 60)  # correctly signed, ten minutes ago: a replay
    assert http.post(backend.server.url, content=body, headers=old).status_code == 401
    time.sleep(0.3)
    assert audit(control) == []


def test_an_events_api_retry_is_acked_but_not_run_twice(http_world):
    fake, control, backend, http = http_world
    event = {"token": "x", "team_id": "T0FAKE", "api_app_id": "A0RATCHET", "type": "event_callback",
             "event_id": "Ev0HTTPRETRY", "event_time": int(time.time()),
             "event": {"type": "app_mention", "user": "U0VIEWER", "text": "<@UBOT> hint try RoPE base 50000",
                       "ts": "1.000100", "channel": CHANNEL, "event_ts": "1.000100"}}
    body = json.dumps(event).encode()
    assert http.post(backend.server.url, content=body, headers=signed(body, ctype="json")).status_code == 200
    retry = signed(body, ctype="json", **{"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
    assert http.post(backend.server.url, content=body, headers=retry).status_code == 200
    fake.wait_for(lambda: fake.ephemerals, what="the answer")
    time.sleep(0.5)
    with Session(control.db) as s:
        assert [h.text for h in s.exec(select(Hint)).all()] == ["try RoPE base 50000"]
    assert len(audit(control)) == 1 and len(fake.ephemerals) == 1


def test_url_verification_answers_the_challenge(http_world):
    fake, control, backend, http = http_world
    body = json.dumps({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
                       "type": "url_verification"}).encode()
    r = http.post(backend.server.url, content=body, headers=signed(body, ctype="json"))
    assert r.status_code == 200 and "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P" in r.text
