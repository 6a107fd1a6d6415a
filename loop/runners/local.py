"""The local runner: each experiment is `python -m trainer.run` in its own process group, one per slot,
under the sandbox launcher (trainer/sandbox.py) when `sandbox` is on.

Reads the result only from the harness's JSON; never parses the script's prints.

With `standby` on, each slot keeps the next harness already started (`trainer.run --standby`: the interpreter,
torch and the sandbox are up, waiting for a job on stdin), so an experiment starts training without paying
seconds of start-up; it runs in a directory of its own under `<workdir's parent>/.standby/` and is moved to the
experiment's directory when it ends.
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
import time
from pathlib import Path
from typing import Callable, Optional

from loop.runners.base import Job, Outcome, Slot, downsample_curve, last_curve_point, read_curve, tail
from trainer.result import STANDBY_FAILED, Result, read_result
from trainer.sandbox import (LAUNCH_FAILED, SandboxConfig, defuse, describe_features, launcher_command,
                             sandbox_features, signal_message)

log = logging.getLogger(__name__)

# A standby starts while the slot's experiment trains: niced, it takes the CPU the experiment leaves idle
# instead of slowing its steps (CFS weight 110 against 1024 at nice 0).
STANDBY_NICE = 10
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


def harness_args(job: Job) -> list[str]:
    """trainer.run's options for a job (relative paths inside the workdir)."""
    cmd = ["--script", "train.py", "--data", str(job.data_dir), "--budget-s", str(job.budget_s),
           "--out", "result.json", "--seed", str(job.seed), "--device", job.device, "--grace-s", str(job.grace)]
    if job.scale:
        cmd += ["--scale", json.dumps(job.scale)]
    if job.eval_tokens:
        cmd += ["--eval-tokens", str(job.eval_tokens)]
    if job.seq_len:
        cmd += ["--seq-len", str(job.seq_len)]
    return cmd


def harness_command(job: Job, python: str = sys.executable) -> list[str]:
    """The command line that runs the harness on a job."""
    return [python, "-P", "-m", "trainer.run", *harness_args(job)]


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


def uses_cuda(job: Job, slot: Slot) -> bool:
    """Whether the job trains on a GPU (then no address-space limit: it breaks the CUDA driver)."""
    if job.device != "auto":
        return job.device.startswith("cuda")
    return bool(slot.env.get("CUDA_VISIBLE_DEVICES"))


_warned: set = set()


def check_sandbox(cfg: SandboxConfig) -> dict:
    """sandbox_features(cfg), logging one warning per process for what is not available."""
    f = sandbox_features(cfg)
    if f["missing"] and cfg not in _warned:
        _warned.add(cfg)
        log.warning("%s", describe_features(f))
    return f


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


def _active_sandbox(sandbox: Optional[SandboxConfig]) -> Optional[SandboxConfig]:
    return sandbox if sandbox is not None and sandbox.enabled and sys.platform.startswith("linux") else None


def _sandboxed(cmd: list[str], sandbox: Optional[SandboxConfig], wd: Path, data_dir: Path, cuda: bool) -> list[str]:
    """`cmd` behind the sandbox launcher (wd writable, the data readable), or as is when the sandbox is off."""
    return launcher_command(sandbox, workdir=wd, read=[data_dir], cuda=cuda) + cmd if sandbox else cmd


def _spawn(cmd: list[str], wd: Path, slot: Slot, *, stdin) -> subprocess.Popen:
    """Start `cmd` in `wd` in its own session (process group), output to wd/log.txt."""
    env = {**os.environ, **slot.env, "PYTHONUNBUFFERED": "1"}
    with open(wd / "log.txt", "wb") as log:
        return subprocess.Popen(cmd, cwd=wd, stdout=log, stderr=subprocess.STDOUT, stdin=stdin, env=env,
                                start_new_session=True)


class Standby:
    """A harness started before its job (`trainer.run --standby`) in its own directory, under the sandbox.

    `key` says which jobs it can take: the same data directory and device kind (the sandbox exposes the data
    and sets the memory limit at launch). Dies when released, killed, or when the runner goes away (end of
    its stdin).
    """

    _ids = itertools.count()

    def __init__(self, slot: Slot, root: Path, data_dir: Path, cuda: bool, sandbox: Optional[SandboxConfig]):
        self.slot = slot
        self.key = (str(data_dir), cuda)
        self.dir = root / f"{os.getpid()}-{slot.name.replace(':', '-')}-{next(self._ids)}"
        self.dir.mkdir(parents=True)
        cmd = _sandboxed([sys.executable, "-P", "-m", "trainer.run", "--standby"], sandbox, self.dir, data_dir, cuda)
        self.proc = _spawn(cmd, self.dir, slot, stdin=subprocess.PIPE)
        _renice(self.proc.pid, STANDBY_NICE)  # start-up takes what the running experiment leaves of the CPU

    def alive(self) -> bool:
        return self.proc.poll() is None

    def hand(self, job: Job) -> bool:
        """Give it the job; False when it is gone (then it must not be used)."""
        line = json.dumps({"argv": harness_args(job), "source": job.source}) + "\n"
        _renice(self.proc.pid, 0)  # back to normal priority to train (needs root; else it stays niced)
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


def _renice(pgid: int, nice: int) -> None:
    """Set the nice value of a whole process group (the sandbox launcher and the harness it forks)."""
    try:
        os.setpriority(os.PRIO_PGRP, pgid, nice)
    except OSError:
        pass  # lowering it again needs CAP_SYS_NICE; a group that is gone needs nothing


def remove_tree(path: Path) -> None:
    """Delete a directory a sandboxed run may have written to, without following anything it planted."""
    defuse(path)
    shutil.rmtree(path, ignore_errors=True)


class LocalHandle:
    """A running local experiment. Thread-safe; `on_done` is called once when the outcome is ready.

    With a `standby` (already started and matching the job), the job is handed to it instead of starting a
    process; its directory becomes `job.workdir` when the run ends.
    """

    def __init__(self, job: Job, slot: Slot, on_done: Callable[[], None], sandbox: Optional[SandboxConfig] = None,
                 standby: Optional[Standby] = None):
        self.exp_id = job.exp_id
        self.slot = slot
        self.job = job
        self._on_done = on_done
        self._outcome: Optional[Outcome] = None
        self._aborted = ""
        self._timed_out = False
        self._infra_error = ""
        self.started = time.time()
        final = Path(job.workdir)
        final.mkdir(parents=True, exist_ok=True)
        defuse(final)  # a previous, sandboxed run owned this directory: no link of its making is followed
        for stale in ("result.json", "result.curve.jsonl", "log.txt", "train.py"):
            (final / stale).unlink(missing_ok=True)
        self.sandbox = _active_sandbox(sandbox)
        cuda = uses_cuda(job, slot)
        self._memory = self.sandbox.memory_bytes(cuda) if self.sandbox else None
        self._cuda = cuda
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
        cmd = _sandboxed(harness_command(self.job), self.sandbox, wd, self.job.data_dir, self._cuda)
        self.proc = _spawn(cmd, wd, self.slot, stdin=subprocess.DEVNULL)
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
        """The standby died before it took the job (STANDBY_FAILED, or its sandbox launcher could not start it).
        It was alive when handed the job but was already failing: e.g. its warm-up met a disk that was full."""
        return (self._standby_dir is not None and not self._timed_out
                and self.proc.returncode in (STANDBY_FAILED, LAUNCH_FAILED)
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
        defuse(self._standby_dir)
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
        wall = time.time() - self.started
        defuse(self.job.workdir)
        log_tail = tail(self.log_path)
        result_path = Path(self.job.workdir) / "result.json"
        if self._aborted:
            res = Result(status="crash", error=f"aborted: {self._aborted}", seed=self.job.seed)
        elif self._infra_error:
            res = Result(status="crash", error=self._infra_error, seed=self.job.seed)
        elif result_path.exists():
            try:
                res = read_result(result_path)
            except (OSError, ValueError) as e:
                res = Result(status="crash", error=f"unreadable result.json ({e})", seed=self.job.seed)
        elif self._timed_out:
            res = Result(status="timeout", error=f"killed after budget + grace + {BACKSTOP_S:.0f} s",
                         seed=self.job.seed)
        else:
            res = Result(status="crash", error=self._no_result_error(log_tail), seed=self.job.seed)
        return Outcome(result=res, slot=self.slot.name, host=self.slot.host, wall_seconds=round(wall, 3),
                       log_tail=log_tail, aborted=self._aborted, curve=downsample_curve(read_curve(self.curve_path)),
                       infra_failed=bool(self._infra_error))

    def _no_result_error(self, log_tail: list[str]) -> str:
        """Why the harness left no result: the limit a signal points to, or the launcher's own reason."""
        code = self.proc.returncode
        if code and code < 0 and self.sandbox:
            max_file = int(self.sandbox.max_file_gb * (1 << 30))
            return signal_message(-code, self._memory, max_file)
        if code == LAUNCH_FAILED and self.sandbox:
            why = next((line for line in reversed(log_tail) if line.startswith("sandbox: cannot start")), "")
            return why or f"the sandbox could not start the harness (exit code {code})"
        why = f"killed by signal {-code}" if code and code < 0 else f"exited with code {code}"
        return f"harness {why} without a result"

    def done(self) -> bool:
        return self._outcome is not None

    def outcome(self) -> Optional[Outcome]:
        return self._outcome

    def kill(self, reason: str) -> None:
        """Stop the experiment (its whole process group): SIGTERM, then SIGKILL after KILL_WAIT_S."""
        with self._lock:
            self._aborted = reason or "killed"
        if kill_group(self.pid, signal.SIGTERM):
            try:
                self.proc.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                kill_group(self.pid)

    def progress(self) -> Optional[dict]:
        """{step, elapsed_s, loss} of the latest curve point, or None before the first step."""
        if self.curve_path.is_symlink():
            return None
        return last_curve_point(self.curve_path)


class LocalRunner:
    """Subprocess runner on this machine: one slot per GPU, or one CPU slot.

    `sandbox`: a SandboxConfig, True / False (defaults / off), or None for the configured settings
    (`sandbox`, `sandbox_user`, … in ratchet.toml). `features` says what the sandbox enforces here.
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
        self.features = check_sandbox(sandbox) if sandbox.enabled else sandbox_features(sandbox)

    def slots(self) -> list[Slot]:
        return list(self._slots)

    def start(self, job: Job, slot: Slot, on_done: Callable[[], None]) -> LocalHandle:
        """Start a job on a slot (on its standby when one matches), then start the slot's next standby.

        Raises OSError when the process cannot be started (an infra failure).
        """
        if not self.standby:
            return LocalHandle(job, slot, on_done, self.sandbox)
        cuda = uses_cuda(job, slot)
        root = Path(job.workdir).parent / ".standby"
        with self._lock:
            ready = self._standbys.pop(slot.name, None)
            self._clean(root)
        if ready is not None and (ready.key != (str(job.data_dir), cuda) or not ready.alive()):
            ready.release()
            ready = None
        handle = LocalHandle(job, slot, on_done, self.sandbox, standby=ready)
        try:
            nxt = Standby(slot, root, Path(job.data_dir), cuda, _active_sandbox(self.sandbox))
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
