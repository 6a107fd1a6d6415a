"""Budgets: GPU-hours and Claude USD per budget day and in total — spend from the ledger, caps from config
and from `budget` commands, and which cap (if any) is reached.

Reads the ledger and writes caps only; pausing on a cap is loop/pauses.py's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional
from zoneinfo import ZoneInfo

from sqlmodel import Session, func, select

from db.models import BudgetLedger, BudgetLimit, utcnow

RESOURCES = {"gpu": "gpu_seconds", "claude": "claude_usd"}  # resource → ledger kind
PERIODS = ("day", "total")
BUDGET_HELP = "budget gpu 24h/day · budget gpu 500h total · budget claude $40/day · budget claude $300 total · " \
              "budget gpu none/day (no cap)"


class BudgetError(ValueError):
    """A budget command in the wrong form or unit; the message shows the accepted forms."""


@dataclass(frozen=True)
class Cap:
    """One budget line. `used` and `limit` in GPU-seconds (gpu) or USD (claude); limit None = no cap."""

    resource: str
    period: str
    used: float
    limit: Optional[float]

    @property
    def reached(self) -> bool:
        return self.limit is not None and self.used >= self.limit

    @property
    def left(self) -> Optional[float]:
        return None if self.limit is None else max(0.0, self.limit - self.used)

    @property
    def name(self) -> str:
        return f"{self.resource}/{self.period}"


def budget_day(now: Optional[datetime] = None, tz: str = "UTC") -> str:
    """The budget day (YYYY-MM-DD) of `now` (aware; default utcnow) in the configured timezone."""
    now = now or utcnow()
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    return now.astimezone(ZoneInfo(tz)).date().isoformat()


_AMOUNT = re.compile(r"^(?P<usd>\$)?(?P<num>\d+(?:\.\d+)?)(?P<unit>h|hr|hrs|hours?|m|min|s|usd)?$", re.I)


def parse_budget(args: str) -> tuple[str, str, Optional[float]]:
    """`gpu 24h/day` → ("gpu", "day", 86400.0); `claude $40/day` → ("claude", "day", 40.0);
    `gpu 500h total`; `gpu none/day` clears a cap. GPU amounts take h / m / s, Claude amounts take $ or usd.

    Raises BudgetError naming the accepted forms for anything else (wrong unit, unknown resource).
    """
    parts = args.replace("/", " ").split()
    if len(parts) != 3 or parts[0].lower() not in RESOURCES or parts[2].lower() not in PERIODS:
        raise BudgetError(f"budget takes `<gpu|claude> <amount>/day` or `<gpu|claude> <amount> total`: {BUDGET_HELP}")
    resource, amount, period = parts[0].lower(), parts[1], parts[2].lower()
    if amount.lower() in ("none", "off", "unlimited"):
        return resource, period, None
    m = _AMOUNT.match(amount)
    if not m:
        raise BudgetError(f"cannot read the amount {amount!r}: {BUDGET_HELP}")
    num, unit, usd = float(m["num"]), (m["unit"] or "").lower(), bool(m["usd"]) or (m["unit"] or "").lower() == "usd"
    if resource == "gpu":
        if usd or not unit:
            raise BudgetError(f"a GPU budget is in hours, minutes or seconds (e.g. 24h/day), not {amount!r}")
        seconds = num * (3600 if unit.startswith("h") else 60 if unit.startswith("m") else 1)
        return resource, period, seconds
    if not usd or (unit and unit != "usd"):
        raise BudgetError(f"a Claude budget is in US dollars (e.g. $40/day), not {amount!r}")
    return resource, period, num


def config_limits(settings) -> dict[tuple[str, str], Optional[float]]:
    """Caps from the configuration: GPU-hours → seconds, Claude in USD."""
    h = lambda v: None if v is None else v * 3600.0  # noqa: E731
    return {("gpu", "day"): h(settings.budget_gpu_hours_per_day), ("gpu", "total"): h(settings.budget_gpu_hours_total),
            ("claude", "day"): settings.budget_claude_usd_per_day,
            ("claude", "total"): settings.budget_claude_usd_total}


def limits(db: Session, run_id: int, settings) -> dict[tuple[str, str], Optional[float]]:
    """Config caps, overridden by those set with `budget` commands (stored per run)."""
    out = config_limits(settings)
    for row in db.exec(select(BudgetLimit).where(BudgetLimit.run_id == run_id)).all():
        out[(row.resource, row.period)] = row.limit
    return out


def caps(db: Session, run_id: int, settings, now: Optional[datetime] = None) -> list[Cap]:
    """Every budget line with its spend: today's (budget day in settings.timezone) and the run's total."""
    day = budget_day(now, settings.timezone)
    lim = limits(db, run_id, settings)
    rows = db.exec(select(BudgetLedger.kind, BudgetLedger.day, func.sum(BudgetLedger.amount))
                   .where(BudgetLedger.run_id == run_id).group_by(BudgetLedger.kind, BudgetLedger.day)).all()
    out = []
    for resource, kind in RESOURCES.items():
        total = sum(a for k, _, a in rows if k == kind)
        today = sum(a for k, d, a in rows if k == kind and d == day)
        out.append(Cap(resource, "day", today, lim[(resource, "day")]))
        out.append(Cap(resource, "total", total, lim[(resource, "total")]))
    return out


def reached(db: Session, run_id: int, settings, resources=("gpu", "claude"),
            now: Optional[datetime] = None) -> Optional[Cap]:
    """The first cap reached among `resources`, or None."""
    lim = limits(db, run_id, settings)
    if all(lim[(r, period)] is None for r in resources for period in PERIODS):
        return None  # no cap set: no need to sum the ledger (the engine asks on every tick)
    return next((c for c in caps(db, run_id, settings, now) if c.resource in resources and c.reached), None)


def headroom(db: Session, run_id: int, settings, resource: str = "claude",
             now: Optional[datetime] = None) -> Optional[float]:
    """What is left of `resource` before its tightest cap (USD for claude, GPU-seconds for gpu), today's and the
    total; None when it has no cap. Never negative."""
    lim = limits(db, run_id, settings)
    if all(lim[(resource, period)] is None for period in PERIODS):
        return None
    return min(c.left for c in caps(db, run_id, settings, now) if c.resource == resource and c.limit is not None)


def set_limit(db: Session, run_id: int, resource: str, period: str, limit: Optional[float], user: str) -> None:
    """Store a cap for the run (replacing an earlier one)."""
    row = db.exec(select(BudgetLimit).where(BudgetLimit.run_id == run_id, BudgetLimit.resource == resource,
                                            BudgetLimit.period == period)).first()
    row = row or BudgetLimit(run_id=run_id, resource=resource, period=period)
    row.limit, row.set_by, row.updated_at = limit, user, utcnow()
    db.add(row)


def pause_reason(cap: Cap) -> str:
    """The pause reason for a reached cap: `budget: gpu/day (24.0 h used of 24.0 h)`."""
    return f"budget: {cap.name} ({fmt_amount(cap.resource, cap.used)} used of {fmt_amount(cap.resource, cap.limit)})"


def lifts_at_rollover(reason: str) -> bool:
    """Whether a pause with this reason ends by itself at the budget day's rollover: a daily cap's
    (pause_reason's `budget: gpu/day (…)`); a total cap's, or any other pause, waits for `resume`."""
    parts = reason.split()
    return len(parts) > 1 and parts[0] == "budget:" and parts[1].endswith("/day")


def fmt_amount(resource: str, v: Optional[float]) -> str:
    """GPU-seconds as hours, Claude as dollars; None as 'no cap'."""
    if v is None:
        return "no cap"
    return f"{v / 3600:.2f} h" if resource == "gpu" else f"${v:.2f}"
