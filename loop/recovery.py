"""After a restart: the experiments the last process left running are re-queued (their processes stopped first)
and the run's branch is moved to the head the database recorded (the database is written first)."""

from __future__ import annotations

import logging
from collections.abc import Container

from sqlmodel import select

from db.models import Experiment, Run
from db.session import session_scope
from loop.runners.base import Runner, is_harness_process, kill_group
from loop.workspace import Workspace

log = logging.getLogger("ratchet.recovery")


def reconcile(db_engine, run_id: int, live: Container[int], runner: Runner, workspace: Workspace) -> None:
    """Re-queue the run's experiments found `running` or `proposed` that are not in `live` (experiment ids this
    process is running): a local harness left behind is killed, a remote run reaped on its host (an unreachable
    host is left to the health check). Then the run's branch is set to the database's head if it differs."""
    with session_scope(db_engine) as db:
        run = db.get(Run, run_id)
        stale = db.exec(select(Experiment).where(Experiment.run_id == run.id,
                                                 Experiment.status.in_(("running", "proposed")))).all()
        for exp in stale:
            if exp.id in live:
                continue
            if exp.pid and is_harness_process(exp.pid):
                kill_group(exp.pid)
            elif exp.host and exp.host != "local":
                try:  # a remote run left behind by the crash: stop it before it is re-run
                    runner.reap(exp.id, exp.host)
                except Exception:  # noqa: BLE001 - an unreachable host is the health check's business
                    log.warning("could not reap #%s on %s", exp.id, exp.host)
            exp.status, exp.pid = "queued", None
            exp.reason = "re-queued after a restart"
            db.add(exp)
        head = run.head_commit
        name = run.name
    tip = workspace.branch_tip(name)
    if tip != head:
        log.warning("branch %s at %s, database head %s: moving the branch", name, tip, head)
        workspace.set_branch(name, head)
