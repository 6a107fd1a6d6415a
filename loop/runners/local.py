"""The local runner: each experiment is `python -m trainer.run` (the harness's trusted parent, which starts the
proposal's code in the OS sandbox itself) in its own process group, one per slot.

Reads the result only from the harness's JSON; never parses the script's prints.

With `standby` on, each slot keeps the next harness already started (`trainer.run --standby`: its sandboxed worker
and scorer are up with torch imported, waiting for a job on stdin), so an experiment starts training without
paying seconds of start-up; it runs in a directory of its own under `<workdir's parent>/.standby/` and is moved to
the experiment's directory when it ends.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

from loop.runners.base import (BACKSTOP_S, KILL_WAIT_S, Handle, Job, Outcome, Runner, Slot, downsample_curve,
                               fresh_workdir, harness_args, harness_command, kill_group, read_curve, run_result,
                               sandbox_config, spawn, tail)
from trainer.harness import TRAINING_DONE
from trainer.result import STANDBY_FAILED
from trainer.sandbox import SandboxConfig, delegate_cgroup, describe, features

log = logging.getLogger(__name__)


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


_warned: set = set()


def warn_sandbox(cfg: SandboxConfig) -> None:
    """Log once per process and config what the sandbox cannot enforce here (trainer.sandbox.features)."""
    f = features(cfg)
    if f["missing"] and cfg not in _warned:
        _warned.add(cfg)
        log.warning("%s", describe(f))


class Standby:
    """A harness started before its job (`trainer.run --standby`) in its own directory.

    `key` says which jobs it can take: the same data directory and device (its scorer mounted that data at
    launch). `after`: the directory of the run training on the slot now; on the CPU the standby starts its
    processes once that run's training is over (trainer/run.py), so it never slows a run being timed. Dies when
    released, killed, or when the runner goes away (end of its stdin).
    """

    _ids = itertools.count()

    def __init__(self, slot: Slot, root: Path, data_dir: Path, device: str, sandbox: SandboxConfig,
                 after: Optional[Path] = None):
        self.slot = slot
        self.key = (str(data_dir), device)
        self.sandbox = sandbox
        self.dir = root / f"{os.getpid()}-{slot.name.replace(':', '-')}-{next(self._ids)}"
        self.dir.mkdir(parents=True)
        cmd = [sys.executable, "-P", "-m", "trainer.run", "--standby", "--data", str(data_dir), "--device", device,
               *sandbox.args(), *(["--after", str(after)] if after is not None else [])]
        self.proc = spawn(cmd, self.dir, slot.env, stdin=subprocess.PIPE)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def hand(self, job: Job) -> bool:
        """Give it the job; False when it is gone (then it must not be used)."""
        line = json.dumps({"argv": harness_args(job, self.sandbox), "source": job.source}) + "\n"
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.close()
        except (OSError, ValueError):
            return False
        return self.alive()

    def release(self) -> None:
        """Kill it and remove its directory."""
        kill_group(self.proc.pid)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait()
        remove_tree(self.dir)


def remove_tree(path: Path) -> None:
    """Delete a run directory (only the trusted harness wrote there: nothing planted to follow)."""
    shutil.rmtree(path, ignore_errors=True)


class LocalHandle(Handle):
    """A running local experiment. Thread-safe; `on_done` is called once when the outcome is ready.

    With a `standby` (already started and matching the job), the job is handed to it instead of starting a
    process; its directory becomes `job.workdir` when the run ends.
    """

    def __init__(self, job: Job, slot: Slot, on_done: Callable[[], None], sandbox: SandboxConfig,
                 standby: Optional[Standby] = None):
        super().__init__(job, slot, on_done)
        self._timed_out = False
        self._infra_error = ""
        fresh_workdir(job, TRAINING_DONE)
        self.sandbox = sandbox
        self._lock = threading.Lock()  # kill() against the switch from a failed standby to a fresh process
        self._standby_dir: Optional[Path] = None
        if standby is not None and standby.hand(job):
            self.proc, self._standby_dir = standby.proc, standby.dir
            self.log_path, self.curve_path = standby.dir / "log.txt", standby.dir / "result.curve.jsonl"
        else:
            if standby is not None:
                standby.release()
            self._start_fresh()
        self.pid = self.proc.pid
        threading.Thread(target=self._watch, name=f"exp-{job.exp_id}", daemon=True).start()

    def _start_fresh(self) -> None:
        """Start the harness the slow way, in the experiment's own directory (sets proc, log_path, curve_path)."""
        wd = Path(self.job.workdir)
        (wd / "train.py").write_text(self.job.source)
        self.proc = spawn(harness_command(self.job, self.sandbox), wd, self.slot.env)
        self.log_path, self.curve_path = wd / "log.txt", wd / "result.curve.jsonl"

    def _wait(self) -> None:
        """Wait for the process; past budget + grace + BACKSTOP_S the runner kills it (the harness did not)."""
        try:
            self.proc.wait(timeout=self.job.budget_s + self.job.grace + BACKSTOP_S)
        except subprocess.TimeoutExpired:
            self._timed_out = True
            kill_group(self.pid)
            self.proc.wait()
        kill_group(self.pid)  # leftovers (compile workers) die with their experiment

    def _standby_failed(self) -> bool:
        """The standby died before it took the job (STANDBY_FAILED): it was alive when handed the job but was
        already failing, e.g. its start met a disk that was full."""
        return (self._standby_dir is not None and not self._timed_out and self.proc.returncode == STANDBY_FAILED
                and not (self._standby_dir / "result.json").exists())

    def _watch(self) -> None:
        self._wait()
        if self._standby_failed():
            last = tail(self._standby_dir / "log.txt")
            log.warning("standby harness on %s failed before it took #%s (exit code %s%s); starting it afresh",
                        self.slot.name, self.exp_id, self.proc.returncode, f": {last[-1]}" if last else "")
            remove_tree(self._standby_dir)
            self._standby_dir = None
            with self._lock:
                restart = not self._aborted
                if restart:
                    try:
                        self._start_fresh()
                    except OSError as e:  # the runner's failure, not the idea's: the engine re-queues it
                        log.warning("could not start #%s afresh on %s: %s", self.exp_id, self.slot.name, e)
                        self._infra_error, restart = f"could not start the harness: {e}", False
                    else:
                        self.pid = self.proc.pid
            if restart:
                self._wait()
        if self._standby_dir is not None:
            self._move_home()
        self._outcome = self._read_outcome()
        self._on_done()

    def _move_home(self) -> None:
        """The standby's directory becomes the experiment's (its process is gone: nothing holds it)."""
        final = Path(self.job.workdir)
        try:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(self._standby_dir, final)
        except OSError:  # another file system: copy what the run left, then drop the standby's directory
            final.mkdir(parents=True, exist_ok=True)
            shutil.copytree(self._standby_dir, final, symlinks=True, dirs_exist_ok=True)
            remove_tree(self._standby_dir)
        self.log_path = final / "log.txt"
        self.curve_path = final / "result.curve.jsonl"

    def _read_outcome(self) -> Outcome:
        res = run_result(self.job, aborted=self._aborted, error=self._infra_error, timed_out=self._timed_out,
                         result=Path(self.job.workdir) / "result.json", returncode=self.proc.returncode)
        return self._make_outcome(res, log_tail=tail(self.log_path), aborted=self._aborted,
                                  curve=downsample_curve(read_curve(self.curve_path)),
                                  infra_failed=bool(self._infra_error))

    def kill(self, reason: str) -> None:
        """Stop the experiment (its whole process group): SIGTERM, then SIGKILL after KILL_WAIT_S."""
        with self._lock:
            self._aborted = reason or "killed"
        if kill_group(self.pid, signal.SIGTERM):
            try:
                self.proc.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                kill_group(self.pid)


class LocalRunner(Runner):
    """Subprocess runner on this machine: one slot per GPU, or one CPU slot.

    `sandbox`: a SandboxConfig, True / False (defaults / off), or None for the configured settings
    (`sandbox`, `sandbox_user`, … in ratchet.toml); what it cannot enforce here is logged once.
    """

    name = "local"

    def __init__(self, device: str = "auto", cpu_slots: int = 1, sandbox: SandboxConfig | bool | None = None,
                 standby: bool = False):
        self._slots = detect_slots(device, cpu_slots)
        self.standby = standby
        self._standbys: dict[str, Standby] = {}
        self._cleaned: set[Path] = set()
        self._lock = threading.Lock()
        if sandbox is None:
            sandbox = sandbox_config()
        elif isinstance(sandbox, bool):
            sandbox = SandboxConfig(enabled=sandbox)
        self.sandbox: SandboxConfig = sandbox
        if sandbox.enabled:
            delegate_cgroup()  # a cgroup v2 the service may manage: one child cgroup per experiment
        warn_sandbox(sandbox)

    def slots(self) -> list[Slot]:
        return list(self._slots)

    def start(self, job: Job, slot: Slot, on_done: Callable[[], None]) -> LocalHandle:
        """Start a job on a slot (on its standby when one matches), then start the slot's next standby. A slot
        holding several (Slot.together) runs the job's `nproc` ranks on their devices (CUDA_VISIBLE_DEVICES
        lists them), started afresh: its member slots' standbys are released.

        Raises OSError when the process cannot be started (an infra failure).
        """
        if not self.standby:
            return LocalHandle(job, slot, on_done, self.sandbox)
        if slot.members:  # several GPUs: its slots' standbys (one rank each) cannot take it and would hold them
            with self._lock:
                idle = [self._standbys.pop(name) for name in slot.names if name in self._standbys]
            for s in idle:
                s.release()
            return LocalHandle(job, slot, on_done, self.sandbox)
        root = Path(job.workdir).parent / ".standby"
        with self._lock:
            ready = self._standbys.pop(slot.name, None)
            self._clean(root)
        if ready is not None and (ready.key != (str(job.data_dir), job.device) or not ready.alive()):
            ready.release()
            ready = None
        handle = LocalHandle(job, slot, on_done, self.sandbox, standby=ready)
        try:
            nxt = Standby(slot, root, Path(job.data_dir), job.device, self.sandbox,
                          after=handle._standby_dir or Path(job.workdir))
        except OSError as e:  # no standby is no failure: the next job starts the slow way
            log.warning("could not start a standby harness on %s: %s", slot.name, e)
        else:
            with self._lock:
                old, self._standbys[slot.name] = self._standbys.get(slot.name), nxt
            if old is not None:
                old.release()
        return handle

    def _clean(self, root: Path) -> None:
        """Once per directory: remove standby directories an earlier service process left behind."""
        if root in self._cleaned:
            return
        self._cleaned.add(root)
        for d in root.glob("*") if root.is_dir() else ():
            if not d.name.startswith(f"{os.getpid()}-"):  # this process's own are named by its pid
                remove_tree(d)

    def close(self) -> None:
        """Release the standbys (running experiments are the engine's to stop)."""
        with self._lock:
            standbys, self._standbys = list(self._standbys.values()), {}
        for s in standbys:
            s.release()
