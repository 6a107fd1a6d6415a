"""The disk that holds the experiments' directories and logs fills up while the loop runs: the run pauses with
the reason and says so instead of crash-looping through proposals; after space is freed `resume` goes on."""

from __future__ import annotations

import errno
import signal
import subprocess

import pytest

from db.models import CommandLog, Event, Experiment, Run
from tests.reliability.conftest import (assert_consistent, clone, harness_alive, rows, settings_env, sqlite_url,
                                        wait)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs, mounted where `mount_at(path)` says and unmounted after the test."""
    mounted = []

    def mount_at(path):
        path.mkdir(parents=True, exist_ok=True)
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(path)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill (needs root or CAP_SYS_ADMIN): {p.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount_at
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path) -> None:
    """Write a file in `path` until the disk refuses (ENOSPC)."""
    chunk = bytes(1 << 12)
    with open(path / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


def test_disk_full_pauses_the_run_and_resume_continues(tmp_path, data_dir, measured, serve, tiny_disk):
    home, ws = clone(measured, tmp_path / "c")
    url, out = sqlite_url(home), tmp_path / "out.txt"
    subprocess.run(["rm", "-rf", str(home / "runs")], check=True)
    runs = tiny_disk(home / "runs")
    proc = serve([], settings_env(home, data_dir, ws.path, USER="dana"), out, stdin=subprocess.PIPE)
    wait(lambda: any(harness_alive(e.pid) for e in rows(url, Experiment, kind="experiment", status="running")), proc,
         what="an experiment to train")
    fill(runs)

    wait(lambda: rows(url, Run)[0].state == "paused", proc, timeout=120, what="the pause")
    run = rows(url, Run)[0]
    assert run.pause_reason.startswith("disk full: ") and "No space left on device" in run.pause_reason
    wait(lambda: "paused by ratchet: disk full" in out.read_text(), proc, timeout=30, what="the pause announced")
    victim = rows(url, Experiment, status="queued")
    assert len(victim) == 1 and victim[0].reason.startswith("re-queued: disk full")
    assert not rows(url, Experiment, status="crash")  # the idea is not blamed for the disk
    started = len(rows(url, Experiment))
    wait(lambda: rows(url, Experiment, status="running") == [], proc, timeout=60, what="nothing training")
    assert len(rows(url, Experiment)) == started  # paused: no new proposal was tried on the full disk

    (runs / "filler").unlink()
    proc.stdin.write(b"resume\n")
    proc.stdin.flush()
    wait(lambda: rows(url, Experiment, id=victim[0].id)[0].status in ("keep", "discard"), proc, timeout=120,
         what="the re-queued experiment to finish")
    proc.stdin.write(b"pause\n")
    proc.stdin.flush()
    wait(lambda: not rows(url, Experiment, status="running") and rows(url, Run)[0].state == "paused", proc,
         timeout=120, what="idle")
    wait(lambda: all(ev.delivered_at for ev in rows(url, Event)), proc, timeout=30, what="all events printed")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, out.read_text()[-3000:]

    again = rows(url, Experiment, id=victim[0].id)[0]
    assert again.attempts == 2 and again.val_bpb is not None
    assert_consistent(url, ws)
    assert "resumed by dana (was: disk full: " in out.read_text()
    assert [a.command for a in rows(url, CommandLog)] == ["resume", "pause"]
