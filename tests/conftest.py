"""Shared fixtures: one prepared copy of the default corpus for the whole session, tiny scripts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Prepared data is kept between sessions (preparing is idempotent and takes a few seconds).
TEST_HOME = Path(os.environ.get("RATCHET_TEST_HOME", Path.home() / ".cache" / "ratchet-tests"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The default corpus (Shakespeare, vocab 4096), prepared once."""
    from trainer.data import prepare

    out, _ = prepare(home=TEST_HOME)
    return out


@pytest.fixture(scope="session")
def stdlib_data_dir() -> Path:
    """A small real corpus that needs no network: stdlib sources, vocab 512."""
    from trainer.data import prepare

    out, _ = prepare("stdlib", 512, home=TEST_HOME)
    return out


PG_URL = os.environ.get("RATCHET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_schema_url(name: str) -> str:
    """A fresh PostgreSQL schema for one test, selected through search_path."""
    import psycopg

    with psycopg.connect(PG_URL.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        conn.execute(f'CREATE SCHEMA "{name}"')
    return f"{PG_URL}?options=-csearch_path%3D{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """The same tests on SQLite (a file, WAL) and on the real PostgreSQL at 127.0.0.1:5432."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ratchet.db'}"
    return _pg_schema_url(f"t_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**8}")


# A small real model: trains in a second on CPU, with UPPERCASE constants for the offline proposer.
TINY_TRAIN_PY = '''\
"""A bigram-plus-context model small enough for tests: seconds on CPU."""
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- Hyperparameters ----
LR = 0.02  # AdamW learning rate
DIM = 32  # embedding width
BATCH_SIZE = 4  # sequences per step
WEIGHT_DECAY = 0.0  # AdamW weight decay


class Tiny(nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        return self.head(self.emb(idx))


def train(ctx):
    torch.manual_seed(ctx.seed)
    model = Tiny(ctx.vocab_size, int(ctx.scale.get("width", DIM))).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    step = 0
    for x, y in ctx.train_batches(BATCH_SIZE):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctx.log(step, loss)
        step += 1
        if ctx.should_stop():
            break
    return model
'''


@pytest.fixture
def tiny_workspace(tmp_path):
    """A research repo whose baseline is TINY_TRAIN_PY."""
    from loop.workspace import Workspace

    path = tmp_path / "workspace"
    path.mkdir()
    (path / "train.py").write_text(TINY_TRAIN_PY)
    return Workspace.init(path, force=True)


@pytest.fixture
def restore_environ():
    """Put os.environ back as it was after the test, so nothing a test sets leaks into later tests and the
    subprocesses they start."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def measured(tmp_path_factory, data_dir) -> Path:
    """A research repo whose noise floor is measured, made once per session (tests/reliability/conftest.py:
    make_measured); tests copy it with `clone`."""
    from tests.reliability.conftest import make_measured

    return make_measured(tmp_path_factory.mktemp("measured"), data_dir)


@pytest.fixture
def whole_rounds(monkeypatch):
    """A round of filling free slots stops after loop.engine.ROUND_S of wall time. On a slow machine that changes
    which simulated runs (tests/simfleet.py) start together: a result then met one control run of head instead of
    two, or two changes that should finish together did not. Tests of what the rule does with a given
    interleaving take this, so they never depend on the machine's speed."""
    monkeypatch.setattr("loop.engine.ROUND_S", 3600.0)
