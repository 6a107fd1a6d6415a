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
