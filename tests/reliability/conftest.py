"""What the fault tests share: a research repo whose val_bpb does not depend on machine load, a home with its
noise floor already measured (copied per test), a throwaway PostgreSQL cluster, and the invariants every
fault must leave intact."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from db.models import FINAL_STATUSES, BudgetLedger, Event, Experiment, Run
from db.session import make_engine
from loop.workspace import Workspace
from tests.test_serve import serve_env, start

# No gradient steps: val_bpb depends only on the counted batches (seeded), never on how fast the machine is.
# Uniform predictions score the same for every seed (noise floor 0); UNIGRAM = True is far better: a sure keep.
PRIOR_TRAIN_PY = '''\
"""A deterministic test model: next-token probabilities from counted training tokens (unigram), or uniform."""
import torch
import torch.nn as nn

# ---- Hyperparameters ----
UNIGRAM = False  # predict the counted token frequencies instead of a uniform distribution
COUNT_BATCHES = 8  # training batches counted
SMOOTHING = 1.0  # add-k smoothing of the counts
BATCH_SIZE = 4  # sequences per batch


class Prior(nn.Module):
    def __init__(self, logp):
        super().__init__()
        self.logp = nn.Parameter(logp)

    def forward(self, idx):
        return self.logp.expand(idx.shape[0], idx.shape[1], -1)


def train(ctx):
    counts = torch.full((ctx.vocab_size,), SMOOTHING, device=ctx.device)
    step = 0
    for x, y in ctx.train_batches(BATCH_SIZE):
        if step < COUNT_BATCHES:
            counts += torch.bincount(y.flatten(), minlength=ctx.vocab_size).float()
        ctx.log(step, -(counts / counts.sum()).log()[y].mean())
        step += 1
        if step >= COUNT_BATCHES and ctx.should_stop():
            break
    logp = (counts / counts.sum()).log() if UNIGRAM else torch.zeros(ctx.vocab_size, device=ctx.device)
    return Prior(logp)
'''
UNIGRAM_OFF = "UNIGRAM = False  # predict the counted token frequencies instead of a uniform distribution"
UNIGRAM_ON = UNIGRAM_OFF.replace("False", "True")
BUDGET_S = 1
CHANNEL = "C0RATCHET"


# ---- the measured home ----


def settings_env(home: Path, data_dir: Path, workspace: Path, **extra) -> dict:
    """serve's environment for the fault tests: 1 s budget, 2 baseline repeats, no pruning, new-seed confirmation
    (one confirm run per passing change: the keep is decided when it is recorded; tests/test_hardware.py covers
    paired confirmation)."""
    extra.setdefault("RATCHET_CONFIRM", "seeds")
    return serve_env(home, data_dir, workspace, RATCHET_NOISE_REPEATS=2, RATCHET_BUDGET_S=BUDGET_S,
                     RATCHET_PRUNE="false", **extra)


def make_measured(root: Path, data_dir: Path) -> Path:
    """`root` with `home/` (SQLite, noise floor measured over 2 baseline runs, events not yet delivered) and
    `workspace/` (PRIOR_TRAIN_PY), made by the real engine and runner; the session fixture `measured`
    (tests/conftest.py) makes it once, and tests copy it (`clone`)."""
    from db.session import create_tables
    from loop.engine import Engine
    from loop.proposers.offline import OfflineProposer
    from loop.runners.local import LocalRunner

    (root / "workspace").mkdir()
    (root / "workspace" / "train.py").write_text(PRIOR_TRAIN_PY)
    ws = Workspace.init(root / "workspace", force=True)
    home = root / "home"
    serve_env(home, data_dir)  # links the prepared corpus into home/data
    settings = measured_settings(home, ws.path)
    db = make_engine(settings.db_url)
    create_tables(db)
    eng = Engine(settings, db, ws, LocalRunner("cpu"), OfflineProposer(seed=0), home / "data" / data_dir.name)
    eng.setup()
    deadline = time.time() + 300
    while eng.get_run().noise_sigma is None or eng.handles:
        assert time.time() < deadline, "baseline repeats did not finish"
        eng.tick()
        with Session(db) as s:  # both repeats started: no proposal after them
            if len(s.exec(select(Experiment.id).where(Experiment.kind == "baseline")).all()) == 2:
                eng.max_experiments = 0
        time.sleep(0.2)
    eng.stop(kill=True)
    db.dispose()
    return root


def measured_settings(home: Path, workspace: Path):
    """The Settings the measured home was made with (an engine on a clone must match them)."""
    from loop.config import Settings

    return Settings(home=home, workspace=workspace, budget_s=BUDGET_S, noise_repeats=2, eval_tokens=4096,
                    grace_s=60, device="cpu", prune=False)


def clone(measured: Path, dest: Path) -> tuple[Path, Workspace]:
    """A private copy of the measured home and workspace: (home, workspace)."""
    shutil.copytree(measured, dest, symlinks=True)
    return dest / "home", Workspace(dest / "workspace")


@pytest.fixture
def serve():
    """`serve(args, env, out, stdin=…)` starts `ratchet serve` (tests.test_serve.start); whatever is still running
    at the end of the test is killed, so a failed test leaves no service behind."""
    procs: list[subprocess.Popen] = []

    def run(args, env, out, stdin=subprocess.DEVNULL) -> subprocess.Popen:
        procs.append(start(args, env, out, stdin=stdin))
        procs[-1].out = out
        return procs[-1]

    yield run
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)


def wait(cond, proc: subprocess.Popen, timeout: float = 180, what: str = "condition"):
    """Poll cond() (errors count as not yet: the database may be away) until it is truthy; returns its value.
    Fails at once, with serve's output, when `proc` has exited."""
    deadline = time.time() + timeout
    while True:
        try:
            v = cond()
        except Exception:  # noqa: BLE001
            v = None
        if v:
            return v
        if proc.poll() is not None:
            raise AssertionError(f"serve exited ({proc.returncode}) while waiting for {what}:\n"
                                 f"{Path(proc.out).read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


# ---- reading the outcome ----


def sqlite_url(home: Path) -> str:
    return f"sqlite:///{home / 'ratchet.db'}"


def rows(url: str, model, **where):
    eng = make_engine(url)
    try:
        with Session(eng) as s:
            q = select(model).order_by(model.id)
            for k, v in where.items():
                q = q.where(getattr(model, k) == v)
            return s.exec(q).all()
    finally:
        eng.dispose()


def gpu_rows(url: str, exp_id: int) -> list:
    return [r for r in rows(url, BudgetLedger, experiment_id=exp_id) if r.kind == "gpu_seconds"]


def assert_consistent(url: str, ws: Workspace, *, allow_queued: bool = False) -> Run:
    """Nothing lost, branch and database agree: no experiment left running or half-proposed (a change may
    wait `confirming` for its queued confirm run); every trained
    experiment has one GPU ledger row per recorded run (never more than its starts); head is the last keep
    and the branch tip is head; every event delivered. Returns the run."""
    exps = rows(url, Experiment)
    # a change waiting for its confirm run (queued, e.g. the run was paused) is owed, not lost
    owed = {e.confirms_id for e in exps if e.kind == "confirm" and e.status == "queued"}
    confirming = {e.id for e in exps if e.status == "confirming"}
    assert owed <= confirming and confirming <= owed, (owed, confirming)
    open_ = [e for e in exps if e.status in ("running", "proposed") or
             (e.status == "queued" and not allow_queued and e.kind != "confirm")]
    assert not open_, [(e.id, e.status, e.reason) for e in open_]
    for e in exps:
        assert e.status in FINAL_STATUSES | {"queued", "confirming"}, (e.id, e.status)
        if e.status in FINAL_STATUSES - {"invalid"}:
            assert 1 <= len(gpu_rows(url, e.id)) <= e.attempts, (e.id, e.attempts, len(gpu_rows(url, e.id)))
    run = rows(url, Run)[0]
    kept = [e for e in exps if e.kind == "experiment" and e.status == "keep"]
    assert run.head_commit == (kept[-1].commit if kept else run.baseline_commit)
    assert ws.branch_tip(run.name) == run.head_commit
    undelivered = [(ev.id, ev.kind, ev.text) for ev in rows(url, Event) if ev.delivered_at is None]
    assert not undelivered, undelivered
    return run


def assert_posted_once_in_order(url: str, fake) -> None:
    """Slack: every event posted exactly once (no two posts carry one event id), in event order, and each
    event's stored ts is its post's."""
    posts = fake.event_posts(CHANNEL)
    ids = [int(m["metadata"]["event_payload"]["id"]) for m in posts]
    assert len(ids) == len(set(ids)), f"an event was posted twice: {ids}"
    assert ids == sorted(ids), f"events posted out of order: {ids}"
    ts = {int(m["metadata"]["event_payload"]["id"]): m["ts"] for m in posts}
    events = rows(url, Event)
    assert [ev.id for ev in events] == ids
    assert all(ev.delivery_ref.startswith(ts[ev.id]) for ev in events)


def harness_alive(pid: int) -> bool:
    from loop.runners.base import is_harness_process

    return bool(pid) and is_harness_process(pid)


# ---- a throwaway PostgreSQL cluster ----

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """A private PostgreSQL 15 cluster (trust auth, 127.0.0.1:<port>, socket in its own directory) run as the
    `postgres` OS user; stop() / start() restart it in place."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/ratchet"

    def _as_postgres(self, *cmd: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                          "-E", "UTF8", "--no-sync")
        self.start()
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE ratchet")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"),
                          "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")


@pytest.fixture
def pg_cluster():
    """A started throwaway cluster with an empty database `ratchet`; stopped and removed afterwards. Never the
    shared cluster on 5432."""
    import pwd

    if not (PG_BIN / "initdb").exists() or os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs PostgreSQL 15 binaries, root and runuser to start a private cluster")
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no `postgres` OS user to run a private cluster")
    root = Path(tempfile.mkdtemp(prefix="ratchet-pg-"))
    os.chown(root, pw.pw_uid, pw.pw_gid)
    cluster = PgCluster(root)
    try:
        cluster.init()
        yield cluster
    finally:
        try:
            cluster.stop("immediate")
        except subprocess.SubprocessError:
            pass
        shutil.rmtree(root, ignore_errors=True)
