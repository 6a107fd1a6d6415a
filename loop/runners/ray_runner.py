"""The Ray runner: each experiment is a Ray task that runs `python -m trainer.run` on a cluster node (the task's
side is loop/runners/ray_node.py; this is the driver's: the handles and the runner).

Results come only from the harness's result.json, carried back through Ray; a Ray failure is an
infrastructure failure (re-queue), never the idea's fault, and a handle never waits forever.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Literal, Optional

try:
    import ray
    from ray.exceptions import RayTaskError, TaskCancelledError
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("the Ray runner needs Ray: pip install 'ratchet[ray]'") from e

from loop.runners.base import (BACKSTOP_S, Handle, Job, Outcome, Runner, Slot, downsample_curve, first_line,
                               fresh_workdir, read_curve, run_result, sandbox_config)
from loop.runners.ray_node import ProgressBoard, content_hash, remote_run
from trainer.sandbox import SandboxConfig
from trainer.untrusted import clean_lines

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often the monitor looks for finished tasks and fresh curve points
ANSWER_MARGIN_S = 60.0  # past the task's own backstop, a silent node is declared lost
SLOTS_TTL_S = 10.0  # cluster resources are re-read at most this often


class RayHandle(Handle):
    """A running Ray experiment. `pid` is None: kill it with kill(), never by process group.

    Thread-safe; `on_done` is called once, from the runner's monitor thread, when the outcome is ready.
    `info` holds where it runs once known: node, node_id, worker_pid, harness_pid, workdir, data.
    """

    def __init__(self, runner: "RayRunner", job: Job, slot: Slot, on_done: Callable[[], None], want: dict):
        super().__init__(job, slot, on_done)
        self.info: dict = {}
        self._runner = runner
        self._want = want  # the driver's manifest fingerprints and train shards
        self._key = f"{job.exp_id}:{uuid.uuid4().hex[:12]}"
        self._ref = None
        self._shipping = False
        self._progress: Optional[dict] = None
        self._seen: list[dict] = []  # curve points polled while it ran: the curve of a run that never returns
        self._lock = threading.Lock()
        self._phase_since = time.time()
        self._phase = "queued"  # queued → preparing (task started) → training (harness started)

    # -- engine-facing --

    def progress(self) -> Optional[dict]:
        """{step, elapsed_s, loss} of the latest curve point reported through Ray, or None before one."""
        return self._progress

    def kill(self, reason: str) -> None:
        """Stop the experiment: ray.cancel(force=True) kills the worker, its reaper the harness group.

        Returns at once; the outcome (aborted=reason) follows within about a second.
        """
        with self._lock:
            if self._outcome is not None:
                return
            self._aborted = reason or "killed"
            ref = self._ref
        if ref is not None:
            try:
                ray.cancel(ref, force=True)
            except Exception as e:  # noqa: BLE001 - a cancel that fails must not stop the engine
                log.warning("ray.cancel of #%s failed: %s", self.exp_id, e)
        self._runner._wake.set()

    # -- runner-facing --

    def _submit(self, shipped: Optional[dict]) -> None:
        r = self._runner
        n = self.slot.gpus  # a multi-GPU scale: one task holding n slots' resources, on one node (Ray places it)
        opts = {"num_gpus": r.num_gpus_per_task * n, "num_cpus": r.num_cpus_per_task * n,
                "name": f"ratchet-exp-{self.exp_id}"}
        if r.runtime_env:
            opts["runtime_env"] = r.runtime_env
        ref = remote_run.options(**opts).remote(self._key, self.job, self._want, shipped, r._board, r.node_dir,
                                                 r.ship_data == "always", self.slot.env, r.sandbox)
        with self._lock:
            self._ref, self._shipping = ref, False
            self._phase_since = time.time()
            self._phase = "queued"
            aborted = self._aborted
        if aborted:
            ray.cancel(ref, force=True)

    def _ship_and_resubmit(self) -> None:
        try:
            shipped = self._runner._ship(Path(self.job.data_dir))
        except Exception as e:  # noqa: BLE001 - unreadable local data: an infra failure, reported
            self._finish_infra(f"could not ship {self.job.data_dir}: {type(e).__name__}: {e}")
            return
        if self._aborted:
            self._finish(self._aborted_outcome())
            return
        try:
            self._submit(shipped)
        except Exception as e:  # noqa: BLE001
            self._finish_infra(f"could not submit to Ray: {type(e).__name__}: {e}")

    def _collect(self) -> None:
        """The task's ref is ready: turn its value or its error into the outcome."""
        ref = self._ref
        try:
            payload = ray.get(ref, timeout=30)
        except Exception as e:  # noqa: BLE001 - every Ray failure becomes an outcome
            self._fail(describe_ray_error(e))
            return
        if "need_data" in payload:
            if self._aborted:
                self._finish(self._aborted_outcome())
                return
            with self._lock:
                self._ref, self._shipping = None, True
            threading.Thread(target=self._ship_and_resubmit, name=f"ship-{self.exp_id}", daemon=True).start()
            return
        try:
            outcome = self._outcome_from(payload)
        except (OSError, KeyError, TypeError) as e:  # the service's disk, or a node running other code
            self._finish_infra(f"could not record the result: {type(e).__name__}: {e}")
            return
        self._finish(outcome)

    def _observe(self, info: dict, point: Optional[dict]) -> None:
        self.info = info
        if point is not None and point != self._progress:
            self._progress = point
            self._seen.append(point)
        phase = "training" if info.get("harness_pid") else "preparing"
        if phase != self._phase and not (phase == "preparing" and self._phase == "training"):
            self._phase, self._phase_since = phase, time.time()

    def _check_deadline(self, now: float) -> None:
        """Never hang: a task not started, not preparing or not answering in time is an infra failure."""
        if self._outcome is not None or self._shipping or self._ref is None:
            return
        r = self._runner
        if self._phase == "training":
            limit, why = self.job.budget_s + self.job.grace + BACKSTOP_S + ANSWER_MARGIN_S, \
                f"no answer from node {self.info.get('node', '?')}"
        elif self._phase == "preparing":
            limit, why = r.start_timeout_s, f"data not ready on node {self.info.get('node', '?')}"
        else:
            n = self.slot.gpus
            limit, why = r.start_timeout_s, (f"not scheduled: no node with {r.num_gpus_per_task * n:g} GPU / "
                                             f"{r.num_cpus_per_task * n:g} CPU free in the Ray cluster")
        if now - self._phase_since <= limit:
            return
        try:
            ray.cancel(self._ref, force=True)
        except Exception:  # noqa: BLE001
            pass
        self._fail(f"{why} within {limit:.0f} s")

    def _aborted_outcome(self) -> Outcome:
        return self._make_outcome(run_result(self.job, aborted=self._aborted), aborted=self._aborted,
                                  host=self.info.get("node", self.slot.host), curve=downsample_curve(self._seen))

    def _fail(self, error: str) -> None:
        """Finish as aborted when it was killed on purpose, else as infra_failed with `error`."""
        if self._aborted:
            self._finish(self._aborted_outcome())
        else:
            self._finish_infra(error)

    def _finish_infra(self, error: str) -> None:
        self._finish(self._make_outcome(run_result(self.job, error=error), host=self.info.get("node", self.slot.host),
                                        infra_failed=True, curve=downsample_curve(self._seen)))

    def _outcome_from(self, p: dict) -> Outcome:
        """The files the task brought back written to the job's workdir, and the outcome they make."""
        wd = Path(self.job.workdir)
        (wd / "log.txt").write_text(p["log"])
        (wd / "result.curve.jsonl").write_text(p["curve"])
        if p["result_json"] is not None:
            (wd / "result.json").write_text(p["result_json"])
        res = run_result(self.job, aborted=self._aborted, result=wd / "result.json", timed_out=p["timed_out"],
                         returncode=p["returncode"])
        return self._make_outcome(res, host=p["node"], log_tail=clean_lines(p["log"], 20), aborted=self._aborted,
                                  curve=downsample_curve(read_curve(wd / "result.curve.jsonl")))

    def _finish(self, outcome: Outcome) -> None:
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = outcome
        self._runner._forget(self)
        try:
            self._on_done()
        except Exception:  # noqa: BLE001 - the callback's failure is the caller's, not this experiment's
            log.exception("on_done of #%s failed", self.exp_id)


def describe_ray_error(e: BaseException) -> str:
    """One line naming a Ray failure: `WorkerCrashedError: …`, or the task's own exception for RayTaskError."""
    if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None:
        e = e.cause
    first = first_line(e)
    if isinstance(e, TaskCancelledError):
        first = first or "the task was cancelled"
    return f"ray: {type(e).__name__}: {first}" if first else f"ray: {type(e).__name__}"


class RayRunner(Runner):
    """Experiments as Ray tasks on a cluster: one slot per GPU (or `slots`, or per CPU with 0 GPUs per task).

    `address`: an existing cluster (`ray://head:10001` through Ray Client, or `host:port` / `auto` from a
    cluster node); None starts a private local Ray instance (`ray_init` passes more ray.init arguments).
    If Ray is already initialised in this process, that connection is used and left open by close().
    `num_gpus_per_task` / `num_cpus_per_task`: Ray resources per experiment. `ship_data`: "auto" uses a
    node's own copy of the data directory when it has the same preparation, else ships the files
    through the object store; "always" never trusts a node's path. `node_dir`: where nodes keep shipped
    data and experiment directories (default `<tmp>/ratchet-ray` on each node). `start_timeout_s`: how
    long a task may wait for resources (and for its data) before it is an infra failure.
    Raises ConnectionError when the cluster cannot be reached.
    """

    name = "ray"

    def __init__(self, address: Optional[str] = None, *, num_gpus_per_task: float = 1.0,
                 num_cpus_per_task: float = 1.0, slots: Optional[int] = None,
                 ship_data: Literal["auto", "always"] = "auto", node_dir: Optional[str] = None,
                 start_timeout_s: float = 600.0, runtime_env: Optional[dict] = None,
                 ray_init: Optional[dict] = None, sandbox: Optional[SandboxConfig] = None):
        if ship_data not in ("auto", "always"):
            raise ValueError(f"ship_data must be 'auto' or 'always', got {ship_data!r}")
        self.address = address
        self.num_gpus_per_task = float(num_gpus_per_task)
        self.num_cpus_per_task = float(num_cpus_per_task)
        self.ship_data = ship_data
        self.node_dir = node_dir
        self.start_timeout_s = float(start_timeout_s)
        self.runtime_env = runtime_env
        self.sandbox = sandbox or sandbox_config()
        self._fixed_slots = slots
        self._owns_ray = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **(ray_init or {})}
            try:
                ray.init(address=address or "local", **kwargs)
            except ConnectionError:
                raise
            except Exception as e:  # noqa: BLE001 - Ray raises several types for an unreachable cluster
                raise ConnectionError(f"cannot connect to the Ray cluster at {address or 'local'}: {e}") from e
            self._owns_ray = True
        self._board = ProgressBoard.remote()
        self._handles: dict[str, RayHandle] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._shipped_by_dir: dict[tuple, dict] = {}
        self._refs_by_hash: dict[str, object] = {}
        self._ship_lock = threading.Lock()
        self.shipments = 0  # ray.put calls of data (one per distinct data content)
        self._slots_cache: tuple[float, list[Slot]] = (0.0, [])
        self._monitor = threading.Thread(target=self._monitor_loop, name="ray-runner", daemon=True)
        self._monitor.start()

    @classmethod
    def from_settings(cls, settings) -> "RayRunner":
        """The runner ratchet.toml asks for: `ray_address` (None: a local Ray instance) and `ray_num_gpus`
        GPUs per experiment (0: CPU tasks, one CPU each). Raises ConnectionError as the constructor."""
        return cls(settings.ray_address, num_gpus_per_task=settings.ray_num_gpus)

    # ---- slots and health ----

    def slots(self) -> list[Slot]:
        """Slots `ray:0`…`ray:N-1`: N = `slots`, else the cluster's GPUs (CPUs when 0 GPUs per task)
        divided by the resources per task. Re-read from the cluster at most every SLOTS_TTL_S seconds,
        so a lost node takes its slots with it."""
        host = self.address or "ray-local"
        env = {} if self.num_gpus_per_task > 0 else {"CUDA_VISIBLE_DEVICES": ""}  # no GPU reserved: use none
        if self._fixed_slots is not None:
            return [Slot(f"ray:{i}", host, env) for i in range(self._fixed_slots)]
        at, cached = self._slots_cache
        if time.time() - at < SLOTS_TTL_S:
            return list(cached)
        try:
            total = ray.cluster_resources()
        except Exception as e:  # noqa: BLE001 - keep the last answer while the cluster is unreachable
            log.warning("ray.cluster_resources failed: %s", e)
            return list(cached)
        if self.num_gpus_per_task > 0:
            n = int(total.get("GPU", 0) // self.num_gpus_per_task)
        else:
            n = int(total.get("CPU", 0) // max(self.num_cpus_per_task, 1e-9))
        out = [Slot(f"ray:{i}", host, env) for i in range(n)]
        self._slots_cache = (time.time(), out)
        return list(out)

    def health(self) -> list[dict]:
        """One dict per node: name (its address; a dead node is left out once a live one has its address,
        so a replaced node rejoins under the same name), node_id, address, hostname, up (alive), gpus, cpus
        (totals), slots (experiments it can hold), free (resources free now; {} when unknown), running
        (experiment ids of this runner there), error (Ray's death reason; "" when alive).
        Raises ConnectionError when the cluster cannot be asked."""
        try:
            nodes = ray.nodes()
        except Exception as e:  # noqa: BLE001
            raise ConnectionError(f"cannot read the Ray cluster's nodes: {e}") from e
        try:
            from ray._private.state import available_resources_per_node

            free = available_resources_per_node()
        except Exception:  # noqa: BLE001 - a private API; free resources are a nicety
            free = {}
        with self._lock:
            live = list(self._handles.values())
        per = self.num_gpus_per_task or self.num_cpus_per_task
        out, names = [], set()
        for n in sorted(nodes, key=lambda n: not n.get("Alive")):  # live nodes claim their names first
            res, nid, alive = n.get("Resources") or {}, n.get("NodeID", ""), bool(n.get("Alive"))
            address = n.get("NodeManagerAddress", "")
            name = address or nid
            if name in names:
                if not alive:
                    continue
                name = f"{name}/{nid[:8]}"  # two live nodes on one address (a test cluster)
            names.add(name)
            total = res.get("GPU" if self.num_gpus_per_task else "CPU", 0.0)
            out.append({
                "name": name, "node_id": nid, "address": address, "hostname": n.get("NodeManagerHostname", ""),
                "up": alive, "gpus": res.get("GPU", 0.0), "cpus": res.get("CPU", 0.0),
                "slots": int(total // per) if per else 0,
                "free": {k: v for k, v in free.get(nid, {}).items()
                         if k in ("GPU", "CPU", "memory", "object_store_memory")},
                "running": sorted(h.exp_id for h in live if h.info.get("node_id") == nid),
                "error": "" if alive else (n.get("DeathReasonMessage") or "node is dead"),
            })
        return out

    # ---- experiments ----

    def start(self, job: Job, slot: Slot, on_done: Callable[[], None]) -> RayHandle:
        """Submit a job as a Ray task. Returns at once.

        Raises OSError when the job's directory cannot be written or its data directory has no
        manifest, and ConnectionError when Ray refuses the task (both infra failures).
        """
        if self._closed.is_set():
            raise ConnectionError("the Ray runner is closed")
        from trainer.data import load_manifest

        (fresh_workdir(job) / "train.py").write_text(job.source)
        manifest = load_manifest(Path(job.data_dir))
        h = RayHandle(self, job, slot, on_done,
                      {"fingerprints": manifest["fingerprints"], "train_shards": manifest["train_shards"]})
        shipped = self._shipped_by_dir.get(self._dir_key(Path(job.data_dir)))  # else shipped on first need
        with self._lock:
            self._handles[h._key] = h
        try:
            h._submit(shipped)
        except Exception as e:  # noqa: BLE001
            with self._lock:
                self._handles.pop(h._key, None)
            raise ConnectionError(f"Ray refused the task: {e}") from e
        self._wake.set()
        return h

    @staticmethod
    def _dir_key(data_dir: Path) -> tuple:
        st = (data_dir / "manifest.json").stat()
        return (str(data_dir.resolve()), st.st_mtime_ns, st.st_size)

    def _ship(self, data_dir: Path) -> dict:
        """Put a data directory's files into the object store, once per content hash.

        Returns {"hash", "ref": [ObjectRef]}. Raises OSError when a file cannot be read.
        """
        from trainer.data import load_manifest

        with self._ship_lock:
            key = self._dir_key(data_dir)
            if key in self._shipped_by_dir:
                return self._shipped_by_dir[key]
            m = load_manifest(data_dir)
            rels = dict.fromkeys(["manifest.json", *m["fingerprints"], *m["train_shards"], *m["val_shards"]])
            files = {rel: (data_dir / rel).read_bytes() for rel in rels}
            digest = content_hash(files)
            if digest not in self._refs_by_hash:
                self._refs_by_hash[digest] = ray.put(files)
                self.shipments += 1
                log.info("shipped %s (%.1f MB) through the object store as %s", data_dir,
                         sum(map(len, files.values())) / 1e6, digest[:12])
            shipped = {"hash": digest, "ref": [self._refs_by_hash[digest]]}
            self._shipped_by_dir[key] = shipped
            return shipped

    def _forget(self, h: RayHandle) -> None:
        with self._lock:
            self._handles.pop(h._key, None)
        try:
            self._board.forget.remote(h._key)
        except Exception:  # noqa: BLE001
            pass

    def _monitor_loop(self) -> None:
        while not self._closed.is_set():
            try:
                self._monitor_once()
            except Exception:  # noqa: BLE001 - the monitor must outlive any single failure
                log.exception("ray runner monitor failed")
                self._closed.wait(1.0)

    def _monitor_once(self) -> None:
        with self._lock:
            live = [h for h in self._handles.values() if h._outcome is None]
        if not live:
            self._wake.wait(1.0)
            self._wake.clear()
            return
        by_ref = {h._ref: h for h in live if h._ref is not None}
        if by_ref:
            ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=POLL_S, fetch_local=False)
        else:
            ready = []
            self._wake.wait(POLL_S)
            self._wake.clear()
        for ref in ready:
            by_ref[ref]._collect()
        try:
            snap = ray.get(self._board.snapshot.remote([h._key for h in live]), timeout=5)
        except Exception as e:  # noqa: BLE001 - no progress this round; deadlines still apply
            log.debug("progress board unavailable: %s", e)
            snap = {}
        now = time.time()
        for h in live:
            if h._key in snap:
                h._observe(*snap[h._key])
            h._check_deadline(now)

    def handles(self) -> list[RayHandle]:
        """The experiments this runner is watching."""
        with self._lock:
            return list(self._handles.values())

    def close(self, kill: bool = True) -> None:
        """Stop watching; with kill, cancel running tasks first. Shuts Ray down only if this runner started it."""
        if kill:
            for h in self.handles():
                h.kill("runner closed")
            deadline = time.time() + 5
            while self.handles() and time.time() < deadline:
                time.sleep(0.1)
        self._closed.set()
        self._wake.set()
        self._monitor.join(timeout=5)
        try:
            ray.kill(self._board)
        except Exception:  # noqa: BLE001
            pass
        if self._owns_ray:
            ray.shutdown()
