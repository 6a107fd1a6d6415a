"""The local runner's standby harnesses: started ahead of their job, handed it on stdin, moved home at the end."""

from __future__ import annotations

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

import pytest

from loop.runners.base import Job, Slot
from loop.runners.local import LocalRunner, Standby
from trainer.result import STANDBY_FAILED
from tests.conftest import REPO, TINY_TRAIN_PY


def make_job(tmp_path: Path, data_dir: Path, exp_id: int, source: str = TINY_TRAIN_PY) -> Job:
    return Job(exp_id=exp_id, source=source, workdir=tmp_path / "runs" / f"exp-{exp_id}", data_dir=data_dir,
               budget_s=1.0, seed=exp_id, eval_tokens=2048, grace_s=30.0, device="cpu")


def run_job(runner: LocalRunner, job: Job):
    done = threading.Event()
    handle = runner.start(job, runner.slots()[0], done.set)
    assert done.wait(180), "the experiment did not finish"
    return handle, handle.outcome()


def children(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def started_at(pid: int) -> float:
    """When process `pid` started, epoch seconds, to a clock tick (/proc/PID/stat field 22: ticks after boot)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))


def wait_until(cond, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)


def wait_dead(proc: subprocess.Popen, timeout: float = 30) -> int:
    return proc.wait(timeout=timeout)


@pytest.fixture
def runner():
    r = LocalRunner("cpu", sandbox=False, standby=True)
    yield r
    r.close()


def test_the_next_job_runs_on_the_slots_standby_and_its_files_land_in_its_directory(tmp_path, data_dir, runner):
    first, out1 = run_job(runner, make_job(tmp_path, data_dir, 1))
    assert out1.result.status == "ok", (out1.result.error, out1.log_tail)
    assert first._standby_dir is None  # nothing was warm for the first job
    standby = runner._standbys["local:cpu"]
    assert standby.alive() and standby.dir.parent == tmp_path / "runs" / ".standby"

    source = TINY_TRAIN_PY.replace("LR = 0.02", "LR = 0.03")
    done = threading.Event()
    second = runner.start(make_job(tmp_path, data_dir, 2, source), runner.slots()[0], done.set)
    nxt = runner._standbys["local:cpu"]
    assert done.wait(180)
    out2 = second.outcome()
    r = out2.result
    assert r.status == "ok" and r.val_bpb > 0, (r.error, out2.log_tail)
    assert second.pid == standby.proc.pid and r.seed == 2
    final = tmp_path / "runs" / "exp-2"
    assert (final / "train.py").read_text() == source
    assert json.loads((final / "result.json").read_text())["val_bpb"] == r.val_bpb
    assert (final / "result.curve.jsonl").read_text().count("\n") == r.steps + 1 and out2.curve
    assert "val_bpb:" in (final / "log.txt").read_text()
    assert not standby.dir.exists()
    # the clock of a standby starts when the job arrives, not when its process started
    assert r.total_seconds < out2.wall_seconds + 1.0
    # and the slot has its next standby, a different process, which on the CPU started its worker only once the
    # second run's training was over (nothing of ours takes cores from a run being timed)
    assert nxt.proc.pid != standby.proc.pid and runner._standbys["local:cpu"] is nxt
    wait_until(lambda: children(nxt.proc.pid) != [])
    assert min(started_at(c) for c in children(nxt.proc.pid)) >= (final / "training.done").stat().st_mtime - 0.02


def test_a_standby_that_cannot_take_the_job_is_released_and_the_job_starts_cold(tmp_path, data_dir,
                                                                                 stdlib_data_dir, runner):
    run_job(runner, make_job(tmp_path, data_dir, 1))
    other_data = runner._standbys["local:cpu"]
    handle, out = run_job(runner, make_job(tmp_path, stdlib_data_dir, 2))  # other data: not what it exposes
    assert out.result.status == "ok", (out.result.error, out.log_tail)
    assert handle._standby_dir is None and wait_dead(other_data.proc) is not None
    assert not other_data.dir.exists()

    dead = runner._standbys["local:cpu"]
    dead.proc.kill()
    wait_dead(dead.proc)
    handle, out = run_job(runner, make_job(tmp_path, stdlib_data_dir, 3))
    assert out.result.status == "ok" and handle._standby_dir is None and not dead.dir.exists()


def _failing_env() -> dict:
    """An environment in which a harness cannot start its sandbox (no bubblewrap on the PATH): what a standby meets
    when its host cannot start what it needs, made deterministic."""
    return {"PATH": "/nonexistent"}


@pytest.mark.skipif(not shutil.which("bwrap"), reason="needs bubblewrap")
def test_a_standby_that_fails_after_it_was_handed_the_job_gives_it_to_a_fresh_harness(tmp_path, data_dir, caplog):
    # The standby is stopped until it holds the job, so it is alive when handed it and fails after.
    runner = LocalRunner("cpu", sandbox=True, standby=True)
    slot = runner.slots()[0]
    bad = Standby(Slot(slot.name, slot.host, {**slot.env, **_failing_env()}),
                  tmp_path / "runs" / ".standby", data_dir, "cpu", runner.sandbox)
    os.killpg(bad.proc.pid, signal.SIGSTOP)
    runner._standbys[slot.name] = bad
    done = threading.Event()
    with caplog.at_level(logging.WARNING, logger="loop.runners.local"):
        handle = runner.start(make_job(tmp_path, data_dir, 1), slot, done.set)
        assert handle.pid == bad.proc.pid  # it took the job
        os.killpg(bad.proc.pid, signal.SIGCONT)
        assert done.wait(180)
    assert bad.proc.returncode == STANDBY_FAILED
    out = handle.outcome()
    assert out.result.status == "ok" and out.result.seed == 1, (out.result.error, out.log_tail)
    assert handle.pid != bad.proc.pid and handle._standby_dir is None and not bad.dir.exists()
    final = tmp_path / "runs" / "exp-1"
    assert (final / "train.py").read_text() == TINY_TRAIN_PY and (final / "result.json").exists()
    assert any("failed before it took #1" in r.getMessage() and "starting it afresh" in r.getMessage()
               for r in caplog.records)
    runner.close()


def test_close_releases_the_standby(tmp_path, data_dir):
    runner = LocalRunner("cpu", sandbox=False, standby=True)
    run_job(runner, make_job(tmp_path, data_dir, 1))
    standby = runner._standbys["local:cpu"]
    runner.close()
    assert wait_dead(standby.proc) is not None and not standby.dir.exists()
    assert not runner._standbys


def test_a_standby_left_by_a_dead_service_exits_and_its_directory_is_cleaned(tmp_path, data_dir):
    runner = LocalRunner("cpu", sandbox=False, standby=True)
    run_job(runner, make_job(tmp_path, data_dir, 1))
    orphan = runner._standbys.pop("local:cpu")
    orphan.proc.stdin.close()  # what the service's death does to the pipe
    assert wait_dead(orphan.proc) == 0
    stale = orphan.dir.with_name("999999-local-cpu-0")  # as an earlier service process leaves it
    orphan.dir.rename(stale)
    (stale / "result.json").symlink_to("/etc/passwd")  # whatever it holds, nothing in it is followed
    fresh = LocalRunner("cpu", sandbox=False, standby=True)
    try:
        _, out = run_job(fresh, make_job(tmp_path, data_dir, 2))
        assert out.result.status == "ok"
        assert not stale.exists() and Path("/etc/passwd").exists()
    finally:
        fresh.close()


def test_standby_mode_of_the_harness(tmp_path, data_dir):
    cmd = [sys.executable, "-P", "-m", "trainer.run", "--standby", "--data", str(data_dir), "--device", "cpu"]
    released = subprocess.run(cmd, cwd=tmp_path, input="", capture_output=True, text=True, timeout=120, env=_env())
    assert released.returncode == 0 and not list(tmp_path.iterdir())
    bad = subprocess.run(cmd, cwd=tmp_path, input='{"argv": ["--nonsense"]}\n', capture_output=True, text=True,
                         timeout=120, env=_env())
    assert bad.returncode == 2 and "standby: bad job line" in bad.stderr
    broken = subprocess.run(cmd, cwd=tmp_path, input='{"argv": ["--nonsense"]}\n', capture_output=True, text=True,
                            timeout=120, env={**_env(), **_failing_env()})
    assert broken.returncode == STANDBY_FAILED and "standby: could not start" in broken.stderr
    assert "bubblewrap" in broken.stderr
    assert "bad job line" not in broken.stderr  # it failed before it read the job
    job = {"argv": ["--script", "train.py", "--data", str(data_dir), "--budget-s", "1", "--out", "result.json",
                    "--device", "cpu", "--eval-tokens", "2048"], "source": TINY_TRAIN_PY}
    ok = subprocess.run(cmd, cwd=tmp_path, input=json.dumps(job) + "\n", capture_output=True, text=True,
                        timeout=180, env=_env())
    assert ok.returncode == 0, ok.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "ok" and (tmp_path / "train.py").read_text() == TINY_TRAIN_PY


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_standby_under_the_full_sandbox(tmp_path, data_dir):
    from tests.test_sandbox import full_sandbox

    runner = LocalRunner("cpu", sandbox=full_sandbox(), standby=True)
    try:
        run_job(runner, make_job(tmp_path, data_dir, 1))
        standby = runner._standbys["local:cpu"]
        time.sleep(0.5)
        handle, out = run_job(runner, make_job(tmp_path, data_dir, 2))
        r = out.result
        assert r.status == "ok" and r.val_bpb > 0, (r.error, out.log_tail)
        assert handle._standby_dir == standby.dir and not standby.dir.exists()
        assert (tmp_path / "runs" / "exp-2" / "result.json").exists()
    finally:
        runner.close()
