"""The untrusted worker: runs a proposal's `train(ctx)` inside the sandbox and hands back an artifact.

    python -m trainer.worker --fds N[,M…] --device auto      (started by trainer.harness, never by hand)

Nothing this process says is trusted: the parent owns the clock, the data and the score. The worker only gets
training batches from the parent (it sees no data files), runs the script, and sends the trained model back as a
`torch.export` program (no executable Python) over the channel. Protocol, one JSON line each way
(trainer/wire.py): it says `ready`, gets a `job` (the script and the run's settings), then sends `train`,
`batch` requests (answered with tokens and the parent's clock), `log` lines, `trained`, and finally the
`artifact` bytes, or an `error` line.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator

import numpy as np

from trainer.wire import Channel

MAX_LOSS = 100.0  # a loss above this is divergence, not learning


class TrainingDiverged(RuntimeError):
    """Raised by ctx.log on NaN / inf or a loss above MAX_LOSS; the run is a crash."""


class HarnessError(RuntimeError):
    """The script broke the contract (no train(ctx), a bad return value, a model that cannot be exported)."""


def pick_device(name: str = "auto"):
    """`auto` → cuda if available, else mps, else cpu; anything else is passed to torch.device."""
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_name(device, gpus: int = 1) -> str:
    """The hardware a result was measured on, its hardware class: `NVIDIA H100 80GB HBM3 x1` (the GPU model and
    the number of GPUs the run trains on, `gpus`), or the CPU model on CPU (`AMD EPYC 7B13`)."""
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x{gpus}"
    return cpu_model()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (`model name`), else platform.processor(), else `CPU`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() or "CPU"
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


# ---- The context given to train(ctx) ----


class Context:
    """What `train(ctx)` may use. See DESIGN.md "The harness contract".

    Attributes: device (torch.device), seq_len (int), vocab_size (int), budget_s (seconds), seed (int),
    scale (dict of overrides, e.g. {"depth": 12}), logger (logging.Logger), rank and world_size (0 and 1 on one
    device; with several, each rank gets its own batches and `data_parallel(model)` averages gradients).
    The clock is the parent's: these methods only mirror it, the parent enforces it.
    """

    def __init__(self, chan: Channel, job: dict, device, rank: int = 0):
        self._chan = chan
        self.device = device
        self.seq_len = int(job["seq_len"])
        self.vocab_size = int(job["vocab_size"])
        self.budget_s = float(job["budget_s"])
        self.seed = int(job["seed"])
        self.scale = dict(job.get("scale") or {})
        self.rank, self.world_size = rank, int(job.get("world_size", 1))
        self.logger = logging.getLogger("train")
        self._warmup = int(job.get("warmup_batches", 0))
        self._latest_start = time.monotonic() + float(job.get("start_allowance_s", 30.0))
        self._t0: float | None = None  # when the parent's clock started, on this process's monotonic clock
        self._batches = 0
        self.tokens = 0
        self.steps = 0

    def _clock_start(self) -> float:
        t0 = self._t0 if self._t0 is not None else self._latest_start
        return min(t0, self._latest_start)

    # time
    def training_seconds(self) -> float:
        """Counted training time so far, seconds (0 before the clock starts)."""
        return max(0.0, time.monotonic() - self._clock_start())

    def time_left(self) -> float:
        """Seconds of budget left (≥ 0)."""
        return max(0.0, self.budget_s - self.training_seconds())

    def should_stop(self) -> bool:
        """True once the counted training time reaches the budget. With several ranks every rank gets the same
        answer (any rank past the budget stops them all), so data-parallel steps stay in lockstep: call it once
        per step on every rank."""
        stop = self.training_seconds() >= self.budget_s
        if self.world_size > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([float(stop)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def data_parallel(self, model):
        """`model` wrapped for data-parallel training across the ranks (DistributedDataParallel: gradients are
        averaged over ranks in backward), or `model` itself on one device. Train through the wrapper; return the
        module itself from train(ctx)."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def progress(self) -> float:
        """Fraction of the budget used, in [0, 1]; for time-based LR schedules."""
        return min(1.0, self.training_seconds() / self.budget_s) if self.budget_s > 0 else 1.0

    def _started(self) -> None:
        if self._t0 is None:
            self._t0 = time.monotonic()

    # data
    def train_batches(self, batch_size: int) -> Iterator[tuple]:
        """(x, y) pairs, int64 [batch_size, seq_len] on ctx.device; y is x shifted by one. Random windows of the
        train split, seeded by ctx.seed, served by the parent; the iterator ends when the parent stops serving
        (the budget and its allowance are spent)."""
        import torch

        batch_size = int(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        pin = self.device.type == "cuda"
        while True:
            self._chan.send({"op": "batch", "n": batch_size})
            got = self._chan.recv(max_payload=1 << 31)
            if got is None:
                return
            head, payload = got
            if head.get("stop"):
                return
            if self._batches == self._warmup:
                self._started()
            self._batches += 1
            win = torch.from_numpy(np.frombuffer(payload, dtype=np.uint16).reshape(batch_size, -1)
                                   .astype(np.int64))
            if pin:
                win = win.pin_memory()
            win = win.to(self.device, non_blocking=True)
            self.tokens += batch_size * self.seq_len
            yield win[:, :-1], win[:, 1:]

    # curve
    def log(self, step: int, loss) -> None:
        """Record the training loss at `step` (call every step). Raises TrainingDiverged on NaN/inf/>100."""
        import torch

        value = float(loss.detach().float().item() if torch.is_tensor(loss) else loss)
        self.steps = max(self.steps, int(step))
        self._chan.send({"op": "log", "step": int(step), "loss": value if math.isfinite(value) else str(value)})
        if not math.isfinite(value) or value > MAX_LOSS:
            raise TrainingDiverged(f"training loss {value} at step {step} (NaN/inf or > {MAX_LOSS:g})")


# ---- Warm-up, training, export ----


def warm_up(device, export: bool = True) -> None:
    """Load what torch loads lazily on a model's first step (autograd, the optimizers), on a toy model, before the
    job arrives, so no run's budget pays for it; with `export`, also the first export's tracer (dynamo): a standby
    worker pays that while idle instead of after training."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    model = nn.Sequential(nn.Embedding(8, 8), nn.Linear(8, 8)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.zeros(2, 4, dtype=torch.long, device=device)
    F.cross_entropy(model(x).view(-1, 8), x.view(-1)).backward()
    opt.step()
    if export:
        model.eval()
        torch.export.export(model, (x,), strict=False)


def load_script(path: Path):
    """Import a train.py as a fresh module named `train_script`. Raises whatever the script raises."""
    spec = importlib.util.spec_from_file_location("train_script", path)
    if spec is None or spec.loader is None:
        raise HarnessError(f"cannot import {path.name}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "train", None)):
        raise HarnessError(f"{path.name} defines no train(ctx)")
    return module


def export(model, job: dict, device) -> bytes:
    """The trained module as a saved `torch.export` program for input [eval_batch, seq_len] int64, bytes.

    A torch.compile wrapper is unwrapped (the CUDA path exports the uncompiled module). Raises HarnessError
    when the module cannot be exported (Python control flow on tensor values, unsupported ops).
    """
    import io

    import torch
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        raise HarnessError(f"train(ctx) returned {type(model).__name__}, expected a torch.nn.Module")
    model = getattr(model, "_orig_mod", model)
    model.eval()
    example = torch.zeros(int(job["eval_batch"]), int(job["seq_len"]), dtype=torch.long, device=device)
    try:
        program = torch.export.export(model, (example,), strict=False)
    except Exception as e:  # noqa: BLE001 - any export failure is the model's
        raise HarnessError(f"the trained model cannot be exported with torch.export "
                           f"({type(e).__name__}: {_first(str(e))})") from None
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def _first(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def _one_line(e: BaseException) -> str:
    """`Type: message (train.py:LINE)` using the innermost frame inside the script, if any; resource limits
    as what they are."""
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, OSError) and e.errno == errno.EFBIG:
        return "train.py wrote a file larger than the sandbox allows"
    if isinstance(e, OSError) and e.errno == errno.EMFILE:
        return "train.py opened too many files"
    where = ""
    for fs in reversed(traceback.extract_tb(e.__traceback__)):
        if Path(fs.filename).name == "train.py":
            where = f" (train.py:{fs.lineno})"
            break
    msg = _first(str(e))
    return f"{type(e).__name__}: {msg}{where}" if msg else f"{type(e).__name__}{where}"


def _start_ranks(a: argparse.Namespace) -> list:
    """Rank 0 of a multi-process run starts ranks 1..N-1 here, in the same sandbox (they share its loopback for
    torch.distributed), each on its own channel to the parent."""
    import subprocess

    procs = []
    for rank, fd in enumerate(a.fds[1:], start=1):
        procs.append(subprocess.Popen([sys.executable, "-s", "-P", "-m", "trainer.worker", "--fds", str(fd),
                                       "--rank", str(rank), "--device", a.device], pass_fds=(fd,)))
    return procs


def _init_distributed(job: dict, rank: int, device) -> None:
    """Join the run's process group (gloo on CPU, NCCL on CUDA) on the sandbox's own loopback."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["master_port"]), RANK=str(rank),
                      WORLD_SIZE=str(job["world_size"]), LOCAL_RANK=str(rank))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                           world_size=int(job["world_size"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.worker")
    ap.add_argument("--fds", type=lambda v: [int(x) for x in v.split(",")], required=True,
                    help="the channels to the parent (Unix sockets), one per rank; rank 0 starts the others")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warm-export", action="store_true", help="also warm up the export (a standby worker)")
    a = ap.parse_args(argv)
    chan = Channel.from_fd(a.fds[0])
    ranks = _start_ranks(a) if a.rank == 0 else []
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    import torch

    device = pick_device(a.device)
    if device.type == "cuda" and a.rank:
        device = torch.device("cuda", a.rank)
    warm_up(device, export=a.warm_export)
    chan.send({"op": "ready", "device": device.type, "device_name": device_name(device, gpus=len(a.fds))})
    got = chan.recv()
    if got is None or got[0].get("op") != "job":
        return 0  # released before a job
    job = got[0]
    script = Path(f"rank{a.rank}/train.py" if a.rank else "train.py")  # ranks share /job
    script.parent.mkdir(exist_ok=True)
    script.write_text(job["source"])
    torch.manual_seed(int(job["seed"]))
    np.random.seed(int(job["seed"]) % 2**32)
    ctx = Context(chan, job, device, a.rank)
    try:
        if ctx.world_size > 1:
            _init_distributed(job, a.rank, device)
        module = load_script(script)
        if ctx._warmup == 0:
            ctx._started()
        chan.send({"op": "train"})
        model = module.train(ctx)
        est = getattr(model, "estimate_flops", None)
        flops = est() if callable(est) else None
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        chan.send({"op": "trained", "steps": ctx.steps, "flops_per_token": flops if isinstance(flops, (int, float))
                   else None, "peak_memory_mb": peak})
        if a.rank == 0:  # one model is scored: rank 0's (data parallel ranks hold the same weights)
            blob = export(model, job, device)
            chan.send({"op": "artifact", "size": len(blob)})
            chan.sock.sendall(blob)
    except BaseException as e:  # noqa: BLE001 - every fault of the script becomes an error message
        tail = "".join(traceback.format_exception(e)).rstrip().splitlines()[-15:]
        try:
            chan.send({"op": "error", "line": _one_line(e), "tail": tail,
                       "diverged": isinstance(e, TrainingDiverged)})
        except OSError:
            pass
        return 1
    finally:
        for p in ranks:
            p.wait()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # tearing torch down adds most of a second
