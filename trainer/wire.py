"""The harness's message framing over a Unix socket: one JSON line per message, optionally followed by `nbytes`
raw bytes (a batch of tokens). Used between the trusted parent and the worker or the scorer.

The parent reads what the worker sends as untrusted input: lines are bounded, bad JSON is a ProtocolError.
"""

from __future__ import annotations

import json
import select
import socket
import time
from typing import Optional

MAX_LINE = 1 << 16  # bytes of one JSON header


class ProtocolError(RuntimeError):
    """The peer sent something that is not a message (bad JSON, an over-long line, a closed socket mid-message)."""


class Channel:
    """Messages over a connected stream socket. `recv(timeout)` returns (message dict, payload bytes) or None when
    nothing complete arrived in time; raises EOFError when the peer closed the socket, ProtocolError on garbage."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: dict, payload: bytes | memoryview = b"") -> None:
        """Send one message; `payload` goes after the header, its size in the header's `nbytes`."""
        if payload:
            msg = {**msg, "nbytes": len(payload)}
        self.sock.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        if payload:
            self.sock.sendall(payload)

    def _fill(self, deadline: Optional[float]) -> bool:
        """Read what is available into the buffer; False when the deadline passed first."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if deadline is not None:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return False
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError("peer closed the channel")
        self.buf += chunk
        return True

    def recv(self, timeout: Optional[float] = None, max_payload: int = 0) -> Optional[tuple[dict, bytes]]:
        """The next message, waiting at most `timeout` seconds (None: block). A payload larger than
        `max_payload` bytes is a ProtocolError (the parent never accepts payloads from a worker: 0)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                break
            if len(self.buf) > MAX_LINE:
                raise ProtocolError("a message header is longer than 64 KiB")
            if not self._fill(deadline):
                return None
        try:
            msg = json.loads(self.buf[:nl])
        except ValueError as e:
            raise ProtocolError(f"a message is not JSON ({e})") from None
        if not isinstance(msg, dict):
            raise ProtocolError("a message is not a JSON object")
        n = msg.get("nbytes", 0)
        if not isinstance(n, int) or n < 0 or n > max_payload:
            raise ProtocolError(f"a message carries {n!r} bytes, at most {max_payload} allowed")
        while len(self.buf) < nl + 1 + n:
            if not self._fill(deadline if deadline is None else max(deadline, time.monotonic() + 5)):
                raise ProtocolError("a message's payload did not arrive")
        payload = bytes(self.buf[nl + 1:nl + 1 + n])
        del self.buf[:nl + 1 + n]
        return msg, payload

    def recv_to_file(self, f, size: int, deadline: float) -> None:
        """Copy the next `size` raw bytes (what follows a header announcing them) into the binary file `f`.
        Raises ProtocolError when they do not all arrive before `deadline` (time.monotonic())."""
        left = size
        take = min(left, len(self.buf))
        f.write(self.buf[:take])
        del self.buf[:take]
        left -= take
        while left:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([self.sock], [], [], wait)[0]:
                raise ProtocolError(f"{left} of {size} announced bytes did not arrive in time")
            chunk = self.sock.recv(min(left, 1 << 22))
            if not chunk:
                raise ProtocolError(f"the peer closed the channel with {left} of {size} bytes unsent")
            f.write(chunk)
            left -= len(chunk)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
