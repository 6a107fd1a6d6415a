"""What every runner offers the engine: slots, a job to run, a handle to watch or kill it.

Runners execute and report; they never decide keep or discard and never write the database.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

from trainer.result import Result


@dataclass(frozen=True)
class Slot:
    """One place an experiment can train: a GPU (or the CPU) on a host."""

    name: str  # e.g. "local:gpu0" or "local:cpu"
    host: str
    env: dict = field(default_factory=dict)  # extra environment, e.g. CUDA_VISIBLE_DEVICES


@dataclass
class Job:
    """Everything needed to train one experiment. Seconds for times."""

    exp_id: int
    source: str  # the train.py text
    workdir: Path  # the experiment's own directory
    data_dir: Path
    budget_s: float
    seed: int = 0
    scale: dict = field(default_factory=dict)
    eval_tokens: Optional[int] = None
    seq_len: Optional[int] = None
    grace_s: Optional[float] = None
    device: str = "auto"

    @property
    def grace(self) -> float:
        """Seconds past the budget before the harness gives up (its own default when unset)."""
        return 60.0 + 0.5 * self.budget_s if self.grace_s is None else self.grace_s


@dataclass
class Outcome:
    """What came back: the harness's result (or one the runner wrote when the harness could not)."""

    result: Result
    slot: str
    host: str
    wall_seconds: float
    log_tail: list[str] = field(default_factory=list)
    infra_failed: bool = False  # the host or runner failed, not the idea: re-queue
    aborted: str = ""  # set when killed on purpose (pause now): the reason
    curve: list = field(default_factory=list)  # [[elapsed_s, loss], …] downsampled (see downsample_curve)


class Handle(Protocol):
    exp_id: int
    slot: Slot
    pid: Optional[int]

    def done(self) -> bool: ...
    def outcome(self) -> Optional[Outcome]: ...
    def kill(self, reason: str) -> None: ...
    def progress(self) -> Optional[dict]: ...


class Runner(Protocol):
    name: str

    def slots(self) -> list[Slot]: ...
    def start(self, job: Job, slot: Slot, on_done: Callable[[], None]) -> Handle: ...


def last_curve_point(curve: Path) -> Optional[dict]:
    """The last complete JSON line of a curve file ({step, elapsed_s, loss}), or None."""
    try:
        with open(curve, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def read_curve(path: Path) -> list[dict]:
    """Every complete JSON line of a curve file ({step, elapsed_s, loss}); a torn last line is skipped."""
    out = []
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return out


def downsample_curve(points: list[dict], n: int = 200) -> list[list[float]]:
    """At most n [elapsed_s, loss] pairs, evenly spaced over the run, the last point kept; non-finite losses dropped."""
    pts = [[float(p["elapsed_s"]), float(p["loss"])] for p in points
           if isinstance(p.get("loss"), (int, float)) and p["loss"] == p["loss"] and "elapsed_s" in p]
    if len(pts) <= n:
        return pts
    step = len(pts) / n
    picked = [pts[int(i * step)] for i in range(n - 1)]
    return picked + [pts[-1]]


def tail(path: Path, n: int = 20) -> list[str]:
    """The last n lines of a text file (empty if missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            return f.read().decode(errors="replace").splitlines()[-n:]
    except OSError:
        return []
