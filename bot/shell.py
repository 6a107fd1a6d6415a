"""The shell chat backend (the embedded default): commands on stdin, events and replies on stdout.

Carries text only: parsing and execution are bot/commands.py's, state changes the control API's.
"""

from __future__ import annotations

import getpass
import logging
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Optional, TextIO

from rich.console import Console
from rich.markup import escape

from bot.commands import handle
from loop.control import Control

log = logging.getLogger("ratchet.shell")

EVENT_STYLE = {"kept": "bold green", "discarded": "yellow", "crashed": "red", "invalid": "magenta",
               "aborted": "red", "paused": "bold cyan", "resumed": "bold cyan", "baseline": "bold",
               "baseline_run": "dim", "infra_failed": "red", "proposer_error": "red", "hint": "cyan",
               "pruned": "yellow", "rebased": "cyan", "confirming": "cyan", "host_down": "bold red",
               "host_up": "green", "budget_changed": "cyan", "reverted": "bold yellow",
               "promotion": "bold magenta", "promotion_requested": "magenta", "promotion_started": "magenta",
               "promotion_cancelled": "magenta", "corpus_small": "bold yellow"}
EVENT_MARK = {"kept": "✓", "discarded": "✗", "crashed": "!", "invalid": "⊘", "aborted": "■", "paused": "⏸",
              "resumed": "▶", "baseline": "≈", "baseline_run": "·", "infra_failed": "↻", "hint": "✎", "pruned": "✂",
              "rebased": "↷", "confirming": "⟳", "host_down": "▼", "host_up": "▲", "budget_changed": "$",
              "reverted": "↶", "promotion": "⇪", "promotion_requested": "⇪", "promotion_started": "⇪",
              "promotion_cancelled": "⇪"}


def stdin_is_interactive(stream: TextIO = sys.stdin) -> bool:
    """Read commands from a terminal or a pipe; not from /dev/null, a file or a closed stdin (a service)."""
    try:
        if stream.isatty():
            return True
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class ShellBackend:
    """Prints every outbox event as one line and answers commands typed on stdin.

    Delivery is at-least-once: an event is marked delivered only after it was printed, so a crash
    between the two prints it again after the restart rather than losing it.
    """

    name = "shell"

    def __init__(self, control: Control, console: Optional[Console] = None, *, user: Optional[str] = None,
                 stdin: TextIO = sys.stdin, read_commands: Optional[bool] = None,
                 digest_dir: Optional[Path] = None):
        self.control = control
        self.digest_dir = Path(digest_dir) if digest_dir else Path.home() / ".ratchet" / "digests"
        self.console = console or Console(highlight=False)
        self.user = user or os.environ.get("USER") or getpass.getuser()
        self.stdin = stdin
        self.read_commands = stdin_is_interactive(stdin) if read_commands is None else read_commands
        self._input_closed = threading.Event()  # stdin reached its end: no command can come any more
        self._lock = threading.Lock()
        self._last_error = ""

    def render_event(self, ev) -> str:
        """One readable line, with rich markup."""
        mark = EVENT_MARK.get(ev.kind, "•")
        style = EVENT_STYLE.get(ev.kind, "")
        when = ev.created_at.strftime("%H:%M:%S")
        body = f"{mark} {escape(ev.text)}"
        return f"[dim]{when}[/dim] " + (f"[{style}]{body}[/{style}]" if style else body)

    def deliver(self) -> int:
        """Print undelivered events in order and mark them delivered. Returns how many were printed.

        Never raises: while the outbox cannot be read or marked (the database restarting) the events wait
        for the next pass, and the failure is logged once.
        """
        with self._lock:
            try:
                n = self._deliver_pending()
            except Exception as e:  # noqa: BLE001 - a delivery failure must never stop the service
                if str(e) != self._last_error:
                    log.warning("outbox delivery failed, events wait: %s", str(e).splitlines()[0][:300])
                self._last_error = str(e)
                return 0
            self._last_error = ""
            return n

    def _deliver_pending(self) -> int:
        n = 0
        for ev in self.control.pending_events(self.name):
            if ev.kind == "digest":
                self.print_digest(ev)
            else:
                self.console.print(self.render_event(ev))
                if ev.kind == "promotion" and ev.payload.get("result", {}).get("reference_runs"):
                    from bot.digest import render_promotion_plot

                    path = self.digest_dir / f"promotion-{ev.payload.get('promotion_id')}.png"
                    render_promotion_plot(ev.payload["result"], ev.payload.get("scale", ""), path)
                    self.console.print(f"  plot: {path}")
            self.control.mark_delivered(ev.id, self.name)
            n += 1
        return n

    def print_digest(self, ev) -> Path:
        """Render a digest event: its text, and the progress plot written to a PNG whose path is printed."""
        from datetime import datetime

        from bot.digest import digest_text, render_plot

        until = datetime.fromisoformat(ev.payload["until"]) if ev.payload.get("until") else None
        d = self.control.digest(until=until)
        path = self.digest_dir / f"digest-{d.run}-{d.until:%Y%m%d-%H%M}-{ev.id}.png"
        render_plot(d, path)
        self.console.print(escape(digest_text(d)))
        self.console.print(f"progress plot: {path}")
        return path

    def answer(self, line: str) -> None:
        """Run one typed command and print its reply."""
        if not line.strip():
            return
        reply = handle(line, self.control, user=self.user, backend=self.name)
        style = "" if reply.ok else "red"
        text = escape(reply.text)
        self.console.print(f"[{style}]{text}[/{style}]" if style else text)
        self.deliver()  # a pause/resume announcement shows at once

    def start(self) -> Optional[threading.Thread]:
        """Start reading commands in a daemon thread (when stdin is a terminal or a pipe)."""
        if not self.read_commands:
            return None
        t = threading.Thread(target=self._read_loop, name="shell-input", daemon=True)
        t.start()
        return t

    def takes_commands(self) -> bool:
        """Whether a command can still come: stdin is a terminal or a pipe and has not reached its end."""
        return self.read_commands and not self._input_closed.is_set()

    def stop(self) -> None:
        """Nothing to release: every event is printed by `deliver`, and the reader thread is a daemon."""

    def _read_loop(self) -> None:
        for line in self.stdin:
            try:
                self.answer(line)
            except Exception as e:  # noqa: BLE001 - a bad command must never end the session
                self.console.print(f"[red]error: {escape(str(e))}[/red]")
        self._input_closed.set()
