"""Outbox delivery to Slack: events posted in order, each post's ts stored, nothing posted twice; the digest's
and a promotion's plot uploaded into the post's thread once, never holding up later posts.

Reads events and marks them delivered through the control API only; renders with bot/blocks.py.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
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
# Plots (files.getUploadURLExternal → POST to its upload_url → files.completeUploadExternal into the thread).
PLOT_MARK = " plot:"  # delivery_ref becomes "<ts> plot:<file id>" once the event's plot is in its thread
UPLOAD_BACKOFF_S = (10.0, 30.0, 60.0, 300.0, 900.0)  # waits after consecutive failed uploads of one plot
UPLOAD_MAX_AGE_S = 24 * 3600.0  # a plot not uploaded within this long after its event is given up (logged)
DIGEST_CACHE = 4  # digests kept from rendering the post to drawing its plot


@dataclass
class Plot:
    """A PNG for an event's thread: its bytes, its title in Slack, alt text, and the line that introduces it."""

    data: bytes
    title: str
    alt_txt: str = ""
    comment: str = ""


@dataclass
class _Upload:
    """A plot owed to a posted event: the post's ts (the thread), failed tries, when to try next (monotonic),
    the plot once drawn, and whether the thread may already hold it (a try failed after sending, or a
    restart before it was recorded)."""

    ev: object
    ts: str
    tries: int = 0
    due: float = 0.0
    plot: Optional[Plot] = None
    check_thread: bool = False


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

    Plots: after an event of a kind in `plots` (default: digest, promotion) is posted, its PNG is uploaded with
    files_upload_v2 into the post's thread, between posts and only while no event waits, so a slow or failing
    file endpoint never holds up or reorders later events. A failed upload is logged and tried again later
    (upload_backoff_s) until upload_max_age_s after its event. Once the file is shared its id is recorded in
    the event's delivery_ref ("<ts> plot:<file id>"); the first pass after a start reads the channel's posts of
    the last upload_max_age_s, and uploads only the plots neither recorded nor found in their thread (by file
    name, blocks.plot_filename), so a restart never uploads a plot twice.
    """

    name = "slack"

    def __init__(self, control: Control, client: WebClient, channel: str, *, daily_thread: bool = False,
                 timezone_: str = "UTC", backoff_s: Sequence[float] = BACKOFF_S, poll_s: float = POLL_S,
                 on_posted: Optional[Callable[[object, str], None]] = None,
                 renderers: Optional[dict[str, Callable[[object], blocks.Message]]] = None,
                 followups: Optional[dict[str, Callable[["Notifier", object, str], None]]] = None,
                 plots: Optional[dict[str, Optional[Callable[[object], Optional[Plot]]]]] = None,
                 upload_backoff_s: Sequence[float] = UPLOAD_BACKOFF_S, upload_max_age_s: float = UPLOAD_MAX_AGE_S):
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
        # (e.g. tell another system); a failed follow-up is logged, never re-posts. Plots are not follow-ups: they
        # are owed until uploaded, and retried (see `plots` below).
        self.renderers = {"digest": self._render_digest, "promotion": self._render_promotion, **(renderers or {})}
        self.followups = dict(followups or {})
        # kind → the plot to upload into the post's thread (None: no plot; a kind mapped to None has none).
        plots = {"digest": self._digest_plot, "promotion": self._promotion_plot, **(plots or {})}
        self.plots = {k: f for k, f in plots.items() if f is not None}
        self.upload_backoff_s = tuple(upload_backoff_s) or UPLOAD_BACKOFF_S
        self.upload_max_age_s = upload_max_age_s
        self.uploaded = 0  # plots uploaded by this notifier
        self.upload_failures = 0  # failed upload tries (all plots, since start)
        self.upload_error = ""  # the last one's reason
        self._uploads: dict[int, _Upload] = {}  # event id → plot owed
        self._scan_needed = True  # look for plots owed from before a restart
        self._digests: dict[int, object] = {}  # event id → loop.digest.Digest rendered for the post
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
                tried: set[int] = set()  # each owed plot is tried at most once per pass
                while True:
                    pending = self.control.pending_events(self.name)
                    if pending:
                        for ev in pending:
                            self._post_event(ev)
                            n += 1
                        continue  # events first; plots only while none waits
                    if not self._upload_next(tried):
                        break
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

    def _digest_of(self, ev):
        until = (ev.payload or {}).get("until")
        return self.control.digest(until=datetime.fromisoformat(until) if until else None)

    def _render_digest(self, ev) -> blocks.Message:
        from bot.digest import digest_text

        d = self._digest_of(ev)
        self._digests[ev.id] = d  # its plot is drawn from the same numbers
        while len(self._digests) > DIGEST_CACHE:
            self._digests.pop(next(iter(self._digests)))
        return blocks.digest_message(ev, digest_text(d))

    def _render_promotion(self, ev) -> blocks.Message:
        pid = (ev.payload or {}).get("promotion_id")
        row = next((p for p in self.control.promotions() if p.id == pid), None) if pid is not None else None
        info = {"budget_s": row.budget_s, "scale_overrides": dict(row.scale_overrides or {}), "seeds": row.seeds} \
            if row is not None else None
        return blocks.promotion_message(ev, info)

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
        if ev.kind in self.plots:
            self._uploads.setdefault(ev.id, _Upload(ev, ts))
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

    # ---- plots ----

    def _digest_plot(self, ev) -> Plot:
        from bot.digest import render_plot

        d = self._digests.pop(ev.id, None) or self._digest_of(ev)
        with tempfile.TemporaryDirectory(prefix="ratchet-plot-") as tmp:
            path = Path(tmp) / "progress.png"
            render_plot(d, path)
            data = path.read_bytes()
        return Plot(data, f"Progress · run {d.run} · {d.until:%Y-%m-%d %H:%M} UTC",
                    f"val_bpb of the run's experiments up to {d.until:%Y-%m-%d %H:%M} UTC, coloured by status, with "
                    "head's running best as a step line", blocks.plot_comment(ev))

    def _promotion_plot(self, ev) -> Optional[Plot]:
        from bot.digest import render_promotion_plot

        p = ev.payload or {}
        result = p.get("result") or {}
        if not result.get("reference_runs") or not result.get("candidate_runs"):
            return None  # a failed promotion has nothing to draw
        scale = str(p.get("scale") or "")
        with tempfile.TemporaryDirectory(prefix="ratchet-plot-") as tmp:
            path = Path(tmp) / "promotion.png"
            render_promotion_plot(result, scale, path)
            data = path.read_bytes()
        return Plot(data, f"Promotion #{p.get('promotion_id')} to {scale}",
                    f"val_bpb at {scale} of the reference and the candidate, one dot per seed", blocks.plot_comment(ev))

    def pending_uploads(self) -> list[int]:
        """Ids of the events whose plot is still owed (waiting for a retry), oldest first."""
        return sorted(self._uploads)

    def _upload_next(self, tried: set[int]) -> bool:
        """Try the oldest owed plot that is due and not tried in this pass. Returns False when there was none.
        Never raises: a failure is logged and the plot waits for a later pass."""
        if self._scan_needed:
            try:
                self._scan_uploads()
                self._scan_needed = False
            except Exception as e:  # noqa: BLE001 - the scan is tried again next pass; posts go on
                log.warning("could not look for plots owed from before the restart: %s", _describe(e))
        now = time.monotonic()
        due = [i for i, u in sorted(self._uploads.items()) if i not in tried and u.due <= now]
        if not due:
            return False
        tried.add(due[0])
        self._try_upload(self._uploads[due[0]])
        return True

    def _try_upload(self, u: _Upload) -> None:
        ev = u.ev
        if time.time() - _epoch(ev.created_at) > self.upload_max_age_s:
            self._uploads.pop(ev.id, None)
            log.error("gave up on the plot of event %s (%s) after %d failed tries: %s", ev.id, ev.kind, u.tries,
                      self.upload_error or "too old")
            return
        try:
            if u.check_thread:  # an earlier try may have shared it before failing (or before a crash)
                found = self._plot_in_thread(ev, u.ts)
                if found is not None:
                    self._record_upload(u, found, uploaded=False)
                    return
                u.check_thread = False
            if u.plot is None:
                u.plot = self.plots[ev.kind](ev)
                if u.plot is None:
                    self._uploads.pop(ev.id, None)
                    return
            u.check_thread = True  # from here on a failure may come after Slack shared the file
            resp = self.client.files_upload_v2(channel=self.channel, thread_ts=u.ts, file=u.plot.data,
                                               filename=blocks.plot_filename(self.control.run_name, ev),
                                               title=u.plot.title, alt_txt=u.plot.alt_txt or None,
                                               initial_comment=u.plot.comment or None)
            self._record_upload(u, str((resp.get("file") or {}).get("id") or ""))
        except Exception as e:  # noqa: BLE001 - a plot never blocks delivery: retried later, logged
            u.tries += 1
            u.due = time.monotonic() + self.upload_backoff_s[min(u.tries - 1, len(self.upload_backoff_s) - 1)]
            self.upload_failures += 1
            self.upload_error = _describe(e)
            if isinstance(e, (SlackApiError, SlackClientError, OSError)):
                log.log(logging.ERROR if _api_error(e) in CONFIG_ERRORS else logging.WARNING,
                        "plot of event %s (%s) not uploaded (try %d): %s; again in %.0f s", ev.id, ev.kind, u.tries,
                        self.upload_error, u.due - time.monotonic())
            else:
                log.exception("plot of event %s (%s) failed (try %d); again later", ev.id, ev.kind, u.tries)

    def _record_upload(self, u: _Upload, file_id: str, uploaded: bool = True) -> None:
        """The plot is in the thread (`uploaded` now, or found there): say so in the event's delivery_ref, so no
        restart uploads it again."""
        self.control.note_delivery(u.ev.id, f"{u.ts}{PLOT_MARK}{file_id or '?'}")
        self._uploads.pop(u.ev.id, None)
        self.uploaded += uploaded
        log.info("plot of event %s (%s) %s its thread (%s)", u.ev.id, u.ev.kind,
                 "uploaded into" if uploaded else "found in", file_id or "no id")

    def _plot_in_thread(self, ev, ts: str) -> Optional[str]:
        """The id of the event's plot among the thread's replies ("" when shared without an id), else None."""
        name = blocks.plot_filename(self.control.run_name, ev)
        for m in self._replies(ts):
            if m.get("ts") == ts:
                continue
            for f in m.get("files") or []:
                if f.get("name") == name:
                    return str(f.get("id") or "")
        return None

    def _scan_uploads(self) -> int:
        """After a start: the plots owed by posts of the last upload_max_age_s (plot kinds, this run) whose
        event records no upload; those already in their thread are recorded, the others queued. Returns how
        many were queued. Raises what the client raises."""
        since = time.time() - self.upload_max_age_s
        posts: list[tuple[int, str, bool]] = []
        for m in self._history(since):
            md = m.get("metadata") or {}
            p = md.get("event_payload") or {}
            if md.get("event_type") == blocks.EVENT_METADATA_TYPE and p.get("run") == self.control.run_name \
                    and p.get("kind") in self.plots:
                try:
                    posts.append((int(p["id"]), m["ts"], bool(m.get("reply_count"))))
                except (KeyError, TypeError, ValueError):
                    continue
        n = 0
        for eid, ts, has_replies in sorted(posts):
            if eid in self._uploads:
                continue
            found = self.control.events_after(eid - 1, limit=1)
            ev = found[0] if found and found[0].id == eid else None
            if ev is None or ev.delivered_at is None or PLOT_MARK in (ev.delivery_ref or ""):
                continue
            u = _Upload(ev, ts)
            file_id = self._plot_in_thread(ev, ts) if has_replies else None
            if file_id is not None:
                self._record_upload(u, file_id, uploaded=False)
                continue
            self._uploads[eid] = u
            n += 1
        if n:
            log.info("%d plot(s) owed from before the restart: uploading", n)
        return n

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


def post_ts(delivery_ref: str) -> str:
    """The Slack ts of an event's post from its delivery_ref ("<ts>", or "<ts> plot:<file id>")."""
    return (delivery_ref or "").split(PLOT_MARK, 1)[0]


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
