"""The score cannot be touched by the code it scores: one proposal per attack class (README: Trust model).

Every attack below passes loop/validate.py (validation is only a first filter) and runs through the real harness
(`python -m trainer.run`: the trusted parent, the sandboxed worker and scorer). Each must end refused or crashed
with a clear one-line reason, or with an honest score: the same val_bpb as the same weights without the attack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loop.validate import validate_proposal
from trainer.result import read_result

REPO = Path(__file__).resolve().parents[1]
SECRETS = {"ANTHROPIC_API_KEY": "sk-ant-api03-Zq9yX8wV7uT6sR5qP4oN3mL2kJ1iH0gF",
           "SLACK_BOT_TOKEN": "xoxb-1234567890-0987654321-AbCdEfGhIjKlMnOpQrStUvWx",
           "RATCHET_DATABASE_URL": "postgresql://ratchet:Hunter2Secret@db:5432/ratchet"}

# A deterministic bigram model: the same weights whatever the machine's speed (seeded, no training steps).
BASE = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

class Bigram(nn.Module):
    def __init__(self, V):
        super().__init__()
        self.emb = nn.Embedding(V, 32)
        self.head = nn.Linear(32, V)

    def forward(self, x):
        return self.head(self.emb(x))

def train(ctx):
    torch.manual_seed(0)
    model = Bigram(ctx.vocab_size)
    x, y = next(iter(ctx.train_batches(2)))
    #ATTACK
    return model
'''


def attack(body: str = "", header: str = "", forward: str = "", klass: str = "") -> str:
    """BASE with lines added: module-level `header`, `body` in train() before the return, a replacement
    `forward` body, and extra `klass` lines in the model class."""
    src = BASE
    if header:
        src = src.replace("class Bigram", textwrap.dedent(header).strip() + "\n\nclass Bigram", 1)
    if forward:
        src = src.replace("        return self.head(self.emb(x))",
                          textwrap.indent(textwrap.dedent(forward).strip(), "        "), 1)
    if klass:
        src = src.replace("    def forward(self, x):", textwrap.indent(textwrap.dedent(klass).strip(), "    ")
                          + "\n\n    def forward(self, x):", 1)
    return src.replace("    #ATTACK", textwrap.indent(textwrap.dedent(body).strip(), "    ") if body else "", 1)


def harness(tmp_path: Path, source: str, data_dir: Path, budget: float = 1.0, *extra: str, env=None):
    verdict = validate_proposal(BASE, {"train.py": source}, max_diff_lines=10_000)
    assert verdict.ok or source == BASE, f"the attack must pass validation: {verdict.reason}"
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "train.py").write_text(source)
    proc = subprocess.run([sys.executable, "-m", "trainer.run", "--script", "train.py", "--data", str(data_dir),
                           "--budget-s", str(budget), "--out", "result.json", "--eval-tokens", "2048", *extra],
                          cwd=run_dir, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **SECRETS, "PYTHONPATH": str(REPO), **(env or {})})
    return proc, read_result(run_dir / "result.json")


@pytest.fixture(scope="module")
def honest(tmp_path_factory, data_dir):
    """val_bpb of BASE's weights, scored by the same harness."""
    _, r = harness(tmp_path_factory.mktemp("honest"), BASE, data_dir)
    assert r.status == "ok", r.error
    return r.val_bpb


def assert_honest_or_refused(r, honest_bpb):
    assert r.status in ("ok", "crash", "refused"), r.status
    if r.status == "ok":
        assert r.val_bpb == pytest.approx(honest_bpb, rel=1e-4), "the score moved"
    else:
        assert r.error and "\n" not in r.error and r.val_bpb is None


# ---- 1. Code in the scoring process ----

CODE_IN_SCORER = {
    "rebinds F.cross_entropy": dict(header="F.cross_entropy = lambda *a, **k: torch.zeros(())"),
    "patches torch functions the scorer uses": dict(body="""
        torch.logsumexp = lambda *a, **k: torch.zeros(())
        torch.Tensor.sum = lambda self, *a, **k: torch.zeros(())
        """),
    "returns a Tensor subclass as logits": dict(header="""
        class Spy(torch.Tensor):
            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):
                out = super().__torch_function__(func, types, args, kwargs or {})
                return out * 0 if "cross_entropy" in str(func) else out
        """, forward="return self.head(self.emb(x)).as_subclass(Spy)"),
    "walks stack frames to the scorer's targets": dict(forward="""
        logits = self.head(self.emb(x))
        try:
            raise RuntimeError
        except RuntimeError as e:
            f = e.__traceback__.tb_frame
        while f is not None:
            for name in ("y", "targets", "windows"):
                t = f.f_locals.get(name)
                if torch.is_tensor(t) and t.shape[:1] == x.shape[:1] and t.dim() == 2:
                    return logits + 50.0 * F.one_hot(t[:, -x.shape[1]:].long(), logits.shape[-1])
            f = f.f_back
        return logits
        """),
    "replaces harness functions through frame globals": dict(body="""
        try:
            raise RuntimeError
        except RuntimeError as e:
            f = e.__traceback__.tb_frame
        while f is not None:
            g = f.f_globals
            for name in ("export", "score", "clean_line"):
                if callable(g.get(name)):
                    g[name] = lambda *a, **k: b"not a model"
            if "Result" in g:
                g["Result"].write = lambda *a, **k: None
            f = f.f_back
        """),
}


@pytest.mark.parametrize("case", sorted(CODE_IN_SCORER))
def test_code_in_the_scoring_process_cannot_move_the_score(tmp_path, data_dir, honest, case):
    _, r = harness(tmp_path, attack(**CODE_IN_SCORER[case]), data_dir)
    assert_honest_or_refused(r, honest)


# ---- 2. Seeing the future ----

FUTURE = {
    "looks at the next token": dict(forward="""
        nxt = torch.roll(x, -1, dims=1)
        return self.head(self.emb(x)) + 30.0 * F.one_hot(nxt, self.head.out_features)
        """),
    "peeks only after the first calls": dict(klass="calls = 0", forward="""
        self.calls += 1
        logits = self.head(self.emb(x))
        if self.calls > 2:
            logits = logits + 30.0 * F.one_hot(torch.roll(x, -1, dims=1), self.head.out_features)
        return logits
        """),
    "peeks only at the scoring batch size": dict(forward="""
        logits = self.head(self.emb(x))
        if x.shape[0] != 2:
            logits = logits + 30.0 * F.one_hot(torch.roll(x, -1, dims=1), self.head.out_features)
        return logits
        """),
    "peeks only without grad": dict(forward="""
        logits = self.head(self.emb(x))
        if not torch.is_grad_enabled():
            logits = logits + 30.0 * F.one_hot(torch.roll(x, -1, dims=1), self.head.out_features)
        return logits
        """),
    "peeks only on text that looks real": dict(forward="""
        logits = self.head(self.emb(x))
        real = (x[:, 1:] == x[:, :-1]).float().mean() < 0.5
        peek = 30.0 * F.one_hot(torch.roll(x, -1, dims=1), self.head.out_features)
        return logits + torch.where(real, 1.0, 0.0) * peek
        """),
    "peeks far ahead at a few positions": dict(forward="""
        logits = self.head(self.emb(x))
        ahead = torch.roll(x, -7, dims=1)
        mask = (torch.arange(x.shape[1]) % 5 == 0).float()[None, :, None]
        return logits + 30.0 * mask * F.one_hot(ahead, self.head.out_features)
        """),
}


def test_a_model_that_looks_at_the_next_token_is_refused(tmp_path, data_dir):
    _, r = harness(tmp_path, attack(**FUTURE["looks at the next token"]), data_dir)
    assert r.status == "refused" and "not causal" in r.error, (r.status, r.error)


def _export_and_score(source: str, data_dir: Path, seed: int = 0):
    """The worker's export and the scorer's load, checks and score, in this process (graph-level attacks only:
    the process boundary is tested above)."""
    import types

    import numpy as np
    import torch

    from trainer import data as tdata
    from trainer.scorer import load_program, score
    from trainer.worker import export

    manifest = tdata.load_manifest(data_dir)
    mod = types.ModuleType("train_script")
    exec(compile(source, "train.py", "exec"), mod.__dict__)
    torch.manual_seed(0)
    model = mod.Bigram(int(manifest["vocab_size"]))
    x = torch.randint(0, 100, (2, 256))
    for _ in range(3):  # the calls training would make
        model(x)
    path = Path(data_dir).parent / f"artifact-{os.getpid()}.pt2"
    try:
        path.write_bytes(export(model, {"eval_batch": 8, "seq_len": 256}, torch.device("cpu")))
        program = load_program(str(path))
    finally:
        path.unlink(missing_ok=True)
    return score(program.module(), tdata.val_tokens(data_dir, manifest),
                 np.load(Path(data_dir) / "token_bytes.npy"), seq_len=256, vocab_size=int(manifest["vocab_size"]),
                 device=torch.device("cpu"), eval_tokens=2048, eval_batch=8, rng=np.random.default_rng(seed))


@pytest.mark.parametrize("case", sorted(set(FUTURE) - {"looks at the next token"}))
def test_a_model_causal_only_while_checked_is_refused(data_dir, case):
    from trainer.scorer import Refused

    src = attack(**FUTURE[case])
    assert validate_proposal(BASE, {"train.py": src}, max_diff_lines=10_000).ok
    if case == "peeks only without grad":  # exported with grad on: the graph is the causal branch, and stays so
        got = _export_and_score(src, data_dir)
        assert got["max_check_diff"] <= 1e-3
        return
    for seed in range(3):  # different cut points and orders: refused every time
        with pytest.raises(Refused, match="not causal"):
            _export_and_score(src, data_dir, seed)


# ---- 3. Validation data within reach ----


def test_no_data_file_the_service_or_another_experiment_is_readable(tmp_path, data_dir, honest):
    from trainer import data as tdata

    manifest = tdata.load_manifest(data_dir)
    other = tmp_path / "other-experiment"
    other.mkdir()
    (other / "train.py").write_text("SECRET_IDEA = 1\n")
    targets = [str(p) for p in tdata.val_paths(data_dir, manifest)] + [
        str(data_dir / s) for s in manifest["train_shards"]] + [
        str(data_dir / "manifest.json"), str(Path.home() / ".ssh" / "id_rsa"), str(Path.home() / ".ratchet"),
        str(other / "train.py"), "/proc/1/environ", "/proc/self/environ", str(REPO / "README.md")]
    corpus = sorted(Path(data_dir).parent.parent.glob("cache/**/*.tar.gz"))
    targets += [str(p) for p in corpus[:1]]
    body = f"""
        import linecache
        seen = {{}}
        for path in {targets!r}:
            seen[path] = len("".join(linecache.getlines(path)))
        print("SEEN " + repr(seen), flush=True)
        """
    proc, r = harness(tmp_path, attack(header="import linecache", body=body), data_dir)
    assert r.status == "ok" and r.val_bpb == pytest.approx(honest, rel=1e-4), r.error
    seen = eval(next(line for line in proc.stdout.splitlines() if line.startswith("SEEN "))[5:])
    readable = {p: n for p, n in seen.items() if n and not p.endswith("/proc/self/environ")}
    assert readable == {}, readable
    env_lines = [line for line in proc.stdout.splitlines() if line.startswith("SEEN ")]
    assert not any(v in env_lines[0] for v in SECRETS.values())


def test_reading_validation_data_while_scoring_is_refused(data_dir):
    from trainer import data as tdata
    from trainer.scorer import Refused

    val = str(tdata.val_paths(data_dir, tdata.load_manifest(data_dir))[0])
    forward = f"""
        peek = torch.ops.aten.__getattr__("from_" + "file")({val!r}, False, 4096, dtype=torch.uint8)
        return self.head(self.emb(x)) + peek[:1].float() * 0
        """
    src = attack(forward=forward)
    assert validate_proposal(BASE, {"train.py": src}, max_diff_lines=10_000).ok
    from trainer.worker import HarnessError

    with pytest.raises((Refused, HarnessError), match="aten.from_file|cannot be exported"):
        _export_and_score(src, data_dir)


def test_state_kept_across_scoring_calls_is_refused(data_dir):
    from trainer.scorer import Refused

    klass = """
        def __init__(self, V):
            super().__init__()
            self.emb = nn.Embedding(V, 32)
            self.head = nn.Linear(32, V)
            self.register_buffer("seen", torch.zeros(V))
        """
    forward = """
        self.seen.add_(F.one_hot(x[:, -1], self.head.out_features).sum(0))
        return self.head(self.emb(x)) + self.seen.log1p()
        """
    src = attack(klass=klass, forward=forward).replace(
        "    def __init__(self, V):\n        super().__init__()\n        self.emb = nn.Embedding(V, 32)\n"
        "        self.head = nn.Linear(32, V)\n\n", "", 1)
    assert validate_proposal(BASE, {"train.py": src}, max_diff_lines=10_000).ok
    with pytest.raises(Refused, match="state kept between calls"):
        _export_and_score(src, data_dir)


# ---- 4. Time ----


def test_training_past_the_budget_is_refused(tmp_path, data_dir):
    body = """
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cached = [next(iter(ctx.train_batches(2))) for _ in range(3)]
        while ctx.training_seconds() < 3 * ctx.budget_s + 3:
            for bx, by in cached:
                loss = F.cross_entropy(model(bx).flatten(0, 1), by.flatten())
                opt.zero_grad(); loss.backward(); opt.step()
        """
    _, r = harness(tmp_path, attack(body=body), data_dir, 1.0)
    assert r.status == "refused" and "on a 1 s budget" in r.error, (r.status, r.error)


def test_never_returning_is_a_timeout_at_budget_plus_grace(tmp_path, data_dir):
    body = """
        import time
        while True:
            time.sleep(0.05)
        """
    _, r = harness(tmp_path, attack(body=body, header="import time"), data_dir, 0.5, "--grace-s", "3")
    assert r.status == "timeout" and "budget + grace" in r.error


def test_the_clock_is_the_parents_not_the_scripts(tmp_path, data_dir):
    body = """
        import time
        for step in range(5):
            ctx.log(10**6 + step, 1.0)
        time.sleep(2.5)
        """
    _, r = harness(tmp_path, attack(body=body, header="import time"), data_dir, 5.0)
    assert r.status == "ok" and r.training_seconds >= 2.5


# ---- 5. Secrets and host files ----


def test_the_worker_gets_an_allow_listed_environment_and_no_secret_reaches_the_result(tmp_path, data_dir):
    body = """
        import linecache
        print("ENV " + "".join(linecache.getlines("/proc/self/environ")).replace(chr(0), " "), flush=True)
        raise ValueError("leaking " + "".join(linecache.getlines("/proc/self/environ")) +
                         " xoxb-9999999999-8888888888-FakeTokenTextHere sk-ant-api03-AAAABBBBCCCCDDDDEEEE")
        """
    proc, r = harness(tmp_path, attack(body=body, header="import linecache"), data_dir)
    env_line = next(line for line in proc.stdout.splitlines() if line.startswith("ENV "))
    names = {kv.split("=", 1)[0] for kv in env_line[4:].split()}
    assert names <= {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "PYTHONUNBUFFERED",
                     "PYTHONDONTWRITEBYTECODE", "TORCHINDUCTOR_CACHE_DIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                     "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "PWD"}, names
    assert r.status == "crash" and r.error.startswith("ValueError: leaking")
    stored = json.dumps({"error": r.error, "tail": r.log_tail})
    assert "xoxb-9999999999" not in stored and "sk-ant-api03-AAAA" not in stored and "[redacted]" in stored
    assert not any(v in stored or v in proc.stdout for v in SECRETS.values())


def test_a_raised_disk_full_error_is_a_crash_not_a_full_disk(tmp_path, data_dir):
    _, r = harness(tmp_path, attack(body='raise OSError(28, "No space left on device")'), data_dir)
    assert r.status == "crash" and r.disk_full == "" and "No space left" in r.error


@pytest.mark.skipif(os.geteuid() != 0, reason="the root service's uid switch needs root")
def test_the_worker_runs_as_an_unprivileged_uid_that_owns_nothing(tmp_path, data_dir):
    body = """
        status = "".join(linecache.getlines("/proc/self/status"))
        print("UID " + status.split("Uid:")[1].split()[0] + " MAP " +
              "".join(linecache.getlines("/proc/self/uid_map")).replace(chr(10), ";"), flush=True)
        """
    proc, r = harness(tmp_path, attack(body=body, header="import linecache"), data_dir)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("UID "))
    uid = int(line.split()[1])
    import pwd

    assert uid == pwd.getpwnam("nobody").pw_uid and r.status == "ok"


# ---- 6. The validator: one check for every edit ----


def test_a_constant_edit_that_closes_a_string_gets_the_full_check():
    parent = '''import torch

LR = 0.02  # learning rate
NOTES = """
WARMUP = 3  # steps
"""
TAIL = """
"""


def train(ctx):
    return torch.nn.Linear(1, 1)
'''
    assert validate_proposal("def train(ctx):\n    return 1\n", {"train.py": parent}).ok
    # Inside NOTES the line looks like a constant; its "comment" closes the string and the code after it runs.
    edit = parent.replace('WARMUP = 3  # steps', 'WARMUP = 3  # """; import os; os.system("id"); X = """')
    verdict = validate_proposal(parent, {"train.py": edit})
    assert not verdict.ok and "os" in verdict.reason


# ---- Through the loop: what a run says is data ----


def test_the_loop_stores_posts_and_shows_no_secret_and_takes_no_decision_from_script_text(tmp_path, data_dir,
                                                                                       tiny_workspace,
                                                                                       restore_environ):
    """A crash line and log full of secret-shaped text, and a raised 'No space left on device': stored cleaned,
    posted cleaned, shown to the proposer cleaned, and the run goes on (a full disk is the parent's to say)."""
    from db.models import Event, Experiment, Run
    from tests.test_engine import FixedProposer, make_engine_for, rows, tick_until

    os.environ.update(SECRETS)  # the service's own environment holds them
    leak = ("    print('token xoxb-5555555555-6666666666-LeakedTokenValueHere key sk-ant-api03-QQQQRRRRSSSSTTTTUUUU "
            "url postgresql://ratchet:Hunter2Secret@db/ratchet', flush=True)\n")
    proposer = FixedProposer([
        lambda src: src.replace("    step = 0\n", "    step = 0\n" + leak +
                                "    raise ValueError('xoxb-5555555555-6666666666-LeakedTokenValueHere')\n"),
        lambda src: src.replace("    step = 0\n", "    step = 0\n    raise OSError(28, 'No space left on device')\n"),
        lambda src: src.replace("LR = 0.02", "LR = 0.03"),
    ])
    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace, proposer=proposer, max_experiments=3)
    tick_until(eng, lambda: eng.finished())
    search = [e for e in rows(db) if e.kind == "experiment"]
    assert [e.status for e in search[:2]] == ["crash", "crash"], [(e.status, e.reason) for e in search]
    assert "No space left on device" in search[1].reason and search[2].status in ("keep", "discard")
    assert rows(db, Run)[0].state == "running"  # not paused for a disk the script only claimed was full
    stored = json.dumps([[e.reason, e.log_tail] for e in rows(db, Experiment)] + [ev.text for ev in rows(db, Event)])
    shown = json.dumps([vars(t) for t in eng.proposals.history(rows(db, Run)[0])], default=str)
    for text in (stored, shown):
        assert "LeakedTokenValueHere" not in text and "QQQQRRRRSSSS" not in text and "Hunter2Secret" not in text
        assert not any(v in text for v in SECRETS.values())
    assert "[redacted]" in stored
