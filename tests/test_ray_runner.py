"""The Ray runner on a real local Ray instance (2 CPUs, CPU tasks) with real text and the tiny model."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from loop.hosts import normalise_health  # noqa: E402
from loop.runners.base import Job, Slot  # noqa: E402
from loop.runners.base import is_harness_process  # noqa: E402
from loop.runners.ray_runner import RayRunner  # noqa: E402
from tests.conftest import TINY_TRAIN_PY  # noqa: E402

CRASHING_TRAIN_PY = TINY_TRAIN_PY.replace("    torch.manual_seed(ctx.seed)\n",
                                          "    torch.manual_seed(ctx.seed)\n    raise ValueError('boom')\n")


@pytest.fixture(scope="module")
def runner():
    """One private Ray instance for the module: 2 CPUs, a small object store, no dashboard."""
    r = RayRunner(None, num_gpus_per_task=0, num_cpus_per_task=1,
                  ray_init={"num_cpus": 2, "object_store_memory": 100 * 1024 * 1024})
    yield r
    r.close()


def job(tmp_path, data_dir, exp_id, source=TINY_TRAIN_PY, budget_s=1.0, **kw) -> Job:
    return Job(exp_id=exp_id, source=source, workdir=tmp_path / f"exp-{exp_id}", data_dir=data_dir,
               budget_s=budget_s, seed=exp_id, eval_tokens=4096, grace_s=30, device="cpu", **kw)


def start(runner, j):
    """Start a job; returns (handle, event set by on_done, list counting on_done calls)."""
    ev, calls = threading.Event(), []

    def on_done():
        calls.append(1)
        ev.set()

    slot = runner.slots()[0]
    return runner.start(j, slot, on_done), ev, calls


def wait_until(cond, timeout=60.0, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def processes_in(workdir: str) -> list[int]:
    """Pids whose working directory is the experiment's directory on the node."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.readlink(p / "cwd") == workdir:
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def test_slots_and_health(runner):
    assert [s.name for s in runner.slots()] == ["ray:0", "ray:1"]  # 2 CPUs, 1 CPU per task
    assert runner.slots()[0].env == {"CUDA_VISIBLE_DEVICES": ""}  # CPU tasks reserve no GPU, so use none
    (node,) = runner.health()
    assert node["up"] and node["cpus"] == 2.0 and node["slots"] == 2 and node["name"] == node["address"]
    rec = normalise_health(node)  # what the engine's host checks make of it
    assert rec["up"] and rec["name"] == node["address"] and rec["error"] == ""


def test_unschedulable_task_is_an_infra_failure(runner, tmp_path, data_dir):
    """A task asking for a GPU the cluster does not have never starts: the handle still completes."""
    gpu = RayRunner(num_gpus_per_task=1, start_timeout_s=1.0)  # Ray already up: shares it
    try:
        assert gpu.slots() == []  # no GPU in this cluster
        h = gpu.start(job(tmp_path, data_dir, 5), Slot("ray:0", "ray-local"), lambda: None)
        wait_until(h.done, 30, "the handle to give up")
        out = h.outcome()
        assert out.infra_failed and "not scheduled" in out.result.error, out.result.error
    finally:
        gpu.close()


def test_experiment_end_to_end_beside_a_crashing_one(runner, tmp_path, data_dir):
    h, ev, calls = start(runner, job(tmp_path, data_dir, 1, budget_s=2.0))
    bad, bad_done, _ = start(runner, job(tmp_path, data_dir, 2, source=CRASHING_TRAIN_PY))
    assert h.pid is None
    seen = []
    while not ev.wait(0.05):
        if h.progress():
            seen.append(h.progress())
    out = h.outcome()
    assert h.done() and calls == [1]
    assert out.result.status == "ok", out.result.error
    assert 0 < out.result.val_bpb < 20 and out.result.tokens > 0
    assert not out.infra_failed and out.aborted == ""
    assert out.host == runner.health()[0]["address"]
    assert seen and {"step", "elapsed_s", "loss"} <= seen[-1].keys(), "no progress seen while training"
    assert h.info["data"] == "node path"
    wd = tmp_path / "exp-1"
    curve = (wd / "result.curve.jsonl").read_text().splitlines()
    assert len(curve) == out.result.steps + 1 and out.curve  # the whole curve came back through Ray
    assert "val_bpb" in (wd / "result.json").read_text() and "---" in (wd / "log.txt").read_text()
    assert any("val_bpb" in line for line in out.log_tail)

    assert bad_done.wait(60)
    out = bad.outcome()  # the harness's own one-line reason, not a Ray error
    assert out.result.status == "crash" and not out.infra_failed and out.aborted == ""
    assert out.result.error.startswith("ValueError: boom (train.py:"), out.result.error


def test_kill_aborts_and_a_lost_worker_is_an_infra_failure(runner, tmp_path, data_dir):
    """Two experiments train side by side: one is killed on purpose, the other loses its Ray worker."""
    (killed, killed_done, _), (lost, lost_done, lost_calls) = [
        start(runner, job(tmp_path, data_dir, i, budget_s=60.0)) for i in (3, 4)]
    wait_until(lambda: killed.progress() is not None and lost.progress() is not None, what="training to start")
    harnesses = [killed.info["harness_pid"], lost.info["harness_pid"]]
    workdirs = [killed.info["workdir"], lost.info["workdir"]]
    assert all(is_harness_process(p) for p in harnesses) and harnesses[0] in processes_in(workdirs[0])
    assert runner.health()[0]["running"] == [3, 4]

    killed.kill("paused now: lunch")
    os.kill(lost.info["worker_pid"], signal.SIGKILL)
    assert killed_done.wait(30) and lost_done.wait(60), "a handle never completed"

    out = killed.outcome()
    assert out.aborted == "paused now: lunch" and not out.infra_failed
    assert out.result.error == "aborted: paused now: lunch" and out.curve  # the points seen before the kill
    out = lost.outcome()
    assert out.infra_failed and out.aborted == "" and lost_calls == [1]
    assert "WorkerCrashedError" in out.result.error, out.result.error
    # No harness is left (found by pid and by working directory), and the node's directories are gone.
    wait_until(lambda: not any(is_harness_process(p) for p in harnesses)
               and not any(processes_in(w) for w in workdirs), 10, "the harnesses to die")
    wait_until(lambda: not any(Path(w).exists() for w in workdirs), 10, "the node's experiment directories")


def test_data_travels_through_the_object_store(runner, tmp_path, data_dir):
    """ship_data="always": nodes never use the driver's path; the files come from the object store,
    are written to the node's cache once per content hash, checked against the manifest, and used."""
    local_copy = tmp_path / "data-copy"
    shutil.copytree(data_dir, local_copy)
    node_dir = tmp_path / "node"
    remote = RayRunner(num_gpus_per_task=0, ship_data="always", node_dir=str(node_dir))
    try:
        started = [start(remote, job(tmp_path, local_copy, 10 + i)) for i in range(2)]
        for h, ev, _ in started:
            assert ev.wait(90)
            assert h.outcome().result.status == "ok", h.outcome().result.error
            assert h.info["data"].startswith(("shipped through the object store", "cached on node")), h.info
        assert remote.shipments == 1  # two experiments, one ray.put
        (cached,) = (node_dir / "data").iterdir()
        for f in local_copy.rglob("*"):
            if f.is_file():
                assert (cached / f.relative_to(local_copy)).read_bytes() == f.read_bytes()
        assert not any((node_dir / "runs").iterdir())  # experiment directories are removed on the node
    finally:
        remote.close()


def test_engine_requeues_an_experiment_whose_worker_died(runner, tmp_path, data_dir, tiny_workspace):
    """Through the real engine: the lost run is infra_failed, re-queued, re-run, and counts once."""
    from sqlmodel import Session, select

    from db.models import Event, Experiment
    from db.session import create_tables, make_engine
    from loop.config import Settings
    from loop.engine import Engine
    from loop.proposers.offline import OfflineProposer

    settings = Settings(home=tmp_path / "home", workspace=tiny_workspace.path, budget_s=2.0, noise_repeats=2,
                        eval_tokens=2048, grace_s=30, device="cpu")
    db = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    create_tables(db)
    eng = Engine(settings, db, tiny_workspace, runner, OfflineProposer(seed=1), data_dir, max_experiments=1)
    eng.setup()

    def rows():
        with Session(db) as s:
            return {e.id: e for e in s.exec(select(Experiment)).all()}

    def tick_until(cond, timeout=90):
        t0 = time.time()
        while time.time() - t0 < timeout:
            eng.tick()
            if cond():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for the engine: {[(e.id, e.status, e.reason) for e in rows().values()]}")

    tick_until(lambda: any(h.progress() for h in eng.handles.values()))
    victim = next(h for h in eng.handles.values() if h.progress())
    os.kill(victim.info["worker_pid"], signal.SIGKILL)
    tick_until(lambda: eng.get_run().noise_sigma is not None)  # both repeats finished, the lost one re-run

    exp = rows()[victim.exp_id]
    assert exp.kind == "baseline" and exp.attempts == 2 and exp.val_bpb is not None, (exp.status, exp.reason)
    with Session(db) as s:
        assert [e.text for e in s.exec(select(Event).where(Event.kind == "infra_failed")).all()]
    for h in list(eng.handles.values()):  # an experiment may have started meanwhile: stop it
        h.kill("test over")
    tick_until(lambda: not eng.handles, 30)


def test_a_multi_slot_job_asks_ray_for_every_member_s_resources(runner, tmp_path, data_dir):
    """Two slots taken together (a scale with gpus = 2) are one task asking for twice a slot's resources: on this
    2-CPU cluster, 2 CPUs per slot cannot be had twice, so it is never scheduled (and says what it asked for)."""
    wide = RayRunner(num_gpus_per_task=0, num_cpus_per_task=2, slots=2, start_timeout_s=1.0)  # shares Ray
    try:
        both = Slot.together(wide.slots())
        h = wide.start(replace(job(tmp_path, data_dir, 5), nproc=2), both, lambda: None)
        wait_until(h.done, 30, "the handle to give up")
        out = h.outcome()
        assert out.infra_failed and "no node with 0 GPU / 4 CPU free" in out.result.error, out.result.error
        assert out.slot == "ray:0+ray:1"
    finally:
        wide.close()
