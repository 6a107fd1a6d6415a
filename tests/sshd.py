"""A real OpenSSH sshd on a free 127.0.0.1 port with generated host and user keys, for the SSH runner's tests.

Listens on loopback only and stops everything it started (by pid); never touches the system's sshd or keys.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

SSHD = "/usr/sbin/sshd"


def ensure_sshd() -> Optional[str]:
    """None when /usr/sbin/sshd and ssh-keygen are usable (installing openssh-server with apt-get when
    missing and running as root); else the reason they are not."""
    if Path(SSHD).exists() and shutil.which("ssh-keygen"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "sshd is missing and cannot be installed here (needs root and apt-get): apt-get install openssh-server"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "openssh-server"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode:
            return f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return None if Path(SSHD).exists() else "openssh-server installed but /usr/sbin/sshd is missing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Descendants of `pid` (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class Sshd:
    """sshd -D with its own config, keys and pid file under `root`. `user_key` logs in as the current user."""

    def __init__(self, root: Path, port: Optional[int] = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.user = getpass.getuser()
        self.host_key = self.root / "ssh_host_ed25519_key"
        self.user_key = self.root / "id_ed25519"
        self.authorized_keys = self.root / "authorized_keys"
        self.config = self.root / "sshd_config"
        self.log = self.root / "sshd.log"
        self.proc: Optional[subprocess.Popen] = None
        for key in (self.host_key, self.user_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ratchet-test", "-f", str(key)],
                               check=True, capture_output=True)
        self.authorized_keys.write_text(Path(f"{self.user_key}.pub").read_text())
        os.chmod(self.authorized_keys, 0o600)
        sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")
                     if Path(p).exists()), "internal-sftp")
        self.config.write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {self.root / 'sshd.pid'}
AuthorizedKeysFile {self.authorized_keys}
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {self.user}
MaxStartups 100
MaxSessions 20
LogLevel ERROR
Subsystem sftp {sftp}
# Keep the account's ~/.bashrc out of remote commands (bash reads it for ssh commands only below SHLVL 2):
# here it runs `pyenv rehash`, which hangs every login behind a stale lock when a test drops a connection.
SetEnv SHLVL=1
""")

    def start(self) -> "Sshd":
        """Start (or restart) and wait until the port accepts. Raises RuntimeError with sshd's log."""
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # its privilege-separation directory
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + 15
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def sessions(self) -> list[int]:
        """Pids of the per-connection sshd processes (not the commands they run: those end on their own)."""
        if not self.proc or self.proc.poll() is not None:
            return []
        out = []
        for pid in _children(self.proc.pid):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() in ("sshd", "sshd-session"):
                    out.append(pid)
            except OSError:
                continue
        return out

    def drop_connections(self, sig: int = signal.SIGKILL) -> None:
        """Signal every connection's processes (SIGKILL drops them; SIGSTOP freezes them); the listener stays."""
        for pid in reversed(self.sessions()):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """Stop the listener and drop every connection (the host 'dies' as far as SSH goes)."""
        if not self.proc or self.proc.poll() is not None:
            return
        sessions = self.sessions()
        self.proc.kill()
        self.proc.wait(timeout=10)
        for pid in reversed(sessions):
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
