"""The local runner: each experiment is `python -m trainer.run` in its own process group, one per slot.

Reads the result only from the harness's JSON; never parses the script's prints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from loop.runners.base import Job, Outcome, Slot, downsample_curve, last_curve_point, read_curve, tail
from trainer.result import Result, read_result

BACKSTOP_S = 30.0  # the harness times itself out at budget + grace; the runner kills only if that fails
KILL_WAIT_S = 3.0  # SIGTERM, then SIGKILL after this long


def detect_slots(device: str = "auto", cpu_slots: int = 1) -> list[Slot]:
    """One slot per visible CUDA GPU (CUDA_VISIBLE_DEVICES pinned per slot), else `cpu_slots` CPU slots."""
    if device in ("auto", "cuda"):
        import torch

        n = torch.cuda.device_count()
        if n:
            return [Slot(f"local:gpu{i}", "local", {"CUDA_VISIBLE_DEVICES": str(i)}) for i in range(n)]
    env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    if cpu_slots == 1:
        return [Slot("local:cpu", "local", env)]
    return [Slot(f"local:cpu{i}", "local", env) for i in range(cpu_slots)]


def harness_command(job: Job, python: str = sys.executable) -> list[str]:
    """The command line that runs the harness on a job (relative paths inside the workdir)."""
    cmd = [python, "-P", "-m", "trainer.run", "--script", "train.py", "--data", str(job.data_dir),
           "--budget-s", str(job.budget_s), "--out", "result.json", "--seed", str(job.seed),
           "--device", job.device, "--grace-s", str(job.grace)]
    if job.scale:
        import json

        cmd += ["--scale", json.dumps(job.scale)]
    if job.eval_tokens:
        cmd += ["--eval-tokens", str(job.eval_tokens)]
    if job.seq_len:
        cmd += ["--seq-len", str(job.seq_len)]
    return cmd


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


class LocalHandle:
    """A running local experiment. Thread-safe; `on_done` is called once when the outcome is ready."""

    def __init__(self, job: Job, slot: Slot, on_done: Callable[[], None]):
        self.exp_id = job.exp_id
        self.slot = slot
        self.job = job
        self._on_done = on_done
        self._outcome: Optional[Outcome] = None
        self._aborted = ""
        self._timed_out = False
        self.started = time.time()
        wd = Path(job.workdir)
        wd.mkdir(parents=True, exist_ok=True)
        for stale in ("result.json", "result.curve.jsonl", "log.txt"):
            (wd / stale).unlink(missing_ok=True)
        (wd / "train.py").write_text(job.source)
        self.log_path = wd / "log.txt"
        self.curve_path = wd / "result.curve.jsonl"
        env = {**os.environ, **slot.env, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(harness_command(job), cwd=wd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.pid = self.proc.pid
        threading.Thread(target=self._watch, name=f"exp-{job.exp_id}", daemon=True).start()

    def _watch(self) -> None:
        deadline = self.job.budget_s + self.job.grace + BACKSTOP_S
        try:
            self.proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            self._timed_out = True
            kill_group(self.pid)
            self.proc.wait()
        kill_group(self.pid)  # leftovers (compile workers) die with their experiment
        self._outcome = self._read_outcome()
        self._on_done()

    def _read_outcome(self) -> Outcome:
        wall = time.time() - self.started
        log_tail = tail(self.log_path)
        result_path = Path(self.job.workdir) / "result.json"
        if self._aborted:
            res = Result(status="crash", error=f"aborted: {self._aborted}", seed=self.job.seed)
        elif result_path.exists():
            try:
                res = read_result(result_path)
            except (OSError, ValueError) as e:
                res = Result(status="crash", error=f"unreadable result.json ({e})", seed=self.job.seed)
        elif self._timed_out:
            res = Result(status="timeout", error=f"killed after budget + grace + {BACKSTOP_S:.0f} s",
                         seed=self.job.seed)
        else:
            code = self.proc.returncode
            why = f"killed by signal {-code}" if code and code < 0 else f"exited with code {code}"
            res = Result(status="crash", error=f"harness {why} without a result", seed=self.job.seed)
        return Outcome(result=res, slot=self.slot.name, host=self.slot.host, wall_seconds=round(wall, 3),
                       log_tail=log_tail, aborted=self._aborted, curve=downsample_curve(read_curve(self.curve_path)))

    def done(self) -> bool:
        return self._outcome is not None

    def outcome(self) -> Optional[Outcome]:
        return self._outcome

    def kill(self, reason: str) -> None:
        """Stop the experiment (its whole process group): SIGTERM, then SIGKILL after KILL_WAIT_S."""
        self._aborted = reason or "killed"
        if kill_group(self.pid, signal.SIGTERM):
            try:
                self.proc.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                kill_group(self.pid)

    def progress(self) -> Optional[dict]:
        """{step, elapsed_s, loss} of the latest curve point, or None before the first step."""
        return last_curve_point(self.curve_path)


class LocalRunner:
    """Subprocess runner on this machine: one slot per GPU, or one CPU slot."""

    name = "local"

    def __init__(self, device: str = "auto", cpu_slots: int = 1):
        self._slots = detect_slots(device, cpu_slots)

    def slots(self) -> list[Slot]:
        return list(self._slots)

    def start(self, job: Job, slot: Slot, on_done: Callable[[], None]) -> LocalHandle:
        """Start a job on a slot. Raises OSError when the process cannot be started (an infra failure)."""
        return LocalHandle(job, slot, on_done)
