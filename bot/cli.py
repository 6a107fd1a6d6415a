"""The `ratchet` command line (typer): serve, init, data prepare, train, db upgrade, doctor.

Parses arguments and prints; the work is done by bot/serve.py, loop/ and trainer/.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from loop.config import ConfigError, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Ratchet: automated pretraining research.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare training data.")
app.add_typer(data_app, name="data")
db_app = typer.Typer(no_args_is_help=True, help="Database schema: upgrade, current, downgrade, revision.")
app.add_typer(db_app, name="db")
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

ConfigOpt = typer.Option(None, "--config", "-c", envvar="RATCHET_CONFIG", help="ratchet.toml")


def _settings(config: Optional[Path], **overrides):
    try:
        return load_settings(config, **overrides)
    except ConfigError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2)


def _open_db(settings):
    """The database for a command: a new empty one is migrated; an out-of-date one exits 2 naming the fix."""
    from db.migrate import SchemaError, open_database

    try:
        return open_database(settings.db_url)
    except SchemaError as e:
        err.print(f"[red]{e}[/red]", soft_wrap=True)
        raise typer.Exit(2)


@app.command()
def serve(config: Optional[Path] = ConfigOpt,
          max_experiments: Optional[int] = typer.Option(None, min=1, help="stop after this many experiments"),
          budget_s: Optional[float] = typer.Option(None, min=0.1, help="training budget per experiment, seconds"),
          run: Optional[str] = typer.Option(None, help="run name (branch ratchet/<run>)"),
          home: Optional[Path] = typer.Option(None, envvar="RATCHET_HOME", help="state directory")):
    """Run the loop: baseline repeats, then propose → train → keep or revert, with the shell chat."""
    from bot.serve import ServeError, serve as run_serve
    from trainer.data import CorpusError

    settings = _settings(config, budget_s=budget_s, run=run, home=home)
    try:
        code = run_serve(settings, max_experiments=max_experiments, budget_explicit=budget_s is not None,
                         console=console)
    except (ServeError, CorpusError) as e:
        err.print(f"[red]{e}[/red]", soft_wrap=True)
        raise typer.Exit(2)
    raise typer.Exit(code)


@app.command()
def propose(dry_run: bool = typer.Option(True, "--dry-run/--no-dry-run", help="print only (the default)"),
            config: Optional[Path] = ConfigOpt,
            run: Optional[str] = typer.Option(None, help="run name")):
    """Print the next proposal for head (diff, description, hypothesis, cost) without running it."""
    from bot.serve import ServeError, make_proposer, prepare_everything, resolve_device
    from loop.engine import Engine
    from loop.proposers.base import ProposalError, ProposalRejected
    from loop.runners.local import LocalRunner
    from loop.validate import validate_proposal

    if not dry_run:
        err.print("[red]only --dry-run is supported: `ratchet serve` runs proposals[/red]")
        raise typer.Exit(2)
    settings = _settings(config, run=run)
    try:
        data_dir, ws, db = prepare_everything(settings, err)
        device = resolve_device(settings.device)
        proposer = make_proposer(settings, device)
    except ServeError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    engine = Engine(settings, db, ws, LocalRunner(settings.device), proposer, data_dir, device=device)
    run_row = engine.setup(reconcile=False)  # read-only next to a live serve: never re-queue its experiments
    head = ws.read_file(run_row.head_commit)
    state = engine.proposals.research_state(run_row)
    try:
        p = proposer.propose(head, run_row.head_commit, engine.proposals.history(run_row), state)
    except ProposalRejected as e:
        console.print(f"no usable proposal: {e.reason} (cost ${e.cost_usd:.4f})")
        raise typer.Exit(1)
    except ProposalError as e:
        err.print(f"[red]proposer failed: {e}[/red]")
        raise typer.Exit(1)
    verdict = validate_proposal(head, {"train.py": p.source}, seen_hashes=state.seen_hashes)
    console.print(f"proposer: {p.proposer} · head {run_row.head_commit[:10]}")
    console.print(f"description: {p.description}\nhypothesis: {p.hypothesis}")
    console.print("validation: ok" if verdict.ok else f"validation: invalid: {verdict.reason}")
    console.print(f"cost: ${p.cost_usd:.4f}" + (f" · usage {p.usage}" if p.usage else ""))
    console.print(verdict.diff, markup=False, highlight=False)


@app.command()
def digest(out: Path = typer.Option(..., "--out", help="where to write the progress plot (PNG)"),
           hours: float = typer.Option(24.0, min=0.1, help="the window, hours before now"),
           config: Optional[Path] = ConfigOpt, run: Optional[str] = typer.Option(None, help="run name")):
    """Render the digest: print its text and write the progress plot, without posting anything."""
    from bot.digest import digest_text, render_plot
    from loop.digest import build_digest

    settings = _settings(config, run=run)
    db = _open_db(settings)
    try:
        d = build_digest(db, settings.run, settings, hours=hours)
    except LookupError as e:
        err.print(f"[red]{e}; start it with `ratchet serve`[/red]")
        raise typer.Exit(2)
    render_plot(d, out)
    console.print(digest_text(d), markup=False, highlight=False)
    console.print(f"progress plot: {out}")


@app.command()
def init(directory: Optional[Path] = typer.Argument(None, help="default: <home>/workspace"),
         config: Optional[Path] = ConfigOpt):
    """Create the research repo: train.py from the template and program.md, committed on main."""
    from loop.workspace import Workspace, WorkspaceError

    settings = _settings(config)
    path = directory or settings.workspace
    try:
        ws = Workspace.init(path)
    except WorkspaceError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    console.print(f"workspace ready: {ws.path} (baseline {ws.head_commit()[:10]})")


@data_app.command("prepare")
def data_prepare(corpus: Optional[str] = typer.Option(
                     None, help="shakespeare | stdlib | climbmix[:N] | fineweb-edu[:N] | "
                                "parquet:https://…/shard_{:05d}.parquet[:N] | parquet:DIR | text:GLOB"),
                 vocab_size: Optional[int] = typer.Option(
                     None, help="BPE vocabulary size (default 4096; 8192 for climbmix, fineweb-edu, parquet URLs)"),
                 base_url: Optional[str] = typer.Option(
                     None, help="a mirror of climbmix / fineweb-edu: the URL holding its shard_NNNNN.parquet files "
                                "(default $RATCHET_CORPUS_BASE_URL, else Hugging Face)"),
                 config: Optional[Path] = ConfigOpt):
    """Fetch or read a corpus, train the tokenizer, write token shards and the manifest (idempotent)."""
    from trainer.data import CorpusError, load_manifest, prepare

    settings = _settings(config, corpus=corpus, vocab_size=vocab_size)
    try:
        out, did = prepare(settings.corpus, settings.vocab_size, home=settings.home, console=err,
                           base_url=base_url or settings.corpus_base_url)
    except (CorpusError, ValueError) as e:
        err.print(str(e), style="red", markup=False, soft_wrap=True)  # messages hold brackets: ratchet[parquet]
        raise typer.Exit(2)
    m = load_manifest(out)
    if not did:
        console.print(f"already prepared, nothing to do: {out}")
    console.print(f"{m['corpus']}: vocab {m['vocab_size']}, {m['tokens']['train']:,} train / "
                  f"{m['tokens']['val']:,} validation tokens ({m['documents']['val']} held-out documents) in {out}",
                  markup=False, soft_wrap=True)


@app.command()
def train(script: Optional[Path] = typer.Option(None, help="a train.py (default: the workspace's)"),
          budget_s: Optional[float] = typer.Option(None, min=0.1, help="training budget, seconds"),
          seed: int = typer.Option(0), device: str = typer.Option("auto"),
          config: Optional[Path] = ConfigOpt):
    """One manual run through the harness, with the summary printed (like `uv run train.py`)."""
    from trainer.data import CorpusError, prepare

    settings = _settings(config, budget_s=budget_s)
    try:
        data_dir, _ = prepare(settings.corpus, settings.vocab_size, home=settings.home, console=err,
                              base_url=settings.corpus_base_url)
    except CorpusError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2)
    if script is None:
        from loop.workspace import TEMPLATE

        ws_script = Path(settings.workspace) / "train.py"
        script = ws_script if ws_script.exists() else TEMPLATE
    out_dir = Path(tempfile.mkdtemp(prefix="ratchet-train-"))
    cmd = [sys.executable, "-m", "trainer.run", "--script", str(Path(script).resolve()), "--data", str(data_dir),
           "--budget-s", str(settings.budget_s), "--out", str(out_dir / "result.json"), "--seed", str(seed),
           "--device", device]
    if settings.eval_tokens:
        cmd += ["--eval-tokens", str(settings.eval_tokens)]
    err.print(f"training {script} for {settings.budget_s:g} s; curve and result in {out_dir}")
    raise typer.Exit(subprocess.call(cmd))


@app.command()
def doctor(config: Optional[Path] = ConfigOpt):
    """Check config, database, Slack, the Anthropic key, hosts and data: one line each; exit code 1 on a failure.

    Each line is ok / warn / fail with what to do; secrets are masked; nothing is changed.
    """
    from bot.doctor import doctor as run_doctor

    raise typer.Exit(run_doctor(config, console))


# ---- ratchet db ----


def _db_engine(config: Optional[Path]):
    from sqlalchemy.exc import ArgumentError

    from db.migrate import safe_url
    from db.session import make_engine

    settings = _settings(config)
    try:
        return make_engine(settings.db_url), safe_url(settings.db_url)
    except ArgumentError as e:
        err.print(f"malformed database URL {safe_url(settings.db_url)}: {e.__class__.__name__}", markup=False,
                  soft_wrap=True)
        raise typer.Exit(2)


def _db_call(fn, *args):
    """Run a migration step; a database error or a SchemaError exits 1 with one line (password masked)."""
    from sqlalchemy.exc import SQLAlchemyError

    from db.migrate import SchemaError

    try:
        return fn(*args)
    except SchemaError as e:
        err.print(str(e), markup=False, soft_wrap=True)
    except SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:300]
        err.print(f"database error: {reason}", markup=False, soft_wrap=True)
    raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="target revision (default: head)"),
               config: Optional[Path] = ConfigOpt):
    """Upgrade the database schema to this version's (adopting a database made before migrations)."""
    from db import migrate

    engine, shown = _db_engine(config)
    before = _db_call(migrate.schema_state, engine)
    after = _db_call(migrate.upgrade, engine, revision)
    if before.current == after:
        console.print(f"{shown}: already at {migrate.describe(after)}; nothing to do", markup=False, soft_wrap=True)
    else:
        was = migrate.describe(before.current) + (" (tables made before migrations)" if before.tables and
                                                  before.current is None else "")
        console.print(f"{shown}: {was} → {migrate.describe(after)}", markup=False, soft_wrap=True)


@db_app.command("current")
def db_current(config: Optional[Path] = ConfigOpt):
    """Print the database's schema revision and this version's head; exit code 1 when they differ."""
    from db import migrate

    engine, shown = _db_engine(config)
    st = _db_call(migrate.schema_state, engine)
    if st.at_head:
        console.print(f"{shown}: {migrate.describe(st.current)} (head)", markup=False, soft_wrap=True)
        return
    try:
        migrate.check_schema(engine)
    except migrate.SchemaError as e:
        console.print(f"{shown}: {e}", markup=False, soft_wrap=True)
    raise typer.Exit(1)


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(..., help="target revision: an id, -1 (one step) or base (empty)"),
                 config: Optional[Path] = ConfigOpt):
    """Downgrade the schema (columns and tables added since `revision` are dropped with their data)."""
    from db import migrate

    engine, shown = _db_engine(config)
    before = _db_call(migrate.current_revision, engine)
    after = _db_call(migrate.downgrade, engine, revision)
    console.print(f"{shown}: {migrate.describe(before)} → {migrate.describe(after)}", markup=False, soft_wrap=True)


@db_app.command("stamp")
def db_stamp(revision: str = typer.Argument(..., help="the revision the schema already is at"),
             config: Optional[Path] = ConfigOpt):
    """Record a revision without running migrations (for a schema fixed by hand)."""
    from db import migrate

    engine, shown = _db_engine(config)
    _db_call(migrate.stamp, engine, revision)
    now = _db_call(migrate.current_revision, engine)
    console.print(f"{shown}: stamped {migrate.describe(now)}", markup=False, soft_wrap=True)


@db_app.command("revision")
def db_revision(message: str = typer.Option(..., "-m", "--message", help="what changes, e.g. 'hosts: add zone'"),
                empty: bool = typer.Option(False, "--empty", help="an empty revision to fill in by hand"),
                url: Optional[str] = typer.Option(None, help="compare against this database (at head) instead of a "
                                                              "scratch SQLite")):
    """For developers: write a revision with what db/models.py changed since the last one (autogenerate).

    The file is db/migrations/versions/<id>_<slug>.py; review it, then run tests/test_migrations.py.
    """
    from db import migrate

    path = _db_call(lambda: migrate.new_revision(message, autogenerate=not empty, url=url))
    console.print(f"wrote {path}; review it (renames, server defaults for NOT NULL columns, data moves) and run "
                  f"pytest tests/test_migrations.py", markup=False, soft_wrap=True)


if __name__ == "__main__":
    app()
