"""The SSH runner: experiments on GPU hosts over SSH (asyncssh), each in its own remote directory and process group.

Reads results only from the harness's result.json; never logs keys, never disables host-key checking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import shlex
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import asyncssh

import trainer
from loop.config import HostConfig, default_home
from loop.runners.base import (BACKSTOP_S, KILL_WAIT_S, Handle, Job, Outcome, Runner, Slot, downsample_curve,
                               fresh_workdir, harness_command, read_curve, run_result, sandbox_config, tail)
from loop.runners.ssh_bootstrap import BootstrapReport, ensure_ready
from loop.runners.ssh_host import (GROUP_ALIVE, READ_CHUNK, HostHealth, RemoteCommandError, SSHHost, SSHRunnerError,
                                   kill_script, last_line, run_dir_name)
from trainer.sandbox import SandboxConfig

log = logging.getLogger(__name__)

DONE_GRACE_S = 30.0  # after a kill or timeout, seconds before the handle gives up waiting for the group to die


# ---- The handle ----


class SSHHandle(Handle):
    """A running remote experiment. Thread-safe; `on_done` is called once (on the runner's thread) when done.

    Mirrors the host's log.txt and result.curve.jsonl into the job's local workdir as they grow, and the
    result.json at the end, so the files look as with the local runner.
    """

    def __init__(self, runner: "SSHRunner", host: SSHHost, job: Job, slot: Slot, on_done: Callable[[], None]):
        super().__init__(job, slot, on_done)  # pid stays None: remote processes are reaped, never kill_group()
        self.host = host
        self.runner = runner
        self._timed_out = False
        self._kill_started: Optional[float] = None
        self._wake: Optional[asyncio.Event] = None
        self.pgid: Optional[int] = None  # the remote process group, once launched
        self.remote_dir = ""  # <workdir>/runs/exp-NNNNNN on the host, once launched
        self.launched = 0.0
        wd = fresh_workdir(job)
        (wd / "train.py").write_text(job.source)
        self.log_path, self.curve_path = wd / "log.txt", wd / "result.curve.jsonl"
        self._offsets = {"log.txt": 0, "result.curve.jsonl": 0}
        self.future = runner._loop.submit(self._main())

    def kill(self, reason: str) -> None:
        """Stop the experiment: its remote process group gets SIGTERM, then SIGKILL after KILL_WAIT_S.

        Returns within KILL_WAIT_S + a few seconds even when the host is unreachable; the handle then
        completes with `aborted` set (and the group is reaped at the next contact with the host).
        """
        first = not self._aborted
        self._aborted = reason or "killed"
        if not first or self.done():
            return
        fut = self.runner._loop.submit(self._kill_remote())
        try:
            fut.result(timeout=KILL_WAIT_S + 5)
        except (concurrent.futures.TimeoutError, OSError):
            pass

    # ---- the loop side ----

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        self.runner._tasks.add(asyncio.current_task())
        try:
            outcome = await self._execute()
        except asyncio.CancelledError:
            outcome = self._infra("the SSH runner was closed")
        except Exception as e:  # noqa: BLE001 - the handle must always complete; the error is the outcome
            log.exception("exp %s on %s: runner error", self.exp_id, self.slot.name)
            outcome = self._infra(f"runner error: {type(e).__name__}: {e}")
        self._outcome = outcome
        self.runner._tasks.discard(asyncio.current_task())
        try:
            self._on_done()
        except Exception:  # noqa: BLE001
            log.exception("on_done of exp %s failed", self.exp_id)

    async def _execute(self) -> Outcome:
        h = self.host
        try:
            await ensure_ready(h, self.job.data_dir)
        except SSHRunnerError as e:
            h.mark_down(str(e))
            return self._infra(str(e))
        if self._aborted:
            return self._final(None)
        try:
            await self._launch()
        except SSHRunnerError as e:
            h.mark_down(str(e))
            return self._infra(f"could not launch on {self.slot.name}: {e}")
        return await self._monitor()

    async def _launch(self) -> None:
        h = self.host
        rd = f"{h.workdir}/runs/{run_dir_name(self.exp_id)}"
        self.remote_dir = rd
        h.orphans.discard(rd)
        job = dataclasses.replace(self.job, data_dir=Path(f"{h.workdir}/data/{Path(self.job.data_dir).name}"))
        env = {**self.slot.env, "PYTHONPATH": f"{h.workdir}/lib", "PYTHONUNBUFFERED": "1"}
        # the harness sandboxes the proposal itself with what the host offers (bubblewrap: deploy/bootstrap-gpu-host.sh)
        argv = harness_command(job, self.runner.sandbox, python=h.python)
        cmd = shlex.join(argv)
        inner = (f"echo $$ > pid.tmp && mv pid.tmp pid; "
                 f"{' '.join(f'{k}={shlex.quote(str(v))}' for k, v in env.items())} {cmd} > log.txt 2>&1 < /dev/null; "
                 f"echo $? > exit_code.tmp; mv exit_code.tmp exit_code")
        script = (
            f"( {kill_script(rd)}) >/dev/null\n"
            f"rm -rf {shlex.quote(rd)} && mkdir -p {shlex.quote(rd)} && cd {shlex.quote(rd)} && cat > train.py\n"
            f"setsid sh -c {shlex.quote(inner)} > /dev/null 2>&1 < /dev/null &\n"
            f"i=0; while [ ! -s pid ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done\n"
            f"cat pid\n")
        out = await h.run(script, input=self.job.source)
        try:
            self.pgid = int(last_line(out))
        except ValueError:
            raise RemoteCommandError(f"{h.name}: the harness did not start (no pid file in {rd})") from None
        self.launched = time.time()

    async def _kill_remote(self) -> None:
        """Kill the launched process group (nothing before launch: _execute checks `_aborted` first)."""
        if self._wake:
            self._wake.set()
        if self.pgid is None:
            return
        if self._kill_started is None:
            self._kill_started = time.time()
        await self.host.run(kill_script(self.remote_dir), timeout=KILL_WAIT_S + 4)

    async def _status(self) -> str:
        """`alive`, `exit N` or `gone`; then the log and curve mirrored up to now."""
        rd = shlex.quote(self.remote_dir)
        state = last_line(await self.host.run(
            GROUP_ALIVE + f"cd {rd} 2>/dev/null || {{ echo gone; exit 0; }}; "
            f"if [ -e exit_code ]; then echo \"exit $(cat exit_code)\"; "
            f"elif group_alive {self.pgid}; then echo alive; else echo gone; fi"))
        await self._mirror()
        return state

    async def _mirror(self) -> None:
        for name, local in (("result.curve.jsonl", self.curve_path), ("log.txt", self.log_path)):
            while True:
                data = await self.host.read_from(f"{self.remote_dir}/{name}", self._offsets[name])
                if not data:
                    break
                with open(local, "ab") as f:
                    f.write(data)
                self._offsets[name] += len(data)
                if len(data) < READ_CHUNK:
                    break

    async def _monitor(self) -> Outcome:
        r = self.runner
        deadline = self.launched + self.job.budget_s + self.job.grace + r.backstop_s
        lost_since: Optional[float] = None
        lost_error = ""
        state = "alive"
        while True:
            now = time.time()
            give_up = self._kill_started is not None and now - self._kill_started > DONE_GRACE_S
            if give_up:
                self.host.orphans.add(self.remote_dir)
                return self._final(None, note="the process group did not die after the kill")
            try:
                if self._aborted and self._kill_started is None:
                    await self._kill_remote()
                if not self._timed_out and now > deadline:
                    self._timed_out = True
                    log.warning("exp %s on %s: past budget + grace + backstop, killing", self.exp_id, self.slot.name)
                    await self._kill_remote()
                state = await self._status()
                lost_since = None
            except SSHRunnerError as e:
                lost_since = lost_since or now
                lost_error = str(e)
                if self._kill_started is not None:  # its fate is decided (aborted or timed out): do not wait
                    self.host.orphans.add(self.remote_dir)
                    return self._final(None, note=f"host unreachable during the kill: {lost_error}")
                if now - lost_since >= r.reconnect_s:
                    self.host.orphans.add(self.remote_dir)
                    self.host.mark_down(lost_error)
                    return self._infra(f"lost {self.host.name} during the run: {lost_error}")
                await asyncio.sleep(min(r.poll_s, 1.0))
                continue
            if state != "alive":
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), r.poll_s)
            except asyncio.TimeoutError:
                pass
        # finished: leftovers (compile workers) die with their experiment, then the result comes back
        try:
            await self.host.run(kill_script(self.remote_dir, wait_s=1.0))
            data = await self.host.read_from(f"{self.remote_dir}/result.json", 0, 64 << 20)
        except SSHRunnerError as e:
            self.host.orphans.add(self.remote_dir)
            if self._aborted:
                return self._final(None)
            return self._infra(f"lost {self.host.name} while fetching the result: {e}")
        exit_code = None
        if state.startswith("exit "):
            try:
                exit_code = int(state.split()[1])
            except (ValueError, IndexError):
                pass
        return self._final(data, exit_code=exit_code)

    def _final(self, result_json: Optional[bytes], exit_code: Optional[int] = None, note: str = "") -> Outcome:
        """The outcome from what came back (`exit_code`: the harness's shell status, 128 + N for signal N)."""
        result_path = Path(self.job.workdir) / "result.json"
        if result_json is not None:
            tmp = result_path.with_name("result.json.tmp")
            tmp.write_bytes(result_json)
            os.replace(tmp, result_path)
        code = 128 - exit_code if exit_code is not None and exit_code > 128 else exit_code
        res = run_result(self.job, aborted=self._aborted, result=result_path, timed_out=self._timed_out,
                         returncode=code, backstop_s=self.runner.backstop_s, note=note)
        return self._make_outcome(res, log_tail=tail(self.log_path), aborted=self._aborted,
                                  curve=downsample_curve(read_curve(self.curve_path)))

    def _infra(self, error: str) -> Outcome:
        return self._make_outcome(run_result(self.job, error=error), log_tail=tail(self.log_path),
                                  infra_failed=True, aborted=self._aborted)


# ---- The runner ----


class _LoopThread:
    """An asyncio event loop in a daemon thread; coroutines are submitted from any other thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name="ssh-runner", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro, timeout: Optional[float] = None):
        if threading.current_thread() is self.thread:
            raise RuntimeError("blocking SSHRunner call from the runner's own thread (e.g. inside on_done)")
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class SSHRunner(Runner):
    """Runs experiments on GPU hosts over SSH: one slot per GPU per host (one CPU slot on a cpu_only host).

    A host is prepared at first contact (workdir, trainer package, Python check, data synced and verified).
    A host found down (connection refused or lost, bootstrap failed) leaves `slots()` until a health check
    (`health()`, which the scheduler calls every `health_interval_s`) finds it up again.
    Times in seconds. The blocking methods must not be called from `on_done` (it runs on the runner's thread).
    """

    name = "ssh"

    def __init__(self, hosts: list[HostConfig], *, local_python_pkg: Path = Path(trainer.__file__).parent,
                 known_hosts_file: Optional[Path] = None, poll_s: float = 1.0, connect_timeout_s: float = 15.0,
                 op_timeout_s: float = 30.0, keepalive_s: float = 5.0, keepalive_count: int = 3,
                 reconnect_s: float = 30.0, backstop_s: float = BACKSTOP_S, sandbox: Optional[SandboxConfig] = None):
        """`known_hosts_file`: where unknown host keys are recorded (accept-new) for hosts without their own
        `known_hosts`; default `<ratchet home>/known_hosts`. `reconnect_s`: how long a running experiment
        waits for its host to come back before it is `infra_failed`. `backstop_s`: past budget + grace, when
        the runner kills a harness that did not time itself out. `sandbox`: what the launcher on each host
        enforces (default: the configured settings). Raises ValueError on duplicate host names."""
        names = [h.name for h in hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate host names in [[hosts]]: {names}")
        self.local_python_pkg = Path(local_python_pkg)
        self.known_hosts_file = Path(known_hosts_file) if known_hosts_file else default_home() / "known_hosts"
        self.poll_s, self.connect_timeout_s, self.op_timeout_s = poll_s, connect_timeout_s, op_timeout_s
        self.keepalive_s, self.keepalive_count = keepalive_s, keepalive_count
        self.reconnect_s, self.backstop_s = reconnect_s, backstop_s
        self.sandbox = sandbox or sandbox_config()
        self._cfgs = list(hosts)
        self._handles: dict[int, SSHHandle] = {}
        self._tasks: set[asyncio.Task] = set()  # ours, cancelled by close()
        self._closed = False
        self._loop = _LoopThread()
        self._hosts = {c.name: SSHHost(c, self) for c in self._cfgs}

    @staticmethod
    def _host_slots(cfg: HostConfig) -> list[Slot]:
        if cfg.cpu_only:
            return [Slot(f"{cfg.name}:cpu", cfg.name, {"CUDA_VISIBLE_DEVICES": ""})]
        return [Slot(f"{cfg.name}:gpu{i}", cfg.name, {"CUDA_VISIBLE_DEVICES": str(i)}) for i in range(cfg.gpus)]

    # ---- Runner protocol ----

    def slots(self) -> list[Slot]:
        """The slots of every host not known to be down (a never-checked host counts as up)."""
        return [s for c in self._cfgs if self._hosts[c.name].health.up is not False for s in self._host_slots(c)]

    def all_slots(self) -> list[Slot]:
        """Every configured slot, up or down."""
        return [s for c in self._cfgs for s in self._host_slots(c)]

    def start(self, job: Job, slot: Slot, on_done: Callable[[], None]) -> SSHHandle:
        """Start a job on a slot and return at once; the host is prepared and the harness launched in the
        background. Host failures come back as an Outcome with infra_failed=True, never as an exception.
        Raises SSHRunnerError (an OSError) when the runner is closed or the slot's host is unknown."""
        if self._closed:
            raise SSHRunnerError("the SSH runner is closed")
        if slot.host not in self._hosts:
            raise SSHRunnerError(f"unknown host {slot.host!r} (not in [[hosts]])")
        handle = SSHHandle(self, self._hosts[slot.host], job, slot, on_done)
        self._handles = {k: v for k, v in self._handles.items() if not v.done()}
        self._handles[job.exp_id] = handle
        return handle

    # ---- hosts ----

    def prepare_host(self, host: str, data_dir: Optional[Path] = None, timeout: float = 3600.0) -> BootstrapReport:
        """Bootstrap `host` now (what the first experiment on it would do) and return what was done.

        Raises HostUnreachable, BootstrapError, KeyError for an unknown host, TimeoutError after `timeout` s.
        """
        h = self._hosts[host]

        async def go() -> BootstrapReport:
            try:
                return await ensure_ready(h, Path(data_dir) if data_dir else None)
            except SSHRunnerError as e:
                h.mark_down(str(e))
                raise
        return self._loop.call(go(), timeout)

    def health(self, timeout: Optional[float] = None) -> list[HostHealth]:
        """Check every host now, concurrently (connect, nvidia-smi or CPU count, free disk of the workdir;
        the Python until verified), update up/down, and return the records in config order.
        Blocks at most `timeout` s (default connect + 3 commands' timeouts); a host not done by then is down."""
        timeout = timeout or (self.connect_timeout_s + 3 * self.op_timeout_s + 10)
        try:
            return self._loop.call(self._check_all(timeout), timeout + 5)
        except concurrent.futures.TimeoutError:
            return self.host_status()

    def host_status(self) -> list[HostHealth]:
        """The last known health of every host, without touching the network (for the `hosts` command)."""
        return [dataclasses.replace(self._hosts[c.name].health) for c in self._cfgs]

    def reap(self, exp_id: int, host: str, timeout: Optional[float] = None) -> bool:
        """Kill what is left of experiment `exp_id` on `host` (its process group from the run dir's pidfile),
        e.g. after a restart of the service. True when a live group was killed. When the host cannot be reached
        the reap is remembered and done at the next connection, and False is returned. KeyError: unknown host."""
        h = self._hosts[host]

        async def go() -> bool:
            await h.connection()
            rd = f"{h.workdir}/runs/{run_dir_name(exp_id)}"
            if exp_id in self._handles and not self._handles[exp_id].done():
                return False  # ours and running: kill() it instead
            return "killed" in await h.run(kill_script(rd))

        try:
            return self._loop.call(go(), timeout or self.connect_timeout_s + self.op_timeout_s + 10)
        except (SSHRunnerError, concurrent.futures.TimeoutError) as e:
            log.warning("%s: cannot reap exp %s now (%s); will at the next connection", host, exp_id, e)
            self._loop.loop.call_soon_threadsafe(h.pending_reaps.add, exp_id)
            return False

    def close(self, kill_running: bool = True) -> None:
        """Stop: kill the remote process groups of running experiments (when `kill_running`), close the
        connections and the runner's thread. Their handles complete (infra_failed). Idempotent."""
        if self._closed:
            return
        self._closed = True
        running = [h for h in self._handles.values() if not h.done()]
        if kill_running and running:
            futs = [self._loop.submit(h._kill_remote()) for h in running]
            concurrent.futures.wait(futs, timeout=KILL_WAIT_S + 5)

        async def shutdown() -> None:
            tasks = list(self._tasks)
            for t in tasks:  # the health loop and the handles still watching (they complete as infra_failed)
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
            for host in self._hosts.values():
                if host.conn is not None:
                    host.conn.close()
            for host in self._hosts.values():
                if host.conn is not None:
                    try:
                        await asyncio.wait_for(host.conn.wait_closed(), 2)
                    except (asyncio.TimeoutError, OSError, asyncssh.Error):
                        pass

        try:
            self._loop.call(shutdown(), 10)
        except concurrent.futures.TimeoutError:
            pass
        for h in running:  # a cancelled task may not have run its handler: complete every handle
            if h._outcome is None:
                h._outcome = h._infra("the SSH runner was closed")
        self._loop.stop()

    # ---- internals ----

    async def _check_all(self, timeout: float) -> list[HostHealth]:
        async def one(h: SSHHost) -> HostHealth:
            try:
                return await asyncio.wait_for(h.check(), timeout)
            except asyncio.TimeoutError:
                h.drop("health check timed out")
                h.mark_down(f"{h.name}: health check timed out after {timeout:.0f} s")
                return h.health
        return list(await asyncio.gather(*(one(self._hosts[c.name]) for c in self._cfgs)))
