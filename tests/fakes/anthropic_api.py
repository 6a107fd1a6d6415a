"""A fake Anthropic Messages API on 127.0.0.1 (port 0) for the real `anthropic` client: scripted
answers and error shapes, every request recorded. Tests only; it never reaches the network."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

_ids = itertools.count(1)

# Error type of each status, as the API documents them (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    500: "api_error", 529: "overloaded_error",
}


@dataclass
class Reply:
    """One scripted HTTP answer: status, JSON body, extra headers."""

    status: int
    body: dict
    headers: dict = field(default_factory=dict)


@dataclass
class Recorded:
    """One request as the fake saw it: method, path, headers (lower-case names), parsed JSON body."""

    method: str
    path: str
    headers: dict
    body: dict


def usage(input_tokens: int = 1200, output_tokens: int = 300, cache_creation_input_tokens: int = 0,
          cache_read_input_tokens: int = 0) -> dict:
    """A Usage object (tokens)."""
    return {"input_tokens": input_tokens, "output_tokens": output_tokens,
            "cache_creation_input_tokens": cache_creation_input_tokens,
            "cache_read_input_tokens": cache_read_input_tokens}


def message(content: list[dict], stop_reason: str = "end_turn", model: str = "claude-opus-4-8",
            usage_: dict | None = None, **extra) -> Reply:
    """A 200 Message object with the given content blocks."""
    body = {"id": f"msg_fake{next(_ids):06d}", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop_reason, "stop_sequence": None,
            "usage": usage_ or usage(), **extra}
    return Reply(200, body)


def tool_answer(edits: list[tuple[str, str]] | None = None, description: str = "a change",
                hypothesis: str = "it should help", *, tool_input: object = None, text: str = "",
                usage_: dict | None = None, model: str = "claude-opus-4-8", name: str = "propose_change") -> Reply:
    """A Message that calls `name` with {description, hypothesis, edits}, or with `tool_input` as given
    (for malformed inputs); `text` adds a text block before the call."""
    if tool_input is None:
        tool_input = {"description": description, "hypothesis": hypothesis,
                      "edits": [{"old_str": old, "new_str": new} for old, new in edits or []]}
    content = [{"type": "text", "text": text}] if text else []
    content.append({"type": "tool_use", "id": f"toolu_fake{next(_ids):06d}", "name": name, "input": tool_input})
    return message(content, "tool_use", model, usage_)


def refusal(explanation: str = "I can't help with that.", usage_: dict | None = None) -> Reply:
    """A Message stopped by the refusal classifier (stop_reason "refusal", with stop_details)."""
    return message([], "refusal", usage_=usage_,
                   stop_details={"type": "refusal", "category": None, "explanation": explanation})


def error(status: int, msg: str = "", *, retry_after: str | None = None, error_type: str | None = None) -> Reply:
    """An error response in the API's shape, {"type": "error", "error": {"type", "message"}}, with a
    `retry-after` header (seconds, as a string) when given."""
    kind = error_type or ERROR_TYPES.get(status, "api_error")
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return Reply(status, {"type": "error", "error": {"type": kind, "message": msg or kind}}, headers)


class FakeAnthropic:
    """The fake server: `url` is the base_url for `anthropic.Anthropic(base_url=...)`.

    `script(*replies)` queues answers for POST /v1/messages, served in order; with the queue empty it
    asks `respond(body) -> Reply` when given, else answers 400 "no scripted reply left" (never retried, so a
    missing reply fails fast). `requests` lists every request received. Each answer waits `latency_s` seconds,
    then for `gate` (an Event, set by default: clear it to hold requests in flight). `in_flight` and
    `peak_in_flight` count requests being answered. Use as a context manager or call start() / stop().
    """

    def __init__(self, respond=None, latency_s: float = 0.0):
        self.requests: list[Recorded] = []
        self.respond, self.latency_s = respond, latency_s
        self.gate = threading.Event()
        self.gate.set()
        self.in_flight = self.peak_in_flight = 0
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-anthropic",
                                        daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    @property
    def bodies(self) -> list[dict]:
        """The JSON bodies of the requests received, in order."""
        return [r.body for r in self.requests]

    def start(self) -> "FakeAnthropic":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "FakeAnthropic":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _next(self, recorded: Recorded) -> Reply:
        with self._lock:
            self.requests.append(recorded)
            if recorded.method != "POST" or recorded.path.split("?")[0] != "/v1/messages":
                return error(404, f"fake: no route {recorded.method} {recorded.path}")
            if self._queue:
                return self._queue.popleft()
            if self.respond is not None:
                return self.respond(recorded.body)
            return error(400, "fake: no scripted reply left")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except json.JSONDecodeError:
                    body = {"_raw": raw.decode("utf-8", "replace")}
                headers = {k.lower(): v for k, v in self.headers.items()}
                with fake._lock:
                    fake.in_flight += 1
                    fake.peak_in_flight = max(fake.peak_in_flight, fake.in_flight)
                try:
                    if fake.latency_s:
                        time.sleep(fake.latency_s)
                    fake.gate.wait()
                    self._send(fake._next(Recorded(self.command, self.path, headers, body)))
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            do_GET = do_POST

            def _send(self, reply: Reply) -> None:
                data = json.dumps(reply.body).encode("utf-8")
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", f"req_fake{next(_ids):06d}")
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        return Handler


@pytest.fixture
def fake_anthropic():
    """A started FakeAnthropic, stopped after the test (import this fixture into a test module)."""
    with FakeAnthropic() as fake:
        yield fake
