"""The swarm's arithmetic: how many Claude requests a fleet needs in flight, the AIMD limit that backs off on
rate limits, the latency window, and the research directions of program.md that concurrent requests spread over.

Pure: no network, no database, no threads of its own (the callers lock).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from loop.validate import DUPLICATE

MAX_CONCURRENCY = 64  # a sane bound on requests in flight, whatever the fleet's size
DEFAULT_LATENCY_S = 30.0  # assumed answer time until the first answers are measured (a large model, long prompt)
LATENCY_WINDOW = 20  # recent answers the median latency is taken over


def default_concurrency(slots: int) -> int:
    """`proposer_concurrency` when not configured: one request per slot, at most MAX_CONCURRENCY, at least 1."""
    return max(1, min(MAX_CONCURRENCY, slots))


def demand(free: int, remaining_s: Iterable[float], latency_s: float, ready: int) -> int:
    """Proposals still needed: the free slots, plus the training slots expected to free up within `latency_s`
    (`remaining_s`: each training slot's expected seconds to go), less the proposals `ready` (stored `queued`,
    not training). A request started now answers in about `latency_s`, so this is what it must cover.
    Never negative."""
    soon = sum(1 for r in remaining_s if r <= latency_s)
    return max(0, free + soon - ready)


def to_start(need: int, in_flight: int, limit: int, left: Optional[int] = None) -> int:
    """How many requests to start now: enough that in-flight requests cover `need`, never more than `limit` in
    flight, never more than `left` (experiments left before max_experiments; None = no bound). Never negative."""
    n = min(need - in_flight, limit - in_flight)
    if left is not None:
        n = min(n, left - in_flight)
    return max(0, n)


class Latency:
    """The median of the last LATENCY_WINDOW answer times (seconds); DEFAULT_LATENCY_S before the first."""

    def __init__(self, default_s: float = DEFAULT_LATENCY_S, window: int = LATENCY_WINDOW):
        self.default_s = default_s
        self._seen: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self._seen.append(max(0.0, float(seconds)))

    def median(self) -> float:
        return statistics.median(self._seen) if self._seen else self.default_s


class Aimd:
    """Additive-increase / multiplicative-decrease limit on requests in flight, as TCP congestion control does.

    `throttled(now)` on a 429 / 529 (retried by the SDK or not) halves the limit, at most once per
    `cooldown_s` (a burst of answers to requests that were already in flight is one signal, not many);
    `answered()` on a success grows it by 1 / limit (one request more per limit's worth of answers) up to
    `cap`. A back-off episode runs from the first halving until the limit is back at `cap`: `throttled`
    returns True only for the first halving of an episode, so the caller writes one event per back-off.
    """

    def __init__(self, cap: int, cooldown_s: float = 5.0):
        self.cap = max(1, int(cap))
        self.value = float(self.cap)
        self.cooldown_s = cooldown_s
        self.backing_off = False
        self._last_cut = -math.inf

    @property
    def limit(self) -> int:
        return max(1, int(self.value))

    def set_cap(self, cap: int) -> None:
        cap = max(1, int(cap))
        if not self.backing_off or self.value > cap:
            self.value = float(cap)
        self.cap = cap

    def throttled(self, now: float) -> bool:
        if now - self._last_cut < self.cooldown_s:
            return False
        self._last_cut = now
        self.value = max(1.0, self.value / 2)
        first, self.backing_off = not self.backing_off, True
        return first

    def answered(self) -> None:
        if self.value < self.cap:
            self.value = min(float(self.cap), self.value + 1.0 / self.value)
        if self.value >= self.cap:
            self.backing_off = False


# ---- research directions ----

@dataclass(frozen=True)
class Direction:
    """A research direction named in program.md: `name` (a short key, e.g. "optimiser") and what it covers."""

    name: str
    text: str


_HEADING = re.compile(r"^#{1,6}\s+research directions\s*$", re.I | re.M)
_BULLET = re.compile(r"^\s*[-*]\s+\**`?([A-Za-z][\w /+-]{0,40}?)`?\**\s*[:—–-]\s+(.+)$")


def parse_directions(program: str) -> list[Direction]:
    """The directions of program.md's "## Research directions" section: one bullet each, `- name: what it
    covers` (the name up to 40 characters). [] when there is no such section."""
    m = _HEADING.search(program or "")
    if not m:
        return []
    out: list[Direction] = []
    for line in program[m.end():].splitlines():
        if line.startswith("#"):
            break
        b = _BULLET.match(line)
        if b:
            out.append(Direction(b.group(1).strip().lower(), b.group(2).strip()))
    return out


def pick_direction(directions: Sequence[Direction], active: Mapping[str, int], tried: Mapping[str, int]) -> str:
    """The direction for the next request: the one with the fewest proposals active right now (in flight, queued,
    training), then the fewest tried so far, then program.md's order. "" when there are none."""
    if not directions:
        return ""
    order = {d.name: i for i, d in enumerate(directions)}
    return min(order, key=lambda n: (active.get(n, 0), tried.get(n, 0), order[n]))


def duplicate_rate(proposals: Iterable[tuple[Optional[dict], str]]) -> Optional[float]:
    """The share of proposals whose idea was a duplicate of one already tried, queued or in flight (same
    normalised AST): an answer the proposer had to repair for it (usage["duplicate_turns"]) or one stored
    `invalid` for it. `proposals`: (usage, reason) per proposal. None when there are none."""
    n = dup = 0
    for usage, reason in proposals:
        n += 1
        dup += bool((usage or {}).get("duplicate_turns")) or DUPLICATE in (reason or "")
    return dup / n if n else None
