"""`ratchet serve`: one process with the scheduler, the engine and the chat backend.

Wiring only: the loop's rules live in loop/, the chat's in bot/commands.py.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import threading
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.markup import escape

from bot.commands import format_status
from bot.shell import ShellBackend
from db.migrate import SchemaError, open_database
from db.models import Run
from db.session import is_transient
from loop import budget
from loop.config import Settings
from loop.control import Control
from loop.engine import Engine
from loop.proposers.offline import OfflineProposer
from loop.runners.local import LocalRunner
from loop.scheduler import make_scheduler, next_digest
from loop.workspace import Workspace
from trainer import data as tdata

log = logging.getLogger("ratchet")


class ServeError(RuntimeError):
    """serve cannot start as configured; the message says what to do."""


def setup_logging(home: Path) -> Path:
    """Log to `<home>/logs/ratchet.log` (rotated at 10 MB, 5 kept); the console shows events, not logs."""
    path = home / "logs" / "ratchet.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=10_000_000, backupCount=5)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_SecretFilter())
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, logging.handlers.RotatingFileHandler)]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    return path


class _SecretFilter(logging.Filter):
    """Masks tokens, the API key and database passwords in every log line (the doctor's redaction)."""

    def __init__(self):
        super().__init__()
        from bot.doctor import secrets_in

        self.secrets = secrets_in(os.environ, (os.environ.get("RATCHET_DATABASE_URL", ""),))

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            from bot.doctor import mask

            record.msg, record.args = mask(record.getMessage(), self.secrets), None
            if record.exc_info:  # another handler may have cached the traceback text already: mask either
                record.exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            if record.exc_text:
                record.exc_text = mask(record.exc_text, self.secrets)
        return True


def resolve_device(name: str) -> str:
    """The device type experiments will use: cuda / mps / cpu (what `auto` picks on this machine)."""
    from trainer.worker import pick_device

    return pick_device(name).type


def make_proposer(settings: Settings, device: str):
    """The configured proposer: Claude (Anthropic API; ANTHROPIC_API_KEY, optional ANTHROPIC_BASE_URL) or offline.

    Raises ServeError when the Claude proposer is configured without an API key.
    """
    if settings.proposer_name == "claude":
        from loop.proposers.claude import ClaudeProposer, make_client

        try:
            client = make_client(max_retries=settings.claude_max_retries, timeout=settings.claude_timeout_s)
        except ValueError as e:
            raise ServeError(f"proposer = claude needs ANTHROPIC_API_KEY ({e})") from None
        return ClaudeProposer(client, model=settings.claude_model, max_tokens=settings.claude_max_tokens,
                              repair_turns=settings.claude_repair_turns, prices=settings.claude_prices or None,
                              history_rows=settings.claude_history_rows)
    return OfflineProposer(seed=settings.seed, device=device)


def make_runner(settings: Settings):
    """The configured runner: local (subprocesses here), ssh (settings.hosts) or ray (settings.ray_address).

    Raises ServeError for a runner configured without what it needs.
    """
    if settings.runner == "ssh":
        if not settings.hosts:
            raise ServeError("runner = ssh needs [[hosts]] in ratchet.toml (see deploy/ratchet.toml)")
        from loop.runners.ssh import SSHRunner

        # host keys learned on first contact live with the service's state; the engine runs the health checks
        return SSHRunner(settings.hosts, known_hosts_file=settings.home / "known_hosts")
    if settings.runner == "ray":
        try:
            from loop.runners.ray_runner import RayRunner
        except ImportError as e:  # its message names the extra to install
            raise ServeError(f"runner = ray: {e}") from e

        return RayRunner.from_settings(settings)
    return LocalRunner(settings.device, standby=settings.standby)


def make_chat(settings: Settings, control: Control, console: Console, read_commands: Optional[bool] = None):
    """The chat backend: Slack (bot/slack_app.py) when SLACK_BOT_TOKEN and SLACK_APP_TOKEN or
    SLACK_SIGNING_SECRET are set, else the shell. Raises ServeError when Slack is configured wrongly."""
    if os.environ.get("SLACK_BOT_TOKEN"):
        from bot.slack_app import SlackBackend, SlackConfig, SlackConfigError, slack_configured

        if slack_configured():
            try:
                return SlackBackend(SlackConfig.from_settings(settings), control,
                                    on_posted=lambda ev, ts: console.print(f"→ slack: {ev.text}", markup=False))
            except SlackConfigError as e:
                raise ServeError(str(e)) from None
    return ShellBackend(control, console, read_commands=read_commands, digest_dir=settings.home / "digests")


def prepare_everything(settings: Settings, console: Console):
    """Database (a new empty one is migrated to head; any other must be at head), data (prepared if missing),
    workspace (created if missing). Returns them. Raises ServeError naming the fix (`ratchet db upgrade`)."""
    try:
        db = open_database(settings.db_url)
    except SchemaError as e:
        raise ServeError(str(e)) from None
    data_dir, did = tdata.prepare(settings.corpus, settings.vocab_size, home=settings.home, console=console,
                                  base_url=settings.corpus_base_url)
    console.print(f"data: {data_dir} ({'prepared now' if did else 'ready'})")
    ws = Workspace.init(settings.workspace)
    return data_dir, ws, db


STRANDED = 3  # exit code of a bounded serve stopped because its paused run cannot be resumed


def serve(settings: Settings, *, max_experiments: Optional[int] = None, budget_explicit: bool = False,
          console: Optional[Console] = None, read_commands: Optional[bool] = None) -> int:
    """Run the loop until max_experiments are done (forever when None) or SIGINT/SIGTERM.

    On a signal the running experiments are killed and re-run at the next start. A bounded run (max_experiments)
    that is paused with nothing training and no way to take `resume` (stdin closed, no Slack; a daily budget's
    pause lifts by itself at the rollover, so it is waited for) stops with exit code STRANDED instead of waiting
    for ever. Returns an exit code (0: done).
    Raises ServeError when the existing run's budget conflicts with an explicit --budget-s.
    """
    console = console or Console(highlight=False)
    log_path = setup_logging(settings.home)
    data_dir, ws, db = prepare_everything(settings, console)
    device = resolve_device(settings.device)
    runner = make_runner(settings)
    engine = Engine(settings, db, ws, runner, make_proposer(settings, device), data_dir,
                    max_experiments=max_experiments, device=device)
    run = engine.setup()
    if budget_explicit and abs(run.budget_s - settings.budget_s) > 1e-9:
        raise ServeError(f"run {run.name!r} measured its noise floor at a {run.budget_s:g} s budget; results at "
                         f"{settings.budget_s:g} s would not compare. Start a new run: --run NAME --budget-s "
                         f"{settings.budget_s:g}")
    control = Control(db, run.name, engine)
    shell = make_chat(settings, control, console, read_commands)
    engine.on_change = shell.deliver
    console.print(f"ratchet: run {run.name!r} on branch {run.branch} in {ws.path}; {len(runner.slots())} slot(s) "
                  f"({', '.join(s.name for s in runner.slots())}), {device}, budget {run.budget_s:g} s, proposer "
                  f"{engine.proposer.name}; log {log_path}")
    if shell.name == "slack":
        console.print(shell.describe())
    else:
        console.print("type `help` for commands" if shell.read_commands else "no terminal: printing events only")

    scheduler = make_scheduler(settings, db, engine, run_name=run.name)  # digest, budget rollover (persisted)
    scheduler.add_job(shell.deliver, "interval", seconds=2, id="deliver-outbox", max_instances=1, coalesce=True,
                      jobstore="memory", replace_existing=True)
    engine.rollover()  # a budget-only pause from a day that has ended
    console.print(f"next digest: {next_digest(settings):%Y-%m-%d %H:%M %Z}")
    stop = threading.Event()

    def on_signal(signum, _frame):
        console.print(f"[yellow]signal {signal.Signals(signum).name}: stopping; running experiments will be "
                      f"re-run at the next start[/yellow]")
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    engine.start()
    shell.start()
    progress = _Progress(console, engine)
    code = 0
    try:
        while not stop.is_set():
            shell.deliver()
            progress.update()
            if engine.finished():
                break
            run = stranded(engine, shell) if max_experiments is not None else None
            if run is not None:
                console.print(f"[red]run {run.name!r} is paused ({escape(run.pause_reason)}) and nothing here can "
                              f"resume it (stdin is closed, no Slack): stopping before {max_experiments} "
                              f"experiment(s). Run `ratchet serve` in a terminal, or with Slack, and type "
                              f"`resume`.[/red]")
                code = STRANDED
                break
            stop.wait(0.5)
    finally:
        progress.close()
        engine.stop(kill=stop.is_set())
        scheduler.shutdown(wait=False)
        shell.deliver()
        shell.stop()  # Slack: post what is pending (bounded), then disconnect
        for s, h in old.items():
            signal.signal(s, h)
    console.print(format_status(control.status()))
    return code


def stranded(engine: Engine, chat) -> Optional[Run]:
    """The run when it is paused, nothing trains, and no command can resume it: the chat takes none (a shell whose
    stdin has closed) and the pause does not lift at the budget day's rollover. Else None, also while the
    database is away."""
    if chat.takes_commands():
        return None
    try:
        if not engine.idle():
            return None
        run = engine.get_run()
    except Exception as e:
        if is_transient(e):
            return None  # the database is away (the engine retries): nothing to decide until it is back
        raise
    return run if run.state == "paused" and not budget.lifts_at_rollover(run.pause_reason) else None


class _Progress:
    """A live progress bar per training experiment (terminals only; elsewhere the events suffice)."""

    def __init__(self, console: Console, engine: Engine):
        self.engine = engine
        self.tasks: dict[int, int] = {}
        self.bar = None
        if console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                console=console, transient=True)
            self.bar.start()

    def update(self) -> None:
        if self.bar is None:
            return
        live = {r.exp_id: r for r in self.engine.running()}
        for exp_id in list(self.tasks):
            if exp_id not in live:
                self.bar.remove_task(self.tasks.pop(exp_id))
        for exp_id, r in live.items():
            info = f"{r.elapsed_s:.0f}/{r.budget_s:.0f} s" + (f" loss {r.loss:.3f}" if r.loss is not None else "")
            if exp_id not in self.tasks:
                self.tasks[exp_id] = self.bar.add_task(f"#{exp_id} {r.description}"[:60], total=r.budget_s, info=info)
            self.bar.update(self.tasks[exp_id], completed=min(r.elapsed_s, r.budget_s), info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
