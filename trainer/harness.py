"""The fixed harness's trusted parent: owns the data, the clock, the budget and result.json.

It never runs a proposal's code. It starts two sandboxed processes (trainer/sandbox.py): the **worker**
(trainer/worker.py), which runs `train(ctx)` on batches the parent serves and hands back the trained model as a
`torch.export` artifact, and the **scorer** (trainer/scorer.py), which loads that artifact without running any
Python of the proposal and computes val_bpb. The parent writes result.json beside the experiment's files, where
neither can write. This module does not import torch.

The clock (README: Trust model): the worker gets `start_allowance_s` from the job to start up (interpreter, torch,
building the model) and, on CUDA, WARMUP_BATCHES batches (compilation) before the clock starts; the clock starts at
the first batch after those, or when the allowance runs out. No batch is served once the budget plus
`overrun_s()` is spent. Training that ends later than budget + overrun_s() is refused; a worker that has not
handed back its artifact by budget + grace is killed (timeout).
"""

from __future__ import annotations

import errno
import json
import math
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from trainer import data as tdata
from trainer import sandbox
from trainer.result import Result
from trainer.untrusted import clean_line, clean_lines
from trainer.wire import Channel, ProtocolError

# Batches served before the clock starts, so compilation and allocator warm-up are free (autoresearch: 10 steps).
# On CPU nothing is compiled: the clock starts when train(ctx) is called.
WARMUP_BATCHES = {"cuda": 10, "mps": 3, "cpu": 0}
# Seconds from the job's hand-over to the clock's start that are not counted, at most (start-up, model building,
# and on CUDA the warm-up batches' compilation).
START_ALLOWANCE_S = {"cuda": 180.0, "mps": 60.0, "cpu": 30.0}
DEFAULT_SEQ_LEN = {"cuda": 2048, "mps": 512, "cpu": 256}
# Validation tokens scored by default: always the first tokens of the pinned split, so every experiment is scored
# on the same text. On a small CPU the forward pass is the loop's largest per-experiment cost after training.
DEFAULT_EVAL_TOKENS = {"cuda": 1 << 22, "mps": 1 << 18, "cpu": 1 << 14}
# Tokens per scoring batch; the artifact is exported for exactly this batch shape. On CPU small batches are the
# faster ones: the logits of a batch (tokens × vocab floats) then stay in the cache.
EVAL_BATCH_TOKENS = {"cuda": 1 << 18, "mps": 1 << 15, "cpu": 1 << 10}
# Dense bf16 peak FLOP/s by GPU name, from NVIDIA's data sheets (H100 SXM 989.5 TFLOP/s, as autoresearch).
PEAK_BF16_FLOPS = {"H200": 989.5e12, "H100": 989.5e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10G": 70e12, "4090": 165e12, "3090": 71e12}
MIN_FREE_BYTES = 64 << 10  # below this much free space where the experiment writes, the disk is full
READY_TIMEOUT_S = 300.0  # a sandboxed process that has not started by then will not
# Written in the run's directory once training is over (or result.json, when it failed first): a CPU standby
# waits for it before it starts (trainer/run.py), so nothing of ours takes cores from a run being timed.
TRAINING_DONE = "training.done"


def overrun_s(budget_s: float) -> float:
    """How long after the budget the last training step may end: 2 s + 5% of the budget."""
    return 2.0 + 0.05 * budget_s


def default_grace_s(budget_s: float) -> float:
    """How long after the budget the artifact may arrive (the last step and the export): 30 s + 10% of it."""
    return 30.0 + 0.1 * budget_s


def score_limit_s(budget_s: float) -> float:
    """The scorer's time limit: 120 s + the budget (an honest model scores far faster than it trains)."""
    return 120.0 + budget_s


def free_space(path: Path) -> str:
    """'' when `path`'s file system has MIN_FREE_BYTES free, else 'disk full: <path>: No space left on device
    (N KiB free)'. The parent's own check: a full disk is never taken from what the proposal's code says."""
    try:
        st = os.statvfs(path)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    return "" if free >= MIN_FREE_BYTES else f"disk full: {path}: No space left on device ({free >> 10} KiB free)"


def uses_cuda(device: str) -> bool:
    """Whether a run on `device` gets the GPUs (auto: when the host has an NVIDIA driver and a visible GPU)."""
    if device != "auto":
        return device.startswith("cuda")
    return Path("/dev/nvidiactl").exists() and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != ""


# ---- The two sandboxed processes ----


@dataclass
class Process:
    """A sandboxed child and the parent's end of its channel."""

    proc: subprocess.Popen
    chans: list[Channel]  # one per rank (the scorer: one)
    ready: Optional[dict] = None

    @property
    def chan(self) -> Channel:
        return self.chans[0]

    def wait_ready(self, timeout: float) -> dict:
        """Rank 0's `ready` message, once every rank said it (before any proposal code exists in them).
        Raises RuntimeError if one dies or is late."""
        if self.ready is None:
            deadline = time.monotonic() + timeout
            for chan in self.chans:
                try:
                    got = chan.recv(timeout=max(0.0, deadline - time.monotonic()))
                except (EOFError, ProtocolError, OSError) as e:
                    raise RuntimeError(f"it exited while starting ({e})") from None
                if got is None or got[0].get("op") != "ready":
                    raise RuntimeError(f"it did not start within {timeout:.0f} s")
                self.ready = self.ready or got[0]
        return self.ready

    def close(self) -> None:
        sandbox.kill(self.proc)
        for chan in self.chans:
            chan.close()


def _start(cfg: sandbox.SandboxConfig, plan: sandbox.Plan, argv: list[str], *, ro, cuda: bool,
           cgroup: sandbox.Cgroup, channels: int = 1) -> Process:
    """Start `argv` in the sandbox with `channels` socket pairs; it gets their far ends as `--fds a,b,…`."""
    pairs = [socket.socketpair() for _ in range(channels)]
    fds = [theirs.fileno() for _, theirs in pairs]
    cmd = sandbox.command(cfg, plan, [*argv, "--fds", ",".join(map(str, fds))], ro=ro, cuda=cuda, cgroup=cgroup)
    try:
        proc = sandbox.spawn(cmd, pass_fds=fds)
    finally:
        for _, theirs in pairs:
            theirs.close()
    return Process(proc, [Channel(ours) for ours, _ in pairs])


@dataclass
class Launched:
    """The worker and the scorer of one run, started (possibly ahead of the job: a standby harness)."""

    data_dir: Path
    device: str
    cfg: sandbox.SandboxConfig
    workdir: Path
    cgroup: sandbox.Cgroup
    worker: Process
    scorer: Process
    artifact: str  # where the scorer finds the artifact
    nproc: int = 1  # the worker's ranks
    missing: list = field(default_factory=list)

    def key(self) -> tuple:
        return str(self.data_dir), self.device, self.cfg, self.nproc

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until both processes said `ready`. Raises RuntimeError naming the one that did not start."""
        for name, p in (("worker", self.worker), ("scorer", self.scorer)):
            try:
                p.wait_ready(timeout)
            except RuntimeError as e:
                raise RuntimeError(f"the sandboxed {name} could not start: {e}") from None

    def close(self) -> None:
        for p in (self.worker, self.scorer):
            p.close()
        self.cgroup.remove()
        try:
            (self.workdir / "artifact").rmdir()  # only when empty
        except OSError:
            pass


def launch(data_dir: Path, workdir: Path, device: str = "auto",
           cfg: Optional[sandbox.SandboxConfig] = None, nproc: int = 1, ahead: bool = False) -> Launched:
    """Start the worker (`nproc` ranks in one sandbox) and the scorer for runs on `data_dir` in `workdir` (they
    import torch while they wait). `ahead`: started before the job is known (a standby), so on CUDA the worker also
    warms up the export while it waits (on CPU that would take cores from the run training beside it).

    The scorer sees the validation shards, the byte table and `workdir/artifact/` (where the parent later puts the
    artifact), read-only; the worker sees none of the data. Raises OSError when a process cannot be started.
    """
    cfg = cfg or sandbox.SandboxConfig()
    data_dir, workdir = Path(data_dir).resolve(), Path(workdir).resolve()
    manifest = tdata.load_manifest(data_dir)
    plan = sandbox.plan(cfg)
    cg = sandbox.Cgroup.create(f"ratchet-{os.getpid()}-{time.monotonic_ns()}", cfg.memory_bytes(),
                               cfg.max_processes)
    cuda = uses_cuda(device)
    py = [sys.executable, "-s", "-P", "-m"]  # no user site, no working directory on the path
    art = workdir / "artifact"
    art.mkdir(exist_ok=True)
    # What the scorer reads, mounted read-only at fixed places (as they are when the sandbox is off).
    ro = [(str(v), f"/data/val/{v.name}") for v in tdata.val_paths(data_dir, manifest)]
    ro += [(str(data_dir / "token_bytes.npy"), "/data/token_bytes.npy"), (str(art), "/artifact")]
    seen = {host: (host if plan.mode == "off" else inside) for host, inside in ro}
    try:
        warm = ["--warm-export"] if ahead and cuda else []
        worker = _start(cfg, plan, [*py, "trainer.worker", "--device", device, *warm],
                        ro=[], cuda=cuda, cgroup=cg, channels=nproc)
        scorer = _start(cfg, plan, [*py, "trainer.scorer", "--device", device,
                                    "--token-bytes", seen[str(data_dir / "token_bytes.npy")],
                                    *[a for host, _ in ro[:-2] for a in ("--val", seen[host])]],
                        ro=ro, cuda=cuda, cgroup=cg)
    except BaseException:
        cg.remove()
        raise
    return Launched(data_dir, device, cfg, workdir, cg, worker, scorer, seen[str(art)] + "/model.pt2", nproc,
                    list(plan.missing) + cg.missing)


# ---- Batches ----


class Batches:
    """Random windows of the train split, as ctx.train_batches serves them: uint16 [n, seq_len + 1], seeded."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, seed: int):
        self.shards = [s for s in shards if len(s) > seq_len + 1]
        if not self.shards:
            raise ValueError(f"no train shard is longer than seq_len={seq_len}")
        lengths = np.array([len(s) for s in self.shards], dtype=np.float64)
        self.weights = lengths / lengths.sum()
        self.T = seq_len
        self.rng = np.random.default_rng(seed)
        self.ar = np.arange(seq_len + 1)

    def next(self, n: int) -> np.ndarray:
        shard = self.shards[self.rng.choice(len(self.shards), p=self.weights)] if len(self.shards) > 1 \
            else self.shards[0]
        starts = self.rng.integers(0, len(shard) - self.T - 1, size=n)
        return np.ascontiguousarray(shard[starts[:, None] + self.ar], dtype=np.uint16)


# ---- One run ----


class Outcome(Exception):
    """Ends a run early with a status and a one-line reason (trusted text: the parent's own words)."""

    def __init__(self, status: str, reason: str, tail: Optional[list] = None):
        super().__init__(reason)
        self.status, self.reason, self.tail = status, reason, tail or []


def _send(chan: Channel, msg: dict, payload=b"") -> None:
    try:
        chan.send(msg, payload)
    except OSError:
        raise Outcome("crash", "") from None  # it is gone: the caller finds out why


def _next(chans: list[Channel], open_: set, timeout: float) -> Optional[tuple[int, dict]]:
    """(rank, message) from whichever open channel has one, waiting at most `timeout` seconds; None if none.
    Raises EOFError with the rank in args[1] when a channel closes, ProtocolError on garbage."""
    deadline = time.monotonic() + timeout
    while True:
        for r in sorted(open_):
            try:
                got = chans[r].recv(timeout=0)
            except EOFError as e:
                raise EOFError(str(e), r) from None
            if got is not None:
                return r, got[0]
        wait = deadline - time.monotonic()
        if wait <= 0:
            return None
        select.select([chans[r] for r in open_], [], [], wait)


def _train(w: Process, job: dict, batches: list[Batches], res: Result, artifact: Path, curve, *, budget_s: float,
           grace_s: float, warmup: int, start_allowance: float, max_bytes: int) -> dict:
    """Serve one training run to the worker's ranks until rank 0's artifact is in `artifact`. Returns what the
    worker said about itself (steps, flops_per_token, peak_memory_mb: untrusted, informational). Raises Outcome."""
    t_job = time.monotonic()
    for rank, chan in enumerate(w.chans):
        _send(chan, {**job, "rank": rank})
    latest_start = t_job + start_allowance
    clock: Optional[float] = None
    trained: dict = {}  # rank → when it said train(ctx) returned
    told: dict = {}
    served = counted = 0
    T = batches[0].T
    open_ = set(range(len(w.chans)))
    while True:
        now = time.monotonic()
        deadline = (clock if clock is not None else latest_start) + budget_s + grace_s
        if now >= deadline:
            raise Outcome("timeout", f"still running after budget + grace ({budget_s + grace_s:.0f} s)")
        try:
            got = _next(w.chans, open_, min(1.0, deadline - now))
        except EOFError as e:
            rank = e.args[1] if len(e.args) > 1 else 0
            if rank == 0 or rank not in trained:
                raise Outcome("crash", "") from None  # the caller finds out why (the OOM killer, its exit)
            open_.discard(rank)  # a rank > 0 that trained is done
            continue
        except ProtocolError as e:
            raise Outcome("crash", f"the worker broke the harness protocol ({e})") from None
        if got is None:
            continue
        (rank, msg), now = got, time.monotonic()
        chan = w.chans[rank]
        if clock is None and now >= latest_start:
            clock = latest_start
        op = msg.get("op")
        if op == "train":
            if warmup == 0 and clock is None:
                clock = now
        elif op == "batch":
            n = msg.get("n")
            if not isinstance(n, int) or not 1 <= n <= 1 << 16:
                raise Outcome("crash", f"ctx.train_batches was asked for {n!r} sequences per batch")
            if clock is None and served >= warmup * len(w.chans):
                clock = now
            if (clock is not None and now - clock > budget_s + overrun_s(budget_s)) or rank in trained:
                _send(chan, {"stop": True})
                continue
            arr = batches[rank].next(n)
            served += 1
            res.tokens += n * T
            counted += n * T if clock is not None else 0
            _send(chan, {"elapsed": round(now - clock, 4) if clock is not None else 0.0}, arr.tobytes())
        elif op == "log":
            step, loss = msg.get("step"), msg.get("loss")
            if isinstance(step, int) and rank == 0:
                told["steps"] = max(told.get("steps", 0), step)
                loss = loss if isinstance(loss, (int, float)) and math.isfinite(loss) else str(loss)[:20]
                curve.write(json.dumps({"step": step, "elapsed_s": round(now - clock, 3) if clock else 0.0,
                                        "loss": loss}) + "\n")
        elif op == "trained":
            trained[rank] = now
            for k in ("steps", "flops_per_token", "peak_memory_mb"):
                v = msg.get(k)
                if rank == 0 and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0:
                    told[k] = v
        elif op == "error":
            tail = clean_lines(msg.get("tail") if isinstance(msg.get("tail"), list) else [])
            line = clean_line(msg.get("line", ""))
            if msg.get("diverged") is True:
                line = line or "training diverged"
            where = f"rank {rank}: " if len(w.chans) > 1 else ""
            raise Outcome("crash", where + (line or "train.py failed"), tail)
        elif op == "artifact" and rank == 0:
            size = msg.get("size")
            if not isinstance(size, int) or not 0 < size <= max_bytes:
                raise Outcome("crash", f"the trained model's artifact has {size!r} bytes (at most {max_bytes})")
            end = max(trained.values()) if trained else now
            clock = clock if clock is not None else min(end, latest_start)
            res.training_seconds = round(end - clock, 3)
            told["counted_tokens"] = counted
            if end - clock > budget_s + overrun_s(budget_s):
                raise Outcome("refused", f"trained {end - clock:.1f} s on a {budget_s:g} s budget (the last step "
                                         f"may end {overrun_s(budget_s):.1f} s late)")
            with open(artifact, "wb") as f:
                try:
                    chan.recv_to_file(f, size, deadline)
                except ProtocolError as e:
                    raise Outcome("timeout" if time.monotonic() >= deadline else "crash",
                                  f"the trained model's artifact did not arrive ({e})") from None
            told["export_s"] = round(time.monotonic() - trained.get(0, now), 3)
            told["start_s"] = round(clock - t_job, 3)
            return told
        else:
            raise Outcome("crash", f"the worker broke the harness protocol (unexpected message {str(op)[:40]!r})")


def _score(s: Process, job: dict, limit_s: float) -> dict:
    """Ask the scorer to score the artifact; its answer. Raises Outcome (refused, crash, or over the limit)."""
    try:
        s.chan.send(job)
        got = s.chan.recv(timeout=limit_s)
    except (EOFError, ProtocolError, OSError) as e:
        raise Outcome("crash", f"the scorer died ({e})") from None
    if got is None:
        raise Outcome("refused", f"scoring took longer than {limit_s:.0f} s")
    msg = got[0]
    if msg.get("op") == "scored":
        return msg
    status = "refused" if msg.get("op") == "refused" else "crash"
    raise Outcome(status, str(msg.get("reason", "the scorer failed"))[:300])


def mfu_percent(flops_per_token: float, tokens: int, seconds: float, device_name: str) -> Optional[float]:
    """Model FLOPs utilisation: flops/token × counted tokens ÷ (seconds × peak bf16 FLOP/s of the GPU model).
    None off CUDA or on an unknown GPU."""
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)
    gpus = int(device_name.rsplit(" x", 1)[1]) if " x" in device_name and device_name.rsplit(" x", 1)[1].isdigit() \
        else 1
    if peak is None or seconds <= 0:
        return None
    return 100.0 * flops_per_token * tokens / (seconds * peak * max(1, gpus))


def peak_memory_mb(kind: str, told: dict, cgroup_peak: Optional[int]) -> float:
    """A result's peak memory, MiB: on CUDA the GPU memory rank 0's torch allocated at most (as the worker reports
    it: informational, nothing decides on it), else the most RAM the experiment's cgroup held; 0 when unknown."""
    if kind == "cuda":
        return round(float(told.get("peak_memory_mb") or 0.0), 1)
    return round(cgroup_peak / 2**20, 1) if cgroup_peak else 0.0


def run(*, script: Path, data_dir: Path, budget_s: float, out: Path, device: str = "auto", seed: int = 0,
        scale: dict | None = None, eval_tokens: int | None = None, seq_len: int | None = None,
        grace_s: float | None = None, curve: Path | None = None, warmup_steps: int | None = None,
        sandbox_cfg: Optional[sandbox.SandboxConfig] = None, started: float | None = None,
        launched: Optional[Launched] = None, nproc: int = 1) -> Result:
    """Train `script` for `budget_s` seconds in the sandbox, score it, and write `out` (result JSON).

    `started` (epoch seconds): when this run began, for `total_seconds` (default now). `launched`: the worker and
    scorer already started by launch() (a standby harness); else they are started here. `warmup_steps` overrides
    the warm-up batches (per rank). `nproc` > 1: data parallel over that many ranks (devices), each served its own
    batches; rank 0's model is scored. Never raises: the script's faults become `crash` (exception, divergence, a
    bad module, out of memory), `timeout` (no artifact by budget + grace) or `refused` (over budget, not causal, a
    graph the scorer does not run). Data problems (fingerprint mismatch) and a full disk are crashes with the reason.
    """
    t0 = time.time() if started is None else started
    script, data_dir, out = Path(script), Path(data_dir), Path(out)
    workdir = out.resolve().parent
    grace_s = default_grace_s(budget_s) if grace_s is None else grace_s
    res = Result(seed=seed)
    curve = curve or out.with_name(out.stem + ".curve.jsonl")
    artifact = workdir / "artifact" / "model.pt2"
    cfg = sandbox_cfg or sandbox.SandboxConfig()
    told: dict = {}
    try:
        res.disk_full = free_space(workdir)
        if res.disk_full:
            raise Outcome("crash", res.disk_full)
        try:
            manifest = tdata.verify_fingerprints(data_dir)  # refuse to train on data we could not score fairly
        except (tdata.FingerprintError, OSError, ValueError, KeyError) as e:
            raise Outcome("crash", str(e)) from None
        if launched is None:
            try:
                launched = launch(data_dir, workdir, device, cfg, nproc)
            except OSError as e:
                raise Outcome("crash", f"cannot start the sandbox: {e}") from None
        try:
            ready = launched.worker.wait_ready(READY_TIMEOUT_S)
        except RuntimeError as e:
            raise Outcome("crash", f"the sandboxed worker could not start: {e}") from None
        try:  # before the clock starts: its start-up must not take cores from training, nor fail after it
            launched.scorer.wait_ready(READY_TIMEOUT_S)
        except RuntimeError as e:
            raise Outcome("crash", f"the sandboxed scorer could not start: {e}") from None
        kind = str(ready.get("device", "cpu"))
        # the hardware class the rule compares within (loop/hardware.py): what trained, not what scored
        res.device, res.device_name = kind, clean_line(ready.get("device_name", ""), 120)
        T = seq_len or DEFAULT_SEQ_LEN.get(kind, 256)
        eval_batch = max(1, EVAL_BATCH_TOKENS.get(kind, 1 << 11) // T)
        warmup = WARMUP_BATCHES.get(kind, 0) if warmup_steps is None else warmup_steps
        try:
            shards = tdata.train_tokens(data_dir, manifest)
            batches = [Batches(shards, T, seed if r == 0 else [seed, r]) for r in range(launched.nproc)]
        except ValueError as e:
            raise Outcome("crash", str(e)) from None
        job = {"op": "job", "source": script.read_text(), "seq_len": T, "vocab_size": int(manifest["vocab_size"]),
               "budget_s": float(budget_s), "seed": seed, "scale": scale or {}, "eval_batch": eval_batch,
               "warmup_batches": warmup, "start_allowance_s": START_ALLOWANCE_S.get(kind, 30.0),
               "world_size": launched.nproc, "master_port": _free_port()}
        artifact.unlink(missing_ok=True)
        with open(curve, "w", buffering=1) as cf:
            told = _train(launched.worker, job, batches, res, artifact, cf, budget_s=budget_s, grace_s=grace_s,
                          warmup=warmup, start_allowance=job["start_allowance_s"],
                          max_bytes=int(cfg.max_file_gb * sandbox.GIB))
        launched.worker.close()  # nothing of it may run while the artifact is read
        (workdir / TRAINING_DONE).touch()
        res.steps = int(told.get("steps", 0))
        res.epochs = round(res.tokens / max(1, int(manifest["tokens"]["train"])), 3)
        tdata.verify_fingerprints(data_dir, manifest)  # again: nothing changed them while training ran
        scored = _score(launched.scorer, {"op": "score", "artifact": launched.artifact, "seq_len": T,
                                          "vocab_size": job["vocab_size"], "eval_batch": eval_batch,
                                          "eval_tokens": eval_tokens or DEFAULT_EVAL_TOKENS.get(kind, 1 << 14)},
                        score_limit_s(budget_s))
        res.val_bpb = float(scored["val_bpb"])
        res.params = int(scored.get("params", 0))
        if not math.isfinite(res.val_bpb):
            raise Outcome("crash", f"val_bpb is {res.val_bpb} (the model's logits are not finite)")
        flops = told.get("flops_per_token") or 6 * res.params
        res.mfu_percent = mfu_percent(flops, told.get("counted_tokens", 0), res.training_seconds,
                                      res.device_name) if kind == "cuda" else None
        res.timings.update(start_s=told.get("start_s"), export_s=told.get("export_s"), load_s=scored.get("load_s"),
                           score_s=scored.get("score_s"))
        res.status = "ok"
    except Outcome as o:
        res.status, res.error, res.log_tail, res.val_bpb = o.status, o.reason, o.tail, None
        if launched is not None and o.status == "crash" and not o.reason:
            res.error = why_it_died(launched)
        if res.status == "crash" and not res.disk_full:
            res.disk_full = free_space(workdir)
    except OSError as e:  # the parent's own writes (curve, artifact) on a full disk, or its own failure
        res.status, res.val_bpb = "crash", None
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            res.disk_full = f"disk full: {workdir}: {e.strerror}"
            res.error = res.disk_full
        else:
            res.error = f"harness error: {type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - the parent's own failure still writes a result
        res.status, res.error, res.val_bpb = "crash", f"harness error: {type(e).__name__}: {e}", None
    finally:
        if launched is not None:
            res.peak_memory_mb = peak_memory_mb(res.device, told, launched.cgroup.peak_bytes())
            launched.close()
        artifact.unlink(missing_ok=True)
        res.total_seconds = round(time.time() - t0, 3)
        res.write(out)
    return res


def _free_port() -> int:
    """A TCP port free on this host's loopback, for torch.distributed's rendezvous (in the sandbox's own network
    namespace any port would do; without the sandbox it must not clash)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def why_it_died(launched: Launched) -> str:
    """The parent's own explanation of a worker that ended without a message: the OOM killer, or its exit."""
    if launched.cgroup.oom_killed():
        return f"out of memory (limit {sandbox.gib(launched.cgroup.memory_bytes)} GiB for the experiment)"
    code = launched.worker.proc.poll()
    if code is None:
        try:
            code = launched.worker.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = None
    if code is not None and (code < 0 or code > 128):
        sig = -code if code < 0 else code - 128
        return f"the worker was killed by signal {sig}"
    return f"the worker exited (code {code}) without handing back a model"


def remove_tree(path: Path) -> None:
    """Delete a run directory (the worker never wrote to it: nothing planted to follow)."""
    shutil.rmtree(path, ignore_errors=True)
