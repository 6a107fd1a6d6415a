"""Scheduler and digest: the cron fires at the configured local time, a restart across the digest time
posts exactly once, and the plot draws exactly the experiments in the database."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timezone

from pathlib import Path

from PIL import Image
from sqlmodel import Session, select

from bench.digest import fill
from bot.digest import digest_text, plot_series, render_plot
from db.models import Event, Experiment, Run
from db.session import create_tables, make_engine
from loop.config import Settings
from loop.digest import build_digest
from loop.scheduler import make_scheduler, next_digest, request_digest


def digest_events(db_engine, run_name: str) -> list[Event]:
    """The run's digest events, oldest first."""
    with Session(db_engine) as db:
        run = db.exec(select(Run).where(Run.name == run_name)).first()
        if run is None:
            return []
        return list(db.exec(select(Event).where(Event.run_id == run.id, Event.kind == "digest")
                            .order_by(Event.id)).all())


def test_digest_fires_at_the_cron_time_in_a_non_utc_timezone():
    frozen = datetime(2026, 11, 21, 23, 30, tzinfo=timezone.utc)  # 08:30 on the 22nd in Tokyo
    tokyo = Settings(timezone="Asia/Tokyo")  # default cron: 09:00 local
    assert next_digest(tokyo, frozen) == datetime(2026, 11, 22, 0, 0, tzinfo=timezone.utc)
    ny = Settings(timezone="America/New_York", digest_cron="30 7 * * 1-5")  # weekdays 07:30, EST in November
    assert next_digest(ny, frozen) == datetime(2026, 11, 23, 12, 30, tzinfo=timezone.utc)  # Monday


def test_a_restart_across_the_digest_time_posts_exactly_once(tmp_path):
    db = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    create_tables(db)
    fill(db, 20)
    settings = Settings(home=tmp_path, timezone="Europe/Berlin")
    # A service that scheduled the digest, then died (os._exit: no clean shutdown) just before it was due;
    # the digest time passes while it is down.
    script = (
        "import os\nfrom datetime import timedelta\nfrom db.session import make_engine\n"
        "from db.models import utcnow\nfrom loop.config import Settings\nfrom loop.scheduler import make_scheduler\n"
        f"db = make_engine({str(db.url)!r})\n"
        "s = make_scheduler(Settings(timezone='Europe/Berlin'), db)\ns.pause()\n"
        "s.modify_job('digest:main', next_run_time=utcnow() - timedelta(minutes=30))\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], check=True, timeout=60)
    assert digest_events(db, "main") == []

    sched = make_scheduler(settings, db)  # the restart: the missed digest fires once
    t0 = time.time()
    while not digest_events(db, "main") and time.time() - t0 < 20:
        time.sleep(0.1)
    time.sleep(0.5)
    sched.shutdown(wait=True)
    assert len(digest_events(db, "main")) == 1
    nxt = make_scheduler(settings, db)  # another restart: nothing is due, nothing more is posted
    time.sleep(1.0)
    job = nxt.get_job("digest:main")
    nxt.shutdown(wait=True)
    assert len(digest_events(db, "main")) == 1 and job.next_run_time > datetime.now(timezone.utc)
    # the job itself never writes two scheduled digests for one day
    assert request_digest(db, "main", "Europe/Berlin") is None
    assert request_digest(db, "main", "Europe/Berlin", by="alice") is not None


def test_plot_draws_exactly_the_experiments_in_the_database(tmp_path, db_url):
    db = make_engine(db_url)
    create_tables(db)
    fill(db, 300, seed=1, keep_percent=10)
    d = build_digest(db, "main", Settings(home=tmp_path, budget_gpu_hours_per_day=24))
    out = tmp_path / "digest.png"
    series = render_plot(d, out)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 500
    with Session(db) as s:
        exps = s.exec(select(Experiment).order_by(Experiment.id)).all()
        run = s.exec(select(Run)).one()
    scored = [e for e in exps if e.val_bpb is not None and e.kind != "confirm"]  # a re-run is not a new point
    assert any(e.kind == "confirm" for e in exps)
    assert series["y"] == [e.val_bpb for e in scored] and series["x"] == list(range(len(scored)))
    kept = [e for e in exps if e.kind == "experiment" and e.status == "keep"]
    means = [e.decision["val_bpb"] for e in kept]  # the mean of a keep's runs, not its first run
    assert means != [e.val_bpb for e in kept]
    assert [y for _, y, _ in series["labels"]] == means
    assert series["head_y"][-1] == run.head_val_bpb == means[-1]
    assert all(b <= a for a, b in zip(series["head_y"], series["head_y"][1:]))  # the running best never rises
    assert plot_series(d.plot) == series
    text = digest_text(d)
    assert "best val_bpb" in text and "gpu/day" in text and "keep rate" in text


def test_budget_and_digest_commands_in_the_shell(tmp_path):
    import io

    from rich.console import Console

    from bot.shell import ShellBackend
    from db.models import CommandLog
    from loop.control import Control

    db = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    create_tables(db)
    fill(db, 50, keep_percent=10)
    buf = io.StringIO()
    shell = ShellBackend(Control(db, "main"), Console(file=buf, width=120), user="olga", read_commands=False,
                         digest_dir=tmp_path / "digests")
    shell.answer("budget gpu 24h/day")
    shell.answer("budget claude 24h/day")  # wrong unit: refused with the accepted forms
    shell.answer("budget")
    shell.answer("digest")
    out = buf.getvalue()
    assert "budget gpu/day set to 24.00 h by olga" in out
    assert "a Claude budget is in US dollars" in out and "budget gpu 24h/day" in out
    assert "gpu/day" in out and "of 24.00 h" in out
    assert "Ratchet digest · run main" in out and "best val_bpb" in out
    pngs = list((tmp_path / "digests").glob("*.png"))
    assert len(pngs) == 1 and f"progress plot: {pngs[0]}" in out.replace("\n", "")
    with Session(db) as s:
        audit = [(a.command, a.allowed) for a in s.exec(select(CommandLog).order_by(CommandLog.id)).all()]
    assert audit == [("budget_set", True), ("", True), ("budget", True), ("digest", True)]


def test_ratchet_digest_renders_without_posting(tmp_path):
    home = tmp_path / "home"
    db = make_engine(f"sqlite:///{home / 'ratchet.db'}")
    create_tables(db)
    fill(db, 40, keep_percent=10)
    out = tmp_path / "p.png"
    import os

    p = subprocess.run([sys.executable, "-m", "bot.cli", "digest", "--out", str(out)], capture_output=True, text=True,
                       env={**os.environ, "RATCHET_HOME": str(home)}, cwd=Path(__file__).resolve().parents[1],
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Ratchet digest" in p.stdout and out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert digest_events(db, "main") == []  # nothing posted
