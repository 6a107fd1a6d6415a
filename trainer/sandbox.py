"""The OS sandbox for the proposal's code: bubblewrap, a separate unprivileged uid, a cgroup per experiment.

`command()` wraps a command line so that it runs with no network, its own PID/IPC/UTS namespaces, a read-only view
of only the paths it is given, a private tmpfs as its only writable place, an allow-listed environment, and as an
unprivileged user that owns nothing on the host. How the uid is separated depends on what the service may do:

- `root`: the service runs as root. bwrap sets up the namespaces, then `setpriv` drops to `sandbox_user`.
- `subuid`: the service is an ordinary user with a subordinate uid range in /etc/subuid (as deploy/ sets up).
  `unshare --map-users` (newuidmap) maps the range into a user namespace; inside it bwrap runs as its root and
  `setpriv` drops to uid 65534 there — on the host a uid from the range that owns no file.
- `userns`: neither: bwrap maps the service's own uid to 65534 in a user namespace. The code sees only what is
  mounted, but on the host it is still the service's uid (reported as missing).
- `off`: `sandbox = false`, not Linux, or no bwrap: a plain child process with the allow-listed environment.

Memory and processes are limited per experiment by a cgroup (v2, or v1's memory and pids controllers) that the
command joins before it starts, so forked children share one limit; without a writable cgroup, per-process
rlimits are the fallback (reported as missing). Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

GIB = 1 << 30
DEFAULT_MEMORY_FRACTION = 0.8  # of the host's RAM per experiment, when memory_gb is not set
NS_UID = 65534  # the uid the code has inside a user namespace (nobody)
# Environment variables passed through to the sandbox; everything else (secrets included) is dropped.
ENV_PASS = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "LD_LIBRARY_PATH", "LANG", "LC_ALL", "TZ")
# Read-only system paths every sandbox sees (the interpreter, shared libraries, CA-free minimal /etc).
SYSTEM_RO = ("/usr", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
             "/etc/alternatives")
MERGED_USR_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def gib(n_bytes: float) -> str:
    """Bytes as a short GiB figure: 2147483648 → '2', 19971597107 → '18.6', 10737418 → '0.01'."""
    v = n_bytes / GIB
    return f"{v:.1f}".removesuffix(".0") if v >= 1 else f"{v:.2g}"


# ---- Settings ----


@dataclass(frozen=True)
class SandboxConfig:
    """What the sandbox enforces. Sizes in GiB; `memory_gb` 0 means DEFAULT_MEMORY_FRACTION of the host's RAM."""

    enabled: bool = True
    user: str = "nobody"  # the unprivileged user the code runs as when the service is root
    memory_gb: float = 0.0  # RAM of one experiment, all its processes together (cgroup); not GPU memory
    max_processes: int = 4096  # processes and threads of one experiment (cgroup pids)
    max_file_gb: float = 16.0  # size of the code's private tmpfs and largest file it may write
    max_open_files: int = 4096  # RLIMIT_NOFILE

    def memory_bytes(self) -> int:
        """The memory limit of one experiment on this machine, bytes."""
        if self.memory_gb:
            return int(self.memory_gb * GIB)
        return int(DEFAULT_MEMORY_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def args(self) -> list[str]:
        """These settings as trainer.run options (how runners pass them to the harness on any host)."""
        if not self.enabled:
            return ["--no-sandbox"]
        return ["--sandbox-user", self.user, "--memory-gb", repr(float(self.memory_gb)),
                "--max-processes", str(self.max_processes), "--max-file-gb", repr(float(self.max_file_gb)),
                "--max-open-files", str(self.max_open_files)]


def _subuid_range(user: str) -> Optional[tuple[int, int]]:
    """(first, count) of `user`'s first subordinate uid range of at least 65536, from /etc/subuid and /etc/subgid."""
    found = []
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            return None
        uid = str(os.getuid())
        got = None
        for line in lines:
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[0] in (user, uid) and parts[1].isdigit() and parts[2].isdigit():
                if int(parts[2]) >= NS_UID + 1:
                    got = (int(parts[1]), int(parts[2]))
                    break
        if got is None:
            return None
        found.append(got)
    return found[0] if found[0] == found[1] else None


@dataclass(frozen=True)
class Plan:
    """How this machine runs sandboxed commands: the mode (root | subuid | userns | off | unavailable: the sandbox
    is on but cannot run here, so nothing may run) and what is missing."""

    mode: str
    uid: Optional[int] = None  # root mode: the sandbox user's uid and gid
    gid: Optional[int] = None
    subuid: Optional[tuple[int, int]] = None
    missing: tuple = ()


def plan(cfg: SandboxConfig) -> Plan:
    """Pick the mode for `cfg` on this machine (see the module docstring)."""
    if not cfg.enabled:
        return Plan("off", missing=("OS sandbox: off (sandbox = false): proposals run unconfined",))
    if not sys.platform.startswith("linux"):
        return Plan("unavailable", missing=(f"OS sandbox: Linux only (this is {sys.platform}); set sandbox = false "
                                            "to run proposals unconfined",))
    if shutil.which("bwrap") is None:
        return Plan("unavailable", missing=("OS sandbox: bubblewrap (bwrap) is not installed; install it, or set "
                                            "sandbox = false to run proposals unconfined",))
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(cfg.user) if not cfg.user.isdigit() else pwd.getpwuid(int(cfg.user))
            uid, gid = pw.pw_uid, pw.pw_gid
        except KeyError:
            uid = gid = int(cfg.user) if cfg.user.isdigit() else -1
        if uid <= 0:
            return Plan("userns", missing=(f"separate uid: sandbox_user {cfg.user!r} is root or unknown; the code "
                                           "runs as root's uid in a user namespace",))
        return Plan("root", uid=uid, gid=gid)
    me = pwd.getpwuid(os.getuid()).pw_name
    sub = _subuid_range(me)
    if sub and shutil.which("newuidmap") and shutil.which("newgidmap") and shutil.which("unshare"):
        return Plan("subuid", subuid=sub)
    return Plan("userns", missing=(f"separate host uid: {me} has no subordinate uid range in /etc/subuid (or "
                                   "newuidmap is missing); the code runs as the service's uid in a user namespace",))


# ---- cgroup: memory and processes of one experiment ----


def _own_cgroup_dir(controller: str) -> Optional[Path]:
    """The directory of this process's cgroup for `controller` (v1), or for the unified hierarchy (v2: '')."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hid, ctrls, path = line.split(":", 2)
        if controller and controller in ctrls.split(","):
            root = Path("/sys/fs/cgroup") / controller
            return root / path.lstrip("/") if root.is_dir() else None
        if not controller and hid == "0":
            for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                if (root / "cgroup.controllers").exists():
                    return root / path.lstrip("/")
    return None


@dataclass
class Cgroup:
    """One experiment's cgroup(s). `procs` are the cgroup.procs files a process joins; `memory_bytes` its limit."""

    dirs: list[Path]
    procs: list[Path]
    memory_bytes: int
    v2: bool
    missing: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, name: str, memory_bytes: int, max_processes: int) -> "Cgroup":
        """Make the cgroup under this process's own (v2 first, else v1 memory + pids). When none is writable the
        result has no dirs and says why in `missing` (the caller then falls back to rlimits)."""
        v2 = Path(os.environ["RATCHET_CGROUP_ROOT"]) if os.environ.get("RATCHET_CGROUP_ROOT") else _own_cgroup_dir("")
        if v2 is not None and "memory" in _read(v2 / "cgroup.controllers").split():
            d = v2 / name
            try:
                if "memory" not in _read(v2 / "cgroup.subtree_control").split():
                    (v2 / "cgroup.subtree_control").write_text("+memory +pids")
                d.mkdir()
                (d / "memory.max").write_text(str(memory_bytes))
                if (d / "memory.swap.max").exists():
                    (d / "memory.swap.max").write_text("0")
                if (d / "pids.max").exists():
                    (d / "pids.max").write_text(str(max_processes))
                return cls([d], [d / "cgroup.procs"], memory_bytes, True)
            except OSError as e:
                _rmdir(d)
                why = f"cgroup v2 at {v2} is not writable ({e.strerror})"
        else:
            why = "no cgroup v2 with the memory controller"
        dirs, procs = [], []
        try:
            for ctrl in ("memory", "pids"):
                own = _own_cgroup_dir(ctrl)
                if own is None:
                    if ctrl == "memory":
                        raise OSError(0, "no cgroup v1 memory controller")
                    continue
                d = own / name
                d.mkdir()
                dirs.append(d)
                if ctrl == "memory":
                    (d / "memory.limit_in_bytes").write_text(str(memory_bytes))
                else:
                    (d / "pids.max").write_text(str(max_processes))
                procs.append(d / "cgroup.procs")
            return cls(dirs, procs, memory_bytes, False)
        except OSError as e:
            for d in dirs:
                _rmdir(d)
            return cls([], [], memory_bytes, False,
                       [f"memory per experiment: {why}; cgroup v1: {e.strerror}; per-process limits only"])

    def oom_killed(self) -> bool:
        """True when the kernel killed a process of this cgroup for memory."""
        for d in self.dirs:
            for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
                try:
                    for line in (d / name).read_text().splitlines():
                        k, _, v = line.partition(" ")
                        if k == key and int(v) > 0:
                            return True
                except (OSError, ValueError):
                    continue
        return False

    def peak_bytes(self) -> Optional[int]:
        """The most memory the experiment's processes used at once, or None when the kernel does not say."""
        for d in self.dirs:
            for name in ("memory.peak", "memory.max_usage_in_bytes"):
                try:
                    return int((d / name).read_text())
                except (OSError, ValueError):
                    continue
        return None

    def remove(self) -> None:
        """Kill what is left in it and remove it."""
        for d in self.dirs:
            _kill_all(d / "cgroup.procs")
        for d in self.dirs:
            _rmdir(d)


def delegate_cgroup(own: Optional[Path] = None) -> Optional[Path]:
    """Make this process's cgroup v2 (delegated to the service, e.g. systemd's Delegate=) able to hold one child
    cgroup per experiment: cgroup v2 lets a cgroup enable controllers for children only while it holds no process,
    so this process moves into a `service` leaf, the memory and pids controllers are enabled below `own`, and
    RATCHET_CGROUP_ROOT tells the harnesses it starts where to make their experiments' cgroups.
    Returns that root, or None where there is nothing to do (cgroup v1, already enabled, not writable)."""
    own = own or _own_cgroup_dir("")
    if own is None or "memory" not in _read(own / "cgroup.controllers").split():
        return None
    if "memory" in _read(own / "cgroup.subtree_control").split():
        os.environ["RATCHET_CGROUP_ROOT"] = str(own)
        return own
    try:
        leaf = own / "service"
        leaf.mkdir(exist_ok=True)
        for pid in _read(own / "cgroup.procs").split():  # this process, and any helper already started
            (leaf / "cgroup.procs").write_text(pid)
        (own / "cgroup.subtree_control").write_text("+memory +pids")
    except OSError:
        return None
    os.environ["RATCHET_CGROUP_ROOT"] = str(own)
    return own


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _kill_all(procs: Path) -> None:
    for _ in range(50):
        try:
            pids = [int(p) for p in procs.read_text().split()]
        except (OSError, ValueError):
            return
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


def _rmdir(d: Path) -> None:
    for _ in range(50):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)  # its last process is still being reaped


# ---- The command line ----


def _python_paths() -> list[str]:
    """What the interpreter and the trainer package need, read-only: the venv, the base installation, and the
    trainer package's own directory (not the checkout around it)."""
    import trainer

    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(os.path.abspath(trainer.__file__))]
    out: list[str] = []
    for p in paths:
        for v in (os.path.abspath(p), os.path.realpath(p)):
            if os.path.exists(v) and not any(v == o or v.startswith(o + os.sep) for o in out):
                out = [o for o in out if not o.startswith(v + os.sep)] + [v]
    return out


def _dirs_above(paths: list[str]) -> list[str]:
    """Every ancestor directory of `paths`, parents first (made 0755 in the sandbox so the code can reach them)."""
    seen: list[str] = []
    for p in paths:
        parts = Path(p).parts
        for i in range(2, len(parts)):
            d = str(Path(*parts[:i]))
            if d not in seen:
                seen.append(d)
    return seen


def clean_env(extra: Optional[dict] = None) -> dict:
    """The sandbox's environment: the allow-listed variables of this process, the trainer package's directory as
    PYTHONPATH (only that package of it is mounted), then `extra`."""
    import trainer

    env = {k: os.environ[k] for k in ENV_PASS if k in os.environ}
    env.update({"PATH": "/usr/bin:/bin", "HOME": "/job", "USER": "sandbox", "LOGNAME": "sandbox",
                "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(trainer.__file__)))})
    env.update(extra or {})
    return env


def command(cfg: SandboxConfig, p: Plan, argv: list[str], *, ro: list[tuple[str, str]] = (),
            env: Optional[dict] = None, cuda: bool = False, cgroup: Optional[Cgroup] = None) -> list[str]:
    """`argv` wrapped to run in the sandbox (see the module docstring).

    `ro`: (host path, path inside) pairs mounted read-only besides the system and Python paths. The only writable
    place is a private tmpfs at /job (the working directory, at most max_file_gb). `env` replaces the environment
    (default clean_env()). `cgroup`: the command joins it before anything else runs.
    """
    if p.mode == "unavailable":
        raise OSError(p.missing[0])
    env = clean_env() if env is None else env
    limits = ["prlimit", f"--nofile={cfg.max_open_files}", f"--fsize={int(cfg.max_file_gb * GIB)}", "--core=0"]
    if cgroup is None or not cgroup.procs:
        if not cuda:  # an address-space limit breaks the CUDA driver (it reserves huge virtual ranges)
            limits.append(f"--as={cfg.memory_bytes()}")
        limits.append(f"--nproc={cfg.max_processes}")
    limits.append("--")
    if p.mode == "off":
        cmd = list(argv)
    else:
        cmd = _bwrap(cfg, p, argv, ro, env, cuda, limits)
    if cgroup is not None and cgroup.procs:
        joins = " && ".join(f'echo $$ > "${i + 1}"' for i in range(len(cgroup.procs)))
        cmd = ["/bin/sh", "-c", f'{joins} && shift {len(cgroup.procs)} && exec "$@"', "sh",
               *map(str, cgroup.procs), *cmd]
    return cmd


def _exe(name: str) -> str:
    """`name`'s absolute path on the service's PATH, as plan() found it: the command starts with the sandbox's
    clean environment, whose PATH (/usr/bin:/bin) would miss a bwrap installed elsewhere (/usr/local/bin)."""
    return shutil.which(name) or name


def _bwrap(cfg: SandboxConfig, p: Plan, argv, ro, env, cuda: bool, limits: list[str]) -> list[str]:
    py = _python_paths()
    binds = [(s, s) for s in py] + [(s, d) for s, d in ro]
    cmd = [_exe("bwrap"), "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid", "--unshare-net",
           "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
    if p.mode == "userns":
        cmd += ["--unshare-user", "--uid", str(NS_UID), "--gid", str(NS_UID), "--disable-userns"]
    # The fresh file systems first: a read-only bind below /tmp (a venv there) must land on top of them.
    cmd += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm",  # NCCL, multiprocessing
            "--perms", "1777", "--tmpfs", "/tmp",
            "--size", str(int(cfg.max_file_gb * GIB)), "--perms", "0777", "--tmpfs", "/job"]
    for d in ["/etc", *_dirs_above([dst for _, dst in binds])]:
        if d not in ("/tmp", "/job", "/dev", "/proc") and not d.startswith("/usr"):
            cmd += ["--perms", "0755", "--dir", d]
    for s in SYSTEM_RO:
        cmd += ["--ro-bind-try", s, s]
    for link in MERGED_USR_LINKS:  # merged-/usr systems: /lib → usr/lib
        if os.path.islink(link):
            cmd += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            cmd += ["--ro-bind", link, link]
    for s, d in binds:
        cmd += ["--ro-bind", s, d]
    cmd += ["--chdir", "/job"]
    if cuda:
        for dev in sorted(Path("/dev").glob("nvidia*")):
            cmd += ["--dev-bind", str(dev), str(dev)]
        cmd += ["--ro-bind-try", "/sys", "/sys"]  # NVML reads the PCI topology
    cmd += ["--clearenv"]
    for k, v in env.items():
        cmd += ["--setenv", k, str(v)]
    drop: list[str] = []
    if p.mode == "root":
        drop = ["setpriv", f"--reuid={p.uid}", f"--regid={p.gid}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--"]
    elif p.mode == "subuid":
        drop = ["setpriv", f"--reuid={NS_UID}", f"--regid={NS_UID}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--"]
    cmd += ["--", *limits, *drop, *argv]
    if p.mode == "subuid":
        first, count = p.subuid
        cmd = [_exe("unshare"), "--user", "--map-root-user", f"--map-users={first},1,{count}",
               f"--map-groups={first},1,{count}", "--", *cmd]
    return cmd


def spawn(cmd: list[str], *, pass_fds=(), env: Optional[dict] = None) -> subprocess.Popen:
    """Start a sandboxed command in this process's group (a runner's signal to the harness's group reaches it),
    its output to this process's stdout and stderr."""
    return subprocess.Popen(cmd, pass_fds=pass_fds, stdin=subprocess.DEVNULL, cwd=tempfile.gettempdir(),
                            env=env if env is not None else clean_env())


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a spawned command and reap it. Under bubblewrap everything it started dies with it (its own PID
    namespace, --die-with-parent); the experiment's cgroup is emptied by Cgroup.remove()."""
    try:
        proc.kill()
    except OSError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# ---- What is enforced here ----

_PROBE = ("import json, os, socket\n"
          "def can(f):\n"
          "    try:\n        f(); return True\n    except OSError:\n        return False\n"
          "print(json.dumps({'uid': os.getuid(), 'host_uid': int(open('/proc/self/status').read().split('Uid:')[1]"
          ".split()[0]), 'net': can(lambda: socket.create_connection(('1.1.1.1', 53), timeout=1)),"
          " 'root': sorted(os.listdir('/')), 'write_usr': can(lambda: open('/usr/.probe', 'w')),"
          " 'env': sorted(os.environ)}))\n")

_FEATURES: dict = {}


def features(cfg: Optional[SandboxConfig] = None, refresh: bool = False) -> dict:
    """What the sandbox enforces on this machine, found by running a probe in it once (cached per config).

    Keys: enabled, mode, user (what the code runs as), network_isolated, read_only, memory_gb (per experiment),
    memory_scope ('experiment' with a cgroup, 'process' without), max_processes, max_file_gb, max_open_files,
    missing (one line per protection not available, with the reason).
    """
    cfg = cfg or SandboxConfig()
    if cfg in _FEATURES and not refresh:
        return dict(_FEATURES[cfg])
    p = plan(cfg)
    f = {"enabled": p.mode not in ("off", "unavailable"), "mode": p.mode, "user": None, "network_isolated": False,
         "read_only": False, "memory_gb": float(gib(cfg.memory_bytes())), "memory_scope": "process",
         "max_processes": cfg.max_processes, "max_file_gb": cfg.max_file_gb, "max_open_files": cfg.max_open_files,
         "missing": list(p.missing)}
    cg = Cgroup.create(f"ratchet-probe-{os.getpid()}-{time.monotonic_ns()}", cfg.memory_bytes(), cfg.max_processes)
    f["missing"] += cg.missing
    if cg.procs:
        f["memory_scope"] = "experiment"
    if f["enabled"]:
        try:
            cmd = command(cfg, p, [sys.executable, "-I", "-c", _PROBE], cgroup=cg)
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tempfile.gettempdir(),
                                 env=clean_env(), start_new_session=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            f["network_isolated"] = not got["net"]
            f["read_only"] = not got["write_usr"]
            f["user"] = (f"uid {got['host_uid']} on the host" if p.mode != "userns"
                         else f"the service's uid (uid {got['uid']} in a user namespace)")
        except (OSError, ValueError, IndexError, KeyError, subprocess.TimeoutExpired) as e:
            f["enabled"] = False
            f["missing"] = [f"OS sandbox: bwrap failed here ({type(e).__name__}: "
                            f"{(locals().get('out').stderr.strip()[-200:] if locals().get('out') else e)})"]
    cg.remove()
    _FEATURES[cfg] = f
    return dict(f)


def describe(f: dict) -> str:
    """One line for `ratchet doctor` and the serve start line: what is on, then what is missing and why."""
    if not f.get("enabled"):
        return "sandbox off: " + "; ".join(f.get("missing") or ["disabled"])
    on = [f"bubblewrap ({f['mode']})"]
    if f.get("user"):
        on.append(f"runs as {f['user']}")
    if f.get("network_isolated"):
        on.append("no network")
    on.append("sees only the Python installation and what it is given")
    on.append(f"memory ≤ {f['memory_gb']:g} GiB per {f['memory_scope']}")
    on.append(f"≤ {f['max_processes']} processes")
    on.append(f"files ≤ {f['max_file_gb']:g} GiB")
    line = "sandbox: " + ", ".join(on)
    if f.get("missing"):
        line += "; not available: " + "; ".join(f["missing"])
    return line
