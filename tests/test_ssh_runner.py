"""The SSH runner against a real OpenSSH sshd on 127.0.0.1 (this machine is the 'GPU host', CPU only).

Bootstrap and its idempotence, an experiment end to end, refused data, kill, timeout, a host that dies
or drops its connection mid-run, reaping after a restart, health, and host-key checking.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loop.config import HostConfig
from loop.runners.base import Job
from loop.runners.ssh import SSHRunner
from loop.runners.ssh_bootstrap import package_hash
from loop.runners.ssh_host import (BootstrapError, HostUnreachable, expand_home, kill_script, parse_nvidia_smi,
                                   run_dir_name)
from tests.conftest import TINY_TRAIN_PY
from tests.sshd import Sshd, ensure_sshd

pytestmark = pytest.mark.timeout(180)

HOST_PYTHON = str(Path(sys.executable))  # the venv's python: it has torch, numpy, tokenizers

# Holds the GIL so the harness's own watchdog can never fire: only the runner's backstop can stop it.
GIL_HOG_TRAIN_PY = '''\
import sys
import torch.nn as nn


def train(ctx):
    sys.setswitchinterval(1e6)
    while True:
        pass
    return nn.Linear(1, 1)
'''


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    why = ensure_sshd()
    if why:
        pytest.skip(f"no OpenSSH server: {why}")
    server = Sshd(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def host_workdir(tmp_path_factory) -> Path:
    """The 'GPU host's workdir, shared by the tests of this module (like a real host between restarts)."""
    return tmp_path_factory.mktemp("gpuhost") / "ratchet"


def host_config(sshd: Sshd, workdir: Path, **kw) -> HostConfig:
    kw = {"name": "box", "cpu_only": True, "python": HOST_PYTHON, **kw}
    return HostConfig(address="127.0.0.1", port=sshd.port, user=sshd.user, key=sshd.user_key, workdir=str(workdir),
                      **kw)


@pytest.fixture
def make_runner(sshd, host_workdir, tmp_path):
    made = []

    def make(*, known_hosts_file=None, hosts=None, **kw) -> SSHRunner:
        kw = {"poll_s": 0.2, "connect_timeout_s": 5, "op_timeout_s": 20,
              "keepalive_s": 1.0, "keepalive_count": 2, "reconnect_s": 10, **kw}
        r = SSHRunner(hosts or [host_config(sshd, host_workdir)],
                      known_hosts_file=known_hosts_file or tmp_path / "known_hosts", **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def make_job(tmp_path: Path, data_dir: Path, exp_id: int, *, source: str = TINY_TRAIN_PY, budget_s: float = 1.0,
             grace_s: float = 30.0) -> Job:
    return Job(exp_id=exp_id, source=source, workdir=tmp_path / "local" / run_dir_name(exp_id), data_dir=data_dir,
               budget_s=budget_s, seed=exp_id, eval_tokens=2048, seq_len=64, grace_s=grace_s, device="cpu")


def start(runner: SSHRunner, job: Job):
    done = threading.Event()
    handle = runner.start(job, runner.slots()[0], done.set)
    return handle, done


def wait_for(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def group_alive(pgid: int) -> bool:
    """Any process of the group that is not a zombie (pgrep; zombies wait for this sandbox's init to reap them)."""
    pids = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        except OSError:
            continue
    return False


def procs_in(directory: str) -> list[int]:
    """Pids of the processes whose working directory is `directory` (the experiment's run dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.readlink(d / "cwd") == directory:
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def assert_nothing_left(handle) -> None:
    assert handle.pgid and not group_alive(handle.pgid), (
        f"process group {handle.pgid} still alive: "
        + subprocess.run(["ps", "-o", "pid,pgid,sid,stat,etimes,cmd", "-g", str(handle.pgid)], capture_output=True,
                         text=True).stdout)
    assert procs_in(handle.remote_dir) == []


# ---- no server needed ----


def test_slots_one_per_gpu_or_one_cpu_slot(tmp_path):
    gpu = HostConfig(name="g", address="10.0.0.1", gpus=2)
    cpu = HostConfig(name="c", address="10.0.0.2", cpu_only=True)
    r = SSHRunner([gpu, cpu], known_hosts_file=tmp_path / "kh")
    try:
        assert [(s.name, s.host, s.env) for s in r.slots()] == [
            ("g:gpu0", "g", {"CUDA_VISIBLE_DEVICES": "0"}), ("g:gpu1", "g", {"CUDA_VISIBLE_DEVICES": "1"}),
            ("c:cpu", "c", {"CUDA_VISIBLE_DEVICES": ""})]
        assert [h.up for h in r.host_status()] == [None, None]
    finally:
        r.close()
    with pytest.raises(ValueError, match="duplicate"):
        SSHRunner([gpu, gpu])


def test_helpers(tmp_path):
    assert expand_home("~/ratchet", "/home/u") == "/home/u/ratchet"
    assert expand_home("work", "/home/u") == "/home/u/work"
    assert expand_home("/srv/r", "/home/u") == "/srv/r"
    pkg = tmp_path / "pkg"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    h = package_hash(pkg)
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    assert package_hash(pkg) == h  # caches do not count
    (pkg / "a.py").write_text("x = 2\n")
    assert package_hash(pkg) != h
    assert "kill -TERM -- -$pg" in kill_script("/w/runs/exp-000001")
    assert parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 1234, 81559\n1, NVIDIA H100 80GB HBM3, 0, 81559\n") == [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_used_mib": 1234.0, "memory_total_mib": 81559.0},
        {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_used_mib": 0.0, "memory_total_mib": 81559.0}]


# ---- against sshd ----


def test_bootstrap_and_experiment_end_to_end(make_runner, data_dir, tmp_path, host_workdir):
    runner = make_runner()
    report = runner.prepare_host("box", data_dir)
    assert report.trainer_uploaded and report.python == HOST_PYTHON
    assert sorted(report.uploaded_files) == sorted(
        p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file())
    assert report.uploaded_files[-1] == "manifest.json"  # last, so a half-synced dir never looks complete
    remote_data = host_workdir / "data" / data_dir.name
    assert (remote_data / "val" / "val_000.bin").read_bytes() == (data_dir / "val" / "val_000.bin").read_bytes()
    assert (host_workdir / "lib" / "trainer" / "harness.py").is_file()
    assert "[127.0.0.1]:" in (tmp_path / "known_hosts").read_text()  # accept-new recorded the key

    job = make_job(tmp_path, data_dir, 1)
    handle, done = start(runner, job)
    assert handle.pid is None
    points = []
    while not done.wait(0.2):
        points.append(handle.progress())
    out = handle.outcome()
    assert out is not None and not out.infra_failed and not out.aborted
    assert out.result.status == "ok", (out.result.error, out.log_tail)
    assert 0 < out.result.val_bpb < 20 and out.result.steps >= 0 and out.result.device == "cpu"
    assert out.slot == "box:cpu" and out.host == "box" and out.wall_seconds > 0
    assert any(points), "progress() never showed a curve point while it trained"
    assert handle.progress() is not None and out.curve
    local = Path(job.workdir)
    assert (local / "result.json").is_file() and (local / "result.curve.jsonl").read_text().strip()
    assert "val_bpb" in (local / "log.txt").read_text()  # the harness's summary block, streamed back
    remote = host_workdir / "runs" / run_dir_name(1)
    assert handle.remote_dir == str(remote)
    assert (remote / "train.py").read_text() == TINY_TRAIN_PY
    assert (remote / "exit_code").read_text().strip() == "0"
    assert_nothing_left(handle)


def test_second_bootstrap_skips_the_upload_and_heals_a_damaged_host(make_runner, data_dir, host_workdir):
    first = make_runner().prepare_host("box", data_dir)  # the module's host may be fresh when run alone
    again = make_runner().prepare_host("box", data_dir)
    assert not again.trainer_uploaded
    assert again.uploaded_files == [] and again.uploaded_bytes == 0
    assert first.data_dir == again.data_dir

    # Someone changed the host's validation shard, keeping its size and mtime: it is detected and re-sent.
    val = host_workdir / "data" / data_dir.name / "val" / "val_000.bin"
    st = val.stat()
    raw = bytearray(val.read_bytes())
    raw[100] ^= 0xFF
    val.write_bytes(bytes(raw))
    os.utime(val, ns=(st.st_atime_ns, st.st_mtime_ns))
    healed = make_runner().prepare_host("box", data_dir)
    assert healed.uploaded_files == ["val/val_000.bin"]
    assert val.read_bytes() == (data_dir / "val" / "val_000.bin").read_bytes()


def test_data_failing_its_fingerprints_is_refused_on_the_host(make_runner, data_dir, tmp_path):
    bad = tmp_path / "bad-corpus"
    shutil.copytree(data_dir, bad)
    raw = bytearray((bad / "val" / "val_000.bin").read_bytes())
    raw[0] ^= 0xFF
    (bad / "val" / "val_000.bin").write_bytes(bytes(raw))  # the manifest still has the old sha256
    runner = make_runner()
    with pytest.raises(BootstrapError, match=r"data on the host refused.*fingerprint mismatch for val/val_000\.bin"):
        runner.prepare_host("box", bad)
    assert runner.slots() == []  # the host is down until a health check finds it usable again
    assert "fingerprint mismatch" in runner.host_status()[0].error

    runner = make_runner()  # through start(): an infrastructure failure, never the idea's
    handle, done = start(runner, make_job(tmp_path, bad, 2))
    assert done.wait(60)
    out = handle.outcome()
    assert out.infra_failed and "fingerprint mismatch" in out.result.error
    assert handle.pgid is None  # nothing was launched


def test_kill_stops_the_remote_process_group(make_runner, data_dir, tmp_path):
    runner = make_runner()
    handle, done = start(runner, make_job(tmp_path, data_dir, 3, budget_s=60))
    wait_for(handle.progress, 90, "the first curve point")
    assert group_alive(handle.pgid)
    t0 = time.time()
    handle.kill("paused now: lunch")
    assert done.wait(30), "the handle did not complete after kill()"
    assert time.time() - t0 < 30
    out = handle.outcome()
    assert out.aborted == "paused now: lunch" and not out.infra_failed
    assert out.result.status == "crash" and out.result.error == "aborted: paused now: lunch"
    assert_nothing_left(handle)


def test_timeout_kills_a_harness_that_cannot_stop_itself(make_runner, data_dir, tmp_path):
    runner = make_runner(backstop_s=1.0)
    job = make_job(tmp_path, data_dir, 4, source=GIL_HOG_TRAIN_PY, budget_s=1.0, grace_s=1.0)
    handle, done = start(runner, job)
    assert done.wait(90)
    out = handle.outcome()
    assert out.result.status == "timeout" and "budget + grace" in out.result.error
    assert not out.infra_failed and not out.aborted
    assert_nothing_left(handle)


def test_host_dies_mid_run_infra_failed_then_rejoins(make_runner, sshd, data_dir, tmp_path):
    runner = make_runner(reconnect_s=2)
    [h] = runner.health()
    assert h.up is True and h.error == "" and h.cpus >= 1 and h.free_disk_bytes > 0 and h.gpus == []
    handle, done = start(runner, make_job(tmp_path, data_dir, 5, budget_s=60))
    wait_for(handle.progress, 90, "the first curve point")
    try:
        sshd.stop()  # the host dies: SSH gone, and its processes with it
        os.killpg(handle.pgid, signal.SIGKILL)
        t0 = time.time()
        assert done.wait(60), "the handle hung after its host died"
        out = handle.outcome()
        assert out.infra_failed and "lost box" in out.result.error and not out.aborted
        assert time.time() - t0 < 60
        assert runner.slots() == []  # marked down
        [h] = runner.health()
        assert h.up is False and "cannot connect" in h.error
    finally:
        sshd.start()
    # a recovered host rejoins at its next health check (the scheduler's health job calls health())
    wait_for(lambda: runner.health() and runner.slots(), 60, "a health check to bring the host back")
    [h] = runner.host_status()
    assert h.up is True and h.error == "" and [s.name for s in runner.slots()] == ["box:cpu"]


def test_dropped_connection_reconnects_and_the_run_completes(make_runner, sshd, data_dir, tmp_path):
    # A frozen connection (no FIN, no reply) is noticed by keepalives; the harness on the host lives on.
    runner = make_runner(keepalive_s=0.5, keepalive_count=2, reconnect_s=30)
    handle, done = start(runner, make_job(tmp_path, data_dir, 6, budget_s=6))
    wait_for(handle.progress, 90, "the first curve point")
    frozen = sshd.sessions()
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        assert done.wait(120), "the handle hung on a frozen connection"
    finally:
        for pid in frozen:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
    out = handle.outcome()
    assert out.result.status == "ok" and not out.infra_failed, (out.result.error, out.log_tail)
    assert out.result.val_bpb is not None
    assert runner._hosts["box"].connects >= 2  # it did reconnect


def test_reap_kills_what_a_restarted_service_left_behind(make_runner, data_dir, tmp_path):
    old = make_runner()
    handle, _ = start(old, make_job(tmp_path, data_dir, 7, budget_s=60))
    wait_for(lambda: handle.pgid, 90, "the launch")
    pgid, remote_dir = handle.pgid, handle.remote_dir
    old.close(kill_running=False)  # the service died; the experiment keeps running on the host
    assert handle.done() and handle.outcome().infra_failed
    assert group_alive(pgid)
    new = make_runner()
    assert new.reap(7, "box") is True
    assert not group_alive(pgid) and procs_in(remote_dir) == []
    assert new.reap(7, "box") is False  # nothing left


def test_host_keys_are_checked(make_runner, sshd, host_workdir, tmp_path):
    kh = tmp_path / "managed_known_hosts"
    other_key = " ".join(Path(f"{sshd.user_key}.pub").read_text().split()[:2])  # a real key, not the host's
    kh.write_text(f"[127.0.0.1]:{sshd.port} {other_key}\n")
    runner = make_runner(known_hosts_file=kh)
    [h] = runner.health()
    assert h.up is False and "CHANGED" in h.error  # accept-new never replaces a recorded key
    assert kh.read_text().count("\n") == 1

    strict = tmp_path / "strict_known_hosts"
    strict.write_text("")
    runner = make_runner(hosts=[host_config(sshd, host_workdir, known_hosts=strict)])
    with pytest.raises(HostUnreachable, match="not in"):
        runner.prepare_host("box")
    assert strict.read_text() == ""  # a configured known_hosts file is never written


def test_gpu_host_without_nvidia_smi_is_down(make_runner, sshd, host_workdir):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    runner = make_runner(hosts=[host_config(sshd, host_workdir, cpu_only=False, gpus=2)])
    assert [s.name for s in runner.slots()] == ["box:gpu0", "box:gpu1"]
    [h] = runner.health()
    assert h.up is False and "nvidia-smi failed" in h.error and "cpu_only" in h.error
    assert runner.slots() == []


def test_wrong_python_names_the_bootstrap_script(make_runner, sshd, host_workdir):
    runner = make_runner(hosts=[host_config(sshd, host_workdir, python="/usr/bin/false")])
    with pytest.raises(BootstrapError, match="bootstrap-gpu-host.sh"):
        runner.prepare_host("box")


def test_bootstrap_script_checks_a_host_and_prints_its_entry(tmp_path):
    import getpass
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "venv").symlink_to(Path(sys.executable).parents[1])  # a venv with torch, as the script makes
    r = subprocess.run(["bash", str(repo / "deploy" / "bootstrap-gpu-host.sh"), "--user", getpass.getuser(),
                        "--workdir", str(wd), "--cpu-only", "--check", "--name", "box"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    entry = tomllib.loads(r.stdout[r.stdout.index("[[hosts]]"):])["hosts"][0]
    cfg = HostConfig(**entry)
    assert cfg.name == "box" and cfg.cpu_only and cfg.python == f"{wd}/venv/bin/python"
    bad = subprocess.run(["bash", str(repo / "deploy" / "bootstrap-gpu-host.sh"), "--bogus"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_health_changes_nothing_on_the_host(make_runner, sshd, tmp_path):
    fresh = tmp_path / "never-bootstrapped" / "ratchet"
    runner = make_runner(hosts=[host_config(sshd, fresh)])
    [h] = runner.health()
    assert h.up is True and h.cpus >= 1 and h.free_disk_bytes > 0, h.error
    assert not fresh.exists()  # the workdir is made by the first experiment, not by a health check
