"""Containment for agent-written train.py: audit-hook guards inside the harness (every runner, every OS) and a
Linux launcher that starts the harness in new namespaces, as an unprivileged user, with resource limits.

Neither part imports torch or the harness: the launcher runs as root until it drops privileges.
Launcher: `python -P -m trainer.sandbox --workdir DIR [--read PATH]… [limits] -- python -P -m trainer.run …`
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import re
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GIB = 1 << 30
DEFAULT_MEMORY_FRACTION = 0.8  # of the host's RAM, the address-space limit on CPU when none is configured
SHM_SIZE = "64m"  # the private /dev/shm (POSIX semaphores of multiprocessing need one)
LAUNCH_FAILED = 125  # the launcher's exit code when it could not start the command


def gib(n_bytes: float) -> str:
    """Bytes as a short GiB figure: 2147483648 → '2', 19971597107 → '18.6', 10737418 → '0.01'."""
    v = n_bytes / GIB
    return f"{v:.1f}".removesuffix(".0") if v >= 1 else f"{v:.2g}"


# ---- Settings ----


@dataclass(frozen=True)
class SandboxConfig:
    """What the launcher enforces. Sizes in GiB; `memory_gb` 0 means DEFAULT_MEMORY_FRACTION of the host's RAM."""

    enabled: bool = True
    user: str = "nobody"  # a user name or a numeric uid; taken when the service runs as root
    memory_gb: float = 0.0  # RLIMIT_AS on CPU; never on CUDA (the driver reserves huge virtual ranges)
    max_processes: int = 4096  # RLIMIT_NPROC: processes *and threads* of the sandbox user, all experiments together
    max_file_gb: float = 16.0  # RLIMIT_FSIZE
    max_open_files: int = 4096  # RLIMIT_NOFILE

    def memory_bytes(self, cuda: bool) -> Optional[int]:
        """The address-space limit for one experiment on this machine, or None (CUDA: no limit)."""
        if cuda:
            return None
        if self.memory_gb:
            return int(self.memory_gb * GIB)
        return int(DEFAULT_MEMORY_FRACTION * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# ---- In-process guards ----

NET_EVENTS = frozenset({"urllib.Request", "http.client.connect", "ftplib.connect", "smtplib.connect",
                        "imaplib.open", "poplib.connect", "nntplib.connect", "telnetlib.Telnet.open",
                        "webbrowser.open"})
HARMLESS_SOCKET_EVENTS = frozenset({"socket.gethostname"})
PROCESS_EVENTS = frozenset({"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                            "subprocess.Popen", "os.startfile", "pty.spawn"})
SIGNAL_EVENTS = frozenset({"os.kill", "os.killpg"})
NATIVE_EVENTS = frozenset({"ctypes.dlopen"})
# Audit events that change the file system at a path: event → positions of the paths changed.
PATH_WRITE_EVENTS = {
    "os.rename": (0, 1), "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.link": (1,),
    "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
    "os.chflags": (0,), "os.lchflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
    "shutil.copyfile": (1,), "shutil.copymode": (1,), "shutil.copystat": (1,), "shutil.copytree": (1,),
    "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.chown": (0,), "shutil.make_archive": (0,),
    "shutil.unpack_archive": (1,), "sqlite3.connect": (0,), "tempfile.mkstemp": (0,), "tempfile.mkdtemp": (0,),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
ALWAYS_WRITABLE = frozenset({"/dev/null", "/dev/stdout", "/dev/stderr"})
# Libraries whose own machinery may start processes or load native code (torch.compile's worker pool, Triton's
# compiler and launcher build). Only the first caller outside the standard library counts.
TRUSTED_LIBRARIES = ("torch", "triton")


class ScriptGuard:
    """An audit hook that, while `active`, refuses what train.py must not do and remembers the first refusal.

    Refused: sockets and other network clients, starting processes (fork, exec, spawn, system, Popen),
    signalling other processes, ctypes.dlopen (these four unless the first caller outside the standard
    library is torch or triton), and writes outside `workdir` (open for writing, rename, remove, mkdir, …).
    Reads stay allowed. The refusal is a PermissionError; `violation` keeps its one-line reason, so a script
    that catches it still crashes. Audit hooks cannot be removed: switch the guard with `active`.
    """

    def __init__(self, workdir: Path, script_name: str = "train.py"):
        self.workdir = os.path.realpath(workdir)
        self.script = script_name
        self.active = False
        self.violation: Optional[str] = None
        paths = sysconfig.get_paths()
        self._stdlib = tuple({os.path.join(paths[k], "") for k in ("stdlib", "platstdlib")})
        self._site = tuple({os.path.join(paths[k], "") for k in ("purelib", "platlib")})
        self._trusted = tuple(d for d in map(_package_dir, TRUSTED_LIBRARIES) if d)
        self._skip_cache: dict[str, bool] = {}
        sys.addaudithook(self._hook)

    # the hook runs for every audited event in the process: return fast when inactive or not ours
    def _hook(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        if event == "open":
            if len(args) >= 3 and isinstance(args[2], int) and _writes(args[2]):
                self._check_write(args[0])
            return
        if event in PATH_WRITE_EVENTS:
            for i in PATH_WRITE_EVENTS[event]:
                if i < len(args):
                    self._check_write(args[i])
            return
        if event.startswith("socket.") or event in NET_EVENTS:
            if event not in HARMLESS_SOCKET_EVENTS and not self._trusted_caller():
                self._refuse(f"tried to open a network connection ({_describe_net(event, args)})")
        elif event in PROCESS_EVENTS:
            if not self._trusted_caller():
                self._refuse(f"tried to start a process ({_describe_proc(event, args)})")
        elif event in SIGNAL_EVENTS:
            if not (event == "os.kill" and args and args[0] == os.getpid()) and not self._trusted_caller():
                self._refuse(f"tried to signal another process ({event} {args[0] if args else ''})")
        elif event in NATIVE_EVENTS:
            if not self._trusted_caller():
                self._refuse(f"tried to load native code (ctypes.dlopen {args[0] if args else ''})")

    def _check_write(self, target) -> None:
        if target is None or isinstance(target, int):
            return  # an already open descriptor
        try:
            raw = os.fsdecode(target)
        except TypeError:
            return
        if raw in ALWAYS_WRITABLE:
            return
        path = os.path.realpath(raw)
        if path != self.workdir and not path.startswith(self.workdir + os.sep):
            self._refuse(f"tried to write outside its directory: {path}")

    def _refuse(self, what: str) -> None:
        msg = f"{self.script} {what}"
        if self.violation is None:
            self.violation = msg
        raise PermissionError(msg)

    def _trusted_caller(self) -> bool:
        """True when the innermost caller outside the standard library lies in torch or triton."""
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            skip = self._skip_cache.get(name)
            if skip is None:
                skip = name.startswith("<") or (name.startswith(self._stdlib) and not name.startswith(self._site))
                self._skip_cache[name] = skip
            if not skip:
                return bool(self._trusted) and name.startswith(self._trusted)
            frame = frame.f_back
        return False


def _package_dir(name: str) -> str:
    mod = sys.modules.get(name)
    origin = getattr(mod, "__file__", None)
    if origin is None:
        try:
            import importlib.util

            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec else None
        except (ImportError, ValueError):
            origin = None
    return os.path.join(os.path.dirname(os.path.realpath(origin)), "") if origin else ""


def _writes(flags: int) -> bool:
    tmpfile = getattr(os, "O_TMPFILE", 0)
    return bool(flags & WRITE_FLAGS) or bool(tmpfile and flags & tmpfile == tmpfile)


def _describe_net(event: str, args: tuple) -> str:
    if event in ("socket.connect", "socket.bind", "socket.sendto") and len(args) >= 2:
        addr = args[-1]
        if isinstance(addr, tuple) and len(addr) >= 2:
            return f"{event} {addr[0]}:{addr[1]}"
        return f"{event} {addr!r}"[:120]
    if event == "socket.getaddrinfo" and args:
        return f"{event} {args[0]!r}"[:120]
    return event


def _describe_proc(event: str, args: tuple) -> str:
    cmd = None
    if event == "os.system" and args:
        cmd = args[0]
    elif event == "subprocess.Popen" and len(args) >= 2:
        cmd = args[1]
    elif event in ("os.exec", "os.posix_spawn", "os.spawn") and len(args) >= 2:
        cmd = args[1]
    if cmd is None:
        return event
    if isinstance(cmd, (list, tuple)):
        cmd = " ".join(os.fsdecode(c) if isinstance(c, (str, bytes)) else str(c) for c in cmd)
    text = os.fsdecode(cmd) if isinstance(cmd, (str, bytes)) else str(cmd)
    return f"{event}: {text[:80]}"


def contain_environment(workdir: Path) -> list[Path]:
    """Point temporary files and compile caches (TMPDIR, XDG_CACHE_HOME, TorchInductor, Triton) into `workdir`.

    Call before training code runs. Returns the directories it created, for the caller to remove afterwards.
    """
    workdir = Path(workdir)
    tmp, cache = workdir / "tmp", workdir / ".cache"
    created = [d for d in (tmp, cache) if not d.exists()]
    for d in (tmp, cache):
        d.mkdir(exist_ok=True)
    env = {"TMPDIR": tmp, "TEMP": tmp, "TMP": tmp, "XDG_CACHE_HOME": cache,
           "TORCHINDUCTOR_CACHE_DIR": cache / "torchinductor", "TRITON_CACHE_DIR": cache / "triton",
           "TRITON_HOME": cache, "CUDA_CACHE_PATH": cache / "nv"}
    for k, v in env.items():
        os.environ[k] = str(v)
    tempfile.tempdir = None  # recomputed from TMPDIR on next use
    return created


# ---- What a limit looks like when it is hit ----


def _soft_limit(which: int) -> Optional[int]:
    try:
        soft = resource.getrlimit(which)[0]
    except (ValueError, OSError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def limit_message(e: BaseException, script_name: str = "train.py") -> Optional[str]:
    """A one-line status for an exception raised by hitting a resource limit, or None for any other exception.

    MemoryError and allocator failures → "out of memory (limit N GiB)"; EFBIG → "wrote a file larger than N GiB";
    EAGAIN from fork / "can't start new thread" under RLIMIT_NPROC → "started too many processes (limit N)";
    EMFILE → "opened too many files (limit N)". Limits are read from this process's own rlimits.
    """
    text = str(e)
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
            "can't allocate memory" in text or "not enough memory" in text or "DefaultCPUAllocator" in text)):
        limit = _soft_limit(resource.RLIMIT_AS)
        return f"out of memory (limit {gib(limit)} GiB)" if limit else "out of memory"
    if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        first = text.strip().splitlines()[0] if text.strip() else ""
        return f"out of GPU memory ({first[:160]})" if first else "out of GPU memory"
    nproc = _soft_limit(resource.RLIMIT_NPROC)
    if nproc and ((isinstance(e, OSError) and e.errno == errno.EAGAIN) or
                  (isinstance(e, RuntimeError) and "can't start new thread" in text)):
        return f"{script_name} started too many processes (limit {nproc})"
    if isinstance(e, OSError) and e.errno == errno.EFBIG:
        limit = _soft_limit(resource.RLIMIT_FSIZE)
        return f"{script_name} wrote a file larger than {gib(limit)} GiB" if limit else \
            f"{script_name} wrote a file larger than the file-size limit"
    if isinstance(e, OSError) and e.errno == errno.EMFILE:
        limit = _soft_limit(resource.RLIMIT_NOFILE)
        return f"{script_name} opened too many files (limit {limit})"
    return None


def signal_message(sig: int, memory_bytes: Optional[int] = None, max_file_bytes: Optional[int] = None) -> str:
    """What a harness killed by `sig` (not by the runner) most likely ran into, as a one-line status."""
    if sig == signal.SIGKILL:
        return (f"out of memory (limit {gib(memory_bytes)} GiB): killed by SIGKILL" if memory_bytes else
                "out of memory: killed by SIGKILL (the kernel's OOM killer)")
    if sig == getattr(signal, "SIGXFSZ", None):
        return (f"wrote a file larger than {gib(max_file_bytes)} GiB (killed by SIGXFSZ)" if max_file_bytes else
                "wrote a file larger than the file-size limit (killed by SIGXFSZ)")
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return f"harness killed by {name} without a result"


# ---- The launcher: command line ----


def launcher_command(cfg: SandboxConfig, *, workdir: str | Path, read: tuple | list = (), cuda: bool = False,
                     python: str = sys.executable) -> list[str]:
    """The prefix that runs a command under the sandbox: `… -- ` is followed by the harness command.

    `workdir` becomes the only writable place (relative paths are taken from the command's cwd); `read` are
    extra paths the sandbox user must be able to read (the prepared data). The memory limit is left to the
    launcher ("auto") so it is taken from the RAM of the host the command runs on; CUDA gets none.
    """
    memory = "off" if cuda else (repr(float(cfg.memory_gb)) if cfg.memory_gb else "auto")
    cmd = [python, "-P", "-m", "trainer.sandbox", "--workdir", str(workdir)]
    for p in read:
        cmd += ["--read", str(p)]
    cmd += ["--user", cfg.user, "--memory-gb", memory, "--max-processes", str(cfg.max_processes),
            "--max-file-gb", repr(float(cfg.max_file_gb)), "--max-open-files", str(cfg.max_open_files), "--"]
    return cmd


_FEATURES: dict = {}


def sandbox_features(cfg: Optional[SandboxConfig] = None, *, python: str = sys.executable,
                     refresh: bool = False) -> dict:
    """What the sandbox enforces on this machine, found by running the launcher once in probe mode (cached).

    Keys: enabled, audit_hooks, network_isolated, user (name or None), pid_namespace, read_only (everything but
    the experiment's directory), memory_gb (CPU), max_processes (None when not enforced: root), max_file_gb,
    max_open_files, missing (one line per protection not available, with the reason).
    """
    cfg = cfg or SandboxConfig()
    key = (cfg, python)
    if key in _FEATURES and not refresh:
        return dict(_FEATURES[key])
    base = {"enabled": cfg.enabled, "audit_hooks": True, "network_isolated": False, "user": None,
            "pid_namespace": False, "read_only": False, "memory_gb": None, "max_processes": None,
            "max_file_gb": None, "max_open_files": None, "missing": []}
    if not cfg.enabled:
        base["missing"] = ["OS sandbox: off (sandbox = false); only the harness's audit hooks apply"]
    elif not sys.platform.startswith("linux"):
        base["missing"] = [f"OS sandbox: Linux only (this is {sys.platform}); only the harness's audit hooks apply"]
    else:
        with tempfile.TemporaryDirectory(prefix="ratchet-sandbox-probe-") as tmp:
            cmd = launcher_command(cfg, workdir=tmp, python=python)
            cmd.insert(cmd.index("--"), "--probe")
            try:
                out = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=60)
                found = json.loads(out.stdout.strip().splitlines()[-1])
                base.update(found)
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as e:
                base["missing"] = [f"OS sandbox: the launcher failed ({type(e).__name__}: {e}); "
                                   "only the harness's audit hooks apply"]
    _FEATURES[key] = base
    return dict(base)


def describe_features(f: dict) -> str:
    """One line for `ratchet doctor` and the serve start line: what is on, then what is missing and why."""
    if not f.get("enabled"):
        return "sandbox off: audit hooks only"
    on = ["audit hooks"]
    if f.get("network_isolated"):
        on.append("no network")
    if f.get("user"):
        on.append(f"user {f['user']}")
    if f.get("read_only"):
        on.append("read-only outside its directory")
    if f.get("pid_namespace"):
        on.append("own process namespace")
    if f.get("memory_gb"):
        on.append(f"memory ≤ {f['memory_gb']:g} GiB (CPU)")
    if f.get("max_processes"):
        on.append(f"≤ {f['max_processes']} processes")
    if f.get("max_file_gb"):
        on.append(f"files ≤ {f['max_file_gb']:g} GiB")
    if f.get("max_open_files"):
        on.append(f"≤ {f['max_open_files']} open files")
    line = "sandbox: " + ", ".join(on)
    if f.get("missing"):
        line += "; not available: " + "; ".join(f["missing"])
    return line


# ---- The launcher: Linux plumbing ----

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
# What runners read back or write as root in the experiment's directory (the SSH runner's shell: pid, exit_code).
RUNNER_FILES = ("result.json", "result.curve.jsonl", "log.txt", "train.py", "pid", "pid.tmp", "exit_code",
                "exit_code.tmp")


class _Libc:
    def __init__(self):
        lib = ctypes.CDLL(None, use_errno=True)
        self.unshare = lib.unshare
        self.unshare.argtypes = [ctypes.c_int]
        self._mount = lib.mount
        self._mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        self.prctl = lib.prctl
        self.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    def mount(self, source: Optional[str], target: str, fstype: Optional[str], flags: int,
              data: Optional[str] = None) -> None:
        enc = (lambda s: s.encode() if s is not None else None)
        if self._mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {target}: {os.strerror(err)}")

    def try_unshare(self, flags: int) -> int:
        """0 on success, else the errno."""
        return 0 if self.unshare(flags) == 0 else ctypes.get_errno()


def _resolve_user(name: str) -> tuple[int, int]:
    """(uid, gid) of a user name, or of a numeric uid (gid = uid when it has no passwd entry). KeyError if unknown."""
    import pwd

    if name.isdigit():
        uid = int(name)
        try:
            return uid, pwd.getpwuid(uid).pw_gid
        except KeyError:
            return uid, uid
    pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def _permits(path: str, uid: int, gid: int, need: int) -> bool:
    """Whether mode bits let (uid, gid, no supplementary groups) do `need` (4 read, 1 search) at `path`."""
    try:
        st = os.stat(path)
    except OSError:
        return True  # nothing there to expose
    mode = st.st_mode
    bits = (mode >> 6) if st.st_uid == uid else (mode >> 3) if st.st_gid == gid else mode
    return (bits & need) == need


def _needed_paths(workdir: str, read: list[str], command: list[str]) -> list[str]:
    """What the harness must reach: its directory, the data, the interpreter and every import path."""
    paths = [workdir, *read, sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             str(Path(__file__).resolve().parent.parent)]
    paths += [p for p in sys.path if p]
    if command:
        exe = command[0] if os.sep in command[0] else (shutil.which(command[0]) or command[0])
        paths += [os.path.dirname(os.path.realpath(exe))]
    paths += [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    out = []
    for p in paths:  # the path as the command will use it (through symbolic links) and where it leads
        for v in (os.path.abspath(p), os.path.realpath(p)):
            if os.path.exists(v) and v not in out:
                out.append(v)
    return out


def _expose(libc: _Libc, targets: list[str], uid: int, gid: int) -> list[str]:
    """Make `targets` readable for uid/gid in this mount namespace without touching the disk: each directory on
    the way that the user may not search (e.g. /root, 0700) is covered by a root-owned 0755 tmpfs holding only
    bind mounts of what is needed below it. Returns the covered directories."""
    tree: dict = {}
    for t in targets:
        node = tree
        for part in Path(t).parts[1:]:
            node = node.setdefault(part, {})
        node[""] = {}  # marks a target
    covered: list[str] = []

    def walk(d: str, node: dict) -> None:
        kids = [k for k in node if k]
        is_target = "" in node
        if os.path.isdir(d) and not _permits(d, uid, gid, 5 if is_target else 1):
            _cover(libc, d, None if is_target else kids)
            covered.append(d)
        for k in kids:
            walk(os.path.join(d, k), node[k])

    walk("/", tree)
    return covered


def _cover(libc: _Libc, d: str, keep: Optional[list[str]]) -> None:
    """Mount a 0755 tmpfs over directory `d`, then bind back the entries named in `keep` (None: all of them)."""
    names = os.listdir(d) if keep is None else [k for k in keep if os.path.lexists(os.path.join(d, k))]
    entries = []
    for name in names:
        p = os.path.join(d, name)
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            entries.append((name, "link", os.readlink(p)))
        else:
            entries.append((name, "dir" if stat.S_ISDIR(st.st_mode) else "file",
                            os.open(p, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)))
    try:
        libc.mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for name, kind, what in entries:
            p = os.path.join(d, name)
            if kind == "link":
                os.symlink(what, p)
                continue
            if kind == "dir":
                os.mkdir(p, 0o755)
            else:
                os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
            libc.mount(f"/proc/self/fd/{what}", p, None, MS_BIND | MS_REC)
    finally:
        for _, kind, what in entries:
            if kind != "link":
                os.close(what)


def _mount_points() -> list[str]:
    out: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mp not in out:
                out.append(mp)
    return out


def _read_only_except(libc: _Libc, keep: str) -> list[str]:
    """Remount every mount of this namespace read-only except `keep` (and below) and /proc. Returns failures."""
    carried = [(os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
               (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
               (getattr(os, "ST_RELATIME", 4096), MS_RELATIME)]
    failed = []
    for mp in _mount_points():
        if mp == keep or mp.startswith(keep + "/") or mp == "/proc" or mp.startswith("/proc/"):
            continue
        try:
            st = os.statvfs(mp)
        except OSError:
            continue
        if st.f_flag & os.ST_RDONLY:
            continue
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for st_flag, ms_flag in carried:  # a user namespace may not clear the flags of a mount it inherited
            if st.f_flag & st_flag:
                flags |= ms_flag
        try:
            libc.mount(None, mp, None, flags)
        except OSError:
            failed.append(mp)
    return failed


def _loopback_up() -> None:
    import fcntl
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        got = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0))
        flags = struct.unpack("16sH22x", got)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def _hand_over(workdir: str, gid: int) -> None:
    """Let the sandbox user's group write `workdir` (root:gid, 1770): with the sticky bit it cannot delete or
    replace what root put there (train.py, the runner's log.txt and pid files), only its own files."""
    os.chown(workdir, 0, gid, follow_symlinks=False)
    os.chmod(workdir, 0o1770)


def defuse(workdir: str | Path) -> None:
    """Remove what the sandboxed code may have planted under the names a runner reads back as root: a symbolic
    link (to a secret), a FIFO (blocks the reader), a directory or a hard link is deleted; regular files stay."""
    for name in RUNNER_FILES:
        p = os.path.join(workdir, name)
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            continue
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass


def _limits(a: argparse.Namespace, state: dict) -> list[tuple[int, int]]:
    """The rlimits to set in the command's process (soft = hard, so the command cannot raise them)."""
    out = []
    if a.memory_gb != "off":
        mem = int(float(a.memory_gb) * GIB) if a.memory_gb != "auto" else SandboxConfig().memory_bytes(False)
        out.append((resource.RLIMIT_AS, mem))
        state["memory_gb"] = float(gib(mem))
    out += [(resource.RLIMIT_NPROC, a.max_processes), (resource.RLIMIT_FSIZE, int(a.max_file_gb * GIB)),
            (resource.RLIMIT_NOFILE, a.max_open_files), (resource.RLIMIT_CORE, 0)]
    state["max_file_gb"] = a.max_file_gb
    state["max_open_files"] = a.max_open_files
    state["max_processes"] = a.max_processes if state["user"] or os.geteuid() != 0 else None
    if state["max_processes"] is None:
        state["missing"].append("process limit: not enforced for root (no sandbox user)")
    return out


def _apply_limits(limits: list[tuple[int, int]]) -> None:
    for which, value in limits:
        hard = resource.getrlimit(which)[1]
        if hard != resource.RLIM_INFINITY and os.geteuid() != 0:
            value = min(value, hard)  # only root may raise a hard limit
        resource.setrlimit(which, (value, value))


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    else:
        command = []
    p = argparse.ArgumentParser(prog="python -P -m trainer.sandbox", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the only writable directory (made the command's cwd)")
    p.add_argument("--read", action="append", default=[], help="a path the command must be able to read")
    p.add_argument("--user", default="nobody", help="user name or uid to run as when started as root")
    p.add_argument("--memory-gb", default="auto", help="address-space limit: GiB, auto (80%% of RAM) or off")
    p.add_argument("--max-processes", type=int, default=4096)
    p.add_argument("--max-file-gb", type=float, default=16.0)
    p.add_argument("--max-open-files", type=int, default=4096)
    p.add_argument("--probe", action="store_true", help="set everything up, print what is enforced as JSON, exit")
    a = p.parse_args(argv)
    if not command and not a.probe:
        p.error("no command after --")
    return a, command


def main(argv: Optional[list[str]] = None) -> int:
    """Set up the sandbox and run the command in it. Exit status: the command's (a death by signal is passed on
    as the same signal); LAUNCH_FAILED when the command could not be started (the reason on stderr)."""
    a, command = parse_args(sys.argv[1:] if argv is None else argv)
    state: dict = {"enabled": True, "audit_hooks": True, "network_isolated": False, "user": None,
                   "pid_namespace": False, "read_only": False, "memory_gb": None, "missing": []}
    missing = state["missing"]
    workdir = os.path.realpath(a.workdir)
    libc = _Libc()
    root = os.geteuid() == 0

    ids = None
    if not root:
        missing.append("unprivileged user: the service does not run as root")
    elif a.user in ("", "root", "0"):
        missing.append("unprivileged user: sandbox_user is root")
    else:
        try:
            ids = _resolve_user(a.user)
        except KeyError:
            missing.append(f"unprivileged user: no user {a.user!r} on this host")

    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
    ns = None
    err = libc.try_unshare(flags)
    if err == 0:
        ns = "host"
    elif not root:
        # An unprivileged user namespace (same uid inside) carries the others. Tried in a throw-away child
        # first: some hosts allow the unshare but refuse what follows (AppArmor's userns restriction).
        err = _in_child(lambda: _enter_user_namespace(libc, flags))
        if err == 0:
            err = _enter_user_namespace(libc, flags)
            if err:
                return _fail(f"cannot enter the user namespace: {os.strerror(err)}")
            ns = "user"
    if ns is None:
        missing.append(f"network and mount isolation: unshare refused ({os.strerror(err)})")
    else:
        libc.mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
        try:
            _loopback_up()
        except OSError:
            pass  # no loopback either: still no network
        state["network_isolated"] = True
        state["pid_namespace"] = True

    try:
        if ids is not None:
            _hand_over(workdir, ids[1])
            if ns == "host":
                _expose(libc, _needed_paths(workdir, a.read, command), *ids)
            else:
                blocked = [p for p in _needed_paths(workdir, a.read, command) if not _reachable(p, *ids)]
                if blocked:
                    missing.append(f"unprivileged user: {a.user} cannot read {blocked[0]} (and no mount namespace "
                                   "to expose it)")
                    ids = None
        if ns is not None:
            libc.mount(workdir, workdir, None, MS_BIND | MS_REC)
            failed = _read_only_except(libc, workdir)
            state["read_only"] = "/" not in failed
            if failed:
                missing.append(f"read-only: {len(failed)} mount(s) stayed writable ({', '.join(failed[:3])})")
            if os.path.isdir("/dev/shm"):
                try:
                    libc.mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={SHM_SIZE}")
                except OSError:
                    pass
        else:
            missing.append("read-only file system: needs a mount namespace")
    except OSError as e:
        return _fail(f"cannot set up: {e}")
    if ids is not None:
        state["user"] = a.user
    limits = _limits(a, state)

    env = dict(os.environ, HOME=workdir)
    if ids is not None:
        import pwd

        try:
            env["USER"] = env["LOGNAME"] = pwd.getpwuid(ids[0]).pw_name
        except KeyError:
            env["USER"] = env["LOGNAME"] = str(ids[0])
    if missing and not a.probe:
        sys.stderr.write("sandbox: not available: " + "; ".join(missing) + "\n")
        sys.stderr.flush()

    if ns is None:  # no process namespace: become the command
        return _exec(libc, a, command, env, ids, workdir, state, limits, mount_proc=False)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            code = _exec(libc, a, command, env, ids, workdir, state, limits, mount_proc=True)
        except BaseException as e:  # noqa: BLE001 - the child must never return into the parent's code
            sys.stderr.write(f"sandbox: cannot start: {e}\n")
            code = LAUNCH_FAILED
        os._exit(code)
    return _supervise(pid, workdir)


def _enter_user_namespace(libc: _Libc, flags: int) -> int:
    """unshare a user namespace with the other namespaces, map this uid/gid to themselves: 0 or an errno."""
    uid, gid = os.getuid(), os.getgid()
    err = libc.try_unshare(flags | CLONE_NEWUSER)
    if err:
        return err
    try:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
        libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as e:
        return e.errno or errno.EPERM
    return 0


def _in_child(fn) -> int:
    """fn() (returning 0 or an errno) in a forked child that then exits; its result."""
    pid = os.fork()
    if pid == 0:
        try:
            code = fn()
        except BaseException:  # noqa: BLE001
            code = errno.EPERM
        os._exit(min(int(code), 255))
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else errno.EPERM


def _reachable(path: str, uid: int, gid: int) -> bool:
    parts = Path(path).parts
    for i in range(1, len(parts)):
        if not _permits(str(Path(*parts[:i])), uid, gid, 1):
            return False
    return _permits(path, uid, gid, 5 if os.path.isdir(path) else 4)


def _fail(why: str) -> int:
    sys.stderr.write(f"sandbox: cannot start: {why}\n")
    sys.stderr.flush()
    return LAUNCH_FAILED


def _exec(libc: _Libc, a, command: list[str], env: dict, ids, workdir: str, state: dict,
          limits: list[tuple[int, int]], mount_proc: bool) -> int:
    """In the process that becomes the command: /proc, limits, privileges, then exec (or print the probe's JSON).
    `mount_proc`: this is the launcher's child, PID 1 of a new PID namespace."""
    if mount_proc:
        try:
            libc.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            pass  # the host's /proc stays: it shows other processes, nothing more
    os.chdir(workdir)
    _apply_limits(limits)
    if ids is not None:
        uid, gid = ids
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if mount_proc:  # our own child: die with the launcher (set after setresuid, which clears it)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if a.probe:
        sys.stdout.write(json.dumps(state) + "\n")
        sys.stdout.flush()
        return 0
    try:
        os.execvpe(command[0], command, env)
    except OSError as e:
        if e.errno == errno.EAGAIN:
            return _fail(f"{state.get('user') or 'the user'} already has {a.max_processes} processes "
                         f"(sandbox_max_processes)")
        return _fail(f"{command[0]}: {e.strerror}")
    return LAUNCH_FAILED  # not reached


def _supervise(child: int, workdir: str) -> int:
    """Wait for the command (PID 1 of its namespace: when it ends, everything it started dies with it).

    SIGTERM / SIGHUP kill it (as they would kill an unsandboxed harness); SIGINT is passed on.
    """
    def forward(sig, _frame):
        try:
            os.kill(child, signal.SIGINT if sig == signal.SIGINT else signal.SIGKILL)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            status = LAUNCH_FAILED << 8
            break
    defuse(workdir)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        sys.stdout.flush()
        sys.stderr.flush()
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else LAUNCH_FAILED


if __name__ == "__main__":
    sys.exit(main())
