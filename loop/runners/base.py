"""What every runner offers the engine: slots, a job to run, a handle to watch or kill it; and what the
runners share: the harness command line, the sandbox settings, process groups, curve and log files.

Runners execute and report; they never decide keep or discard and never write the database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from trainer.result import Result, read_result
from trainer.sandbox import SandboxConfig
from trainer.untrusted import clean_lines

BACKSTOP_S = 30.0  # the harness times itself out at budget + grace; the runner kills only if that fails
KILL_WAIT_S = 3.0  # SIGTERM, then SIGKILL after this long


@dataclass(frozen=True)
class Slot:
    """One place an experiment can train: a GPU (or the CPU) on a host; or, for a multi-GPU scale, several
    slots of one host taken together (`members`, see `together`)."""

    name: str  # e.g. "local:gpu0" or "local:cpu"; several together: "local:gpu0+local:gpu1"
    host: str
    env: dict = field(default_factory=dict)  # extra environment, e.g. CUDA_VISIBLE_DEVICES
    members: tuple = ()  # the single slots this one holds (empty: it is a single slot)

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the single slots it holds: busy for every other experiment while it trains."""
        return (self.name,) if not self.members else tuple(m.name for m in self.members)

    @property
    def gpus(self) -> int:
        """How many slots (GPUs) it holds: the job's data-parallel ranks."""
        return len(self.members) or 1

    @classmethod
    def together(cls, slots) -> "Slot":
        """One slot holding `slots` (all of one host) for a job on several GPUs: CUDA_VISIBLE_DEVICES lists
        their devices in order (empty on CPU slots, where the ranks share the CPU). Raises ValueError when the
        slots are none, on more than one host, or already combined."""
        slots = tuple(slots)
        if not slots or len({s.host for s in slots}) != 1 or any(s.members for s in slots):
            raise ValueError(f"slots to take together must be single slots of one host: {[s.name for s in slots]}")
        if len(slots) == 1:
            return slots[0]
        env = dict(slots[0].env)
        devices = [s.env["CUDA_VISIBLE_DEVICES"] for s in slots if s.env.get("CUDA_VISIBLE_DEVICES")]
        if any("CUDA_VISIBLE_DEVICES" in s.env for s in slots):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        return cls("+".join(s.name for s in slots), slots[0].host, env, slots)


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
    nproc: int = 1  # data-parallel ranks: one per GPU (slot) the job holds

    @property
    def grace(self) -> float:
        """Seconds past the budget before the harness gives up: `grace_s`, else the harness's own default
        (trainer.harness.default_grace_s: 30 s + 10% of the budget)."""
        if self.grace_s is not None:
            return self.grace_s
        from trainer.harness import default_grace_s  # here: the harness module imports numpy, the runners need not

        return default_grace_s(self.budget_s)


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


class Handle:
    """A started experiment: poll `done()`, then read `outcome()`; `kill()` stops it; `progress()` is its latest
    curve point. The engine notes on it what the run is for (kind, description, promotion_id, confirms_id)."""

    exp_id: int
    slot: Slot
    job: Job
    pid: Optional[int] = None  # its process group on this machine; None for remote runs (reaped by experiment id)
    started: float = 0.0  # time.time() when it started
    kind: str = "experiment"
    description: str = ""
    promotion_id: Optional[int] = None
    confirms_id: Optional[int] = None
    curve_path: Optional[Path] = None  # the loss curve as it grows, in the job's local workdir
    _outcome: Optional[Outcome] = None
    _aborted: str = ""  # why it was killed on purpose

    def __init__(self, job: Job, slot: Slot, on_done: Callable[[], None]):
        """`job` training on `slot`, started now (time.time()); a runner calls `on_done` once, when the outcome
        is ready."""
        self.exp_id, self.slot, self.job, self._on_done = job.exp_id, slot, job, on_done
        self.started = time.time()

    def done(self) -> bool:
        return self._outcome is not None

    def outcome(self) -> Optional[Outcome]:
        """The outcome once done(), else None."""
        return self._outcome

    def kill(self, reason: str) -> None:
        """Stop it; its outcome then carries `aborted=reason`."""
        raise NotImplementedError

    def progress(self) -> Optional[dict]:
        """{step, elapsed_s, loss} of the latest curve point, or None before the first."""
        return last_curve_point(self.curve_path) if self.curve_path else None

    def _make_outcome(self, result: Result, **fields) -> Outcome:
        """An Outcome of this run (its slot, the slot's host unless `host` is given, wall seconds since it
        started); `fields`: the other Outcome fields."""
        fields.setdefault("host", self.slot.host)
        return Outcome(result=result, slot=self.slot.name, wall_seconds=round(time.time() - self.started, 3), **fields)


class Runner:
    """Where experiments train. A runner with hosts that can fail overrides `all_slots`, `health` and `reap`;
    one with connections or standby processes to release overrides `close`."""

    name: str = ""

    def slots(self) -> list[Slot]:
        """The slots new experiments may start on now."""
        raise NotImplementedError

    def all_slots(self) -> list[Slot]:
        """Every slot, those of hosts that are down included."""
        return self.slots()

    def start(self, job: Job, slot: Slot, on_done: Callable[[], None]) -> Handle:
        """Start `job` on `slot` and return at once; `on_done()` is called once its outcome is ready.
        Raises OSError when it cannot be started (an infrastructure failure)."""
        raise NotImplementedError

    def health(self) -> list:
        """One record per host: a dict, or a dataclass (SSH's HostHealth), with at least name, up (False or None
        when down or never checked) and error, and address where there is one. This default: every host up."""
        return [{"name": host, "up": True, "error": ""} for host in dict.fromkeys(s.host for s in self.all_slots())]

    def reap(self, exp_id: int, host: str) -> bool:
        """Kill what is left of experiment `exp_id` on a remote `host` after a restart; True when something was."""
        return False

    def close(self) -> None:
        """Release what the runner holds (connections, standby processes)."""


def read_end(path: Path, limit: int) -> str:
    """The last `limit` bytes of a file as text ("" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def last_curve_point(curve: Path) -> Optional[dict]:
    """The last complete JSON line of a curve file ({step, elapsed_s, loss}), or None."""
    for line in reversed(read_end(curve, 4096).splitlines()):
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
    """The last n lines of a run's log (empty if missing), cleaned: the log holds the proposal's own output,
    which is untrusted text (truncated, secrets redacted: trainer/untrusted.py)."""
    return clean_lines(read_end(path, 16384), n)


def fresh_workdir(job: Job, *also: str) -> Path:
    """The job's local directory, created, without the files (and `also`) an earlier run of it left."""
    wd = Path(job.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "result.curve.jsonl", "log.txt", "train.py", *also):
        (wd / stale).unlink(missing_ok=True)
    return wd


def run_result(job: Job, *, aborted: str = "", error: str = "", result: Optional[Path] = None,
               timed_out: bool = False, returncode: Optional[int] = None, backstop_s: float = BACKSTOP_S,
               note: str = "") -> Result:
    """The result of a finished run, first that applies: killed on purpose (`aborted`: why); the runner's own
    `error`; the harness's result.json (`result`: its path, read when it exists); a timeout (the runner killed it
    past budget + grace + backstop_s; `note` added); else a crash saying how the harness ended (`returncode`:
    negative for a signal, None when its process group vanished)."""
    if aborted or error:
        return Result(status="crash", error=f"aborted: {aborted}" if aborted else error, seed=job.seed)
    if result is not None and result.exists():
        try:
            return read_result(result)
        except (OSError, ValueError, TypeError) as e:
            return Result(status="crash", error=f"unreadable result.json ({e})", seed=job.seed)
    if timed_out:
        return Result(status="timeout", error=f"killed after budget + grace + {backstop_s:.0f} s"
                      + (f" ({note})" if note else ""), seed=job.seed)
    why = ("was killed (its process group is gone)" if returncode is None else
           f"killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}")
    return Result(status="crash", error=f"harness {why} without a result", seed=job.seed)


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message ("" when it has none)."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")


# ---- the harness and its processes ----


def harness_args(job: Job, sandbox: SandboxConfig) -> list[str]:
    """trainer.run's options for a job (relative paths inside the workdir) under these sandbox settings: the
    harness sandboxes the proposal itself, with what the host offers."""
    cmd = ["--script", "train.py", "--data", str(job.data_dir), "--budget-s", str(job.budget_s),
           "--out", "result.json", "--seed", str(job.seed), "--device", job.device, "--grace-s", str(job.grace),
           *sandbox.args()]
    if job.scale:
        cmd += ["--scale", json.dumps(job.scale)]
    if job.eval_tokens:
        cmd += ["--eval-tokens", str(job.eval_tokens)]
    if job.seq_len:
        cmd += ["--seq-len", str(job.seq_len)]
    if job.nproc > 1:
        cmd += ["--nproc", str(job.nproc)]
    return cmd


def harness_command(job: Job, sandbox: SandboxConfig, python: str = sys.executable) -> list[str]:
    """The command line that runs the harness on a job."""
    return [python, "-P", "-m", "trainer.run", *harness_args(job, sandbox)]


def sandbox_config(settings=None) -> SandboxConfig:
    """The sandbox settings of `settings` (default: the current configuration; the defaults when it is invalid)."""
    if settings is None:
        from loop.config import ConfigError, load_settings

        try:
            settings = load_settings()
        except ConfigError:
            return SandboxConfig()
    return SandboxConfig(enabled=settings.sandbox, user=settings.sandbox_user, memory_gb=settings.sandbox_memory_gb,
                         max_processes=settings.sandbox_max_processes, max_file_gb=settings.sandbox_max_file_gb,
                         max_open_files=settings.sandbox_max_open_files)


def spawn(cmd: list[str], wd: Path, env: dict, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """Start `cmd` in `wd` in a session (process group) of its own, with `env` added to this process's environment
    and its output to wd/log.txt. Raises OSError when it cannot be started."""
    with open(wd / "log.txt", "wb") as log:
        return subprocess.Popen(cmd, cwd=wd, stdout=log, stderr=subprocess.STDOUT, stdin=stdin,
                                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a whole process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def is_harness_process(pid: int) -> bool:
    """True when `pid` is alive and is a trainer.run harness (guards against a reused pid after a restart)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"trainer.run" in cmdline
