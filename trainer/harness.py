"""The fixed harness: runs a script's `train(ctx)`, enforces the time budget, and scores val_bpb.

Nothing here may be changed by a proposal; the score is computed only from the returned module's
logits, never from anything the script reports about itself.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import resource
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import data as tdata
from trainer.result import Result
from trainer.sandbox import ScriptGuard, contain_environment, limit_message

PROCESS_START = time.time()
# Steps before the clock starts, so compilation and allocator warm-up are free (autoresearch: 10).
# On CPU nothing is compiled: the clock runs from the call of train(ctx), building the model included.
WARMUP_STEPS = {"cuda": 10, "mps": 3, "cpu": 0}
MAX_LOSS = 100.0  # a loss above this is divergence, not learning
DEFAULT_SEQ_LEN = {"cuda": 2048, "mps": 512, "cpu": 256}
# Validation tokens scored by default (always the same first tokens of the split, so every experiment is scored on
# the same text). On a 2-core CPU the baseline's forward pass runs at ~6k tokens/s: 2^14 tokens take ~2.5 s of
# the loop's per-experiment overhead, 2^17 would take ~20 s.
DEFAULT_EVAL_TOKENS = {"cuda": 1 << 22, "mps": 1 << 18, "cpu": 1 << 14}
EVAL_BATCH_TOKENS = {"cuda": 1 << 18, "mps": 1 << 15, "cpu": 1 << 13}
# Dense bf16 peak FLOP/s by GPU name, from NVIDIA's data sheets (H100 SXM 989.5 TFLOP/s, as autoresearch).
PEAK_BF16_FLOPS = {"H200": 989.5e12, "H100": 989.5e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10G": 70e12, "4090": 165e12, "3090": 71e12}


class TrainingDiverged(RuntimeError):
    """Raised by ctx.log on NaN / inf or a loss above MAX_LOSS; the run is a crash."""


class HarnessError(RuntimeError):
    """The script broke the contract (bad return value, wrong logits shape, not causal, read val data)."""


def pick_device(name: str = "auto") -> torch.device:
    """`auto` → cuda if available, else mps, else cpu; anything else is passed to torch.device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ---- The validation fence ----


class ValFence:
    """An audit hook that refuses to open validation files while training code runs.

    Audit hooks cannot be removed, so the hook stays installed and is switched by `active`.
    A refused open is also remembered: a script that swallows the PermissionError still crashes.
    """

    def __init__(self, paths: list[Path]):
        self.dirs = {str(p.parent) for p in paths}
        self.paths = {str(p) for p in paths}
        self.active = False
        self.violation: str | None = None
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if not self.active or event != "open" or not args:
            return
        target = args[0]
        if isinstance(target, int) or target is None:
            return
        try:
            p = os.path.realpath(os.fsdecode(target))
        except (TypeError, ValueError):
            return
        if p in self.paths or os.path.dirname(p) in self.dirs:
            self.violation = p
            raise PermissionError(f"validation data is not readable by training code: {p}")


# ---- The context given to train(ctx) ----


class Context:
    """What `train(ctx)` may use. See DESIGN.md "The harness contract".

    Attributes: device (torch.device), seq_len (int), vocab_size (int), budget_s (seconds),
    seed (int), scale (dict of overrides, e.g. {"depth": 12}), logger (logging.Logger).
    """

    def __init__(self, *, device: torch.device, seq_len: int, vocab_size: int, budget_s: float, seed: int,
                 scale: dict, train_shards: list[np.ndarray], curve_path: Path | None,
                 warmup_steps: int = 1):
        self.device = device
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.budget_s = float(budget_s)
        self.seed = seed
        self.scale = dict(scale)
        self.logger = logging.getLogger("train")
        self._shards = [s for s in train_shards if len(s) > seq_len + 1]
        if not self._shards:
            raise HarnessError(f"no train shard is longer than seq_len={seq_len}")
        self._warmup_steps = warmup_steps
        self._t_train = time.time()  # reset when warm-up steps are done
        self._clock_started = warmup_steps <= 0
        self._tokens_at_clock = 0
        self.tokens = 0
        self.steps = 0
        self._curve = open(curve_path, "a", buffering=1) if curve_path else None

    # time
    def training_seconds(self) -> float:
        """Counted training time: since train() began, restarted once the warm-up steps are done."""
        return time.time() - self._t_train

    def time_left(self) -> float:
        """Seconds of budget left (≥ 0)."""
        return max(0.0, self.budget_s - self.training_seconds())

    def should_stop(self) -> bool:
        """True once the counted training time reaches the budget."""
        return self.training_seconds() >= self.budget_s

    def progress(self) -> float:
        """Fraction of the budget used, in [0, 1]; for time-based LR schedules."""
        return min(1.0, self.training_seconds() / self.budget_s) if self.budget_s > 0 else 1.0

    # data
    def train_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Infinite (x, y) pairs, int64 [batch_size, seq_len] on ctx.device; y is x shifted by one.

        Random windows from the train split only, seeded by ctx.seed.
        """
        rng = np.random.default_rng(self.seed)
        lengths = np.array([len(s) for s in self._shards], dtype=np.float64)
        weights = lengths / lengths.sum()
        T = self.seq_len
        ar = np.arange(T + 1)
        pin = self.device.type == "cuda"
        while True:
            shard = self._shards[rng.choice(len(self._shards), p=weights)] if len(self._shards) > 1 else self._shards[0]
            starts = rng.integers(0, len(shard) - T - 1, size=batch_size)
            win = torch.from_numpy(shard[starts[:, None] + ar].astype(np.int64))
            if pin:
                win = win.pin_memory()
            win = win.to(self.device, non_blocking=True)
            self.tokens += batch_size * T
            yield win[:, :-1], win[:, 1:]

    # curve
    def log(self, step: int, loss) -> None:
        """Record the training loss at `step` (call every step). Raises TrainingDiverged on NaN/inf/>100."""
        value = float(loss.detach().float().item() if torch.is_tensor(loss) else loss)
        self.steps = max(self.steps, int(step))
        if not self._clock_started and step >= self._warmup_steps:
            self._clock_started = True
            self._t_train = time.time()
            self._tokens_at_clock = self.tokens
        if self._curve:
            self._curve.write(json.dumps({"step": int(step), "elapsed_s": round(self.training_seconds(), 3),
                                          "loss": value if math.isfinite(value) else str(value)}) + "\n")
        if not math.isfinite(value) or value > MAX_LOSS:
            raise TrainingDiverged(f"training loss {value} at step {step} (NaN/inf or > {MAX_LOSS:g})")

    def counted_tokens(self) -> int:
        """Tokens consumed while the clock ran (for MFU)."""
        return self.tokens - self._tokens_at_clock

    def close(self) -> None:
        if self._curve:
            self._curve.close()


# ---- Checks and evaluation ----


def load_script(path: Path):
    """Import a train.py as a fresh module named `train_script`. Raises whatever the script raises."""
    spec = importlib.util.spec_from_file_location("train_script", path)
    if spec is None or spec.loader is None:
        raise HarnessError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "train", None)):
        raise HarnessError(f"{path.name} defines no train(ctx)")
    return module


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not torch.is_tensor(out) or tuple(out.shape) != (x.shape[0], x.shape[1], vocab_size):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise HarnessError(f"model returned logits of shape {shape}, expected [B, T, V] = "
                           f"{(x.shape[0], x.shape[1], vocab_size)}")
    return out.float()


def check_causal(model: nn.Module, vocab_size: int, seq_len: int, device: torch.device, seed: int = 0) -> None:
    """Changing tokens at positions ≥ k must not change logits at positions < k.

    Two random sequences sharing a prefix of length k = T/2; raises HarnessError when the prefix
    logits differ by more than a tolerance relative to their scale (bf16 kernels are not bitwise equal).
    """
    g = torch.Generator().manual_seed(seed)
    T = seq_len
    k = T // 2
    a = torch.randint(0, vocab_size, (2, T), generator=g)
    b = a.clone()
    b[:, k:] = torch.randint(0, vocab_size, (2, T - k), generator=g)
    la = _logits(model, a.to(device), vocab_size)[:, :k]
    lb = _logits(model, b.to(device), vocab_size)[:, :k]
    diff = (la - lb).abs().max().item()
    tol = 1e-2 * (1.0 + la.abs().max().item())
    if not diff <= tol:
        raise HarnessError(f"model is not causal: changing tokens ≥ {k} changed logits before {k} by {diff:.3g}")


@torch.no_grad()
def evaluate_bpb(model: nn.Module, tokens: np.ndarray, token_bytes: np.ndarray, *, seq_len: int,
                 vocab_size: int, device: torch.device, eval_tokens: int) -> float:
    """val_bpb = Σ cross-entropy (nats) ÷ (ln 2 × Σ UTF-8 bytes) over the first `eval_tokens` targets.

    Non-overlapping windows of seq_len; targets whose token has 0 bytes (BOS) are left out of both
    sums, as nanochat's evaluate_bpb does. Raises HarnessError on a bad logits shape.
    """
    n_windows = max(1, min(eval_tokens, len(tokens) - 1) // seq_len)
    if len(tokens) < seq_len + 1:
        raise HarnessError(f"validation split has {len(tokens)} tokens, fewer than seq_len+1")
    tb = torch.from_numpy(token_bytes.astype(np.int64)).to(device)
    batch = max(1, EVAL_BATCH_TOKENS.get(device.type, 1 << 14) // seq_len)
    total_nats, total_bytes = 0.0, 0
    ar = np.arange(seq_len + 1)
    for i in range(0, n_windows, batch):
        idx = np.arange(i, min(i + batch, n_windows))[:, None] * seq_len + ar
        win = torch.from_numpy(tokens[idx].astype(np.int64)).to(device)
        x, y = win[:, :-1], win[:, 1:]
        logits = _logits(model, x, vocab_size)
        nats = F.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1), reduction="none")
        nbytes = tb[y.reshape(-1)]
        mask = nbytes > 0
        total_nats += nats[mask].double().sum().item()
        total_bytes += int(nbytes.sum().item())
    if total_bytes == 0:
        raise HarnessError("validation targets hold no bytes")
    return total_nats / (math.log(2) * total_bytes)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated by torch; elsewhere: the process's peak RSS (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def mfu_percent(model: nn.Module, ctx: Context, device: torch.device) -> float | None:
    """Model FLOPs utilisation on CUDA: flops/token × counted tokens ÷ (seconds × peak bf16 FLOP/s).

    flops/token comes from `model.estimate_flops()` when the model offers it (nanochat's formula),
    else 6 × params (Kaplan et al. 2020). None off CUDA or on an unknown GPU.
    """
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    secs = ctx.training_seconds()
    if peak is None or secs <= 0:
        return None
    est = getattr(model, "estimate_flops", None)
    per_token = est() if callable(est) else 6 * sum(p.numel() for p in model.parameters())
    return 100.0 * per_token * ctx.counted_tokens() / (secs * peak)


# ---- One run ----


_WARM = False


def warm_up() -> None:
    """Load what torch loads lazily on a model's first step (autograd, the optimizers, dynamo's hooks: about
    1.3 s of CPU in torch 2.13) on a toy model, before any clock runs; once per process. Without it a cold
    harness would spend that inside the budget where a standby harness (trainer.run --standby) does not."""
    global _WARM
    if _WARM:
        return
    model = nn.Sequential(nn.Embedding(8, 8), nn.Linear(8, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = F.cross_entropy(model(torch.zeros(2, 4, dtype=torch.long)).view(-1, 8), torch.zeros(8, dtype=torch.long))
    loss.backward()
    opt.step()
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    _WARM = True


def _one_line(e: BaseException, script: Path) -> str:
    """`Type: message (train.py:LINE)` using the innermost frame inside the script, if any."""
    where = ""
    for fs in reversed(traceback.extract_tb(e.__traceback__)):
        if Path(fs.filename).name == script.name:
            where = f" ({script.name}:{fs.lineno})"
            break
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}{where}" if msg else f"{type(e).__name__}{where}"


def _stack_tail(thread_id: int, n: int = 12) -> list[str]:
    frame = sys._current_frames().get(thread_id)
    lines = "".join(traceback.format_stack(frame)).rstrip().splitlines() if frame else []
    return lines[-n:]


def run(*, script: Path, data_dir: Path, budget_s: float, out: Path, device: str = "auto", seed: int = 0,
        scale: dict | None = None, eval_tokens: int | None = None, seq_len: int | None = None,
        grace_s: float | None = None, curve: Path | None = None, warmup_steps: int | None = None,
        started: float | None = None) -> Result:
    """Train `script` for `budget_s` seconds, score it and write `out` (result JSON). Returns the Result.

    `started` (epoch seconds) is when this run began, for the watchdog and `total_seconds`: the process start by
    default, the moment the job arrived for a standby harness (trainer.run --standby).

    Never raises: the script's faults become status `crash` (exception, bad module, divergence,
    reading validation data, hitting a resource limit, or what trainer.sandbox.ScriptGuard refuses: network,
    processes, native code, writes outside `out`'s directory) or `timeout` (still running at budget + grace
    seconds from process start: the watchdog writes the result and exits the process with code 3). Data
    problems (missing preparation, fingerprint mismatch) are crashes too, with the reason in `error`.
    """
    script, data_dir, out = Path(script).resolve(), Path(data_dir), Path(out)
    workdir = out.resolve().parent  # the experiment's own directory: the only place its code may write
    scratch = contain_environment(workdir)
    guard = ScriptGuard(workdir, script.name)
    dev = pick_device(device)
    grace_s = 60.0 + 0.5 * budget_s if grace_s is None else grace_s
    res = Result(device=str(dev), seed=seed)
    curve = curve or out.with_name(out.stem + ".curve.jsonl")
    curve.write_text("")
    main_thread = threading.get_ident()
    finished = threading.Event()
    write_lock = threading.Lock()
    ctx: Context | None = None
    t0 = PROCESS_START if started is None else started

    def finish(r: Result) -> None:
        guard.active = False  # the harness's own writes
        with write_lock:
            if finished.is_set():
                return
            r.total_seconds = round(time.time() - t0, 3)
            r.peak_memory_mb = round(peak_memory_mb(dev), 1)
            if ctx is not None:
                r.tokens, r.steps = ctx.tokens, ctx.steps
                r.training_seconds = r.training_seconds or round(ctx.training_seconds(), 3)
            r.write(out)
            for d in scratch:
                shutil.rmtree(d, ignore_errors=True)
            finished.set()

    def watchdog() -> None:
        limit = budget_s + grace_s
        remaining = limit - (time.time() - t0)
        if finished.wait(max(0.0, remaining)):
            return
        res.status, res.error = "timeout", f"still running after budget + grace ({limit:.0f} s)"
        res.log_tail = _stack_tail(main_thread)
        finish(res)
        sys.stderr.write(f"harness: {res.error}; killed\n")
        sys.stderr.flush()
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True, name="harness-watchdog").start()
    try:
        manifest = tdata.verify_fingerprints(data_dir)  # refuse to train on data we could not score fairly
        vocab = int(manifest["vocab_size"])
        seq_len = seq_len or DEFAULT_SEQ_LEN.get(dev.type, 256)
        fence = ValFence(tdata.val_paths(data_dir, manifest))
        warm_up()
        torch.manual_seed(seed)
        np.random.seed(seed)
        ctx = Context(device=dev, seq_len=seq_len, vocab_size=vocab, budget_s=budget_s, seed=seed,
                      scale=scale or {}, train_shards=tdata.train_tokens(data_dir, manifest),
                      curve_path=curve,
                      warmup_steps=WARMUP_STEPS.get(dev.type, 1) if warmup_steps is None else warmup_steps)
        fence.active = True
        guard.active = True  # until the score is in: evaluation runs the script's forward() too
        try:
            module = load_script(script)
            model = module.train(ctx)
        finally:
            fence.active = False
            ctx.close()
        res.training_seconds = round(ctx.training_seconds(), 3)
        if fence.violation:
            raise HarnessError(f"train.py tried to read validation data ({Path(fence.violation).name})")
        if guard.violation:
            raise HarnessError(guard.violation)
        if not isinstance(model, nn.Module):
            raise HarnessError(f"train(ctx) returned {type(model).__name__}, expected a torch.nn.Module")
        model.eval()
        res.params = sum(p.numel() for p in model.parameters())
        res.mfu_percent = mfu_percent(model, ctx, dev)
        tdata.verify_fingerprints(data_dir, manifest)  # again: nothing changed them while training ran
        check_causal(model, vocab, seq_len, dev, seed)
        res.val_bpb = evaluate_bpb(model, tdata.val_tokens(data_dir, manifest),
                                   np.load(Path(data_dir) / "token_bytes.npy"), seq_len=seq_len,
                                   vocab_size=vocab, device=dev,
                                   eval_tokens=eval_tokens or DEFAULT_EVAL_TOKENS.get(dev.type, 1 << 17))
        guard.active = False
        if guard.violation:
            raise HarnessError(guard.violation)
        if not math.isfinite(res.val_bpb):
            raise TrainingDiverged(f"val_bpb is {res.val_bpb}")
        res.status = "ok"
    except BaseException as e:  # noqa: BLE001 - every fault of the script must become a result
        guard.active = False
        module = model = None  # noqa: F841 - after a MemoryError, free what the script holds before reporting
        traceback.clear_frames(e.__traceback__)
        limit = limit_message(e, script.name)
        if guard.violation:
            res.error = guard.violation
        elif isinstance(e, KeyboardInterrupt):
            res.error = "interrupted"
        elif limit:
            res.error = limit
        else:
            res.error = _one_line(e, script)
        res.status = "crash"
        res.val_bpb = None
        res.log_tail = traceback.format_exception(e)[-1:] if isinstance(e, HarnessError) else \
            "".join(traceback.format_exception(e)).rstrip().splitlines()[-15:]
    finish(res)
    return res
