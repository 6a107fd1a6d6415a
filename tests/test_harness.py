"""The harness on real text: budget, scoring, and every bad-input case ends in a clear status."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainer import data as tdata
from trainer.result import read_result

REPO = Path(__file__).resolve().parents[1]

BIGRAM = """
import torch, torch.nn as nn, torch.nn.functional as F
class Bigram(nn.Module):
    def __init__(self, V):
        super().__init__()
        self.emb = nn.Embedding(V, 32)
        self.head = nn.Linear(32, V)
    def forward(self, x):
        return self.head(self.emb(x))
def train(ctx):
    model = Bigram(ctx.vocab_size).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2)
    step = 0
    for x, y in ctx.train_batches(4):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(); loss.backward(); opt.step()
        ctx.log(step, loss); step += 1
        if ctx.should_stop():
            break
    {ret}
"""


def harness(tmp_path: Path, script: str, data_dir: Path, budget: float = 1.0, *extra: str):
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(script))
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "trainer.run", "--script", str(path), "--data", str(data_dir),
                           "--budget-s", str(budget), "--out", str(out), "--eval-tokens", "4096", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc, read_result(out)


def test_short_run_beats_an_untrained_model(tmp_path, data_dir):
    # Capped at 150 steps rather than a time budget, so a busy machine cannot change the result.
    script = BIGRAM.format(ret="return model").replace("if ctx.should_stop():", "if ctx.should_stop() or step >= 150:")
    proc, r = harness(tmp_path, script, data_dir, 120.0)
    assert proc.returncode == 0, proc.stderr
    m = tdata.load_manifest(data_dir)
    uniform_bpb = math.log2(m["vocab_size"]) * m["tokens"]["val"] / m["bytes"]["val"]  # an untrained model's
    assert r.status == "ok" and r.val_bpb < 0.75 * uniform_bpb
    assert r.steps == 149 and r.tokens == 150 * 4 * 256 and r.params > 0 and r.peak_memory_mb > 0
    assert r.epochs == round(r.tokens / m["tokens"]["train"], 3) and 0 < r.epochs < 1
    assert "val_bpb:" in proc.stdout and proc.stdout.splitlines()[0] == "---"
    curve = [json.loads(line) for line in (tmp_path / "result.curve.jsonl").read_text().splitlines()]
    assert len(curve) == r.steps + 1 and curve[-1]["loss"] < curve[0]["loss"]
    assert {"step", "elapsed_s", "loss"} <= set(curve[0])


def test_peak_memory_is_the_gpus_on_cuda_and_the_experiments_ram_elsewhere():
    from trainer.harness import peak_memory_mb

    # On CUDA the worker's torch.cuda.max_memory_allocated (an H200 run once reported 0: only the cgroup was read).
    assert peak_memory_mb("cuda", {"peak_memory_mb": 20480.44}, 3 << 30) == 20480.4
    assert peak_memory_mb("cuda", {}, 3 << 30) == 0.0  # unknown, not the host's RAM under the GPU's name
    assert peak_memory_mb("cpu", {"peak_memory_mb": 5.0}, 3 << 30) == 3072.0
    assert peak_memory_mb("cpu", {}, None) == 0.0


def test_the_budget_is_enforced_through_should_stop(tmp_path, data_dir):
    script = ("import time\nimport torch.nn as nn\n"
              "def train(ctx):\n    step = 0\n    while not ctx.should_stop():\n"
              "        ctx.log(step, 1.0)\n        step += 1\n        time.sleep(0.01)\n"
              "    return nn.Sequential(nn.Embedding(ctx.vocab_size, 8), nn.Linear(8, ctx.vocab_size))\n")
    _, r = harness(tmp_path, script, data_dir, 2.0)
    assert r.status == "ok" and 2.0 <= r.training_seconds < 2.5 and r.steps > 10


@pytest.mark.parametrize("ret, status, error, code", [
    ("raise ValueError('boom')", "crash", r"ValueError: boom \(train.py:\d+\)", 1),
    ("return 42", "crash", "returned int, expected a torch.nn.Module", 1),
    ("return nn.Sequential(model.emb, nn.Linear(32, 7))", "crash", r"logits of shape \(\d+, 256, 7\)", 1),
    ("return nn.Sequential(model.emb, type('Mix', (nn.Module,), {'forward': lambda s, h: h.cumsum(1).flip(1)})(), model.head)",
     "refused", "not causal", 5),
])
def test_bad_scripts_get_a_clear_status(tmp_path, data_dir, ret, status, error, code):
    import re

    proc, r = harness(tmp_path, BIGRAM.format(ret=ret), data_dir, 0.5)
    assert r.status == status and re.search(error, r.error), r.error
    assert "\n" not in r.error and r.val_bpb is None
    assert proc.returncode == code
    if ret.startswith("raise"):
        assert any("boom" in line for line in r.log_tail)


def test_divergence_fast_fails(tmp_path, data_dir):
    script = BIGRAM.format(ret="return model").replace("ctx.log(step, loss)", "ctx.log(step, loss * float('nan'))")
    _, r = harness(tmp_path, script, data_dir, 30.0)
    assert r.status == "crash" and "nan" in r.error.lower() and r.training_seconds < 10


def test_hang_past_budget_and_grace_is_a_timeout(tmp_path, data_dir):
    script = "import time\ndef train(ctx):\n    while True:\n        time.sleep(0.05)\n"
    proc, r = harness(tmp_path, script, data_dir, 0.5, "--grace-s", "4")
    assert proc.returncode == 3 and r.status == "timeout"
    assert "budget + grace" in r.error


@pytest.mark.parametrize("swallow", [False, True])
def test_validation_data_is_not_in_the_workers_view(tmp_path, data_dir, swallow):
    val = tdata.val_paths(data_dir, tdata.load_manifest(data_dir))[0]
    peek = f"open({str(val)!r}, 'rb').read(10)"
    if swallow:  # nothing to catch but a missing file: the run goes on, having read nothing
        peek = f"try:\n        {peek}\n    except OSError:\n        pass"
    script = BIGRAM.format(ret="return model").replace("    model = Bigram", f"    {peek}\n    model = Bigram")
    _, r = harness(tmp_path, script, data_dir, 0.5)
    if swallow:
        assert r.status == "ok", r.error
    else:
        assert r.status == "crash" and "FileNotFoundError" in r.error


def test_fingerprint_mismatch_refuses_to_score(tmp_path, data_dir):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    tok = copy / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"<|bos|>"', '"<|BOS|>"', 1))
    _, r = harness(tmp_path, BIGRAM.format(ret="return model"), copy, 0.5)
    assert r.status == "crash" and "fingerprint mismatch for tokenizer.json" in r.error


def test_two_ranks_train_data_parallel_and_are_scored_once(tmp_path, data_dir):
    """--nproc 2 on CPU: two worker processes in one sandbox (gloo), each served its own batches, gradients
    averaged by ctx.data_parallel, ctx.should_stop agreed across ranks; rank 0's model is scored.

    The script checks the ranks itself (an AssertionError makes the run a crash whose line names it), so `ok`
    proves them without depending on the sandbox's stdout."""
    check = (
        "    import torch.distributed as dist\n"
        "    seen = [None, None]\n"
        "    dist.all_gather_object(seen, (ctx.rank, ctx.world_size, step, float(model.head.weight.detach().sum())))\n"
        "    assert [s[:3] for s in seen] == [(0, 2, 20), (1, 2, 20)], f'ranks saw {{seen}}'\n"
        "    assert seen[0][3] == seen[1][3], f'weights differ across ranks: {{seen}}'\n")
    script = BIGRAM.replace(
        "    opt = torch.optim.AdamW", "    step_model = ctx.data_parallel(model)\n    opt = torch.optim.AdamW").replace(
        "loss = F.cross_entropy(model(x)", "loss = F.cross_entropy(step_model(x)").replace(
        "if ctx.should_stop():", "if ctx.should_stop() or step >= 20:").replace("    {ret}", check + "    {ret}")
    proc, r = harness(tmp_path, script.format(ret="return model"), data_dir, 60.0, "--nproc", "2",
                      "--device", "cpu")
    assert r.status == "ok", (r.error, proc.stderr[-2000:])
    assert r.tokens == 2 * 20 * 4 * 256 and r.steps == 19
