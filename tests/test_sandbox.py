"""The OS sandbox around the proposal's code (trainer/sandbox.py): uid, environment, mounts, network, memory and
processes per experiment — for a service running as root and for one running as an ordinary user."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from trainer.result import read_result
from trainer.sandbox import SandboxConfig, describe, features, plan

REPO = Path(__file__).resolve().parents[1]
SANDBOX_USER = "nobody"
SANDBOX_UID = str(pwd.getpwnam(SANDBOX_USER).pw_uid)
# An ordinary user with a subordinate uid range, as deploy/ sets up the service's user (.ci/run creates it).
SERVICE_USER = os.environ.get("RATCHET_TEST_SERVICE_USER", "ratchetsvc")
linux_root = pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("bwrap"),
                                reason="needs Linux, root and bubblewrap")

PROBE = '''
import json, os, socket
import torch.nn as nn

def can(f):
    try:
        f()
        return True
    except OSError:
        return False

def train(ctx):
    status = open("/proc/self/status").read()
    seen = {
        "uid": os.getuid(), "host_uid": None, "uid_map": open("/proc/self/uid_map").read().split(),
        "env": sorted(os.environ), "root": sorted(os.listdir("/")), "cwd": os.getcwd(),
        "caps": status.split("CapEff:")[1].split()[0], "no_new_privs": status.split("NoNewPrivs:")[1].split()[0],
        "write_usr": can(lambda: open("/usr/.probe", "w")), "write_job": can(lambda: open("/job/x", "w")),
        "write_tmp": can(lambda: open("/tmp/x", "w")),
        "net": can(lambda: socket.create_connection(("127.0.0.1", PORT), timeout=2)),
        "home": os.listdir(HOME) if os.path.isdir(HOME) else [],
    }
    print("PROBE " + json.dumps(seen), flush=True)
    next(iter(ctx.train_batches(1)))
    return nn.Sequential(nn.Embedding(ctx.vocab_size, 8), nn.Linear(8, ctx.vocab_size))
'''


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    hits: list = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(1)
                conn.close()
            except OSError:
                continue

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


def full_sandbox(**kw) -> SandboxConfig:
    return SandboxConfig(user=SANDBOX_USER, **kw)


def run_harness(run_dir: Path, source: str, data_dir: Path, cfg: SandboxConfig, budget: float = 1.0,
                user: str | None = None, env: dict | None = None):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.py").write_text(source)
    cmd = [sys.executable, "-m", "trainer.run", "--script", "train.py", "--data", str(data_dir), "--budget-s",
           str(budget), "--out", "result.json", "--eval-tokens", "2048", "--device", "cpu", *cfg.args()]
    if user:
        pw = pwd.getpwnam(user)
        shutil.chown(run_dir, pw.pw_uid, pw.pw_gid)
        cmd = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--reset-env", *cmd]
    proc = subprocess.run(cmd, cwd=run_dir, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SLACK_BOT_TOKEN": "xoxb-1-2-secretsecret", **(env or {})})
    return proc, read_result(run_dir / "result.json")


def _interpreter_dirs(home: Path) -> set:
    """The entries of `home` that lead to the Python installation (mounted read-only), if it lives there."""
    out = set()
    for p in (sys.prefix, sys.base_prefix, REPO / "trainer"):
        try:
            out.add(Path(p).resolve().relative_to(home.resolve()).parts[0])
        except ValueError:
            pass
    return out


def probe(proc) -> dict:
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("PROBE "))[6:])


ALLOWED_ENV = {"PATH", "HOME", "USER", "LOGNAME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "PWD",
               "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TORCHINDUCTOR_CACHE_DIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "LD_LIBRARY_PATH"}


@linux_root
def test_a_root_service_runs_the_code_as_the_sandbox_user_with_nothing_of_the_host(tmp_path, data_dir, listener):
    port, hits = listener
    src = PROBE.replace("PORT", str(port)).replace("HOME", repr(str(Path.home())))
    proc, r = run_harness(tmp_path / "run", src, data_dir, full_sandbox())
    assert r.status == "ok", (r.error, proc.stderr[-2000:])
    seen = probe(proc)
    assert seen["uid"] == int(SANDBOX_UID) and seen["caps"] == "0000000000000000" and seen["no_new_privs"] == "1"
    assert set(seen["env"]) <= ALLOWED_ENV, seen["env"]
    assert not seen["write_usr"] and seen["write_job"] and seen["write_tmp"] and seen["cwd"] == "/job"
    assert not seen["net"] and not hits and set(seen["home"]) <= _interpreter_dirs(Path.home()), seen["home"]
    assert str(data_dir.name) not in json.dumps(seen)  # no data directory is mounted for the worker
    assert not (tmp_path / "run" / "x").exists()  # /job is the worker's own tmpfs, gone with it


@linux_root
def test_an_ordinary_user_service_runs_the_code_as_a_uid_that_owns_nothing(tmp_path, data_dir, listener):
    try:
        svc = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pytest.skip(f"no user {SERVICE_USER} (.ci/run creates it)")
    if not os.access(sys.executable, os.X_OK) or subprocess.run(
            ["setpriv", f"--reuid={svc.pw_uid}", f"--regid={svc.pw_gid}", "--init-groups", sys.executable, "-c", ""],
            capture_output=True).returncode:
        pytest.skip(f"{SERVICE_USER} cannot run this interpreter")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="ratchet-service-"))  # pytest's own temporary tree is root's only
    data = base / "data"
    shutil.copytree(data_dir, data)
    for p in [base, *base.rglob("*")]:
        shutil.chown(p, svc.pw_uid, svc.pw_gid)
    port, hits = listener
    src = PROBE.replace("PORT", str(port)).replace("HOME", repr(svc.pw_dir))
    try:
        proc, r = run_harness(base / "run", src, data, full_sandbox(), user=SERVICE_USER)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert r.status == "ok", (r.error, proc.stderr[-2000:])
    seen = probe(proc)
    m = seen["uid_map"]  # inside the user namespace: 0 → the service, 1.. → its subordinate range
    inner = int(seen["uid"])
    host_uid = next(int(m[i + 1]) + inner - int(m[i]) for i in range(0, len(m), 3)
                    if int(m[i]) <= inner < int(m[i]) + int(m[i + 2]))
    assert host_uid not in (0, svc.pw_uid) and seen["caps"] == "0000000000000000"
    assert set(seen["env"]) <= ALLOWED_ENV and not seen["net"] and not hits
    assert set(seen["home"]) <= _interpreter_dirs(Path(svc.pw_dir)), seen["home"]
    assert not seen["write_usr"] and seen["write_job"]


@linux_root
def test_memory_is_limited_per_experiment_so_forked_children_share_it(tmp_path, data_dir):
    f = features(full_sandbox(memory_gb=1.0))
    if f["memory_scope"] != "experiment":
        pytest.skip("no writable cgroup here: " + "; ".join(f["missing"]))
    src = textwrap.dedent('''
        import os, time
        import torch.nn as nn

        def train(ctx):
            kids = []
            for _ in range(4):
                pid = os.fork()
                if pid == 0:
                    block = bytearray(400 << 20)  # touched: 400 MiB each, 1.6 GiB together
                    time.sleep(3)
                    os._exit(0)
                kids.append(pid)
            killed = sum(os.waitpid(p, 0)[1] != 0 for p in kids)
            print("KILLED", killed, flush=True)
            next(iter(ctx.train_batches(1)))
            return nn.Sequential(nn.Embedding(ctx.vocab_size, 8), nn.Linear(8, ctx.vocab_size))
        ''')
    proc, r = run_harness(tmp_path / "run", src, data_dir, full_sandbox(memory_gb=1.0), budget=5.0)
    killed = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("KILLED")]
    assert (killed and killed[0] >= 1) or "out of memory" in r.error, (r.status, r.error, proc.stdout[-500:])
    assert r.peak_memory_mb <= 1024 + 1


@linux_root
def test_processes_are_limited_per_experiment(tmp_path, data_dir):
    src = textwrap.dedent('''
        import os, time
        import torch.nn as nn

        def train(ctx):
            started = 0
            try:
                for _ in range(400):
                    if os.fork() == 0:
                        time.sleep(5)
                        os._exit(0)
                    started += 1
            except OSError:
                pass
            print("STARTED", started, flush=True)
            next(iter(ctx.train_batches(1)))
            return nn.Sequential(nn.Embedding(ctx.vocab_size, 8), nn.Linear(8, ctx.vocab_size))
        ''')
    proc, r = run_harness(tmp_path / "run", src, data_dir, full_sandbox(max_processes=64), budget=2.0)
    started = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("STARTED")]
    assert started and started[0] < 64, (r.status, r.error, proc.stdout[-500:])


def test_the_probe_says_what_is_enforced_and_what_is_missing():
    off = features(SandboxConfig(enabled=False))
    assert not off["enabled"] and "sandbox = false" in describe(off)
    if not (sys.platform.startswith("linux") and shutil.which("bwrap")):
        return
    f = features(full_sandbox(), refresh=True)
    line = describe(f)
    assert f["enabled"] and f["network_isolated"] and f["read_only"], line
    assert f["mode"] == plan(full_sandbox()).mode and line.startswith("sandbox: bubblewrap")
    if os.geteuid() == 0:
        assert f["user"] == f"uid {SANDBOX_UID} on the host"


def test_bubblewrap_outside_the_sandboxes_path_is_the_one_that_runs(tmp_path, monkeypatch):
    # The sandbox starts with PATH=/usr/bin:/bin; a bwrap the service finds elsewhere (/usr/local/bin, a venv) must
    # be the one run, not "not found" (which turned the sandbox off on a GPU host) nor another bwrap.
    real = shutil.which("bwrap")
    if not (sys.platform.startswith("linux") and real):
        pytest.skip("needs Linux and bubblewrap")
    local = tmp_path / "local-bin"
    local.mkdir()
    marker = tmp_path / "ran"
    (local / "bwrap").write_text(f'#!/bin/sh\ntouch {marker}\nexec {real} "$@"\n')
    (local / "bwrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{local}:{os.environ['PATH']}")
    f = features(full_sandbox(), refresh=True)
    assert f["enabled"] and f["network_isolated"], describe(f)
    assert marker.exists()


def test_without_bubblewrap_nothing_runs_unless_the_sandbox_is_off(tmp_path, data_dir):
    src = PROBE.replace("PORT", "9").replace("HOME", "'/'")
    proc, r = run_harness(tmp_path / "run", src, data_dir, full_sandbox(), env={"PATH": "/nonexistent"})
    assert r.status == "crash" and "bubblewrap" in r.error and "PROBE" not in proc.stdout


def test_a_delegated_cgroup_v2_is_split_into_a_service_leaf_and_experiment_cgroups(tmp_path, monkeypatch):
    # cgroup v2's files as plain files: the kernel's side (moving processes, enabling controllers) is its own.
    from trainer.sandbox import Cgroup, delegate_cgroup

    own = tmp_path / "ratchet.service"
    own.mkdir()
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    (own / "cgroup.subtree_control").write_text("\n")
    (own / "cgroup.procs").write_text("123\n456\n")
    monkeypatch.setenv("RATCHET_CGROUP_ROOT", "")  # recorded, so what delegate_cgroup sets is undone after the test
    assert delegate_cgroup(own) == own and os.environ["RATCHET_CGROUP_ROOT"] == str(own)
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (own / "service" / "cgroup.procs").read_text() == "456"  # each pid written in turn
    cg = Cgroup.create("exp-1", 1 << 30, 64)
    assert cg.v2 and cg.dirs == [own / "exp-1"] and (own / "exp-1" / "memory.max").read_text() == str(1 << 30)
    assert cg.procs == [own / "exp-1" / "cgroup.procs"]
