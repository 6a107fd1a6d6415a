"""One SSH host of the SSH runner: its connection (asyncssh, host keys checked, reconnects), commands and files,
health (GPUs, disk, a Python that imports torch) and control of the remote process groups it runs (run directories,
kill, reaping what a crash left behind). Preparing the host is loop/runners/ssh_bootstrap.py.

Never logs keys, never disables host-key checking.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import asyncssh

from loop.config import HostConfig
from loop.runners.base import KILL_WAIT_S, first_line

if TYPE_CHECKING:
    from loop.runners.ssh import SSHRunner

log = logging.getLogger(__name__)

BOOTSTRAP_HINT = "run deploy/bootstrap-gpu-host.sh on the host (see README, GPU hosts over SSH)"
MAX_CHANNELS = 8  # concurrent exec channels per connection; OpenSSH's MaxSessions defaults to 10
READ_CHUNK = 4 << 20  # bytes of log / curve mirrored per poll
NVIDIA_SMI = "nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader,nounits"


class SSHRunnerError(OSError):
    """Base of the runner's errors (an OSError, so the engine treats it as an infrastructure failure)."""


class HostUnreachable(SSHRunnerError):
    """The host cannot be reached: connection refused or lost, authentication or host key refused, timeout."""


class BootstrapError(SSHRunnerError):
    """The host is reachable but cannot run experiments: no usable Python, data that fails its fingerprints."""


class RemoteCommandError(SSHRunnerError):
    """A command on the host exited non-zero."""


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


def q(s) -> str:
    """`s` (a path, a number) quoted for a remote POSIX shell."""
    return shlex.quote(str(s))


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


def parse_nvidia_smi(text: str) -> list[dict]:
    """Rows of NVIDIA_SMI's output → [{index, name, memory_used_mib, memory_total_mib}]. Raises ValueError."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) < 4:
            raise ValueError(f"unexpected nvidia-smi line {line!r}")
        gpus.append({"index": int(parts[0]), "name": ",".join(parts[1:-2]), "memory_used_mib": float(parts[-2]),
                     "memory_total_mib": float(parts[-1])})
    return gpus


def last_line(out: str) -> str:
    """The last non-empty line of a command's output (a login shell may print banners before it)."""
    lines = [x for x in out.strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else ""


def describe_error(e: BaseException) -> str:
    return "timed out" if isinstance(e, asyncio.TimeoutError) else first_line(e)[:300] or type(e).__name__


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
    r = q(run_dir)
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


class SSHHost:
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
        self.python_lock = asyncio.Lock()
        self.channels = asyncio.Semaphore(MAX_CHANNELS)
        self.connects = 0  # connections made (reconnects included)
        self.home = self.workdir = self.python = ""
        self.pending_reaps: set[int] = set()  # experiments to reap once the workdir is known
        self.deps_conn: Optional[asyncssh.SSHClientConnection] = None  # health's import check passed on it
        self.ready_conn: Optional[asyncssh.SSHClientConnection] = None  # what ssh_bootstrap verified holds for it:
        self.trainer_ok = self.python_ok = self.trainer_uploaded = False
        self.data_ready: dict = {}  # manifest sha256 → BootstrapReport (ssh_bootstrap.py)
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
                self.home = last_line(await self._exec(conn, 'printf "\\n%s\\n" "$HOME"'))
                wd = expand_home(self.cfg.workdir, self.home)
                # resolved without creating it (health checks write nothing); ensure_ready creates it
                self.workdir = last_line(await self._exec(conn, f"cd {q(wd)} 2>/dev/null && pwd -P || echo {q(wd)}"))
                self.orphans |= {f"{self.workdir}/runs/{run_dir_name(i)}" for i in self.pending_reaps}
                self.pending_reaps.clear()
                for run_dir in sorted(self.orphans):
                    if "killed" in await self._exec(conn, kill_script(run_dir)):
                        log.warning("%s: killed the leftover process group of %s", self.name, run_dir)
                    self.orphans.discard(run_dir)
            except BaseException:
                conn.close()
                raise
            self.conn = conn
            return conn

    async def _connect(self) -> asyncssh.SSHClientConnection:
        r, cfg = self.runner, self.cfg
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
            raise HostUnreachable(f"{self.name}: cannot connect to {self.where()}: {describe_error(e)}") from None
        if client.new_key is not None:
            pattern = cfg.address if cfg.port == 22 else f"[{cfg.address}]:{cfg.port}"
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

    def lost(self, e: BaseException, what: str = "", conn=None) -> HostUnreachable:
        """Drop the connection after the network error `e` (see drop); the HostUnreachable to raise."""
        self.drop(describe_error(e), conn)
        return HostUnreachable(f"{self.name}: {what}{describe_error(e)}")

    def mark_down(self, error: str) -> None:
        self.health.up, self.health.error, self.health.checked_at = False, error, time.time()

    # ---- commands and files ----

    async def _exec(self, conn: asyncssh.SSHClientConnection, cmd: str, *, input: Optional[str] = None,
                    timeout: Optional[float] = None, check: bool = True) -> str:
        """Run `cmd` in the login shell; stdout. Raises RemoteCommandError (non-zero) or HostUnreachable."""
        try:
            async with self.channels:
                res = await asyncio.wait_for(conn.run(cmd, input=input, check=False),
                                             timeout or self.runner.op_timeout_s)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
            raise self.lost(e, conn=conn) from None
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
                    raise self.lost(e, "sftp: ") from None
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
            raise self.lost(e, f"reading {path}: ") from None

    async def put(self, src: Path, dest: str, rels: list[str], what: str, part: bool = False) -> None:
        """Upload the files `rels` of local directory `src` into host directory `dest` (when `part`, each through
        `<file>.part` and a rename). Raises HostUnreachable."""
        sftp = await self.sftp_client()
        try:
            for rel in rels:
                if "/" in rel:
                    await sftp.makedirs(f"{dest}/{posixpath.dirname(rel)}", exist_ok=True)
                to = f"{dest}/{rel}" + (".part" if part else "")
                await sftp.put(str(src / rel), to)
                if part:
                    await sftp.posix_rename(to, f"{dest}/{rel}")
        except (OSError, asyncssh.Error) as e:
            raise self.lost(e, f"uploading {what}: ") from None

    # ---- the Python ----

    async def resolve_python(self) -> str:
        """`python` from the config when set there; else `<workdir>/venv/bin/python` (made by
        deploy/bootstrap-gpu-host.sh) when it exists, else `python3`."""
        cfg = self.cfg
        py = expand_home(cfg.python, self.home) if cfg.python.startswith("~") else cfg.python
        if "python" in cfg.model_fields_set:
            return py
        venv = f"{self.workdir}/venv/bin/python"
        return last_line(await self.run(f"if [ -x {q(venv)} ]; then echo {q(venv)}; else echo {q(py)}; fi"))

    async def check_deps(self, conn: asyncssh.SSHClientConnection) -> None:
        """The host's Python imports torch, numpy and tokenizers (once per connection); writes nothing there.
        Raises BootstrapError naming the fix, HostUnreachable."""
        async with self.python_lock:
            if self.ready_conn is conn and self.python_ok or self.deps_conn is conn:
                return
            await self.check_python(with_trainer=False)
            self.deps_conn = conn

    async def check_python(self, with_trainer: bool) -> None:
        """Run _DEPS_CHECK, or _TRAINER_CHECK with our uploaded trainer on the path. Raises BootstrapError."""
        self.python = await self.resolve_python()
        check = _TRAINER_CHECK if with_trainer else _DEPS_CHECK
        path = f"cd {q(self.workdir)} && PYTHONPATH={q(self.workdir + '/lib')} " if with_trainer else ""
        try:
            out = await self.run(f"{path}{q(self.python)} -P -c {q(check)}",
                                 timeout=max(self.runner.op_timeout_s, 120.0))
        except RemoteCommandError as e:
            raise BootstrapError(f"{self.name}: {self.python} cannot run the harness ({e}); {BOOTSTRAP_HINT}") from None
        if with_trainer:
            where = next((x[len("TRAINER="):] for x in out.splitlines() if x.startswith("TRAINER=")), "")
            if not where.startswith(self.workdir + "/lib/trainer/"):
                raise BootstrapError(f"{self.name}: {self.python} imports another trainer package ({where}), not "
                                     f"{self.workdir}/lib/trainer; remove it from that environment")

    # ---- health ----

    async def check(self) -> HostHealth:
        """Connect, list GPUs (nvidia-smi) or CPUs, free disk of the workdir, and (once per connection) whether
        the Python imports torch, numpy and tokenizers. Changes nothing on the host."""
        h = HostHealth(name=self.name, address=self.cfg.address, slots=self.health.slots)
        try:
            conn = await self.connection()
            if self.cfg.cpu_only:
                h.cpus = int(last_line(await self.run("getconf _NPROCESSORS_ONLN 2>/dev/null || nproc")))
            else:
                try:
                    h.gpus = parse_nvidia_smi(await self.run(NVIDIA_SMI))
                except RemoteCommandError as e:
                    raise RemoteCommandError(f"{self.name}: nvidia-smi failed (no driver, or not a GPU host? set "
                                             f"cpu_only = true for a CPU host): {e}") from None
            df = last_line(await self.run(f"d={q(self.workdir)}; while [ ! -e \"$d\" ]; do d=$(dirname \"$d\"); "
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


