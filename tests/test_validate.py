"""Tests for loop.validate: each rejection reason, a passing proposal, AST hashing, apply_edits."""

import pytest

from loop.validate import (
    EditError,
    apply_edits,
    normalised_ast_hash,
    parse,
    validate_proposal,
)

# A small but realistic train.py in the template's shape (never executed here).
TRAIN_PY = '''"""Tiny GPT trained by the harness: train(ctx) -> nn.Module mapping [B, T] ids to [B, T, V] logits."""

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- Hyperparameters ----
MATRIX_LR = 0.02        # AdamW learning rate for weight matrices
EMBED_LR = 0.006        # learning rate for the embedding and head
WEIGHT_DECAY = 0.1
WARMUP_STEPS = 10       # linear warmup from 0
DEPTH_CPU = 4           # layers when training on CPU
DEPTH_CUDA = 8          # layers on a GPU
WIDTH = 96              # model dimension
BATCH_SIZE_CPU = 32
BATCH_SIZE_CUDA = 64
USE_QK_NORM = True      # normalise q and k before attention
OPTIMIZER = "adamw"     # one of: "adamw", "muon", "sgd"
ATTN_BIAS_INIT = -2.0   # initial attention logit bias
SEED_OFFSET = 0         # bookkeeping, never tuned
LABEL = "tiny"          # free text, not an option list


# ---- GPT Model ----

@dataclass
class GPTConfig:
    vocab_size: int
    seq_len: int
    depth: int
    width: int


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        q, k, v = self.qkv(norm(x)).chunk(3, dim=-1)
        if USE_QK_NORM:
            q, k = norm(q), norm(k)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.blocks = nn.ModuleList(Block(config.width) for _ in range(config.depth))
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(norm(x))


# ---- Training loop ----

def get_lr_multiplier(step):
    return min(1.0, (step + 1) / WARMUP_STEPS)


def train(ctx):
    on_gpu = str(ctx.device).startswith("cuda")
    depth = DEPTH_CUDA if on_gpu else DEPTH_CPU
    batch_size = BATCH_SIZE_CUDA if on_gpu else BATCH_SIZE_CPU
    model = GPT(GPTConfig(ctx.vocab_size, ctx.seq_len, depth, WIDTH)).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=MATRIX_LR, weight_decay=WEIGHT_DECAY)
    t0 = time.time()
    for step, (x, y) in enumerate(ctx.train_batches(batch_size)):
        if ctx.should_stop():
            break
        for group in opt.param_groups:
            group["lr"] = MATRIX_LR * get_lr_multiplier(step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ctx.log(step, loss.item())
    ctx.logger.info("trained for %.1fs, %.2f nats", time.time() - t0, math.log(ctx.vocab_size))
    return model
'''


def with_line(after: str, line: str) -> str:
    """TRAIN_PY with `line` inserted right after the first line containing `after`."""
    head, sep, tail = TRAIN_PY.partition(after)
    assert sep, after
    end = tail.index("\n") + 1
    return head + sep + tail[:end] + line + "\n" + tail[end:]


def in_train(line: str) -> str:
    """TRAIN_PY with `line` as the first statement of train(ctx)."""
    return with_line("def train(ctx):", "    " + line)


def check(new_source: str, **kwargs):
    return validate_proposal(TRAIN_PY, {"train.py": new_source}, **kwargs)


EDITED = TRAIN_PY.replace("MATRIX_LR = 0.02 ", "MATRIX_LR = 0.03 ")


# ---- passing ----

def test_valid_edit_passes_with_hash_and_diff():
    verdict = check(EDITED)
    assert verdict.ok, verdict.reason
    assert verdict.reason == ""
    assert verdict.ast_hash == normalised_ast_hash(EDITED)
    assert len(verdict.ast_hash) == 64
    assert verdict.diff.startswith("--- a/train.py\n+++ b/train.py\n")
    assert "-MATRIX_LR = 0.02 " in verdict.diff
    assert "+MATRIX_LR = 0.03 " in verdict.diff


def test_parameter_named_like_a_builtin_is_allowed():
    source = TRAIN_PY.replace("    def forward(self, idx):", "    def forward(self, input):") \
        .replace("        x = self.embed(idx)", "        x = self.embed(input)")
    assert check(source).ok, check(source).reason
    # outside the function that binds it, `input` is the builtin again
    assert "`input`" in check(in_train("x = input()")).reason


def test_private_torch_config_is_allowed():
    source = with_line("import torch.nn.functional as F", "torch._dynamo.config.cache_size_limit = 64")
    assert check(source).ok, check(source).reason


# ---- 1. only train.py ----

def test_other_file_rejected():
    verdict = validate_proposal(TRAIN_PY, {"train.py": EDITED, "prepare.py": "x = 1\n"})
    assert not verdict.ok
    assert verdict.reason == "only train.py may change, got: prepare.py"


def test_missing_train_py_rejected():
    verdict = validate_proposal(TRAIN_PY, {})
    assert not verdict.ok and "train.py" in verdict.reason


# ---- 2. parses ----

def test_syntax_error_reports_line():
    broken = TRAIN_PY.replace("def get_lr_multiplier(step):", "def get_lr_multiplier(step)")
    line = broken.splitlines().index("def get_lr_multiplier(step)") + 1
    verdict = check(broken)
    assert not verdict.ok
    assert verdict.reason.startswith(f"does not parse: line {line}: ")
    assert verdict.ast_hash == ""
    assert verdict.diff  # the diff is still there to show the proposer


# ---- 3. defines train(ctx) ----

def test_missing_train_rejected():
    verdict = check(TRAIN_PY.replace("def train(ctx):", "def fit(ctx):"))
    assert verdict.reason == "no module-level `def train(ctx)`"


def test_nested_train_does_not_count():
    source = TRAIN_PY.replace("def train(ctx):", "def fit(ctx):") + "\n\nclass T:\n    def train(self, ctx):\n        pass\n"
    assert check(source).reason == "no module-level `def train(ctx)`"


def test_train_without_argument_rejected():
    source = TRAIN_PY.replace("def train(ctx):", "def train():")
    assert check(source).reason == "`train` must take at least one argument (ctx)"


def test_train_with_required_extra_argument_rejected():
    source = TRAIN_PY.replace("def train(ctx):", "def train(ctx, steps):")
    assert "`steps` has no default" in check(source).reason
    assert check(TRAIN_PY.replace("def train(ctx):", "def train(ctx, steps=10):")).ok


# ---- 4. forbidden ----

def lineno(source: str, text: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if text in line)


@pytest.mark.parametrize("line, what", [
    ("import os", "`os` import"),
    ("import os.path as osp", "`os` import"),
    ("from subprocess import run", "`subprocess` import"),
    ("from urllib.request import urlopen", "`urllib` import"),
    ("import importlib", "`importlib` import"),
    ("import socket, math", "`socket` import"),
    ("from trainer import harness", "`trainer` import"),
    ("from . import harness", "relative import"),
    ("from torch import *", "`from torch import *`"),
    ("from torch import hub", "`torch.hub` import"),
    ("import torch.distributed as dist", "`torch.distributed` import"),
    ("from torch.utils import cpp_extension", "`torch.utils.cpp_extension` import"),
    ("from numpy import load", "`numpy.load` import"),
])
def test_forbidden_imports(line, what):
    source = with_line("from dataclasses import dataclass", line)
    verdict = check(source)
    assert not verdict.ok
    assert verdict.reason == f"forbidden: {what} at line {lineno(source, line)}"
    assert verdict.ast_hash  # it parses, so the hash is known


@pytest.mark.parametrize("line, what", [
    ("data = open('/etc/passwd').read()", "`open`"),
    ("eval('1 + 1')", "`eval`"),
    ("exec('x = 1')", "`exec`"),
    ("code = compile('1', 'f', 'eval')", "`compile`"),
    ("m = __import__('os')", "`__import__`"),
    ("g = globals()", "`globals`"),
    ("v = vars(ctx)", "`vars`"),
    ("breakpoint()", "`breakpoint`"),
    ("quit()", "`quit`"),
    ("f = eval", "`eval`"),
    ("b = getattr(ctx, '__class__')", "`getattr` of '__class__'"),
    ("setattr(ctx, '__dict__', {})", "`setattr` of '__dict__'"),
    ("b = __builtins__", "`__builtins__`"),
    ("g = train.__globals__", "`__globals__` access"),
    ("s = ().__class__.__bases__[0].__subclasses__()", "`__class__` access"),
    ("c = get_lr_multiplier.__code__", "`__code__` access"),
    ("d = ctx.__dict__", "`__dict__` access"),
    ("torch.save(ctx, 'x.pt')", "`torch.save`"),
    ("state = torch.load('x.pt')", "`torch.load`"),
    ("m = torch.hub.load('a', 'b')", "`torch.hub`"),
    ("torch.ops.load_library('x.so')", "`torch.ops.load_library`"),
    ("torch.multiprocessing.spawn(print)", "`torch.multiprocessing`"),
    ("torch.distributed.init_process_group('nccl')", "`torch.distributed`"),
    ("t = torch.from_file('x.bin')", "`torch.from_file`"),
    ("torch.zeros(3).numpy().tofile('x.bin')", "`.tofile`"),
    ("r = random._os.system('ls')", "`._os` access"),
    ("r = torch.os.getcwd()", "`.os` access"),
    ("r = getattr(torch, 'os')", "`.os` access"),
])
def test_forbidden_calls_and_attributes(line, what):
    source = in_train(line)
    verdict = check(source)
    assert not verdict.ok
    assert verdict.reason == f"forbidden: {what} at line {lineno(source, line)}"


@pytest.mark.parametrize("line, what", [
    ("import numpy as np", None),
    ("x = np.load('a.npy')", "`numpy.load`"),
    ("np.save('a.npy', x)", "`numpy.save`"),
    ("y = np.fromfile('a.bin')", "`numpy.fromfile`"),
])
def test_numpy_file_access(line, what):
    source = with_line("import torch.nn.functional as F", "import numpy as np")
    if what is None:
        assert check(source).ok
        return
    source = source.replace("def train(ctx):\n", f"def train(ctx):\n    {line}\n")
    assert check(source).reason == f"forbidden: {what} at line {lineno(source, line)}"


def test_first_offence_by_line_is_reported():
    source = with_line("from dataclasses import dataclass", "import os")
    source = source.replace("def train(ctx):\n", "def train(ctx):\n    eval('1')\n")
    assert check(source).reason == f"forbidden: `os` import at line {lineno(source, 'import os')}"


def test_allowed_imports_pass():
    source = with_line("from dataclasses import dataclass",
                       "import functools, itertools, typing, collections, random, contextlib, enum")
    assert check(source).ok, check(source).reason


# ---- 5. diff size ----

def test_diff_size_cap():
    padding = "".join(f"PAD_{i} = {i}\n" for i in range(30))
    source = TRAIN_PY.replace("# ---- GPT Model ----", padding + "# ---- GPT Model ----")
    assert check(source).ok
    verdict = check(source, max_diff_lines=20)
    assert not verdict.ok
    assert verdict.reason == "diff too large: 30 changed lines (max 20)"


# ---- 6. no-op ----

def test_identical_source_is_no_change():
    assert check(TRAIN_PY).reason == "no change"


def test_comment_only_change_is_no_change():
    source = TRAIN_PY.replace("# AdamW learning rate", "# learning rate")
    assert "no change" in check(source).reason


# ---- 7. duplicate ----

def test_duplicate_rejected():
    seen = {normalised_ast_hash(EDITED)}
    reformatted = EDITED.replace("MATRIX_LR = 0.03        # AdamW", "MATRIX_LR=0.03  # an edit we tried")
    assert reformatted != EDITED
    verdict = check(reformatted, seen_hashes=seen)
    assert verdict.reason == "duplicate of an earlier experiment"
    assert check(EDITED, seen_hashes={"0" * 64}).ok


# ---- hashing ----

def test_hash_ignores_comments_whitespace_and_docstrings():
    variant = TRAIN_PY.replace('"""Tiny GPT', '"""A different docstring. Tiny GPT') \
        .replace("    def forward(self, x):\n", "    def forward(self, x):\n        \"\"\"Pre-norm block.\"\"\"\n\n") \
        .replace("WEIGHT_DECAY = 0.1", "WEIGHT_DECAY = 0.1   # L2 on matrices") \
        .replace("x = x + self.proj(", "x = x + self.proj (")
    assert variant != TRAIN_PY
    assert normalised_ast_hash(variant) == normalised_ast_hash(TRAIN_PY)
    assert normalised_ast_hash(EDITED) != normalised_ast_hash(TRAIN_PY)


def test_hash_of_unparsable_source_raises():
    with pytest.raises(SyntaxError):
        normalised_ast_hash("def (:\n")


# ---- apply_edits ----

def test_apply_edits_in_order():
    out = apply_edits(TRAIN_PY, [("MATRIX_LR = 0.02", "MATRIX_LR = 0.03"), ("MATRIX_LR = 0.03", "MATRIX_LR = 0.04")])
    assert "MATRIX_LR = 0.04 " in out and "MATRIX_LR = 0.02" not in out


def test_apply_edits_not_found():
    with pytest.raises(EditError) as info:
        apply_edits(TRAIN_PY, [("MATRIX_LR = 0.02", "MATRIX_LR = 0.03"), ("NO_SUCH = 1", "x")])
    assert info.value.index == 2 and info.value.matches == 0
    assert str(info.value).startswith("edit 2: old_str not found")
    assert isinstance(info.value, ValueError)


def test_apply_edits_ambiguous():
    with pytest.raises(EditError) as info:
        apply_edits(TRAIN_PY, [("norm(", "rms(")])
    assert info.value.index == 1 and info.value.matches > 1
    assert f"matches {info.value.matches} times" in str(info.value)


def test_apply_edits_counts_overlapping_matches():
    with pytest.raises(EditError) as info:
        apply_edits("aaa", [("aa", "b")])
    assert info.value.matches == 2


def test_apply_edits_empty_old_str():
    with pytest.raises(EditError, match="edit 1: old_str is empty"):
        apply_edits(TRAIN_PY, [("", "x")])


def test_pathological_nesting_is_rejected_not_raised():
    for tail in ("x = " + "-" * 100_000 + "1\n", "x = " + "+".join(["1"] * 900) + "\n"):
        verdict = check(TRAIN_PY + tail)
        assert not verdict.ok and "nested too deeply" in verdict.reason
    assert check(TRAIN_PY + "x = 1\0\n").reason.startswith("does not parse")


@pytest.mark.parametrize("line", [
    'MATRIX_LR = __import__("os").getpid()  # AdamW learning rate for weight matrices\n',
    "MATRIX_LR = open  # AdamW learning rate for weight matrices\n",
])
def test_forbidden_code_on_a_constant_line_is_refused(line):
    old = next(ln for ln in TRAIN_PY.splitlines(keepends=True) if ln.startswith("MATRIX_LR"))
    verdict = check(TRAIN_PY.replace(old, line))
    assert not verdict.ok and verdict.reason.startswith("forbidden:")


def test_a_literal_edit_of_a_parent_with_forbidden_code_is_refused():
    bad_parent = TRAIN_PY.replace("import math\n", "import os\nimport math\n")
    verdict = validate_proposal(bad_parent, {"train.py": bad_parent.replace("WIDTH = 96 ", "WIDTH = 128 ")})
    assert not verdict.ok and "forbidden" in verdict.reason


def _git_apply(tmp_path, old: str, new: str, diff: str) -> str:
    """Apply `diff` to a file holding `old` with git apply (strict about context) and return the result."""
    import subprocess

    (tmp_path / "train.py").write_text(old)
    (tmp_path / "p.diff").write_text(diff)
    r = subprocess.run(["git", "apply", "p.diff"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return (tmp_path / "train.py").read_text()


def test_the_diff_of_a_long_file_keeps_its_context_and_line_numbers(tmp_path):
    """A one-line change deep in a long file: three lines of context each side, git's line numbers, and the
    diff applies with git apply."""
    from loop.validate import unified_diff

    old = TRAIN_PY + "".join(f"KNOB_{i:03d} = 1.0\n" for i in range(300))
    new = old.replace("KNOB_150 = 1.0", "KNOB_150 = 2.0")
    diff, changed = unified_diff(old, new)
    line = old.splitlines().index("KNOB_150 = 1.0") + 1
    assert changed == 2
    assert f"@@ -{line - 3},7 +{line - 3},7 @@" in diff
    assert " KNOB_147 = 1.0\n" in diff and " KNOB_153 = 1.0\n" in diff and "KNOB_146" not in diff
    assert _git_apply(tmp_path, old, new, diff) == new


@pytest.mark.parametrize("old, new", [
    # a deletion inside a run of equal lines, and one at each end of the file
    ("a\nb\nx\nx\nx\nx\nc\nd\n", "a\nb\nx\nx\nx\nc\nd\n"),
    ("x\nx\nx\na\n", "x\nx\na\n"),
    ("a\nx\nx\nx\n", "a\nx\nx\n"),
    # several hunks, an insertion at the start, no newline at the end
    ("".join(f"l{i}\n" for i in range(40)), "new\n" + "".join(f"l{i}\n" for i in range(40) if i != 20) + "end"),
    ("", "a\n"),
    ("a\n", ""),
])
def test_the_diff_applies_where_lines_repeat_or_changes_touch_the_ends(tmp_path, old, new):
    from loop.validate import unified_diff

    diff, _ = unified_diff(old, new)
    assert _git_apply(tmp_path, old, new, diff) == new


def test_proposals_validate_from_several_threads_at_once():
    """The swarm validates in several threads; CPython 3.11's ast.parse shares its recursion
    depth between threads and fails with a SystemError when a finaliser switches threads
    mid-parse (python/cpython#106905). Garbage with __del__ makes that switch happen."""
    import gc
    import sys
    import threading
    import time

    class Finalised:
        def __del__(self):
            sum(range(50))

    deadline = time.monotonic() + 2.0
    errors: list[str] = []

    def make_garbage():
        while time.monotonic() < deadline:
            cycle = Finalised()
            cycle.self = cycle

    def validate_many(n):
        source = TRAIN_PY.replace("MATRIX_LR = 0.02 ", f"MATRIX_LR = 0.0{n} ")
        verdict = validate_proposal(TRAIN_PY, {"train.py": source})
        if not verdict.ok:
            errors.append(verdict.reason)
        while time.monotonic() < deadline and not errors:
            try:
                parse(source)
            except SystemError as exc:
                errors.append(str(exc))

    def parse_elsewhere():  # a parser outside validate (inspect.signature in pydantic does this)
        import ast

        while time.monotonic() < deadline:
            try:
                ast.parse(TRAIN_PY)
            except SystemError:
                pass  # its own failure; ours must not fail because of it

    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(50, 1, 1)
    try:
        threads = [threading.Thread(target=validate_many, args=(n,)) for n in range(3, 9)]
        threads += [threading.Thread(target=make_garbage) for _ in range(2)]
        threads.append(threading.Thread(target=parse_elsewhere))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)
    assert errors == []


# ---- the per-statement scan and hash (a statement seen before is not walked again) ----

def test_the_hash_is_the_whole_tree_dump_without_positions_or_docstrings():
    """Composed from per-statement parts, the hash still equals sha256 of ast.dump of the whole stripped tree
    (so stored hashes of earlier experiments keep matching)."""
    import ast
    import hashlib

    def whole(source):
        tree = ast.parse(source)
        for node in [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))]:
            if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) \
                    and isinstance(node.body[0].value.value, str):
                node.body = node.body[1:]
        return hashlib.sha256(ast.dump(tree).encode()).hexdigest()

    for source in (TRAIN_PY, EDITED, "x = 1; y = 2\r\nz = 3\r\n", "@dec\nclass C:\n    'doc'\n    a = 1\n"):
        assert normalised_ast_hash(source) == whole(source)
        assert check(source).ast_hash in ("", whole(source))


def test_a_statement_seen_before_is_scanned_again_under_other_imports():
    """`q.load(...)` is harmless while q is `math` and forbidden once q is numpy: the cached scan of that
    statement is per set of the file's imports."""
    harmless = with_line("from dataclasses import dataclass", "import math as q\nSCALE = q.load if 0 else 1")
    assert check(harmless).ok, check(harmless).reason
    forbidden = harmless.replace("import math as q", "import numpy as q")
    assert check(forbidden).reason == f"forbidden: `numpy.load` at line {lineno(forbidden, 'SCALE = q.load')}"


def test_a_decorator_is_part_of_the_statement_it_decorates():
    """A def seen before, now with a decorator, is a new statement (its decorators come before its position)."""
    plain = with_line("from dataclasses import dataclass", "def helper(x):\n    return x")
    assert check(plain).ok, check(plain).reason
    bad = plain.replace("def helper(x):", "@eval\ndef helper(x):")
    assert check(bad).reason == f"forbidden: `eval` at line {lineno(bad, '@eval')}"
    assert normalised_ast_hash(bad) != normalised_ast_hash(plain)
