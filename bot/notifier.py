"""Outbox delivery to Slack: events posted in order, each post's ts stored, nothing posted twice.

Reads events and marks them delivered through the control API only; renders with bot/blocks.py.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from typing import Callable, Iterator, Optional, Sequence
from zoneinfo import ZoneInfo

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError

from bot import blocks
from loop.control import Control

log = logging.getLogger("ratchet.slack.notifier")

BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # waits after consecutive failed passes while Slack is down
POLL_S = 2.0  # events written by another process are seen at least this often
RECOVER_MARGIN_S = 300.0  # how far before the oldest pending event to look for its post
# Errors where Slack refused the message itself: sent again as plain text (so one bad payload never blocks
# the queue). Everything else (outage, auth, rate limit) leaves the event waiting.
PAYLOAD_ERRORS = frozenset({"invalid_blocks", "invalid_blocks_format", "msg_too_long", "invalid_metadata_format",
                            "invalid_metadata_schema", "metadata_too_large", "too_many_attachments"})
# Configuration problems: logged as errors (someone must act); the events wait.
CONFIG_ERRORS = frozenset({"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired",
                           "channel_not_found", "not_in_channel", "is_archived", "missing_scope"})


class DeliveryError(RuntimeError):
    """A pass stopped: Slack could not be reached or refused; the remaining events wait, in order."""


def local_day(when: datetime, tz: str = "UTC") -> str:
    """YYYY-MM-DD of `when` in the IANA zone `tz` (naive datetimes are taken as UTC, as SQLite returns them)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d")


def _epoch(when: datetime) -> float:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


class Notifier:
    """Posts outbox events to one channel, oldest first, from its own thread.

    Each post carries the event id in its message metadata (event_type "ratchet_event"); after it is posted
    the ts is stored with control.mark_delivered(id, "slack", ts). At start-up and after any failed pass,
    `recover()` reads the channel (conversations.history, and the replies of the daily threads) and marks
    the pending events it finds there, so a crash between posting and marking never posts twice.
    While Slack is down events wait, undelivered and in order, and passes back off (BACKOFF_S); `wake()`
    asks for a pass now (non-blocking, safe to call from the engine while it holds its lock).

    The client's own retry handlers retry 429 (Retry-After), 5xx and connection errors within a call.
    """

    name = "slack"

    def __init__(self, control: Control, client: WebClient, channel: str, *, daily_thread: bool = False,
                 timezone_: str = "UTC", backoff_s: Sequence[float] = BACKOFF_S, poll_s: float = POLL_S,
                 on_posted: Optional[Callable[[object, str], None]] = None,
                 renderers: Optional[dict[str, Callable[[object], blocks.Message]]] = None,
                 followups: Optional[dict[str, Callable[["Notifier", object, str], None]]] = None):
        if not channel:
            raise ValueError("no Slack channel: set slack_channel in ratchet.toml or SLACK_CHANNEL")
        self.control = control
        self.client = client
        self.channel = channel
        self.daily_thread = daily_thread
        self.tz = timezone_  # the day of the daily thread (the team's day, as for budgets and the digest)
        self.backoff_s = tuple(backoff_s) or BACKOFF_S
        self.poll_s = poll_s
        self.on_posted = on_posted
        # kind → how to render it (default: blocks.event_message), and kind → what to do once it is posted
        # (e.g. upload the digest's plot into its thread); a failed follow-up is logged, never re-posts.
        self.renderers = {"digest": self._render_digest, **(renderers or {})}
        self.followups = dict(followups or {})
        self.failures = 0  # consecutive failed passes (0 while Slack answers)
        self.last_error = ""
        self.posted = 0  # events posted by this notifier
        self.recovered = 0  # events found already posted by recover()
        self._daily: dict[str, str] = {}  # day → ts of its thread's parent post
        self._recover_needed = True
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---- thread ----

    def start(self) -> threading.Thread:
        """Deliver in a daemon thread until stop()."""
        self._thread = threading.Thread(target=self._loop, name="slack-notifier", daemon=True)
        self._thread.start()
        return self._thread

    def wake(self) -> None:
        """Ask for a delivery pass now (ignored while backing off from an outage)."""
        self._wake.set()

    def stop(self, flush_timeout: float = 5.0) -> None:
        """One last pass (bounded by flush_timeout seconds, skipped while Slack is down), then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=flush_timeout)

    def _loop(self) -> None:
        while True:
            try:
                self.deliver()
            except DeliveryError:
                delay = self.backoff_s[min(self.failures - 1, len(self.backoff_s) - 1)]
                if self._stop.wait(delay):
                    return
                continue
            except Exception:  # noqa: BLE001 - a bug in one pass must not end delivery; the event waits
                log.exception("delivery pass failed")
                self.failures += 1
                if self._stop.wait(self.backoff_s[-1]):
                    return
                continue
            if self._stop.is_set():
                return
            self._wake.wait(self.poll_s)
            self._wake.clear()

    # ---- one pass ----

    def deliver(self) -> int:
        """Post every pending event in order and store its ts. Returns how many were posted.

        Raises DeliveryError at the first event that could not be posted (it and the later ones wait).
        """
        with self._lock:
            try:
                if self._recover_needed:
                    self.recover()
                    self._recover_needed = False
                n = 0
                while True:
                    pending = self.control.pending_events(self.name)
                    if not pending:
                        break
                    for ev in pending:
                        self._post_event(ev)
                        n += 1
            except (SlackApiError, SlackClientError, OSError) as e:
                self._recover_needed = True  # the failed post may have reached Slack after all
                self.failures += 1
                self.last_error = _describe(e)
                level = logging.ERROR if _api_error(e) in CONFIG_ERRORS else logging.WARNING
                log.log(level, "Slack delivery failed (%d in a row): %s; events wait", self.failures, self.last_error)
                raise DeliveryError(self.last_error) from e
            if self.failures:
                log.info("Slack delivery back after %d failed pass(es)", self.failures)
            self.failures, self.last_error = 0, ""
            return n

    def _render_digest(self, ev) -> blocks.Message:
        from datetime import datetime as _dt

        from bot.digest import digest_text

        until = (ev.payload or {}).get("until")
        return blocks.digest_message(ev, digest_text(self.control.digest(until=_dt.fromisoformat(until)
                                                                         if until else None)))

    def _render(self, ev) -> blocks.Message:
        render = self.renderers.get(ev.kind)
        if render is not None:
            try:
                return render(ev)
            except Exception:  # noqa: BLE001 - a renderer bug must not block the queue: post the line
                log.exception("rendering event %s (%s) failed; posting its line", ev.id, ev.kind)
        return blocks.event_message(ev)

    def _post_event(self, ev) -> None:
        msg = self._render(ev)
        thread_ts = self._daily_parent(local_day(ev.created_at, self.tz)) if self.daily_thread and msg.compact else None
        metadata = {**blocks.event_metadata(ev)}
        metadata["event_payload"] = {**metadata["event_payload"], "run": self.control.run_name}
        try:
            resp = self._post(msg.text, msg.blocks, thread_ts, metadata)
        except SlackApiError as e:
            if _api_error(e) not in PAYLOAD_ERRORS:
                raise
            log.warning("event %s: Slack refused the rendered post (%s); sending plain text", ev.id, _api_error(e))
            resp = self._post(blocks.truncate(msg.text, 3000), None, thread_ts, metadata)
        ts = resp["ts"]
        self.control.mark_delivered(ev.id, self.name, ts)
        self.posted += 1
        follow = self.followups.get(ev.kind)
        if follow is not None:
            try:
                follow(self, ev, ts)
            except Exception:  # noqa: BLE001 - the post is out and marked; a follow-up never re-posts it
                log.exception("follow-up of event %s (%s) failed", ev.id, ev.kind)
        if self.on_posted is not None:
            self.on_posted(ev, ts)

    def _post(self, text: str, blocks_: Optional[list], thread_ts: Optional[str], metadata: dict):
        kw = {"blocks": blocks_} if blocks_ else {}
        if thread_ts:
            kw["thread_ts"] = thread_ts
        return self.client.chat_postMessage(channel=self.channel, text=text, metadata=metadata, unfurl_links=False,
                                            unfurl_media=False, **kw)

    def _daily_parent(self, day: str) -> str:
        """ts of the day's thread parent: known, found in the channel (after a restart), or posted now."""
        if day in self._daily:
            return self._daily[day]
        start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=ZoneInfo(self.tz)).timestamp()
        for m in self._history(start - 60):
            md = m.get("metadata") or {}
            if md.get("event_type") == blocks.DAILY_METADATA_TYPE and (md.get("event_payload") or {}).get("day") == day:
                self._daily[day] = m["ts"]
                return m["ts"]
        msg = blocks.daily_thread_message(day, self.tz)
        resp = self._post(msg.text, msg.blocks, None, blocks.daily_metadata(day))
        self._daily[day] = resp["ts"]
        return resp["ts"]

    # ---- recovery ----

    def recover(self) -> int:
        """Mark the pending events whose post is already in the channel (a crash after chat.postMessage and
        before mark_delivered). Returns how many were found. Raises what the client raises."""
        pending = self.control.pending_events(self.name, limit=1000)
        if not pending:
            return 0
        oldest = min(_epoch(ev.created_at) for ev in pending) - RECOVER_MARGIN_S
        want = {ev.id for ev in pending}
        found: dict[int, str] = {}
        threads: list[str] = []
        for m in self._history(oldest):
            self._note(m, found)
            md = m.get("metadata") or {}
            if md.get("event_type") == blocks.DAILY_METADATA_TYPE:
                day = (md.get("event_payload") or {}).get("day")
                if day:
                    self._daily.setdefault(day, m["ts"])
                if m.get("reply_count"):
                    threads.append(m["ts"])
        for root in threads:
            for m in self._replies(root):
                self._note(m, found)
        n = 0
        for ev in pending:
            if ev.id in found and ev.id in want:
                self.control.mark_delivered(ev.id, self.name, found[ev.id])
                n += 1
        if n:
            log.info("recovered %d event(s) already posted to Slack before a restart", n)
        self.recovered += n
        return n

    def _note(self, m: dict, found: dict[int, str]) -> None:
        md = m.get("metadata") or {}
        p = md.get("event_payload") or {}
        if md.get("event_type") == blocks.EVENT_METADATA_TYPE and p.get("run") == self.control.run_name:
            try:
                found.setdefault(int(p["id"]), m["ts"])
            except (KeyError, TypeError, ValueError):
                pass

    def _history(self, oldest: float) -> Iterator[dict]:
        cursor = None
        while True:
            resp = self.client.conversations_history(channel=self.channel, oldest=f"{max(oldest, 0):.6f}", limit=200,
                                                     include_all_metadata=True, cursor=cursor)
            yield from resp.get("messages") or []
            cursor = (resp.get("response_metadata") or {}).get("next_cursor")
            if not resp.get("has_more") or not cursor:
                return

    def _replies(self, ts: str) -> Iterator[dict]:
        cursor = None
        while True:
            resp = self.client.conversations_replies(channel=self.channel, ts=ts, limit=200, include_all_metadata=True,
                                                     cursor=cursor)
            yield from resp.get("messages") or []
            cursor = (resp.get("response_metadata") or {}).get("next_cursor")
            if not resp.get("has_more") or not cursor:
                return


def _api_error(e: Exception) -> str:
    if isinstance(e, SlackApiError) and e.response is not None:
        try:
            return str(e.response.get("error") or "")
        except Exception:  # noqa: BLE001 - a malformed body is just "no error code"
            return ""
    return ""


def _describe(e: Exception) -> str:
    code = _api_error(e)
    if code:
        return f"{code} (HTTP {e.response.status_code})"
    return f"{type(e).__name__}: {e}"
