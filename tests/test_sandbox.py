"""The sandbox: what train.py must not do (network, processes, writes elsewhere, native code, fork bombs,
memory exhaustion) ends in a clear status and leaves nothing behind. First through the harness's audit hooks
(any OS, any runner), then through the local runner's launcher with the hooks switched off from inside the
script, so only the OS layer (namespaces, an unprivileged user, read-only mounts, rlimits) stands in the way."""

from __future__ import annotations

import errno
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from loop.runners.base import Job
from loop.runners.local import LocalRunner
from tests.conftest import TINY_TRAIN_PY
from trainer.result import read_result
from trainer.sandbox import SandboxConfig, describe_features, limit_message, sandbox_features, signal_message

REPO = Path(__file__).resolve().parents[1]

# A script body that returns a small module at once, so a refused action is the only thing that can fail it.
RETURN_MODEL = "    return torch.nn.Sequential(torch.nn.Embedding(ctx.vocab_size, 8), torch.nn.Linear(8, ctx.vocab_size))\n"


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 of the test's own network namespace; `arrived()` says whether anyone connected."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def arrived() -> bool:
        srv.setblocking(False)
        try:
            conn, _ = srv.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True

    yield SimpleNamespace(port=srv.getsockname()[1], arrived=arrived)
    srv.close()


def harness(tmp_path: Path, body: str, data_dir: Path, header: str = ""):
    """Run a script straight through `python -m trainer.run` (no validation, no launcher) in tmp_path/exp."""
    work = tmp_path / "exp"
    work.mkdir()
    script = work / "train.py"
    script.write_text("import torch\n" + textwrap.dedent(header) + "def train(ctx):\n"
                      + textwrap.indent(textwrap.dedent(body), "    ") + RETURN_MODEL)
    proc = subprocess.run([sys.executable, "-m", "trainer.run", "--script", str(script), "--data", str(data_dir),
                           "--budget-s", "1", "--out", str(work / "result.json"), "--eval-tokens", "4096",
                           "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc, read_result(work / "result.json")


# ---- The harness's audit hooks ----


def test_a_socket_is_refused_and_no_connection_arrives(tmp_path, data_dir, listener):
    port = listener.port
    body = f"""
    try:  # swallowing the refusal does not help
        socket.create_connection(("127.0.0.1", {port}), timeout=2).sendall(b"secret")
    except OSError:
        pass
    """
    _, r = harness(tmp_path, body, data_dir, header="import socket\n")
    assert r.status == "crash" and r.error.startswith("train.py tried to open a network connection"), r.error
    assert r.val_bpb is None and not listener.arrived()


def test_writes_outside_the_directory_are_refused_inside_allowed(tmp_path, data_dir):
    outside, inside = tmp_path / "outside.txt", tmp_path / "exp" / "notes.txt"
    body = f"""
    open({str(inside)!r}, "w").write("fine")
    try:
        open({str(outside)!r}, "w").write("escaped")
    except PermissionError:
        pass
    """
    _, r = harness(tmp_path, body, data_dir)
    assert r.status == "crash" and r.error == f"train.py tried to write outside its directory: {outside}"
    assert not outside.exists() and inside.read_text() == "fine"


@pytest.mark.parametrize("action, header, reason", [
    ("""
     for _ in range(20):  # a bounded fork loop: refused at the first fork, so no child is ever made
         try:
             if os.fork() == 0:
                 os._exit(0)
         except PermissionError:
             pass
     """, "import os\n", "train.py tried to start a process (os.fork)"),
    ("subprocess.run(['touch', 'x'])\n", "import subprocess\n", "train.py tried to start a process (subprocess.Popen"),
    ("ctypes.CDLL('libc.so.6')\n", "import ctypes\n", "train.py tried to load native code"),
])
def test_processes_and_native_code_are_refused(tmp_path, data_dir, action, header, reason):
    _, r = harness(tmp_path, action, data_dir, header=header)
    assert r.status == "crash" and r.error.startswith(reason), r.error
    assert not (tmp_path / "exp" / "x").exists()


def test_limit_messages():
    cap = resource.getrlimit(resource.RLIMIT_AS)[0]
    assert limit_message(MemoryError()) == (
        "out of memory" if cap == resource.RLIM_INFINITY else f"out of memory (limit {cap / 2**30:g} GiB)")
    assert limit_message(OSError(errno.EFBIG, "File too large")).startswith("train.py wrote a file larger than")
    assert limit_message(ValueError("boom")) is None
    assert signal_message(signal.SIGKILL, 2 << 30) == "out of memory (limit 2 GiB): killed by SIGKILL"
    assert signal_message(signal.SIGXFSZ, None, 16 << 30) == "wrote a file larger than 16 GiB (killed by SIGXFSZ)"
    assert signal_message(signal.SIGSEGV) == "harness killed by SIGSEGV without a result"
    line = describe_features(sandbox_features(SandboxConfig(enabled=False)))
    assert line == "sandbox off: audit hooks only"


# ---- The OS layer, through the local runner ----

# A uid of its own, so RLIMIT_NPROC counts only this file's processes and leftovers are easy to find.
SANDBOX_UID = str(random.Random(os.getpid()).randrange(61000, 64000))
# Switches the harness's audit hooks off from inside the script: what follows meets only the OS sandbox.
HOOKS_OFF = """
import gc
from trainer.sandbox import ScriptGuard
for g in gc.get_objects():
    if isinstance(g, ScriptGuard):
        g.active = False
"""


def full_sandbox(**limits) -> SandboxConfig:
    cfg = SandboxConfig(user=SANDBOX_UID, **limits)
    f = sandbox_features(cfg)
    if not (f["user"] and f["network_isolated"] and f["pid_namespace"] and f["read_only"]):
        pytest.skip(f"the OS sandbox needs Linux, root and namespaces: {describe_features(f)}")
    return cfg


def run_local(tmp_path: Path, data_dir: Path, source: str, cfg: SandboxConfig, budget_s: float = 1.0):
    """Train `source` through the local runner under `cfg` in tmp_path/exp; the Outcome."""
    runner = LocalRunner("cpu", sandbox=cfg)
    done = threading.Event()
    job = Job(exp_id=1, source=source, workdir=tmp_path / "exp", data_dir=data_dir, budget_s=budget_s,
              eval_tokens=4096, grace_s=30.0, device="cpu")
    handle = runner.start(job, runner.slots()[0], done.set)
    assert done.wait(180), "the experiment did not finish"
    return handle.outcome()


def sandbox_processes() -> list[int]:
    """Live processes (not zombies) of the sandbox uid."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                status = (d / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields.get("Uid", "").split()[:1] == [SANDBOX_UID] and not fields.get("State", "").strip().startswith("Z"):
                found.append(int(d.name))
    return found


def test_a_normal_run_works_under_the_full_sandbox(tmp_path, data_dir):
    cfg = full_sandbox()
    link = tmp_path / "data"  # reached through a link in a directory only root may enter (pytest's are 0700)
    link.symlink_to(data_dir, target_is_directory=True)
    out = run_local(tmp_path, link, TINY_TRAIN_PY, cfg)
    r = out.result
    assert r.status == "ok" and r.val_bpb > 0, (r.error, out.log_tail)
    # it ran as the sandbox user, which could read the data and the installed package and write its directory
    assert (tmp_path / "exp" / "result.json").stat().st_uid == int(SANDBOX_UID)
    assert not (tmp_path / "exp" / "tmp").exists() and not (tmp_path / "exp" / ".cache").exists()


def test_with_the_hooks_off_the_os_still_blocks_network_writes_and_big_files(tmp_path, data_dir, listener):
    cfg = full_sandbox(max_file_gb=0.01)
    outside = tmp_path / "outside.txt"
    harness_file = REPO / "trainer" / "harness.py"
    before = harness_file.stat().st_mtime_ns
    source = "import os, socket, torch\n" + HOOKS_OFF + f"""
def attempt(what, fn):
    try:
        fn()
        notes.append(what + ": done")
    except OSError as e:
        notes.append(what + ": " + (os.strerror(e.errno) if e.errno else str(e)))

def append_nothing(path):  # opens for writing, writes nothing: harmless even where it succeeds
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND))

notes = []
def train(ctx):
    attempt("network", lambda: socket.create_connection(("127.0.0.1", {listener.port}), timeout=3))
    attempt("outside", lambda: open({str(outside)!r}, "w").write("escaped"))
    attempt("harness", lambda: append_nothing({str(harness_file)!r}))
    attempt("big file", lambda: open("big.bin", "wb").write(bytes(20 << 20)))
    raise RuntimeError(" | ".join(notes))
"""
    r = run_local(tmp_path, data_dir, source, cfg).result
    assert r.status == "crash" and "done" not in r.error, r.error
    assert "network: Network is unreachable" in r.error or "network: Connection refused" in r.error, r.error
    assert "big file: File too large" in r.error
    assert not listener.arrived() and not outside.exists()
    assert harness_file.stat().st_mtime_ns == before


def test_a_fork_bomb_is_stopped_by_the_process_limit(tmp_path, data_dir):
    cfg = full_sandbox(max_processes=32)
    source = "import os, time, torch\n" + HOOKS_OFF + """
def train(ctx):
    for _ in range(200):  # bounded: the limit stops it long before
        pid = os.fork()
        if pid == 0:
            try:
                time.sleep(60)
            finally:
                os._exit(0)
"""
    r = run_local(tmp_path, data_dir, source, cfg).result
    assert r.status == "crash" and r.error == "train.py started too many processes (limit 32)", r.error
    assert sandbox_processes() == []  # the children died with the harness (PID 1 of their namespace)


def test_memory_exhaustion_is_out_of_memory(tmp_path, data_dir):
    cfg = full_sandbox(memory_gb=2)
    source = "import torch\n" + """
def train(ctx):
    hoard = []
    for _ in range(64):  # at most 8 GiB asked for; the 2 GiB address-space limit stops it
        hoard.append(bytearray(128 << 20))
"""
    r = run_local(tmp_path, data_dir, source, cfg).result
    assert r.status == "crash" and r.error == "out of memory (limit 2 GiB)", r.error
