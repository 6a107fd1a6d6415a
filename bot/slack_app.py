"""The Slack front: a slack-bolt App (Socket Mode, or HTTP through uvicorn) whose listeners ack at once and
hand the text to bot/commands.py, plus the outbox notifier. Carries text and renders; never decides.

    SLACK_BOT_TOKEN=xoxb-… SLACK_APP_TOKEN=xapp-… SLACK_CHANNEL=C… ratchet serve       # Socket Mode
    SLACK_BOT_TOKEN=xoxb-… SLACK_SIGNING_SECRET=… SLACK_CHANNEL=C… ratchet serve        # HTTP, /slack/events
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional
from urllib.error import URLError

from slack_bolt import App, BoltResponse
from slack_bolt.adapter.asgi import SlackRequestHandler
from slack_bolt.adapter.socket_mode import SocketModeHandler
from slack_bolt.request import BoltRequest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry import RetryHandler
from slack_sdk.http_retry.builtin_handlers import (ConnectionErrorRetryHandler, RateLimitErrorRetryHandler,
                                                   ServerErrorRetryHandler)
from slack_sdk.webhook import WebhookClient

from bot import blocks
from bot.commands import Reply, handle
from bot.notifier import Notifier
from bot.roles import Roles
from loop.control import Control

log = logging.getLogger("ratchet.slack")

SLASH_COMMAND = "/ratchet"
EVENTS_PATH = "/slack/events"
DEDUPE_TTL_S = 3600.0  # Slack retries an event for about an hour at most
DEDUPE_MAX = 20000
WORKERS = 4  # threads that run commands after the ack
LISTENER_THREADS = 16  # bolt's pool that runs listeners until they ack
_MENTION = re.compile(r"<@[UW][A-Z0-9]+(?:\|[^>]*)?>")
_CHANNEL_ID = re.compile(r"[CG][A-Z0-9]{2,}")


class SlackConfigError(ValueError):
    """Slack is configured wrongly (missing channel, rejected token, bad mode); the message says what to set."""


# ---- configuration ----


@dataclass
class SlackConfig:
    """What the Slack front needs. Tokens come from the environment only (SLACK_BOT_TOKEN, SLACK_APP_TOKEN,
    SLACK_SIGNING_SECRET); the rest from Settings (slack_* keys, SLACK_CHANNEL, SLACK_API_URL)."""

    bot_token: str
    channel: str
    app_token: str = ""
    signing_secret: str = ""
    api_url: str = "https://slack.com/api/"
    mode: str = "socket"  # socket | http
    http_host: str = "0.0.0.0"
    http_port: int = 3000
    roles: dict = field(default_factory=dict)
    daily_thread: bool = False
    timezone: str = "UTC"  # the day of the daily thread

    @classmethod
    def from_settings(cls, settings, env: Mapping[str, str] = os.environ) -> "SlackConfig":
        """Build from Settings and the environment. Raises SlackConfigError when something is missing."""
        bot, app, secret = (env.get(k, "").strip() for k in ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN",
                                                            "SLACK_SIGNING_SECRET"))
        mode = settings.slack_mode or ("socket" if app else "http")
        if not bot:
            raise SlackConfigError("Slack needs SLACK_BOT_TOKEN (xoxb-…)")
        if mode == "socket" and not app:
            raise SlackConfigError("Socket Mode needs SLACK_APP_TOKEN (xapp-…, scope connections:write)")
        if mode == "http" and not secret:
            raise SlackConfigError("HTTP mode needs SLACK_SIGNING_SECRET (Basic Information → Signing Secret)")
        if not settings.slack_channel:
            raise SlackConfigError("Slack needs a channel for posts: slack_channel in ratchet.toml or SLACK_CHANNEL "
                                   "(the channel id, C…; invite the app there)")
        if not _CHANNEL_ID.fullmatch(settings.slack_channel):
            raise SlackConfigError(f"slack_channel must be the channel's id (C… or G…, at the bottom of the channel's "
                                   f"details), not {settings.slack_channel!r}")
        return cls(bot_token=bot, app_token=app, signing_secret=secret, channel=settings.slack_channel,
                   api_url=settings.slack_api_url, mode=mode, http_host=settings.slack_http_host,
                   http_port=settings.slack_http_port, roles=dict(settings.slack_roles),
                   daily_thread=settings.slack_daily_thread, timezone=settings.timezone)


def slack_configured(env: Mapping[str, str] = os.environ) -> bool:
    """True when `ratchet serve` should use Slack: a bot token plus an app token (Socket Mode) or a signing
    secret (HTTP mode)."""
    return bool(env.get("SLACK_BOT_TOKEN")) and bool(env.get("SLACK_APP_TOKEN") or env.get("SLACK_SIGNING_SECRET"))


# ---- clients ----


# Calls that post: retried after a connection error only when nothing can have been sent.
NOT_IDEMPOTENT = ("chat.postMessage", "files.completeUploadExternal")


class PostSafeConnectionRetryHandler(ConnectionErrorRetryHandler):
    """slack_sdk's connection-error retries, except a chat.postMessage or files.completeUploadExternal whose
    request may have reached Slack (reset or dropped after sending): retrying that could post (or share a
    plot) twice, so the notifier checks the channel (the thread) first. A refused or unresolvable connection
    (nothing was sent) is retried as usual."""

    def _can_retry(self, *, state, request, response=None, error=None) -> bool:
        if not super()._can_retry(state=state, request=request, response=response, error=error):
            return False
        if request.url.split("?", 1)[0].rstrip("/").endswith(NOT_IDEMPOTENT):
            return isinstance(error, URLError) and isinstance(error.reason, (ConnectionRefusedError, socket.gaierror))
        return True


def retry_handlers(max_retries: int = 2) -> list[RetryHandler]:
    """Retries within one call: 429 after Retry-After, 500/503, connection errors (see above)."""
    return [RateLimitErrorRetryHandler(max_retry_count=max_retries), ServerErrorRetryHandler(max_retry_count=max_retries),
            PostSafeConnectionRetryHandler(max_retry_count=max_retries)]


def make_client(token: str, api_url: str = "https://slack.com/api/", *, max_retries: int = 2,
                timeout: int = 15) -> WebClient:
    """A WebClient for `api_url` (GovSlack / Enterprise / a fake) with the retry handlers above."""
    return WebClient(token=token, base_url=api_url, timeout=timeout, retry_handlers=retry_handlers(max_retries))


# ---- request de-duplication ----


class RecentKeys:
    """Keys seen in the last `ttl_s` seconds (at most `max_keys`), thread-safe: a Slack retry or a Socket Mode
    redelivery of a request already taken is recognised and not executed again."""

    def __init__(self, ttl_s: float = DEDUPE_TTL_S, max_keys: int = DEDUPE_MAX,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_keys, self.clock = ttl_s, max_keys, clock
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def first_time(self, key: str) -> bool:
        """True the first time `key` is offered (and remembers it); False for a repeat."""
        now = self.clock()
        with self._lock:
            while self._seen and (len(self._seen) >= self.max_keys or
                                  now - next(iter(self._seen.values())) > self.ttl_s):
                self._seen.popitem(last=False)
            if key in self._seen:
                return False
            self._seen[key] = now
            return True


def request_key(body: Mapping) -> Optional[str]:
    """What identifies one request from Slack across its retries: the Events API event_id, else the
    trigger_id of a slash command or an interaction. None when there is neither."""
    if body.get("event_id"):
        return f"event:{body['event_id']}"
    if body.get("trigger_id"):
        return f"trigger:{body['trigger_id']}"
    return None


# ---- the app ----


def command_text(text: str) -> str:
    """The subcommand in `/ratchet <text>` or `@ratchet <text>`: mentions removed; empty means help."""
    return _MENTION.sub(" ", text or "").strip() or "help"


class SlackFront:
    """The bolt App and the work behind its listeners.

    Listeners (register_listeners) only ack and submit; the work runs on a small pool: resolve the user's
    role (roles.Roles), run the text through bot/commands.handle (parse, role check, control API, audit),
    answer the user ephemerally, and wake the notifier so state changes reach the channel at once.
    `client` is the bot's WebClient (base_url = SLACK_API_URL); `signing_secret` enables HTTP mode's
    signature check; `verify_token` asks auth.test now (a rejected token raises SlackConfigError).
    """

    def __init__(self, control: Control, client: WebClient, roles: Roles, *, signing_secret: str = "",
                 notify: Callable[[], None] = lambda: None, workers: int = WORKERS, verify_token: bool = True):
        self.control = control
        self.client = client
        self.roles = roles
        self.notify = notify
        self.seen = RecentKeys()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slack-work")
        if verify_token:
            check_token(client)
        self.app = App(client=client, signing_secret=signing_secret, process_before_response=False,
                       token_verification_enabled=False, name="ratchet",
                       listener_executor=ThreadPoolExecutor(max_workers=LISTENER_THREADS,
                                                            thread_name_prefix="slack-listener"))
        register_listeners(self.app, self)

    def submit(self, fn: Callable, *args) -> None:
        """Run fn(*args) after the ack; an error is logged and told to nobody else (the audit has the row)."""
        def run():
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - one failed command must not take the front down
                log.exception("slack: %s failed", getattr(fn, "__name__", fn))

        self.pool.submit(run)

    def close(self) -> None:
        """Stop running commands (queued ones are dropped: they were acked, their users get no answer)."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- the work ----

    def run(self, text: str, user_id: str) -> Reply:
        """One command from a Slack user: role from config, bot/commands.handle, then wake the notifier."""
        role = self.roles.role_of(user_id)
        reply = handle(text, self.control, user=f"<@{user_id}>", backend="slack", role=role)
        self.notify()
        return reply

    def on_slash(self, command: dict) -> None:
        """`/ratchet <text>`: run it; the answer goes to the user only (state changes reach the channel as
        outbox events)."""
        reply = self.run(command_text(command.get("text", "")), command["user_id"])
        self.tell(reply, response_url=command.get("response_url"), channel=command.get("channel_id"),
                  user=command["user_id"])

    def on_mention(self, event: dict) -> None:
        """`@ratchet <text>` in a channel: run it; answer ephemerally in the same place."""
        if event.get("bot_id") or not event.get("user"):
            return
        reply = self.run(command_text(event.get("text", "")), event["user"])
        self.tell(reply, channel=event["channel"], user=event["user"], thread_ts=event.get("thread_ts"))

    def on_button(self, body: dict, text: str) -> None:
        """A button on a post: the same grammar (`pause`, `resume`, `revert 12`, `promote 12`)."""
        user = body["user"]["id"]
        reply = self.run(text, user)
        if reply.ok and text.startswith("revert ") and body.get("message"):
            container = body.get("container") or {}
            try:
                self.client.chat_update(channel=container.get("channel_id") or body["channel"]["id"],
                                        ts=container.get("message_ts") or body["message"]["ts"],
                                        text=body["message"].get("text", ""),
                                        blocks=blocks.reverted_blocks(body["message"].get("blocks", []),
                                                                      f"<@{user}>"))
            except (SlackApiError, SlackClientError, OSError) as e:
                log.warning("could not mark the kept post as reverted: %s", e)
        self.tell(reply, response_url=body.get("response_url"), channel=(body.get("channel") or {}).get("id"),
                  user=user)

    def on_show_diff(self, body: dict, exp_id: str) -> None:
        """Show diff: the diff goes into the post's thread (for everyone looking at the post)."""
        user = body["user"]["id"]
        reply = self.run(f"diff {exp_id}", user)
        container = body.get("container") or {}
        channel = container.get("channel_id") or (body.get("channel") or {}).get("id")
        thread = container.get("message_ts") or (body.get("message") or {}).get("ts")
        if not reply.ok or not channel or not thread:
            self.tell(reply, response_url=body.get("response_url"), channel=channel, user=user)
            return
        for part in blocks.diff_messages(reply.text, int(exp_id)):
            self.client.chat_postMessage(channel=channel, thread_ts=thread, text=part, unfurl_links=False)

    def tell(self, reply: Reply, *, response_url: Optional[str] = None, channel: Optional[str] = None,
             user: Optional[str] = None, thread_ts: Optional[str] = None) -> None:
        """Answer one user only: through the response_url when there is one, else chat.postEphemeral."""
        text = blocks.reply_text(reply.text if reply.ok else f"✗ {reply.text}")
        if response_url:
            resp = WebhookClient(response_url, retry_handlers=retry_handlers()).send(
                text=text, response_type="ephemeral", replace_original=False)
            if resp.status_code == 200:
                return
            log.warning("response_url answered %s; trying chat.postEphemeral", resp.status_code)
        if channel and user:
            kw = {"thread_ts": thread_ts} if thread_ts else {}
            self.client.chat_postEphemeral(channel=channel, user=user, text=text, **kw)


def check_token(client: WebClient) -> Optional[dict]:
    """auth.test: returns its answer, None when Slack cannot be reached now (the service starts anyway and
    delivery waits). Raises SlackConfigError when Slack rejects the token."""
    try:
        return client.auth_test().data
    except SlackApiError as e:
        raise SlackConfigError(f"Slack rejected SLACK_BOT_TOKEN: {e.response.get('error')}") from None
    except (SlackClientError, OSError) as e:
        log.warning("Slack not reachable at start-up (%s); commands and posts wait for it", e)
        return None


def register_listeners(app: App, front: SlackFront) -> None:
    """One small listener per command, event and button: ack, then hand the work to `front` (after the ack).
    A repeat of a request already taken (a Slack retry, X-Slack-Retry-Num) is acked and dropped."""

    @app.middleware
    def drop_repeats(body, next, logger):
        key = request_key(body)
        if key is not None and not front.seen.first_time(key):
            logger.info("slack: repeat of %s dropped", key)
            return BoltResponse(status=200, body="")
        return next()

    @app.command(SLASH_COMMAND)
    def ratchet_command(ack, command):
        ack()
        front.submit(front.on_slash, command)

    @app.event("app_mention")  # events are acked by bolt before the listener runs
    def ratchet_mention(event):
        front.submit(front.on_mention, event)

    @app.action(blocks.PAUSE)
    def pause_clicked(ack, body):
        ack()
        front.submit(front.on_button, body, "pause")

    @app.action(blocks.RESUME)
    def resume_clicked(ack, body):
        ack()
        front.submit(front.on_button, body, "resume")

    @app.action(blocks.REVERT)
    def revert_clicked(ack, body, action):
        ack()
        front.submit(front.on_button, body, f"revert {action['value']}")

    @app.action(blocks.PROMOTE)
    def promote_clicked(ack, body, action):
        ack()
        front.submit(front.on_button, body, f"promote {action['value']}")

    @app.action(blocks.SHOW_DIFF)
    def show_diff_clicked(ack, body, action):
        ack()
        front.submit(front.on_show_diff, body, action["value"])


# ---- HTTP mode ----


class ThreadedSlackRequestHandler(SlackRequestHandler):
    """bolt's ASGI adapter, with the (blocking) App.dispatch moved off the event loop, so one slow request
    never delays the acks of the others."""

    async def dispatch(self, request) -> BoltResponse:
        body = await request.get_raw_body()
        req = BoltRequest(body=body, query=request.query_string, headers=request.get_headers())
        return await asyncio.to_thread(self.app.dispatch, req)


class HttpServer:
    """uvicorn serving the App at http://host:port/slack/events (the Events API / interactivity / slash
    command request URL), in a thread. Signatures are checked by bolt (X-Slack-Signature, 5-minute window)."""

    def __init__(self, app: App, host: str = "0.0.0.0", port: int = 3000, path: str = EVENTS_PATH):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}{path}"
        config = uvicorn.Config(ThreadedSlackRequestHandler(app, path), log_level="warning", lifespan="off",
                                access_log=False, timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Serve in a daemon thread; returns once uvicorn listens (or after 10 s)."""
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="slack-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.time() + 10
        while not self.server.started and time.time() < deadline and self._thread.is_alive():
            time.sleep(0.01)

    def close(self) -> None:
        """Stop serving (in-flight requests get up to 3 s) and release the port."""
        self.server.should_exit = True
        if self._thread:
            self._thread.join(timeout=5)
        self.sock.close()


# ---- Socket Mode ----


class SocketServer:
    """slack_bolt's SocketModeHandler (slack_sdk's built-in client) with a connect that retries in the
    background while Slack is unreachable, so the service starts anyway."""

    def __init__(self, app: App, app_token: str, client: WebClient, backoff_s: tuple = (1, 2, 5, 10, 30, 60)):
        self.handler = SocketModeHandler(app, app_token, web_client=client, concurrency=8)
        self.backoff_s = backoff_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Connect in the background (apps.connections.open, then the WebSocket), retrying with back-off."""
        self._thread = threading.Thread(target=self._connect, name="slack-socket-connect", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        for attempt in range(10**9):
            try:
                self.handler.connect()
                log.info("Socket Mode connected")
                return
            except Exception as e:  # noqa: BLE001 - any failure to connect is retried
                self.handler.client.wss_uri = None  # ask apps.connections.open for a fresh URL
                delay = self.backoff_s[min(attempt, len(self.backoff_s) - 1)]
                log.warning("Socket Mode connect failed (%s); again in %s s", e, delay)
                if self._stop.wait(delay):
                    return

    def connected(self) -> bool:
        """True while the WebSocket session is open."""
        return self.handler.client.is_connected()

    def close(self) -> None:
        """Disconnect without waiting on the client's receive and message threads (they block up to ~1 s)."""
        self._stop.set()
        client = self.handler.client
        client.closed, client.auto_reconnect_enabled = True, False
        session = client.current_session
        sock = getattr(session, "sock", None)
        try:
            if sock is not None:  # wake the receiving thread, which holds the socket until data arrives
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        client.message_queue.put("{}")  # and the message thread, waiting up to 1 s on its queue (a no-op message)
        try:
            self.handler.close()
        except Exception:  # noqa: BLE001 - closing a half-open connection
            log.debug("socket close", exc_info=True)


# ---- the backend `ratchet serve` uses ----


class SlackBackend:
    """What `ratchet serve` runs instead of the shell: the notifier plus the App in Socket Mode or HTTP mode.

    deliver() only wakes the notifier (non-blocking: the engine calls it while holding its lock).
    """

    name = "slack"
    read_commands = False

    def __init__(self, config: SlackConfig, control: Control, *, client: Optional[WebClient] = None,
                 notifier_backoff_s: Optional[tuple] = None, on_posted: Optional[Callable[[object, str], None]] = None):
        self.config = config
        self.control = control
        self.client = client or make_client(config.bot_token, config.api_url)
        kw = {"backoff_s": notifier_backoff_s} if notifier_backoff_s else {}
        self.notifier = Notifier(control, self.client, config.channel, daily_thread=config.daily_thread,
                                 timezone_=config.timezone, on_posted=on_posted, **kw)
        self.front = SlackFront(control, self.client, Roles(config.roles, self.client),
                                signing_secret=config.signing_secret if config.mode == "http" else "",
                                notify=self.notifier.wake)
        if config.mode == "http":
            self.server = HttpServer(self.front.app, config.http_host, config.http_port)
        else:
            self.server = SocketServer(self.front.app, config.app_token, self.client)

    def describe(self) -> str:
        """One line for the console: mode, channel, where requests come in."""
        where = "Socket Mode" if self.config.mode == "socket" else f"HTTP mode at {self.server.url}"
        return f"slack: {where}, posting to {self.config.channel}, API {self.config.api_url}"

    def start(self) -> None:
        """Start delivering the outbox and taking commands."""
        self.notifier.start()
        self.server.start()

    def takes_commands(self) -> bool:
        """Always: Slack can send a command at any time."""
        return True

    def deliver(self) -> int:
        """Ask the notifier for a delivery pass now; returns at once (0: nothing was posted by this call)."""
        self.notifier.wake()
        return 0

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Stop taking commands, post what is pending (bounded), close."""
        self.server.close()
        self.front.close()
        self.notifier.stop(flush_timeout)
