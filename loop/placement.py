"""Placement of a job that needs several GPUs: N free slots of one host, else which host to drain, else why it can
never run. Pure: reads slot lists, touches no runner and no database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from loop.runners.base import Slot


@dataclass(frozen=True)
class Placement:
    """What to do with a job that needs `need` slots of one host. Exactly one of:
    `slots` (start it there now), `drain` (hold it; start nothing new on that host until enough are free),
    `error` (no host has that many slots: it can never run); all empty: hold it, drain nothing (the hosts large
    enough are down)."""

    slots: tuple[Slot, ...] = ()
    drain: Optional[str] = None
    error: str = ""


def slots_per_host(slots: Iterable[Slot]) -> dict[str, int]:
    """Host → how many (single) slots it has, in the order hosts first appear."""
    out: dict[str, int] = {}
    for s in slots:
        out[s.host] = out.get(s.host, 0) + 1
    return out


def place(need: int, free: list[Slot], every: list[Slot], down: Iterable[str] = ()) -> Placement:
    """Where a job needing `need` GPUs (slots) of one host goes.

    `free`: the slots free now (none of a host that is down); `every`: all slots, down hosts' included (a host that
    is down may come back); `down`: hosts taking no new experiment. Among hosts that have `need` free slots, the one
    with the fewest free slots is taken (best fit: larger gaps stay open for other multi-GPU jobs), its first `need`
    free slots in order. When none has, the up host with `need` slots in all and the most of them free now is
    drained. When no host has `need` slots at all, `error` says so (the largest host named).
    """
    sizes = slots_per_host(every)
    if need <= 1:
        return Placement(slots=tuple(free[:1]))
    largest = max(sizes.items(), key=lambda kv: kv[1], default=None)
    if largest is None or largest[1] < need:
        have = f"the largest host, {largest[0]}, has {largest[1]}" if largest else "the runner has none"
        return Placement(error=f"needs {need} GPUs (slots) on one host; {have}")
    down = set(down)
    free_by_host: dict[str, list[Slot]] = {}
    for s in free:
        if s.host not in down:
            free_by_host.setdefault(s.host, []).append(s)
    fits = [(len(f), h) for h, f in free_by_host.items() if len(f) >= need]
    if fits:
        host = min(fits, key=lambda x: x[0])[1]
        return Placement(slots=tuple(free_by_host[host][:need]))
    large = [h for h, n in sizes.items() if n >= need and h not in down]
    if not large:
        return Placement()
    return Placement(drain=max(large, key=lambda h: len(free_by_host.get(h, ()))))
