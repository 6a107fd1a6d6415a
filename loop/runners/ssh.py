"""The SSH runner: experiments on GPU hosts over SSH (asyncssh), each in its own remote directory and process group.

Reads results only from the harness's result.json; never logs keys, never disables host-key checking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import asyncssh

import trainer
from trainer.data import sha256_file
from loop.config import HostConfig, default_home
from loop.runners.base import (BACKSTOP_S, KILL_WAIT_S, Handle, Job, Outcome, Runner, Slot, downsample_curve,
                               harness_command, last_curve_point, read_curve, sandbox_config, tail)
from trainer.result import Result, read_result
from trainer.sandbox import SandboxConfig

log = logging.getLogger(__name__)

BOOTSTRAP_HINT = "run deploy/bootstrap-gpu-host.sh on the host (see README, GPU hosts over SSH)"
MAX_CHANNELS = 8  # concurrent exec channels per connection; OpenSSH's MaxSessions defaults to 10
READ_CHUNK = 4 << 20  # bytes of log / curve mirrored per poll
DONE_GRACE_S = 30.0  # after a kill or timeout, seconds before the handle gives up waiting for the group to die
SYNC_CACHE = ".ratchet-sha256.json"  # on the host, beside the data: (size, mtime_ns, sha256) of each file
TRAINER_STAMP = ".ratchet-hash"  # on the host, in lib/trainer: the content hash of the uploaded package


class SSHRunnerError(OSError):
    """Base of the runner's errors (an OSError, so the engine treats it as an infrastructure failure)."""


class HostUnreachable(SSHRunnerError):
    """The host cannot be reached: connection refused or lost, authentication or host key refused, timeout."""


class BootstrapError(SSHRunnerError):
    """The host is reachable but cannot run experiments: no usable Python, data that fails its fingerprints."""


class RemoteCommandError(SSHRunnerError):
    """A command on the host exited non-zero."""


@dataclass
class BootstrapReport:
    """What preparing a host did. Sizes in bytes, times in seconds."""

    host: str
    workdir: str  # absolute, on the host
    python: str  # the interpreter the harness runs with
    trainer_uploaded: bool  # False when the host already had this trainer package
    data_dir: str = ""  # absolute, on the host
    uploaded_files: list[str] = field(default_factory=list)  # data files sent (relative to the data dir)
    uploaded_bytes: int = 0
    seconds: float = 0.0


@dataclass
class HostHealth:
    """One host's state as last seen. `free_disk_bytes` is of the host's workdir; times are unix seconds."""

    name: str
    address: str
    up: Optional[bool] = None  # None: never checked
    gpus: list[dict] = field(default_factory=list)  # {index, name, memory_used_mib, memory_total_mib}
    cpus: Optional[int] = None  # cpu_only hosts
    free_disk_bytes: Optional[int] = None
    error: str = ""
    checked_at: Optional[float] = None
    slots: list[str] = field(default_factory=list)


# ---- Helpers ----


def _q(s: str) -> str:
    return shlex.quote(str(s))


def package_files(pkg: Path) -> list[Path]:
    """The files of a Python package that are shipped to hosts (sources and templates, no caches), sorted."""
    pkg = Path(pkg)
    return sorted(p for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix not in (".pyc", ".pyo") and not p.name.startswith("."))


def package_hash(pkg: Path) -> str:
    """sha256 over the relative paths and contents of `package_files(pkg)`: changes when any file does."""
    h = hashlib.sha256()
    for p in package_files(pkg):
        h.update(p.relative_to(pkg).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def expand_home(path: str, home: str) -> str:
    """A host path with `~` expanded against the host's $HOME; relative paths are taken from $HOME."""
    if path == "~":
        return home
    if path.startswith("~/"):
        return posixpath.join(home, path[2:])
    return path if path.startswith("/") else posixpath.join(home, path)


def run_dir_name(exp_id: int) -> str:
    """The experiment's directory under `<workdir>/runs/` on a host."""
    return f"exp-{exp_id:06d}"


# Shell: is any process of group $1 alive? Zombies do not count (a host's init may be slow to reap them).
# The group's leader (the wrapper shell, alive while the harness runs) is checked first; `ps` only after it.
GROUP_ALIVE = r"""group_alive() {
  _pg=$1
  if _s=$(cat /proc/$_pg/stat 2>/dev/null); then
    set -- ${_s##*) }
    [ "$1" != Z ] && [ "$3" = "$_pg" ] && return 0
  fi
  ps -e -o pgid= -o stat= 2>/dev/null | awk -v pg="$_pg" '$1 == pg && $2 !~ /^Z/ {f = 1} END {exit !f}'
}
"""


def kill_script(run_dir: str, wait_s: float = KILL_WAIT_S) -> str:
    """Shell that kills the process group whose id is in `<run_dir>/pid`: SIGTERM, then SIGKILL after wait_s.

    Refuses when the pid's process runs elsewhere (a reused pid); prints `killed` when a group was signalled.
    A process-group id cannot be reused while any member lives, so a surviving group is always ours.
    """
    r = _q(run_dir)
    n = max(1, int(wait_s * 10))
    return (GROUP_ALIVE +
            f"pg=$(cat {r}/pid 2>/dev/null) || exit 0\n"
            f"case \"$pg\" in ''|*[!0-9]*) exit 0;; esac\n"
            f"cwd=$(readlink /proc/$pg/cwd 2>/dev/null) && [ \"$cwd\" != {r} ] && exit 0\n"
            f"group_alive $pg || exit 0\n"
            f"kill -TERM -- -$pg 2>/dev/null\n"
            f"i=0; while [ $i -lt {n} ]; do group_alive $pg || {{ echo killed; exit 0; }}; "
            f"sleep 0.1; i=$((i+1)); done\n"
            f"kill -KILL -- -$pg 2>/dev/null; echo killed\n")


# On the host, with its own python: sha256 of the listed files of a directory, cached by (size, mtime_ns)
# for files not marked `full`. Reads {"dir", "files": [[rel, full], ...]} on stdin, prints {rel: sha256}.
_REMOTE_HASH = r'''
import hashlib, json, os, sys
req = json.load(sys.stdin)
d = req["dir"]
cache_path = os.path.join(d, "%s")
try:
    cache = json.load(open(cache_path))
except Exception:
    cache = {}
out = {}
for rel, full in req["files"]:
    p = os.path.join(d, rel)
    try:
        st = os.stat(p)
    except OSError:
        continue
    key = [st.st_size, st.st_mtime_ns]
    c = cache.get(rel)
    if not full and c and c[:2] == key:
        out[rel] = c[2]
        continue
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    out[rel] = h.hexdigest()
    cache[rel] = key + [out[rel]]
if os.path.isdir(d):
    with open(cache_path + ".tmp", "w") as f:
        json.dump(cache, f)
    os.replace(cache_path + ".tmp", cache_path)
print(json.dumps(out))
''' % SYNC_CACHE

_DEPS_CHECK = (
    "import sys; assert sys.version_info >= (3, 11), 'Python %s is too old (3.11+ needed)' % sys.version.split()[0]\n"
    "import numpy, tokenizers, torch\n"
    "print('TORCH=' + torch.__version__)\n")
_TRAINER_CHECK = _DEPS_CHECK + "import trainer\nprint('TRAINER=' + trainer.__file__)\n"


class _Client(asyncssh.SSHClient):
    """Accepts an unknown host key into the ratchet-managed known_hosts file (accept-new); a changed key never."""

    def __init__(self, managed: Optional[Path]):
        self.managed = managed
        self.new_key: Optional[asyncssh.SSHKey] = None
        self.changed = False

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        # Called by asyncssh only for a key the known_hosts file does not already trust.
        if self.managed is None:
            return False
        try:
            known = asyncssh.read_known_hosts(str(self.managed)).match(host, addr, port)
        except (OSError, ValueError):
            known = ((), (), ())
        if known[0] or known[1] or known[2]:
            self.changed = True  # the host is known with another key: never accept silently
            return False
        self.new_key = key
        return True


class _Host:
    """One configured host: its connection, what has been verified on it, and its health. Loop thread only."""

    def __init__(self, cfg: HostConfig, runner: "SSHRunner"):
        self.cfg = cfg
        self.runner = runner
        self.name = cfg.name
        self.conn: Optional[asyncssh.SSHClientConnection] = None
        self.sftp: Optional[asyncssh.SFTPClient] = None
        self.connect_lock = asyncio.Lock()
        self.bootstrap_lock = asyncio.Lock()
        self.sftp_lock = asyncio.Lock()
        self.channels = asyncio.Semaphore(MAX_CHANNELS)
        self.connects = 0  # connections made (reconnects included)
        self.home = ""
        self.workdir = ""
        self.python = ""
        self.python_lock = asyncio.Lock()
        self.pending_reaps: set[int] = set()  # experiments to reap once the workdir is known
        self.ready_conn: Optional[asyncssh.SSHClientConnection] = None  # what is verified holds for this connection
        self.deps_conn: Optional[asyncssh.SSHClientConnection] = None  # health's import check passed on it
        self.trainer_ok = False
        self.python_ok = False
        self.trainer_uploaded = False
        self.data_ready: dict[str, BootstrapReport] = {}  # manifest sha256 → report
        self.orphans: set[str] = set()  # run dirs whose process group may have outlived a lost connection
        self.health = HostHealth(name=cfg.name, address=cfg.address, slots=[s.name for s in runner._host_slots(cfg)])

    # ---- connection ----

    def where(self) -> str:
        return f"{self.cfg.user}@{self.cfg.address}:{self.cfg.port}"

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The open connection, connecting (and reaping orphans) first when needed. Raises HostUnreachable."""
        c = self.conn
        if c is not None and not c.is_closed():
            return c
        async with self.connect_lock:
            if self.conn is not None and not self.conn.is_closed():
                return self.conn
            self.conn, self.sftp = None, None
            conn = await self._connect()
            self.connects += 1
            try:
                self.home = _last_line(await self._exec(conn, 'printf "\\n%s\\n" "$HOME"'))
                wd = expand_home(self.cfg.workdir, self.home)
                # resolved without creating it (health checks write nothing); ensure_ready creates it
                self.workdir = _last_line(await self._exec(conn, f"cd {_q(wd)} 2>/dev/null && pwd -P || echo {_q(wd)}"))
                self.orphans |= {f"{self.workdir}/runs/{run_dir_name(i)}" for i in self.pending_reaps}
                self.pending_reaps.clear()
                for run_dir in sorted(self.orphans):
                    out = await self._exec(conn, kill_script(run_dir))
                    if "killed" in out:
                        log.warning("%s: killed the leftover process group of %s", self.name, run_dir)
                    self.orphans.discard(run_dir)
            except BaseException:
                conn.close()
                raise
            self.conn = conn
            return conn

    async def _connect(self) -> asyncssh.SSHClientConnection:
        r = self.runner
        cfg = self.cfg
        strict = cfg.known_hosts is not None
        kh = Path(cfg.known_hosts).expanduser() if strict else r.known_hosts_file
        if strict and not kh.is_file():
            raise HostUnreachable(f"{self.name}: known_hosts file {kh} does not exist")
        if not strict:
            kh.parent.mkdir(parents=True, exist_ok=True)
            kh.touch(mode=0o600, exist_ok=True)
        client = _Client(None if strict else kh)
        kwargs: dict = dict(port=cfg.port, username=cfg.user, known_hosts=str(kh), client_factory=lambda: client,
                            keepalive_interval=r.keepalive_s, keepalive_count_max=r.keepalive_count,
                            connect_timeout=r.connect_timeout_s, login_timeout=r.connect_timeout_s, config=[])
        if cfg.key is not None:
            kwargs.update(client_keys=[str(Path(cfg.key).expanduser())], agent_path=None)
        try:
            conn = await asyncio.wait_for(asyncssh.connect(cfg.address, **kwargs), r.connect_timeout_s + 5)
        except asyncssh.HostKeyNotVerifiable as e:
            if client.changed:
                raise HostUnreachable(f"{self.name}: the host key of {cfg.address}:{cfg.port} CHANGED since it was "
                                      f"recorded in {kh}; if the host was reinstalled, remove its line there") from None
            raise HostUnreachable(f"{self.name}: host key of {cfg.address}:{cfg.port} is not in {kh} ({e})") from None
        except asyncssh.PermissionDenied:
            raise HostUnreachable(f"{self.name}: {self.where()} refused the key "
                                  f"{cfg.key or '(default keys / agent)'}") from None
        except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as e:
            # the message names the problem, never the key material
            raise HostUnreachable(f"{self.name}: cannot use the key file {cfg.key}: {type(e).__name__}") from None
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
            raise HostUnreachable(f"{self.name}: cannot connect to {self.where()}: {_describe(e)}") from None
        if client.new_key is not None:
            port = "" if cfg.port == 22 else f":{cfg.port}"
            pattern = f"[{cfg.address}]{port}" if port else cfg.address
            line = client.new_key.export_public_key("openssh").decode().split()[:2]
            with open(kh, "a") as f:
                f.write(f"{pattern} {' '.join(line)}\n")
            log.warning("%s: new host key %s accepted and recorded in %s", self.name,
                        client.new_key.get_fingerprint(), kh)
        return conn

    def drop(self, reason: str, conn: Optional[asyncssh.SSHClientConnection] = None) -> None:
        """Close the connection (`conn`, when it is still the current one) after a failure; the next call reconnects."""
        c = self.conn
        if c is None or (conn is not None and conn is not c):
            return
        self.conn, self.sftp = None, None
        c.close()
        log.info("%s: connection dropped: %s", self.name, reason)

    def mark_down(self, error: str) -> None:
        self.health.up = False
        self.health.error = error
        self.health.checked_at = time.time()

    # ---- commands ----

    async def _exec(self, conn: asyncssh.SSHClientConnection, cmd: str, *, input: Optional[str] = None,
                    timeout: Optional[float] = None, check: bool = True) -> str:
        """Run `cmd` in the login shell; stdout. Raises RemoteCommandError (non-zero) or HostUnreachable."""
        timeout = timeout or self.runner.op_timeout_s
        try:
            async with self.channels:
                res = await asyncio.wait_for(conn.run(cmd, input=input, check=False), timeout)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
            self.drop(_describe(e), conn)
            raise HostUnreachable(f"{self.name}: {_describe(e)}") from None
        if check and res.exit_status != 0:
            err = (str(res.stderr or "") + str(res.stdout or "")).strip().splitlines()[-3:]
            first = cmd.strip().splitlines()[0][:60]
            raise RemoteCommandError(f"{self.name}: `{first}` exited {res.exit_status}: {' | '.join(err)}")
        return str(res.stdout or "")

    async def run(self, cmd: str, **kw) -> str:
        return await self._exec(await self.connection(), cmd, **kw)

    async def sftp_client(self) -> asyncssh.SFTPClient:
        conn = await self.connection()
        async with self.sftp_lock:
            if self.sftp is None or self.conn is not conn:
                try:
                    self.sftp = await asyncio.wait_for(conn.start_sftp_client(), self.runner.op_timeout_s)
                except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
                    self.drop(_describe(e))
                    raise HostUnreachable(f"{self.name}: sftp: {_describe(e)}") from None
            return self.sftp

    async def read_from(self, path: str, offset: int, size: int = READ_CHUNK) -> Optional[bytes]:
        """Up to `size` bytes of a host file from `offset`; None when the file does not exist."""
        sftp = await self.sftp_client()
        try:
            async def read() -> bytes:
                async with sftp.open(path, "rb") as f:
                    return await f.read(size, offset)
            return await asyncio.wait_for(read(), self.runner.op_timeout_s)
        except asyncssh.SFTPNoSuchFile:
            return None
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
            self.drop(_describe(e))
            raise HostUnreachable(f"{self.name}: reading {path}: {_describe(e)}") from None

    # ---- bootstrap ----

    async def ensure_ready(self, data_dir: Optional[Path]) -> BootstrapReport:
        """Connect; upload the trainer when its hash changed; check the Python; sync and verify `data_dir`.

        Work already verified on the current connection is skipped. Raises HostUnreachable, BootstrapError.
        """
        async with self.bootstrap_lock:
            t0 = time.time()
            await self.ensure_python(await self.connection())
            report = BootstrapReport(self.name, self.workdir, self.python, self.trainer_uploaded)
            if data_dir is not None:
                key = await asyncio.get_running_loop().run_in_executor(
                    None, sha256_file, Path(data_dir) / "manifest.json")
                if key not in self.data_ready:
                    self.data_ready[key] = await self._sync_data(Path(data_dir), report)
                report = self.data_ready[key]
            report.seconds = round(time.time() - t0, 3)
            return report

    async def _sync_trainer(self) -> bool:
        pkg = self.runner.local_python_pkg
        want = await asyncio.get_running_loop().run_in_executor(None, package_hash, pkg)
        dest = f"{self.workdir}/lib/trainer"
        have = await self.read_from(f"{dest}/{TRAINER_STAMP}", 0)
        if have is not None and have.decode(errors="replace").strip() == want:
            return False
        tmp = f"{dest}.new-{want[:12]}"
        await self.run(f"rm -rf {_q(tmp)} && mkdir -p {_q(tmp)}")
        sftp = await self.sftp_client()
        try:
            for p in package_files(pkg):
                rel = p.relative_to(pkg).as_posix()
                if "/" in rel:
                    await sftp.makedirs(f"{tmp}/{posixpath.dirname(rel)}", exist_ok=True)
                await sftp.put(str(p), f"{tmp}/{rel}")
            async with sftp.open(f"{tmp}/{TRAINER_STAMP}", "w") as f:
                await f.write(want + "\n")
        except (OSError, asyncssh.Error) as e:
            self.drop(_describe(e))
            raise HostUnreachable(f"{self.name}: uploading the trainer package: {_describe(e)}") from None
        await self.run(f"rm -rf {_q(dest)}.old; if [ -d {_q(dest)} ]; then mv {_q(dest)} {_q(dest)}.old; fi; "
                       f"mv {_q(tmp)} {_q(dest)} && rm -rf {_q(dest)}.old")
        log.info("%s: trainer package uploaded (%s)", self.name, want[:12])
        return True

    async def resolve_python(self) -> str:
        """`python` from the config when set there; else `<workdir>/venv/bin/python` (made by
        deploy/bootstrap-gpu-host.sh) when it exists, else `python3`."""
        cfg = self.cfg
        py = expand_home(cfg.python, self.home) if cfg.python.startswith("~") else cfg.python
        if "python" in cfg.model_fields_set:
            return py
        venv = f"{self.workdir}/venv/bin/python"
        return _last_line(await self.run(f"if [ -x {_q(venv)} ]; then echo {_q(venv)}; else echo {_q(py)}; fi"))

    async def ensure_python(self, conn: asyncssh.SSHClientConnection) -> None:
        """The trainer package is current on the host and its Python can run the harness (once per connection).

        Raises BootstrapError naming the fix, HostUnreachable."""
        async with self.python_lock:
            if self.ready_conn is not conn:
                self.trainer_ok = self.python_ok = False
                self.data_ready = {}
                self.ready_conn = conn
            if not self.trainer_ok:
                wd = self.workdir
                self.workdir = _last_line(await self.run(
                    f"mkdir -p {_q(wd)}/lib {_q(wd)}/data {_q(wd)}/runs && cd {_q(wd)} && pwd -P"))
                self.trainer_uploaded = await self._sync_trainer()
                self.trainer_ok = True
            if not self.python_ok:
                await self._check_python(with_trainer=True)
                self.python_ok = True

    async def check_deps(self, conn: asyncssh.SSHClientConnection) -> None:
        """The host's Python imports torch, numpy and tokenizers (once per connection); writes nothing there.
        Raises BootstrapError naming the fix, HostUnreachable."""
        async with self.python_lock:
            if self.ready_conn is conn and self.python_ok or self.deps_conn is conn:
                return
            await self._check_python(with_trainer=False)
            self.deps_conn = conn

    async def _check_python(self, with_trainer: bool) -> None:
        """Run _DEPS_CHECK, or _TRAINER_CHECK with our uploaded trainer on the path. Raises BootstrapError."""
        self.python = await self.resolve_python()
        check = _TRAINER_CHECK if with_trainer else _DEPS_CHECK
        path = f"cd {_q(self.workdir)} && PYTHONPATH={_q(self.workdir + '/lib')} " if with_trainer else ""
        try:
            out = await self.run(f"{path}{_q(self.python)} -P -c {_q(check)}",
                                 timeout=max(self.runner.op_timeout_s, 120.0))
        except RemoteCommandError as e:
            raise BootstrapError(f"{self.name}: {self.python} cannot run the harness ({e}); {BOOTSTRAP_HINT}") from None
        if with_trainer:
            where = next((x[len("TRAINER="):] for x in out.splitlines() if x.startswith("TRAINER=")), "")
            if not where.startswith(self.workdir + "/lib/trainer/"):
                raise BootstrapError(f"{self.name}: {self.python} imports another trainer package ({where}), not "
                                     f"{self.workdir}/lib/trainer; remove it from that environment")

    async def _remote_hashes(self, remote: str, files: list[tuple[str, bool]]) -> dict[str, str]:
        out = await self.run(f"mkdir -p {_q(remote)} && {_q(self.python)} -c {_q(_REMOTE_HASH)}",
                             input=json.dumps({"dir": remote, "files": files}),
                             timeout=max(self.runner.op_timeout_s, 600.0))
        return json.loads(out.strip().splitlines()[-1])

    async def _sync_data(self, data_dir: Path, report: BootstrapReport) -> BootstrapReport:
        """Send the files whose sha256 differs on the host (the manifest last), then verify the fingerprints there."""
        loop = asyncio.get_running_loop()
        manifest = json.loads((data_dir / "manifest.json").read_text())
        fingerprinted = set(manifest.get("fingerprints", {}))
        local = await loop.run_in_executor(None, self.runner.local_hashes, data_dir)
        remote = f"{self.workdir}/data/{data_dir.name}"
        report = dataclasses.replace(report, data_dir=remote, uploaded_files=[], uploaded_bytes=0)
        rels = sorted(local, key=lambda r: (r == "manifest.json", r))
        have = await self._remote_hashes(remote, [(r, r in fingerprinted or r == "manifest.json") for r in rels])
        todo = [r for r in rels if have.get(r) != local[r]]
        if todo:
            sftp = await self.sftp_client()
            try:
                for rel in todo:
                    if "/" in rel:
                        await sftp.makedirs(f"{remote}/{posixpath.dirname(rel)}", exist_ok=True)
                    await sftp.put(str(data_dir / rel), f"{remote}/{rel}.part")
                    await sftp.posix_rename(f"{remote}/{rel}.part", f"{remote}/{rel}")
                    report.uploaded_files.append(rel)
                    report.uploaded_bytes += (data_dir / rel).stat().st_size
            except (OSError, asyncssh.Error) as e:
                self.drop(_describe(e))
                raise HostUnreachable(f"{self.name}: uploading data: {_describe(e)}") from None
            check = await self._remote_hashes(remote, [(r, True) for r in todo])
            bad = [r for r in todo if check.get(r) != local[r]]
            if bad:
                raise BootstrapError(f"{self.name}: data files arrived corrupted on the host: {', '.join(bad)}")
            log.info("%s: sent %d data files (%d bytes) to %s", self.name, len(todo), report.uploaded_bytes, remote)
        verify = (f"from trainer.data import verify_fingerprints; verify_fingerprints({remote!r}); print('ok')")
        try:
            await self.run(f"PYTHONPATH={_q(self.workdir + '/lib')} {_q(self.python)} -P -c {_q(verify)}",
                           timeout=max(self.runner.op_timeout_s, 600.0))
        except RemoteCommandError as e:
            raise BootstrapError(f"{self.name}: data on the host refused: {e}") from None
        return report

    # ---- health ----

    async def check(self) -> HostHealth:
        """Connect, list GPUs (nvidia-smi) or CPUs, free disk of the workdir, and (once per connection) whether
        the Python imports torch, numpy and tokenizers. Changes nothing on the host."""
        h = HostHealth(name=self.name, address=self.cfg.address, slots=self.health.slots)
        try:
            conn = await self.connection()
            if self.cfg.cpu_only:
                h.cpus = int(_last_line(await self.run("getconf _NPROCESSORS_ONLN 2>/dev/null || nproc")))
            else:
                try:
                    h.gpus = parse_nvidia_smi(await self.run(NVIDIA_SMI))
                except RemoteCommandError as e:
                    raise RemoteCommandError(f"{self.name}: nvidia-smi failed (no driver, or not a GPU host? set "
                                             f"cpu_only = true for a CPU host): {e}") from None
            df = _last_line(await self.run(f"d={_q(self.workdir)}; while [ ! -e \"$d\" ]; do d=$(dirname \"$d\"); "
                                           f"done; df -Pk \"$d\" | tail -n 1")).split()
            h.free_disk_bytes = int(df[3]) * 1024
            await self.check_deps(conn)
            h.up = True
            if not self.cfg.cpu_only and len(h.gpus) < self.cfg.gpus:
                h.error = f"{self.cfg.gpus} GPUs configured, {len(h.gpus)} seen"
        except (SSHRunnerError, ValueError, IndexError) as e:
            h.up, h.error = False, str(e) if isinstance(e, SSHRunnerError) else f"{self.name}: unexpected output ({e})"
        h.checked_at = time.time()
        self.health = h
        return h


NVIDIA_SMI = "nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader,nounits"


def parse_nvidia_smi(text: str) -> list[dict]:
    """Rows of NVIDIA_SMI's output → [{index, name, memory_used_mib, memory_total_mib}]. Raises ValueError."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) < 4:
            raise ValueError(f"unexpected nvidia-smi line {line!r}")
        idx, used, total = parts[0], parts[-2], parts[-1]
        gpus.append({"index": int(idx), "name": ",".join(parts[1:-2]), "memory_used_mib": float(used),
                     "memory_total_mib": float(total)})
    return gpus


def _last_line(out: str) -> str:
    """The last non-empty line of a command's output (a login shell may print banners before it)."""
    lines = [x for x in out.strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else ""


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


# ---- The handle ----


class SSHHandle(Handle):
    """A running remote experiment. Thread-safe; `on_done` is called once (on the runner's thread) when done.

    Mirrors the host's log.txt and result.curve.jsonl into the job's local workdir as they grow, and the
    result.json at the end, so the files look as with the local runner.
    """

    pid: Optional[int] = None  # remote processes are not this machine's: reap() them, never kill_group()

    def __init__(self, runner: "SSHRunner", host: _Host, job: Job, slot: Slot, on_done: Callable[[], None]):
        self.exp_id = job.exp_id
        self.slot = slot
        self.job = job
        self.host = host
        self.runner = runner
        self._on_done = on_done
        self._outcome: Optional[Outcome] = None
        self._aborted = ""
        self._timed_out = False
        self._kill_started: Optional[float] = None
        self._wake: Optional[asyncio.Event] = None
        self.started = time.time()
        self.pgid: Optional[int] = None  # the remote process group, once launched
        self.remote_dir = ""  # <workdir>/runs/exp-NNNNNN on the host, once launched
        self.launched = 0.0
        wd = Path(job.workdir)
        wd.mkdir(parents=True, exist_ok=True)
        for stale in ("result.json", "result.curve.jsonl", "log.txt"):
            (wd / stale).unlink(missing_ok=True)
        (wd / "train.py").write_text(job.source)
        self.log_path = wd / "log.txt"
        self.curve_path = wd / "result.curve.jsonl"
        self._offsets = {"log.txt": 0, "result.curve.jsonl": 0}
        self.future = runner._loop.submit(self._main())

    # ---- the public, synchronous side ----

    def done(self) -> bool:
        return self._outcome is not None

    def outcome(self) -> Optional[Outcome]:
        return self._outcome

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

    def progress(self) -> Optional[dict]:
        """{step, elapsed_s, loss} of the latest curve point mirrored from the host, or None before the first."""
        return last_curve_point(self.curve_path)

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
            await h.ensure_ready(self.job.data_dir)
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
        # the harness sandboxes the proposal itself, with what the host offers (bubblewrap: deploy/gpu-host-bootstrap.sh)
        cmd = " ".join(_q(c) for c in harness_command(job, self.runner.sandbox, python=h.python))
        inner = (f"echo $$ > pid.tmp && mv pid.tmp pid; "
                 f"{' '.join(f'{k}={_q(v)}' for k, v in env.items())} {cmd} > log.txt 2>&1 < /dev/null; "
                 f"echo $? > exit_code.tmp; mv exit_code.tmp exit_code")
        script = (
            f"( {kill_script(rd)}) >/dev/null\n"
            f"rm -rf {_q(rd)} && mkdir -p {_q(rd)} && cd {_q(rd)} && cat > train.py\n"
            f"setsid sh -c {_q(inner)} > /dev/null 2>&1 < /dev/null &\n"
            f"i=0; while [ ! -s pid ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done\n"
            f"cat pid\n")
        out = await h.run(script, input=self.job.source)
        try:
            self.pgid = int(_last_line(out))
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
        rd = _q(self.remote_dir)
        state = _last_line(await self.host.run(
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
        """The outcome from what came back, with the local runner's precedence: aborted, result, timeout, crash."""
        wall = time.time() - self.started
        result_path = Path(self.job.workdir) / "result.json"
        seed = self.job.seed
        if result_json is not None:
            tmp = result_path.with_name("result.json.tmp")
            tmp.write_bytes(result_json)
            os.replace(tmp, result_path)
        if self._aborted:
            res = Result(status="crash", error=f"aborted: {self._aborted}", seed=seed)
        elif result_json is not None:
            try:
                res = read_result(result_path)
            except (OSError, ValueError) as e:
                res = Result(status="crash", error=f"unreadable result.json ({e})", seed=seed)
        elif self._timed_out:
            res = Result(status="timeout", error=f"killed after budget + grace + {self.runner.backstop_s:.0f} s"
                         + (f" ({note})" if note else ""), seed=seed)
        else:
            if exit_code is None:
                why = "was killed (its process group is gone)"
            elif exit_code > 128:
                why = f"killed by signal {exit_code - 128}"
            else:
                why = f"exited with code {exit_code}"
            res = Result(status="crash", error=f"harness {why} without a result", seed=seed)
        return Outcome(result=res, slot=self.slot.name, host=self.slot.host, wall_seconds=round(wall, 3),
                       log_tail=tail(self.log_path), aborted=self._aborted,
                       curve=downsample_curve(read_curve(self.curve_path)))

    def _infra(self, error: str) -> Outcome:
        return Outcome(result=Result(status="crash", error=error, seed=self.job.seed), slot=self.slot.name,
                       host=self.slot.host, wall_seconds=round(time.time() - self.started, 3),
                       log_tail=tail(self.log_path), infra_failed=True, aborted=self._aborted)


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
    (every `health_interval_s` seconds in the background, or `health()`) finds it up again.
    Times in seconds. The blocking methods must not be called from `on_done` (it runs on the runner's thread).
    """

    name = "ssh"

    def __init__(self, hosts: list[HostConfig], *, local_python_pkg: Path = Path(trainer.__file__).parent,
                 known_hosts_file: Optional[Path] = None, poll_s: float = 1.0, connect_timeout_s: float = 15.0,
                 op_timeout_s: float = 30.0, keepalive_s: float = 5.0, keepalive_count: int = 3,
                 reconnect_s: float = 30.0, backstop_s: float = BACKSTOP_S,
                 health_interval_s: Optional[float] = 60.0, sandbox: Optional[SandboxConfig] = None):
        """`known_hosts_file`: where unknown host keys are recorded (accept-new) for hosts without their own
        `known_hosts`; default `<ratchet home>/known_hosts`. `reconnect_s`: how long a running experiment
        waits for its host to come back before it is `infra_failed`. `backstop_s`: past budget + grace, when
        the runner kills a harness that did not time itself out. `health_interval_s`: None disables the
        background checks. `sandbox`: what the launcher on each host enforces (default: the configured
        settings). Raises ValueError on duplicate host names."""
        names = [h.name for h in hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate host names in [[hosts]]: {names}")
        self.local_python_pkg = Path(local_python_pkg)
        self.known_hosts_file = Path(known_hosts_file) if known_hosts_file else default_home() / "known_hosts"
        self.poll_s, self.connect_timeout_s, self.op_timeout_s = poll_s, connect_timeout_s, op_timeout_s
        self.keepalive_s, self.keepalive_count = keepalive_s, keepalive_count
        self.reconnect_s, self.backstop_s, self.health_interval_s = reconnect_s, backstop_s, health_interval_s
        self.sandbox = sandbox or sandbox_config()
        self._cfgs = list(hosts)
        self._local_hashes: dict[tuple, str] = {}
        self._hash_lock = threading.Lock()
        self._handles: dict[int, SSHHandle] = {}
        self._tasks: set[asyncio.Task] = set()  # ours, cancelled by close()
        self._closed = False
        self._loop = _LoopThread()
        self._hosts: dict[str, _Host] = self._loop.call(self._make_hosts(), 10)
        self._health_task = (self._loop.submit(self._health_loop()) if health_interval_s else None)

    async def _make_hosts(self) -> dict[str, _Host]:
        return {c.name: _Host(c, self) for c in self._cfgs}

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
                return await h.ensure_ready(Path(data_dir) if data_dir else None)
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

    def local_hashes(self, data_dir: Path) -> dict[str, str]:
        """sha256 of every file of a local data dir (relative posix path → hex), cached by (size, mtime)."""
        out = {}
        for p in sorted(Path(data_dir).rglob("*")):
            if not p.is_file() or p.name.startswith(".") or ".tmp" in p.name:
                continue
            st = p.stat()
            key = (str(p), st.st_size, st.st_mtime_ns)
            with self._hash_lock:
                got = self._local_hashes.get(key)
            if got is None:
                got = sha256_file(p)
                with self._hash_lock:
                    self._local_hashes[key] = got
            out[p.relative_to(data_dir).as_posix()] = got
        return out

    async def _check_all(self, timeout: float) -> list[HostHealth]:
        async def one(h: _Host) -> HostHealth:
            try:
                return await asyncio.wait_for(h.check(), timeout)
            except asyncio.TimeoutError:
                h.drop("health check timed out")
                h.mark_down(f"{h.name}: health check timed out after {timeout:.0f} s")
                return h.health
        return list(await asyncio.gather(*(one(self._hosts[c.name]) for c in self._cfgs)))

    async def _health_loop(self) -> None:
        self._tasks.add(asyncio.current_task())
        while True:
            try:
                await self._check_all(self.connect_timeout_s + 3 * self.op_timeout_s + 10)
            except Exception:  # noqa: BLE001 - the loop must survive; logged
                log.exception("host health check failed")
            await asyncio.sleep(self.health_interval_s)
