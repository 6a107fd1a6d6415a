"""SQLModel tables: runs, experiments, the event outbox, the audit log, the budget ledger, hosts, hints.

Tables only: no business rules live here (those are in loop/).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, Column, Index, Text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Timezone-aware UTC now (SQLModel refuses naive datetimes)."""
    return datetime.now(timezone.utc)


# Pydantic reads a default_factory's signature each time a row is built: a builtin's (`list`, `dict`) is parsed from
# its text signature (an ast.parse and a new class, left as cyclic garbage, per field per row); a Python function's
# is read directly. The engine builds a few rows per experiment.
def empty_list() -> list:
    """A new empty list (a default_factory)."""
    return []


def empty_dict() -> dict:
    """A new empty dict (a default_factory)."""
    return {}


RUN_STATES = ("running", "paused")
EXPERIMENT_STATUSES = ("proposed", "queued", "running", "confirming", "keep", "discard", "crash", "timeout",
                       "refused", "pruned", "invalid", "aborted", "infra_failed")
FINAL_STATUSES = frozenset({"keep", "discard", "crash", "timeout", "refused", "pruned", "invalid", "aborted"})
ACTIVE_STATUSES = frozenset({"proposed", "queued", "running", "confirming"})


class Run(SQLModel, table=True):
    """One research campaign on branch `ratchet/<name>`. Seconds for budgets, val_bpb in bits per byte."""

    __tablename__ = "runs"
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True)
    branch: str
    workspace: str
    baseline_commit: str
    head_commit: str
    head_val_bpb: Optional[float] = None  # mean of head's runs
    head_runs: list = Field(default_factory=empty_list, sa_column=Column(JSON))  # val_bpb of each run of head
    noise_sigma: Optional[float] = None  # σ pooled over every hardware class (shown; the rule uses class_sigma)
    class_sigma: dict = Field(default_factory=empty_dict, sa_column=Column(JSON))  # hardware class → its σ
    promoted_commit: str = ""  # the last commit whose gain was shown to transfer to a larger scale
    budget_s: float
    device: str = "cpu"
    state: str = "running"  # running | paused
    pause_reason: str = ""
    pause_now: bool = False  # paused with `pause now`: running experiments are killed
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Experiment(SQLModel, table=True):
    """One proposal trained once, or a baseline repeat, a confirm run of a passing change, a promotion run.
    Seconds, MiB, USD; val_bpb in bits per byte."""

    __tablename__ = "experiments"
    # The engine asks "is this hash already in the run?" per proposal and "what is queued in the run?" per
    # round: without these, SQLite answers both by scanning every experiment of the run (its run_id index).
    __table_args__ = (Index("ix_experiments_run_id_ast_hash", "run_id", "ast_hash"),
                      Index("ix_experiments_run_id_status", "run_id", "status"),
                      # a commit's accepted runs on a class (each result asks about its parent), what was
                      # tried on head: without them, scans of every keep or every experiment. device_name is
                      # third so that SQLite prefers this index to the class's one below for the first.
                      Index("ix_experiments_run_id_commit_device_name", "run_id", "commit", "device_name"),
                      Index("ix_experiments_run_id_parent_commit", "run_id", "parent_commit"),
                      # σ of one hardware class pools the runs of that class (loop/hardware.py)
                      Index("ix_experiments_run_id_device_name", "run_id", "device_name"))
    id: Optional[int] = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", index=True)
    kind: str = "experiment"  # baseline | experiment | confirm | promotion
    # a confirm run: the experiment whose passing result it re-trains with a new seed before that becomes head
    confirms_id: Optional[int] = Field(default=None, foreign_key="experiments.id", index=True)
    promotion_id: Optional[int] = Field(default=None, foreign_key="promotions.id", index=True)
    scale: str = ""  # scale name for promotion runs ("" = the loop's own)
    scale_overrides: dict = Field(default_factory=empty_dict, sa_column=Column(JSON))  # passed to ctx.scale
    budget_s: Optional[float] = None  # this experiment's budget when not the run's (promotions)
    status: str = Field(default="proposed", index=True)
    reason: str = Field(default="", sa_column=Column(Text))  # why invalid / crashed / aborted
    parent_commit: str = ""
    commit: str = ""  # the experiment commit (reachable from refs/ratchet/experiments)
    proposer: str = ""
    direction: str = ""  # the research direction of program.md the proposal was asked for ("" = none)
    description: str = Field(default="", sa_column=Column(Text))
    hypothesis: str = Field(default="", sa_column=Column(Text))
    diff: str = Field(default="", sa_column=Column(Text))
    edit_key: str = ""
    ast_hash: str = Field(default="", index=True)
    seed: int = 0
    val_bpb: Optional[float] = None
    training_seconds: Optional[float] = None
    total_seconds: Optional[float] = None
    wall_seconds: Optional[float] = None  # submit → result, as the engine saw it
    peak_memory_mb: Optional[float] = None
    mfu_percent: Optional[float] = None
    tokens: Optional[int] = None
    steps: Optional[int] = None
    params: Optional[int] = None
    host: str = ""
    slot: str = ""
    # the hardware class it trained on: result.json's device_name as the harness reported it
    device_name: str = ""
    # the hardware class it must train on ("" any): a paired control or confirmation, a promotion's second side
    hardware: str = ""
    cost_usd: float = 0.0  # proposer spend for this proposal
    usage: dict = Field(default_factory=empty_dict, sa_column=Column(JSON))  # proposer token accounting
    decision: dict = Field(default_factory=empty_dict, sa_column=Column(JSON))  # ratchet rule inputs and verdict
    log_tail: str = Field(default="", sa_column=Column(Text))
    curve: list = Field(default_factory=empty_list, sa_column=Column(JSON))  # [[elapsed_s, loss], …], ≤ 200 points
    attempts: int = 0  # starts, re-runs after a restart or a dead host included
    pid: Optional[int] = None  # local runner: the process group, to clean up after a crash of serve
    workdir: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None


class Promotion(SQLModel, table=True):
    """Does a gain transfer? The candidate and the reference trained at a larger scale, compared there."""

    __tablename__ = "promotions"
    id: Optional[int] = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", index=True)
    candidate_exp_id: Optional[int] = None  # the kept experiment promoted (None: head)
    candidate_commit: str
    reference_commit: str  # the run's baseline, or the last promoted commit
    scale: str  # name in the scale ladder
    scale_overrides: dict = Field(default_factory=empty_dict, sa_column=Column(JSON))
    budget_s: float
    seeds: int = 2
    status: str = "queued"  # queued | running | done | cancelled | failed
    verdict: str = ""  # transfers | does_not_transfer | inconclusive | scale_ignored
    result: dict = Field(default_factory=empty_dict, sa_column=Column(JSON))  # deltas, σ, runs, params per side
    requested_by: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: Optional[datetime] = None


class Event(SQLModel, table=True):
    """The outbox: what the loop has to say, stored in the same transaction as the change it reports."""

    __tablename__ = "events"
    id: Optional[int] = Field(default=None, primary_key=True)
    run_id: Optional[int] = Field(default=None, foreign_key="runs.id", index=True)
    experiment_id: Optional[int] = Field(default=None, foreign_key="experiments.id")
    kind: str  # kept | discarded | crashed | invalid | aborted | baseline | paused | resumed | ...
    text: str = Field(sa_column=Column(Text))  # one readable line
    payload: dict = Field(default_factory=empty_dict, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)
    delivered_at: Optional[datetime] = Field(default=None, index=True)
    delivery_ref: str = ""  # e.g. the Slack message ts, so a restart never posts twice
    attempts: int = 0


class CommandLog(SQLModel, table=True):
    """Audit: every command, allowed or refused, with who, what, when and the result."""

    __tablename__ = "command_log"
    id: Optional[int] = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow)
    user: str
    backend: str  # shell | slack
    text: str = Field(sa_column=Column(Text))
    command: str = ""
    allowed: bool = True
    result: str = Field(default="", sa_column=Column(Text))


class BudgetLedger(SQLModel, table=True):
    """Spend by UTC day: GPU-seconds of trainer slots and Claude USD."""

    __tablename__ = "budget_ledger"
    id: Optional[int] = Field(default=None, primary_key=True)
    day: str = Field(index=True)  # YYYY-MM-DD
    run_id: Optional[int] = Field(default=None, foreign_key="runs.id")
    experiment_id: Optional[int] = Field(default=None, foreign_key="experiments.id")
    kind: str  # gpu_seconds | claude_usd
    amount: float
    created_at: datetime = Field(default_factory=utcnow)


class BudgetLimit(SQLModel, table=True):
    """A cap set by a command (`budget gpu 24h/day`); overrides the config default for that cap."""

    __tablename__ = "budget_limits"
    id: Optional[int] = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", index=True)
    resource: str  # gpu (limit in GPU-seconds) | claude (limit in USD)
    period: str  # day | total
    limit: Optional[float] = None  # None: no cap
    set_by: str = ""
    updated_at: datetime = Field(default_factory=utcnow)


class Host(SQLModel, table=True):
    """A runner host and its slots (the local machine counts as one)."""

    __tablename__ = "hosts"
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(unique=True)
    runner: str = "local"
    address: str = ""
    slots: int = 1
    state: str = "up"  # up | down
    last_error: str = Field(default="", sa_column=Column(Text))
    last_seen: Optional[datetime] = None


class Hint(SQLModel, table=True):
    """A team member's suggestion for the proposer; data, never instructions."""

    __tablename__ = "hints"
    id: Optional[int] = Field(default=None, primary_key=True)
    run_id: Optional[int] = Field(default=None, foreign_key="runs.id")
    author: str
    text: str = Field(sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow)
    closed_at: Optional[datetime] = None


def as_dict(row: SQLModel) -> dict[str, Any]:
    """A row as a plain dict (for JSON output and rendering)."""
    return row.model_dump()
