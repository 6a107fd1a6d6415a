"""The `ratchet` command line: data prepare, train, init, and clear errors for bad config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.test_serve import serve_env

REPO = Path(__file__).resolve().parents[1]


def ratchet(*args, env, cwd=REPO, timeout=300):
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_data_prepare_twice_does_nothing_the_second_time(tmp_path, data_dir):
    env = serve_env(tmp_path / "home", data_dir)
    p = ratchet("data", "prepare", env=env)
    assert p.returncode == 0 and "already prepared, nothing to do" in p.stdout
    assert "4,096" not in p.stdout and "vocab 4096" in p.stdout and "held-out documents" in p.stdout


def test_unknown_corpus_names_the_alternatives(tmp_path, data_dir):
    p = ratchet("data", "prepare", "--corpus", "wikipedia", env=serve_env(tmp_path / "home", data_dir))
    assert p.returncode == 2 and "unknown corpus 'wikipedia'" in p.stderr and "stdlib" in p.stderr


def test_train_prints_the_summary(tmp_path, data_dir):
    from tests.conftest import TINY_TRAIN_PY

    script = tmp_path / "train.py"
    script.write_text(TINY_TRAIN_PY)
    p = ratchet("train", "--script", str(script), "--budget-s", "1", env=serve_env(tmp_path / "home", data_dir))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "---" in lines and any(line.startswith("val_bpb:") for line in lines)


def test_init_creates_the_workspace(tmp_path, data_dir):
    p = ratchet("init", str(tmp_path / "ws"), env=serve_env(tmp_path / "home", data_dir))
    assert p.returncode == 0 and "workspace ready" in p.stdout
    assert (tmp_path / "ws" / "train.py").exists() and (tmp_path / "ws" / "program.md").exists()


def test_config_typo_is_a_clear_error(tmp_path, data_dir):
    cfg = tmp_path / "ratchet.toml"
    cfg.write_text('budget_s = 30\nnoise_repeat = 5\n')
    p = ratchet("serve", "--config", str(cfg), env=serve_env(tmp_path / "home", data_dir))
    assert p.returncode == 2 and "noise_repeat: unknown setting (typo?)" in p.stderr
    cfg.write_text('budget_s = "ten minutes"\n')
    p = ratchet("serve", "--config", str(cfg), env=serve_env(tmp_path / "home", data_dir))
    assert p.returncode == 2 and "budget_s:" in p.stderr


def test_serve_refuses_a_different_budget_on_an_existing_run(tmp_path, data_dir, tiny_workspace):
    from db.session import create_tables, make_engine
    from loop.config import Settings
    from loop.engine import Engine
    from loop.proposers.offline import OfflineProposer
    from loop.runners.local import LocalRunner

    env = serve_env(tmp_path / "home", data_dir, tiny_workspace.path, RATCHET_NOISE_REPEATS=2)
    # the run exists, created at a 1 s budget as `serve --budget-s 1` creates it (what it trains is not the point)
    settings = Settings(home=tmp_path / "home", workspace=tiny_workspace.path, budget_s=1.0)
    db = make_engine(settings.db_url)
    create_tables(db)
    Engine(settings, db, tiny_workspace, LocalRunner("cpu"), OfflineProposer(), data_dir).setup(reconcile=False)
    db.dispose()
    p = ratchet("serve", "--budget-s", "5", "--max-experiments", "1", env=env)
    assert p.returncode == 2 and "--run NAME" in p.stderr and "1 s budget" in p.stderr


def test_secrets_never_reach_the_log_file(tmp_path, monkeypatch):
    import logging

    from bot.serve import setup_logging

    token, key = "xoxb-123-456-abcdefSECRET", "sk-ant-api03-TOPSECRETKEY"
    monkeypatch.setenv("SLACK_BOT_TOKEN", token)
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    path = setup_logging(tmp_path)
    log = logging.getLogger("ratchet.test")
    log.warning("connecting with %s and %s", token, key)
    try:
        raise RuntimeError(f"rejected {key}")
    except RuntimeError:
        log.exception("failed")
    for h in logging.getLogger().handlers:
        h.flush()
    text = path.read_text()
    assert "connecting with" in text and "rejected" in text
    assert token not in text and key not in text
