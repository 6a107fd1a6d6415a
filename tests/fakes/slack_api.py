"""A fake Slack on 127.0.0.1 (port 0) for the real `slack_bolt` / `slack_sdk` clients: the Web API over HTTP,
Socket Mode over WebSocket, response_url webhooks, the external file upload; every call recorded, errors
scripted. Tests only.

Point a client at it with `WebClient(token, base_url=fake.api_url)`; `apps.connections.open` hands out a
ws:// URL to the fake's own Socket Mode server, which pushes envelopes (`slash_command`, `block_action`,
`app_mention`) and records each ack with its time.

Files go the way `files_upload_v2` sends them: `files.getUploadURLExternal` (filename, length) answers a
file_id and an upload_url on the fake (`/upload/v1/<file_id>`); the client POSTs the raw bytes there; then
`files.completeUploadExternal` (files=[{id, title}], channel_id, thread_ts, initial_comment) shares the file:
a message with `files` appears in the channel or the thread, as in Slack. `uploads[file_id]` keeps each one.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.parse
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve

BOT_USER = "UBOT"
BOT_ID = "B0BOT"
TEAM = "T0FAKE"
APP_ID = "A0RATCHET"
BOT_TOKEN = "xoxb-fake-bot-token"
APP_TOKEN = "xapp-fake-app-token"
UPLOAD = "upload"  # the "method" of the POST of a file's bytes to its upload_url: fail(UPLOAD, ...) scripts it
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Reply:
    """One scripted HTTP answer: status, JSON body, extra headers."""

    status: int
    body: dict
    headers: dict = field(default_factory=dict)


@dataclass
class Call:
    """One Web API call as the fake saw it: method (e.g. "chat.postMessage"), merged arguments (query, form or
    JSON body), the token used, lower-case headers, the reply status and body, and when (time.time())."""

    method: str
    args: dict
    token: str
    headers: dict
    status: int = 200
    reply: dict = field(default_factory=dict)
    at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.reply.get("ok"))


@dataclass
class Upload:
    """One external upload: what files.getUploadURLExternal was told, the bytes POSTed to the upload_url
    (None until then), and where files.completeUploadExternal shared it (None until then)."""

    file_id: str
    filename: str
    length: int
    alt_txt: str = ""
    data: Optional[bytes] = None
    completed: Optional[dict] = None  # {channel_id, thread_ts, title, initial_comment, ts of the share message}

    @property
    def is_png(self) -> bool:
        return bool(self.data) and self.data.startswith(PNG_MAGIC)


def ratelimited(retry_after: int = 1) -> Reply:
    """HTTP 429 with Retry-After (seconds), as Slack sends it for rate-limited methods."""
    return Reply(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(retry_after)})


def api_error(error: str) -> Reply:
    """HTTP 200 with {"ok": false, "error": error}, e.g. invalid_auth, channel_not_found."""
    return Reply(200, {"ok": False, "error": error})


def server_error(status: int = 500) -> Reply:
    """An HTTP 5xx with Slack's usual body."""
    return Reply(status, {"ok": False, "error": "internal_error"})


# Block Kit limits (https://api.slack.com/reference/block-kit/blocks): checked so a rendering bug fails here
# the way it would fail in Slack, with invalid_blocks.
def _block_problem(blocks: Any) -> Optional[str]:
    if not isinstance(blocks, list) or len(blocks) > 50:
        return "blocks must be a list of at most 50"
    for b in blocks:
        t = b.get("type")
        if t == "header" and (b["text"]["type"] != "plain_text" or len(b["text"]["text"]) > 150):
            return "header text must be plain_text of at most 150 characters"
        if t == "section":
            if "text" not in b and "fields" not in b:
                return "section needs text or fields"
            if "text" in b and not 1 <= len(b["text"]["text"]) <= 3000:
                return "section text must be 1-3000 characters"
            if len(b.get("fields", [])) > 10 or any(len(f["text"]) > 2000 for f in b.get("fields", [])):
                return "section fields: at most 10 of at most 2000 characters"
            if "accessory" in b and (p := _element_problem(b["accessory"])):
                return p
        elif t == "actions":
            if not 1 <= len(b["elements"]) <= 25:
                return "actions need 1-25 elements"
            ids = [e.get("action_id") for e in b["elements"]]
            if len(set(ids)) != len(ids):
                return "action_id must be unique within a block"
            for e in b["elements"]:
                if p := _element_problem(e):
                    return p
        elif t == "context":
            if not 1 <= len(b["elements"]) <= 10:
                return "context needs 1-10 elements"
        elif t not in ("header", "divider", "rich_text", "image"):
            return f"unknown block type {t!r}"
        if len(b.get("block_id", "")) > 255:
            return "block_id too long"
    return None


def _element_problem(e: dict) -> Optional[str]:
    if e.get("type") != "button":
        return None
    if e["text"]["type"] != "plain_text" or len(e["text"]["text"]) > 75:
        return "button text must be plain_text of at most 75 characters"
    if len(e.get("value", "")) > 2000 or len(e.get("action_id", "")) > 255:
        return "button value or action_id too long"
    if e.get("style") not in (None, "primary", "danger"):
        return "button style must be primary or danger"
    c = e.get("confirm")
    if c is not None and not all(k in c for k in ("title", "text", "confirm", "deny")):
        return "confirm needs title, text, confirm and deny"
    return None


class FakeSlack:
    """The fake: `api_url` is the WebClient base_url; `messages[channel]` the posted messages (thread replies
    included, each with its ts and metadata); `calls` every Web API call; `responses` every response_url
    post; `ephemerals` every chat.postEphemeral; `acks[envelope_id]` the Socket Mode acks; `uploads[file_id]`
    every external upload (`shared_files()` the completed ones).

    `fail(method, *replies)` queues scripted answers for one method (served before the normal ones;
    `fail(UPLOAD, ...)` for the POST of a file's bytes to its upload_url); `down()` makes the Web API refuse
    connections until `up()`. Use as a context manager.
    """

    def __init__(self, usergroups: Optional[dict[str, list[str]]] = None):
        self.usergroups: dict[str, list[str]] = dict(usergroups or {})
        self.calls: list[Call] = []
        self.messages: dict[str, list[dict]] = defaultdict(list)
        self.ephemerals: list[dict] = []
        self.responses: list[dict] = []
        self.acks: dict[str, tuple[float, dict]] = {}
        self.sent_at: dict[str, float] = {}
        self.uploads: dict[str, Upload] = {}
        self._scripted: dict[str, deque[Reply]] = defaultdict(deque)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._last_ts = 0.0
        self._ids = itertools.count(1)
        self._is_down = False
        self._http = self._bind_http(0)
        self.port = self._http.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = self.url + "/api/"
        self._http_thread: Optional[threading.Thread] = None
        self._ws = serve(self._ws_session, "127.0.0.1", 0, compression=None, ping_interval=None)
        self.ws_url = f"ws://127.0.0.1:{self._ws.socket.getsockname()[1]}/link/"
        self._ws_thread = threading.Thread(target=self._ws.serve_forever, name="fake-slack-ws", daemon=True)
        self._conns: list[ServerConnection] = []
        self._send_lock = threading.Lock()
        self.connections_opened = 0

    # ---- lifecycle ----

    def start(self) -> "FakeSlack":
        self._start_http()
        self._ws_thread.start()
        return self

    def stop(self) -> None:
        if not self._is_down:
            self._stop_http()
        self._ws.shutdown()
        self._ws_thread.join(timeout=5)

    def __enter__(self) -> "FakeSlack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def down(self) -> None:
        """A Slack outage: the Web API refuses connections (the listening socket is closed) until up()."""
        with self._lock:
            if self._is_down:
                return
            self._is_down = True
        self._stop_http()

    def up(self) -> None:
        """End the outage: listen again on the same port."""
        with self._lock:
            if not self._is_down:
                return
            self._http = self._bind_http(self.port)
            self._is_down = False
        self._start_http()

    def _bind_http(self, port: int) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        server.daemon_threads = True
        return server

    def _start_http(self) -> None:
        self._http_thread = threading.Thread(target=self._http.serve_forever, args=(0.05,), name="fake-slack-http",
                                             daemon=True)
        self._http_thread.start()

    def _stop_http(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        if self._http_thread:
            self._http_thread.join(timeout=5)

    # ---- scripting and inspection ----

    def fail(self, method: str, *replies: Reply) -> None:
        """Answer the next calls of `method` with `replies`, in order (then normally again)."""
        with self._lock:
            self._scripted[method].extend(replies)

    def calls_to(self, method: str) -> list[Call]:
        """Every recorded call of one Web API method, oldest first."""
        with self._lock:
            return [c for c in self.calls if c.method == method]

    def posts(self, channel: Optional[str] = None) -> list[dict]:
        """Messages posted (chat.postMessage that succeeded), oldest first; thread replies included."""
        with self._lock:
            chans = [channel] if channel else list(self.messages)
            return sorted((m for c in chans for m in self.messages.get(c, [])), key=lambda m: float(m["ts"]))

    def event_posts(self, channel: Optional[str] = None) -> list[dict]:
        """Posted messages that carry a ratchet event id in their metadata, oldest first."""
        return [m for m in self.posts(channel) if m.get("metadata", {}).get("event_type") == "ratchet_event"]

    def shared_files(self, channel: Optional[str] = None, thread_ts: Optional[str] = None) -> list[Upload]:
        """Uploads completed into `channel` (any when None) and, when given, into the thread of `thread_ts`;
        oldest first."""
        with self._lock:
            return [u for u in self.uploads.values() if u.completed
                    and (channel is None or u.completed["channel_id"] == channel)
                    and (thread_ts is None or u.completed.get("thread_ts") == thread_ts)]

    def wait_for(self, cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
        """Block until cond() is truthy (re-checked on every change, and every 50 ms); return its value."""
        deadline = time.time() + timeout
        with self._changed:
            while True:
                v = cond()
                if v:
                    return v
                left = deadline - time.time()
                if left <= 0:
                    raise AssertionError(f"fake slack: timed out waiting for {what}")
                self._changed.wait(min(left, 0.05))

    # ---- Socket Mode ----

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Block until a Socket Mode client is connected."""
        self.wait_for(lambda: self._conns, timeout, "a Socket Mode connection")

    def push(self, kind: str, payload: dict, *, retry_attempt: int = 0, retry_reason: str = "",
             envelope_id: Optional[str] = None, accepts_response_payload: bool = False) -> str:
        """Send one envelope on the newest Socket Mode connection; returns its envelope_id."""
        self.wait_connected()
        eid = envelope_id or f"env-{next(self._ids):06d}"
        env = {"envelope_id": eid, "type": kind, "payload": payload,
               "accepts_response_payload": accepts_response_payload}
        if kind == "events_api":
            env.update(retry_attempt=retry_attempt, retry_reason=retry_reason)
        data = json.dumps(env)
        with self._send_lock:
            conn = self._conns[-1]
            with self._lock:
                self.sent_at.setdefault(eid, time.time())
            conn.send(data)
        return eid

    def slash_command(self, text: str, *, user: str = "U0VIEWER", channel: str = "C0RATCHET",
                      command: str = "/ratchet", trigger_id: Optional[str] = None,
                      envelope_id: Optional[str] = None) -> str:
        """Push a slash_commands envelope (`/ratchet <text>` typed by `user`); returns its envelope_id."""
        return self.push("slash_commands", self.slash_payload(text, user=user, channel=channel, command=command,
                                                              trigger_id=trigger_id),
                         envelope_id=envelope_id, accepts_response_payload=True)

    def slash_payload(self, text: str, *, user: str = "U0VIEWER", channel: str = "C0RATCHET",
                      command: str = "/ratchet", trigger_id: Optional[str] = None) -> dict:
        """The slash command payload Slack sends (form fields in HTTP mode, `payload` in Socket Mode)."""
        n = next(self._ids)
        return {"token": "legacy-verification-token", "team_id": TEAM, "team_domain": "fake",
                "channel_id": channel, "channel_name": "ratchet", "user_id": user, "user_name": user.lower(),
                "command": command, "text": text, "api_app_id": APP_ID, "is_enterprise_install": "false",
                "response_url": f"{self.url}/respond/{n}", "trigger_id": trigger_id or f"trig.{n}.{time.time_ns()}"}

    def block_action(self, message: dict, action_id: str, *, user: str = "U0VIEWER", channel: str = "C0RATCHET",
                     trigger_id: Optional[str] = None) -> str:
        """Push an interactive block_actions envelope: `user` clicked the button `action_id` of `message` (a
        posted message, as in `posts()`), after its confirm dialog if it has one. Returns the envelope_id."""
        button = next(e for b in message.get("blocks", []) for e in
                      (b.get("elements", []) if b["type"] == "actions" else [b.get("accessory") or {}])
                      if e.get("action_id") == action_id)
        n = next(self._ids)
        payload = {"type": "block_actions", "user": {"id": user, "username": user.lower(), "name": user.lower(),
                                                     "team_id": TEAM},
                   "api_app_id": APP_ID, "token": "legacy-verification-token",
                   "container": {"type": "message", "message_ts": message["ts"], "channel_id": channel,
                                 "is_ephemeral": False},
                   "trigger_id": trigger_id or f"trig.{n}.{time.time_ns()}", "team": {"id": TEAM, "domain": "fake"},
                   "channel": {"id": channel, "name": "ratchet"}, "message": message,
                   "response_url": f"{self.url}/respond/{n}",
                   "actions": [{"action_id": action_id, "block_id": "b", "text": button["text"],
                                "value": button.get("value", ""), "type": "button", "action_ts": f"{time.time():.6f}"}]}
        return self.push("interactive", payload)

    def app_mention(self, text: str, *, user: str = "U0VIEWER", channel: str = "C0RATCHET",
                    event_id: Optional[str] = None, retry_attempt: int = 0, envelope_id: Optional[str] = None) -> str:
        """Push an events_api envelope with an app_mention (`<@UBOT> text`); returns its envelope_id."""
        n = next(self._ids)
        ts = self._next_ts()
        payload = {"token": "legacy-verification-token", "team_id": TEAM, "api_app_id": APP_ID,
                   "event": {"type": "app_mention", "user": user, "text": f"<@{BOT_USER}> {text}", "ts": ts,
                             "channel": channel, "event_ts": ts},
                   "type": "event_callback", "event_id": event_id or f"Ev{n:08d}", "event_time": int(time.time()),
                   "authorizations": [{"team_id": TEAM, "user_id": BOT_USER, "is_bot": True}]}
        return self.push("events_api", payload, retry_attempt=retry_attempt,
                         retry_reason="timeout" if retry_attempt else "", envelope_id=envelope_id)

    def wait_ack(self, envelope_id: str, timeout: float = 5.0) -> dict:
        """The ack's payload once the app acked `envelope_id` (raises AssertionError after `timeout`)."""
        return self.wait_for(lambda: self.acks.get(envelope_id), timeout, f"ack of {envelope_id}")[1]

    def ack_latency(self, envelope_id: str) -> float:
        """Seconds from sending the envelope to receiving its ack."""
        with self._lock:
            return self.acks[envelope_id][0] - self.sent_at[envelope_id]

    def _ws_session(self, conn: ServerConnection) -> None:
        with self._lock:
            self._conns.append(conn)
            self._changed.notify_all()
        conn.send(json.dumps({"type": "hello", "num_connections": len(self._conns),
                              "debug_info": {"host": "fake-slack", "approximate_connection_time": 18060},
                              "connection_info": {"app_id": APP_ID}}))
        try:
            for raw in conn:
                try:
                    msg = json.loads(raw)
                except (TypeError, ValueError):
                    continue
                if "envelope_id" in msg:
                    with self._lock:
                        self.acks.setdefault(msg["envelope_id"], (time.time(), msg.get("payload") or {}))
                        self._changed.notify_all()
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    # ---- Web API ----

    def _next_ts(self) -> str:
        """Slack's ts: epoch seconds with microseconds, unique and increasing within a channel."""
        with self._lock:
            self._last_ts = max(time.time(), self._last_ts + 1e-6)
            return f"{self._last_ts:.6f}"

    def _answer(self, method: str, args: dict, token: str) -> Reply:
        if method == "apps.connections.open":
            if not token.startswith("xapp-"):
                return api_error("invalid_auth")
            with self._lock:
                self.connections_opened += 1
            return Reply(200, {"ok": True, "url": f"{self.ws_url}?ticket=fake-{next(self._ids)}&app_id={APP_ID}"})
        if not token.startswith("xoxb-"):
            return api_error("not_authed" if not token else "invalid_auth")
        if method == "auth.test":
            return Reply(200, {"ok": True, "url": "https://fake.slack.com/", "team": "fake", "user": "ratchet",
                               "team_id": TEAM, "user_id": BOT_USER, "bot_id": BOT_ID, "is_enterprise_install": False})
        if method == "chat.postMessage":
            return self._post(args)
        if method == "chat.update":
            with self._lock:
                for m in self.messages.get(args.get("channel", ""), []):
                    if m["ts"] == args.get("ts"):
                        if args.get("blocks") is not None and (p := _block_problem(_loads(args["blocks"]))):
                            return Reply(200, {"ok": False, "error": "invalid_blocks", "errors": [p]})
                        m.update(text=args.get("text", m["text"]), blocks=_loads(args.get("blocks", m.get("blocks"))),
                                 edited={"user": BOT_USER, "ts": self._next_ts()})
                        return Reply(200, {"ok": True, "channel": args["channel"], "ts": m["ts"], "text": m["text"]})
            return api_error("message_not_found")
        if method == "chat.postEphemeral":
            if not args.get("channel") or not args.get("user"):
                return api_error("invalid_arguments")
            with self._lock:
                self.ephemerals.append(dict(args))
            return Reply(200, {"ok": True, "message_ts": self._next_ts()})
        if method in ("conversations.history", "conversations.replies"):
            return self._history(method, args)
        if method == "files.getUploadURLExternal":
            return self._upload_url(args)
        if method == "files.completeUploadExternal":
            return self._complete_upload(args)
        if method == "usergroups.users.list":
            users = self.usergroups.get(args.get("usergroup", ""))
            return Reply(200, {"ok": True, "users": users}) if users is not None else api_error("no_such_subteam")
        if method == "users.info":
            uid = args.get("user", "")
            return Reply(200, {"ok": True, "user": {"id": uid, "name": uid.lower(), "real_name": uid}})
        return api_error("unknown_method")

    def _post(self, args: dict) -> Reply:
        channel = args.get("channel")
        if not channel:
            return api_error("channel_not_found")
        blocks = _loads(args.get("blocks"))
        if not args.get("text") and not blocks:
            return api_error("no_text")
        if blocks is not None and (p := _block_problem(blocks)):
            return Reply(200, {"ok": False, "error": "invalid_blocks", "errors": [p]})
        if len(args.get("text") or "") > 40000:
            return api_error("msg_too_long")
        msg = {"type": "message", "ts": self._next_ts(), "user": BOT_USER, "bot_id": BOT_ID, "app_id": APP_ID,
               "text": args.get("text", ""), "team": TEAM}
        if blocks is not None:
            msg["blocks"] = blocks
        if args.get("thread_ts"):
            msg["thread_ts"] = args["thread_ts"]
        metadata = _loads(args.get("metadata"))
        if metadata:
            msg["metadata"] = metadata
        with self._lock:
            if args.get("thread_ts"):
                parent = next((m for m in self.messages[channel] if m["ts"] == args["thread_ts"]), None)
                if parent is None:
                    return api_error("thread_not_found")
                parent["reply_count"] = parent.get("reply_count", 0) + 1
                parent.setdefault("thread_ts", parent["ts"])
            self.messages[channel].append(msg)
        return Reply(200, {"ok": True, "channel": channel, "ts": msg["ts"], "message": msg})

    def _upload_url(self, args: dict) -> Reply:
        try:
            length = int(args.get("length") or 0)
        except ValueError:
            length = 0
        if not args.get("filename") or length <= 0:
            return api_error("invalid_arguments")
        file_id = f"F{next(self._ids):010d}"
        with self._lock:
            self.uploads[file_id] = Upload(file_id, args["filename"], length, args.get("alt_txt") or "")
        return Reply(200, {"ok": True, "upload_url": f"{self.url}/upload/v1/{file_id}", "file_id": file_id})

    def _receive_file(self, path: str, headers: dict, raw: bytes) -> Reply:
        """The POST of a file's bytes to its upload_url (raw body, as slack_sdk sends it)."""
        file_id = path.rstrip("/").rsplit("/", 1)[-1]
        with self._lock:
            scripted = self._scripted[UPLOAD].popleft() if self._scripted[UPLOAD] else None
            up = self.uploads.get(file_id)
            if scripted is not None:
                reply = scripted
            elif up is None:
                reply = Reply(404, {"ok": False, "error": "not_found"})
            else:
                up.data = raw
                reply = Reply(200, {"ok": True})
            self.calls.append(Call(UPLOAD, {"file_id": file_id, "length": len(raw)}, "", headers, reply.status,
                                   reply.body, time.time()))
            self._changed.notify_all()
        return reply

    def _complete_upload(self, args: dict) -> Reply:
        files = _loads(args.get("files"))
        if not isinstance(files, list) or not files or not all(isinstance(f, dict) and f.get("id") for f in files):
            return api_error("invalid_arguments")
        channel, thread_ts = args.get("channel_id") or "", args.get("thread_ts") or ""
        with self._lock:
            ups = [self.uploads.get(f["id"]) for f in files]
            # never uploaded, bytes not matching the announced length, or completed already ("can only be
            # called once"): the fake answers file_not_found for all three
            if any(u is None or u.data is None or len(u.data) != u.length or u.completed for u in ups):
                return api_error("file_not_found")
            if thread_ts and not channel:
                return api_error("invalid_arguments")
            parent = None
            if thread_ts:
                parent = next((m for m in self.messages.get(channel, []) if m["ts"] == thread_ts), None)
                if parent is None or parent.get("thread_ts", parent["ts"]) != parent["ts"]:
                    return api_error("thread_not_found")  # unknown, or a reply's ts instead of its parent's
            share_ts = self._next_ts() if channel else ""
            objs = []
            for u, f in zip(ups, files):
                title = f.get("title") or u.filename
                u.completed = {"channel_id": channel, "thread_ts": thread_ts, "title": title,
                               "initial_comment": args.get("initial_comment") or "", "ts": share_ts}
                objs.append({"id": u.file_id, "name": u.filename, "title": title, "size": len(u.data),
                             "mimetype": "image/png" if u.is_png else "application/octet-stream",
                             "filetype": "png" if u.is_png else "binary", "alt_txt": u.alt_txt, "user": BOT_USER})
            if channel:
                msg = {"type": "message", "ts": share_ts, "user": BOT_USER, "bot_id": BOT_ID, "app_id": APP_ID,
                       "text": args.get("initial_comment") or "", "team": TEAM, "upload": True, "files": objs}
                if parent is not None:
                    msg["thread_ts"] = thread_ts
                    parent["reply_count"] = parent.get("reply_count", 0) + 1
                    parent.setdefault("thread_ts", parent["ts"])
                self.messages[channel].append(msg)
        return Reply(200, {"ok": True, "files": [{"id": o["id"], "title": o["title"]} for o in objs]})

    def _history(self, method: str, args: dict) -> Reply:
        channel = args.get("channel", "")
        limit = int(args.get("limit") or 100)
        offset = int(args.get("cursor") or 0)
        oldest = float(args.get("oldest") or 0)
        with self._lock:
            if method == "conversations.history":
                rows = [m for m in self.messages.get(channel, []) if m.get("thread_ts", m["ts"]) == m["ts"]]
                rows = sorted(rows, key=lambda m: -float(m["ts"]))  # newest first
            else:
                root = args.get("ts", "")
                rows = [m for m in self.messages.get(channel, []) if m["ts"] == root or m.get("thread_ts") == root]
                if not rows:
                    return api_error("thread_not_found")
                rows = sorted(rows, key=lambda m: float(m["ts"]))
            rows = [m for m in rows if float(m["ts"]) > oldest]
            page = rows[offset:offset + limit]
            if str(args.get("include_all_metadata", "")).lower() not in ("1", "true"):
                page = [{k: v for k, v in m.items() if k != "metadata"} for m in page]
            more = offset + limit < len(rows)
        body = {"ok": True, "messages": json.loads(json.dumps(page)), "has_more": more,
                "response_metadata": {"next_cursor": str(offset + limit) if more else ""}}
        return Reply(200, body)

    def _handle(self, path: str, headers: dict, args: dict) -> Reply:
        if path.startswith("/respond/"):
            with self._lock:
                self.responses.append({"path": path, "at": time.time(), **args})
                self._changed.notify_all()
            return Reply(200, {"ok": True})
        if not path.startswith("/api/"):
            return Reply(404, {"ok": False, "error": "not_found"})
        method = path[len("/api/"):].split("?")[0]
        auth = headers.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else args.pop("token", "")
        with self._lock:
            scripted = self._scripted[method].popleft() if self._scripted[method] else None
        reply = scripted or self._answer(method, args, token)
        with self._lock:
            self.calls.append(Call(method, args, token, headers, reply.status, reply.body, time.time()))
            self._changed.notify_all()
        return reply

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                url = urllib.parse.urlsplit(self.path)
                if url.path.startswith("/upload/v1/"):
                    reply = fake._receive_file(url.path, headers, raw)
                    # Slack's upload endpoint answers plain text ("OK - <bytes>") on success
                    data = (f"OK - {len(raw)}" if reply.status == 200 else json.dumps(reply.body)).encode("utf-8")
                    self.send_response(reply.status)
                    self.send_header("content-type", "text/plain; charset=utf-8")
                    self.send_header("content-length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                    return
                args: dict = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
                ctype = headers.get("content-type", "")
                if raw and "json" in ctype:
                    args.update(json.loads(raw))
                elif raw:
                    args.update({k: v[-1] for k, v in urllib.parse.parse_qs(raw.decode("utf-8")).items()})
                reply = fake._handle(url.path, headers, args)
                data = json.dumps(reply.body).encode("utf-8")
                self.send_response(reply.status)
                self.send_header("content-type", "application/json; charset=utf-8")
                self.send_header("content-length", str(len(data)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        return Handler


def _loads(v: Any) -> Any:
    """Slack accepts blocks / metadata as JSON strings (form posts) or as JSON values."""
    if isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


@pytest.fixture
def fake_slack():
    """A started FakeSlack, stopped after the test (import this fixture into a test module)."""
    with FakeSlack() as fake:
        yield fake
