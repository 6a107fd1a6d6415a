"""Host health: the runner's hosts recorded in the hosts table with an event when one goes down or comes back,
and whether a failed run failed for want of disk space.

Reads what runners report; never starts or stops a run.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path
from typing import Optional

from sqlmodel import Session, select

from db.models import Host, Run, utcnow
from loop import events
from loop.runners.base import Outcome, Runner

SPACE_PROBE_BYTES = 1 << 16  # a failed run's work directory must take this much more, or the disk is full


def normalise_health(rec) -> dict:
    """A runner's host record (see Runner.health: a dict or a dataclass) as {name, up, error, address}."""
    d = rec if isinstance(rec, dict) else dataclasses.asdict(rec)
    return {"name": str(d["name"]), "up": bool(d["up"]), "error": str(d.get("error") or ""),
            "address": str(d.get("address") or "")}


def record_health(db: Session, run: Run, records: list[dict], runner: Runner) -> None:
    """Store normalised health records in the hosts table (state, slot count, address, last error, last seen),
    with a `host_down` / `host_up` event for a known host whose state changed."""
    slots_by_host: dict[str, int] = {}
    for slot in runner.all_slots():  # down hosts' slots too
        slots_by_host[slot.host] = slots_by_host.get(slot.host, 0) + 1
    for rec in records:
        row = db.exec(select(Host).where(Host.name == rec["name"])).first()
        row = row or Host(name=rec["name"], runner=runner.name)
        was_up = row.state == "up"
        row.state = "up" if rec["up"] else "down"
        row.slots = slots_by_host.get(rec["name"], row.slots)
        row.address = rec["address"] or row.address or ""
        row.last_error = rec["error"] if not rec["up"] else row.last_error
        row.last_seen = utcnow() if rec["up"] else row.last_seen
        db.add(row)
        if was_up != bool(rec["up"]) and row.id is not None:
            kind = "host_up" if rec["up"] else "host_down"
            text = (f"host {rec['name']} is back: its slots take experiments again" if rec["up"] else
                    f"host {rec['name']} is down: {rec['error'] or 'no answer'}; its experiments are re-queued")
            db.add(events.run_event(run, kind, text, host=rec["name"], error=rec["error"]))


def disk_full_reason(workdir: Optional[str], outcome: Optional[Outcome], local: bool = True) -> str:
    """'disk full: <where>: <why>' when a run that failed did so for want of disk space, else ''.

    Evidence only from trusted code: the harness parent's own free-space check (the result's `disk_full`, on any
    host), or, for local runs, this process finding that the work directory cannot take SPACE_PROBE_BYTES more.
    Never the run's error text or log: the proposal writes those (it can raise OSError(28) itself). An ok result
    is never a disk problem.
    """
    if outcome is not None:
        r = outcome.result
        if outcome.aborted or (r.status == "ok" and not outcome.infra_failed):
            return ""
        if r.disk_full:
            return r.disk_full if r.disk_full.startswith("disk full") else f"disk full: {r.disk_full}"
    if not workdir or not local:
        return ""
    where = Path(workdir)
    while not where.exists() and where != where.parent:
        where = where.parent
    probe = where / ".ratchet-space-probe"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(SPACE_PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full: {where}: {e.strerror}"
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return ""
