"""The Ray runner's side on a cluster node: the task that runs `python -m trainer.run` for one experiment in a
directory of its own (the data made ready there first), the reaper that cleans up after a dead worker, and the
progress board the driver reads curve points from.

Only stdlib, ray, trainer and loop.runners.* are imported here: this is what a node imports.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

try:
    import ray
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("the Ray runner needs Ray: pip install 'ratchet[ray]'") from e

from loop.runners.base import BACKSTOP_S, Job, harness_command, kill_group, last_curve_point, read_end, spawn
from trainer.sandbox import SandboxConfig

REPORT_S = 0.25  # how often a task sends its latest curve point to the progress board
LOG_RETURN_BYTES = 256 * 1024  # the tail of the harness log carried back per experiment


# Watches the Ray worker that started a harness; when the worker dies (ray.cancel(force=True), a crash, a
# lost raylet) it kills the harness's whole process group and removes the experiment's directory. It
# detaches (double fork) because Ray kills a dead worker's direct children, which would include it.
REAPER = r"""
import os, shutil, signal, sys, time
pgid, worker, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def identity(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]  # a zombie is dead; start time guards pid reuse
born = identity(worker)
def worker_alive():
    if born is not None:
        return identity(worker) == born
    try:
        os.kill(worker, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
if os.fork():
    os._exit(0)
while True:
    time.sleep(0.5)
    if not worker_alive():
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
        time.sleep(0.2)
        shutil.rmtree(workdir, ignore_errors=True)
        os._exit(0)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        os._exit(0)  # the harness ended: the task collects its result and cleans up
    except PermissionError:
        pass
"""


def content_hash(files: dict[str, bytes]) -> str:
    """sha256 over (relative path, bytes) pairs in path order: the identity of shipped data."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + len(files[rel]).to_bytes(8, "little"))
        h.update(files[rel])
    return h.hexdigest()


def _same_preparation(data_dir: Path, want: dict) -> bool:
    """True when `data_dir` on this node holds the preparation the driver means (same fingerprints)."""
    try:
        m = json.loads((data_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if m.get("fingerprints") != want["fingerprints"] or m.get("train_shards") != want["train_shards"]:
        return False
    return all((data_dir / rel).exists() for rel in [*m["train_shards"], *m["fingerprints"]])


def materialise(files: dict[str, bytes], digest: str, target: Path) -> None:
    """Write shipped data files under `target` atomically (temp dir + rename) and check them.

    Raises ValueError when the bytes do not hash to `digest` or a path escapes the directory, and
    trainer.data.FingerprintError when the manifest's sha256 fingerprints do not match.
    """
    from trainer.data import verify_fingerprints

    if content_hash(files) != digest:
        raise ValueError(f"shipped data does not hash to {digest[:12]}…")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.tmp-", dir=target.parent))
    try:
        for rel, blob in files.items():
            path = (tmp / rel).resolve()
            if not path.is_relative_to(tmp.resolve()):
                raise ValueError(f"shipped path escapes the data directory: {rel}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
        verify_fingerprints(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "manifest.json").exists():
                raise  # not a lost race with another task on this node
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def node_data_dir(job: Job, want: dict, shipped: Optional[dict], node_dir: Path,
                  always_ship: bool) -> Optional[tuple[Path, str]]:
    """The data directory to train on here: (path, how it got here), or None when it must be shipped.

    Uses the job's path when this node has the same preparation there (unless always_ship), else the
    node's cache of shipped data (`<node_dir>/data/<content hash>`), fetching the bytes from the object
    store once per node. Raises ValueError / FingerprintError when shipped files do not check out.
    """
    from trainer.data import verify_fingerprints

    if not always_ship and _same_preparation(Path(job.data_dir), want):
        return Path(job.data_dir), "node path"
    if shipped is None:
        return None
    target = node_dir / "data" / shipped["hash"]
    how = f"cached on node {shipped['hash'][:12]}"
    if not (target / "manifest.json").exists():
        materialise(ray.get(shipped["ref"][0]), shipped["hash"], target)
        how = f"shipped through the object store {shipped['hash'][:12]}"
    verify_fingerprints(target)
    return target, how


def sweep_runs(runs: Path, min_age_s: float = 60.0) -> None:
    """Remove experiment directories on this node left by tasks that died (their lock is free)."""
    for d in runs.iterdir():
        try:
            if time.time() - d.stat().st_mtime < min_age_s:
                continue
            fd = os.open(d / ".lock", os.O_RDWR)
        except FileNotFoundError:
            shutil.rmtree(d, ignore_errors=True)  # its task died before it could take the lock
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass  # a live task holds it
        finally:
            os.close(fd)


def run_experiment(key: str, job: Job, want: dict, shipped: Optional[dict], board, node_dir: Optional[str],
                   always_ship: bool, env: dict, sandbox: Optional[SandboxConfig] = None) -> dict:
    """Body of the Ray task: run the harness on this node and return what it wrote.

    Returns {"need_data": reason} when this node cannot see the data and none was shipped; else
    {"result_json" (str or None), "curve" (JSONL text), "log" (tail), "returncode", "timed_out",
    "node", "data"}. The harness's process group never outlives this task's worker (a reaper kills it).
    """
    ctx = ray.get_runtime_context()
    info = {"node": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(), "worker_pid": os.getpid(),
            "harness_pid": None, "workdir": None, "data": None}

    def report(point=None):
        try:
            board.report.remote(key, dict(info), point)
        except Exception:  # noqa: BLE001 - progress is best effort; the result still comes back
            pass

    report()
    root = Path(node_dir or Path(tempfile.gettempdir()) / "ratchet-ray")
    found = node_data_dir(job, want, shipped, root, always_ship)
    if found is None:
        return {"need_data": f"{job.data_dir} is not on node {info['node']}"}
    data_dir, info["data"] = str(found[0]), found[1]
    (root / "runs").mkdir(parents=True, exist_ok=True)
    sweep_runs(root / "runs")
    wd = Path(tempfile.mkdtemp(prefix=f"exp-{job.exp_id:06d}-", dir=root / "runs"))
    lock = os.open(wd / ".lock", os.O_RDWR | os.O_CREAT)  # held while this task lives (not inherited)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info["workdir"] = str(wd)
        return _train_here(job, Path(data_dir), wd, env, info, report, sandbox or SandboxConfig())
    finally:
        shutil.rmtree(wd, ignore_errors=True)
        os.close(lock)


def _train_here(job: Job, data_dir: Path, wd: Path, env: dict, info: dict, report, sandbox: SandboxConfig) -> dict:
    """Run the harness in `wd` until it exits (or budget + grace + BACKSTOP_S), reporting curve points. The harness
    sandboxes the proposal itself, with what the node offers; `env` is added to the worker's (where Ray has set
    CUDA_VISIBLE_DEVICES for GPU tasks)."""
    (wd / "train.py").write_text(job.source)
    log_path, curve_path = wd / "log.txt", wd / "result.curve.jsonl"
    proc = spawn(harness_command(replace(job, data_dir=data_dir), sandbox), wd, env)
    timed_out, last = False, None
    deadline = time.time() + job.budget_s + job.grace + BACKSTOP_S
    try:
        subprocess.run([sys.executable, "-c", REAPER, str(proc.pid), str(os.getpid()), str(wd)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       start_new_session=True, check=False)  # returns once the reaper has detached
        info["harness_pid"] = proc.pid
        report()
        while True:
            try:
                proc.wait(timeout=REPORT_S)
                break
            except subprocess.TimeoutExpired:
                pass
            point = last_curve_point(curve_path)
            if point is not None and point != last:
                last = point
                report(point)
            if time.time() > deadline:
                timed_out = True
                break
    finally:
        kill_group(proc.pid)  # leftovers (compile workers) die with their experiment
        if proc.poll() is None:
            proc.wait()
    result_path = wd / "result.json"
    return {"result_json": result_path.read_text() if result_path.exists() else None,
            "curve": read_end(curve_path, 1 << 26), "log": read_end(log_path, LOG_RETURN_BYTES),
            "returncode": proc.returncode, "timed_out": timed_out, "node": info["node"], "data": info["data"]}


remote_run = ray.remote(max_retries=0)(run_experiment)


@ray.remote(num_cpus=0, max_restarts=-1)
class ProgressBoard:
    """Latest curve point and whereabouts (node, worker pid, harness pid) of each running task."""

    def __init__(self):
        self.entries: dict[str, tuple[dict, Optional[dict]]] = {}

    def report(self, key: str, info: dict, point: Optional[dict]) -> None:
        old = self.entries.get(key, (info, None))[1]
        self.entries[key] = (info, point if point is not None else old)

    def snapshot(self, keys: list[str]) -> dict:
        return {k: self.entries[k] for k in keys if k in self.entries}

    def forget(self, key: str) -> None:
        self.entries.pop(key, None)
