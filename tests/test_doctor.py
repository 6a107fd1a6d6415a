"""`ratchet doctor`: a healthy local setup, a bad database, Slack tokens against the fake Slack, the Anthropic key
against the fake Messages API, hosts, data fingerprints and config typos; secrets never in the output."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from bot.doctor import Check, check_runner, doctor, mask, redact, secrets_in
from db import migrate
from db.session import make_engine
from loop.config import Settings
from tests.fakes.anthropic_api import FakeAnthropic, error, message
from tests.fakes.slack_api import APP_TOKEN, BOT_TOKEN, FakeSlack, api_error
from tests.test_serve import serve_env

REPO = Path(__file__).resolve().parents[1]
ANTHROPIC_KEY = "sk-ant-api03-doctor-test-secret-key-0123456789"
DB_PASSWORD = "pw-doctor-s3cret"
DEFAULT_MODEL = Settings.model_fields["claude_model"].default


pytestmark = pytest.mark.usefixtures("restore_environ")


@pytest.fixture
def home(tmp_path, data_dir, monkeypatch):
    """A tmp RATCHET_HOME with the session's prepared corpus linked in and the database at head; the process
    environment cleared of every secret and pointer the checks read."""
    home = tmp_path / "home"
    env = serve_env(home, data_dir)
    for k in ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_CHANNEL", "SLACK_API_URL",
              "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "RATCHET_DATABASE_URL", "RATCHET_CONFIG"):
        monkeypatch.delenv(k, raising=False)
        env.pop(k, None)
    for k in ("RATCHET_HOME", "RATCHET_DEVICE"):
        monkeypatch.setenv(k, env[k])
    migrate.upgrade(make_engine(f"sqlite:///{home / 'ratchet.db'}"))
    return home


def run_doctor(config=None) -> tuple[int, str, dict[str, list[str]]]:
    """Doctor in this process: (exit code, output, {check name: its lines' statuses})."""
    buf = io.StringIO()
    code = doctor(config, Console(file=buf, width=300, highlight=False, color_system=None), os.environ)
    out = buf.getvalue()
    status: dict[str, list[str]] = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0] in ("ok", "warn", "fail"):
            rest = line[6:]
            name = rest[:16].strip()
            status.setdefault(name, []).append(parts[0])
    return code, out, status


def test_healthy_local_setup(home):
    code, out, st = run_doctor()
    assert code == 0, out
    assert st == {"config": ["ok"], "database": ["ok"], "slack": ["ok"], "anthropic": ["ok"], "runner": ["ok"],
                  "sandbox": ["ok"], "data": ["ok"]}, out
    assert "sandbox: bubblewrap" in out and "no network" in out
    assert f"schema at {migrate.head_revision()}" in out and "fingerprints match" in out and "all ok" in out
    assert "not configured: serve uses the shell chat" in out and "offline proposer" in out


def test_cli_doctor_exit_codes(home, tmp_path):
    """The command: exit 0 when healthy, 1 on a failed check (a config typo stops before torch is imported)."""
    env = {**os.environ}
    p = subprocess.run([sys.executable, "-m", "bot.cli", "doctor"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[0].startswith("ok    config") and "7 checks: all ok" in p.stdout
    cfg = tmp_path / "ratchet.toml"
    cfg.write_text("noise_repeat = 5\n")
    p = subprocess.run([sys.executable, "-m", "bot.cli", "doctor", "--config", str(cfg)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 1 and p.stdout.startswith("fail  config") and "noise_repeat" in p.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- database ----


def test_unreachable_database_fails_and_hides_the_password(home, monkeypatch):
    monkeypatch.setenv("RATCHET_DATABASE_URL",
                       f"postgresql://ratchet:{DB_PASSWORD}@127.0.0.1:{free_port()}/ratchet?connect_timeout=3")
    code, out, st = run_doctor()
    assert code == 1 and st["database"] == ["fail"], out
    line = next(x for x in out.splitlines() if x.startswith("fail  database"))
    assert "cannot connect to postgresql://ratchet:***@127.0.0.1" in line and "RATCHET_DATABASE_URL" in line
    assert DB_PASSWORD not in out
    assert st["data"] == ["ok"]  # one failure does not hide the other checks


def test_malformed_database_url(home, monkeypatch):
    monkeypatch.setenv("RATCHET_DATABASE_URL", "no-such-scheme-at-all")
    code, out, st = run_doctor()
    assert code == 1 and st["database"] == ["fail"] and "malformed URL" in out, out


def test_out_of_date_schema_names_the_command(home):
    migrate.downgrade(make_engine(f"sqlite:///{home / 'ratchet.db'}"), "0001")
    code, out, st = run_doctor()
    assert code == 1 and st["database"] == ["fail"], out
    assert "database schema is at 0001 (initial tables)" in out and "→ run `ratchet db upgrade`" in out


def test_missing_database_is_a_warning(home):
    (home / "ratchet.db").unlink()
    code, out, st = run_doctor()
    assert code == 0 and st["database"] == ["warn"] and "`ratchet serve` creates it" in out, out
    assert not (home / "ratchet.db").exists()  # doctor never creates or migrates


def test_postgres_at_head(home, monkeypatch):
    pytest.importorskip("psycopg")
    from tests.conftest import _pg_schema_url

    url = _pg_schema_url(f"doctor_{os.getpid()}")
    try:
        migrate.upgrade(make_engine(url))
    except Exception as e:  # PostgreSQL not running here
        pytest.skip(f"PostgreSQL unavailable: {e}")
    monkeypatch.setenv("RATCHET_DATABASE_URL", url)
    code, out, st = run_doctor()
    assert code == 0 and st["database"] == ["ok"] and "postgresql+psycopg://postgres@127.0.0.1" in out, out


# ---- Slack ----


def test_slack_tokens_checked_with_auth_test(home, monkeypatch):
    with FakeSlack() as fake:
        monkeypatch.setenv("SLACK_BOT_TOKEN", BOT_TOKEN)
        monkeypatch.setenv("SLACK_APP_TOKEN", APP_TOKEN)
        monkeypatch.setenv("SLACK_API_URL", fake.api_url)
        monkeypatch.setenv("SLACK_CHANNEL", "C0DOCTOR1")
        code, out, st = run_doctor()
        assert code == 0, out
        assert st["slack config"] == ["ok"] and st["slack bot token"] == ["ok"] and st["slack app token"] == ["ok"]
        assert "auth.test: bot @ratchet in fake (T0FAKE)" in out and "socket mode, channel C0DOCTOR1" in out
        assert [c.token for c in fake.calls_to("auth.test")] == [BOT_TOKEN]
        assert len(fake.calls_to("apps.connections.open")) == 1
        assert not fake.posts()  # doctor posts nothing
        assert BOT_TOKEN not in out and APP_TOKEN not in out


def test_slack_invalid_auth(home, monkeypatch):
    with FakeSlack() as fake:
        fake.fail("auth.test", api_error("invalid_auth"))
        monkeypatch.setenv("SLACK_BOT_TOKEN", BOT_TOKEN)
        monkeypatch.setenv("SLACK_APP_TOKEN", "xapp-another-app-token-value")
        monkeypatch.setenv("SLACK_API_URL", fake.api_url)
        monkeypatch.setenv("SLACK_CHANNEL", "C0DOCTOR1")
        code, out, st = run_doctor()
    assert code == 1 and st["slack bot token"] == ["fail"], out
    assert "Slack rejected SLACK_BOT_TOKEN: invalid_auth" in out and "Bot User OAuth Token" in out
    assert BOT_TOKEN not in out and "xapp-another-app-token-value" not in out


def test_slack_bad_app_token_and_missing_channel(home, monkeypatch):
    with FakeSlack() as fake:
        monkeypatch.setenv("SLACK_BOT_TOKEN", BOT_TOKEN)
        monkeypatch.setenv("SLACK_APP_TOKEN", "not-an-app-token-0123456789")
        monkeypatch.setenv("SLACK_API_URL", fake.api_url)
        code, out, st = run_doctor()
    assert code == 1 and st["slack config"] == ["fail"] and st["slack app token"] == ["fail"], out
    assert "SLACK_CHANNEL" in out and "Slack rejected SLACK_APP_TOKEN: invalid_auth" in out
    assert "not-an-app-token-0123456789" not in out and BOT_TOKEN not in out


def test_slack_unreachable(home, monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("SLACK_SIGNING_SECRET", "signing-secret-0123456789abcdef")
    monkeypatch.setenv("SLACK_API_URL", f"http://127.0.0.1:{free_port()}/api/")
    monkeypatch.setenv("SLACK_CHANNEL", "C0DOCTOR1")
    code, out, st = run_doctor()
    assert code == 1 and st["slack bot token"] == ["fail"] and "cannot reach Slack" in out, out
    assert "http mode" in out and "signing-secret-0123456789abcdef" not in out


# ---- Anthropic ----


def test_anthropic_key_accepted(home, monkeypatch):
    with FakeAnthropic() as fake:
        fake.script(message([{"type": "text", "text": "p"}], stop_reason="max_tokens"))
        monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        code, out, st = run_doctor()
    assert code == 0 and st["anthropic"] == ["ok"], out
    assert f"key accepted; {DEFAULT_MODEL} answered" in out
    (req,) = fake.requests
    assert req.body["max_tokens"] == 1 and req.body["model"] == DEFAULT_MODEL
    assert ANTHROPIC_KEY in req.headers.get("x-api-key", "") + req.headers.get("authorization", "")
    assert ANTHROPIC_KEY not in out


def test_anthropic_key_rejected(home, monkeypatch):
    with FakeAnthropic() as fake:
        fake.script(error(401, "invalid x-api-key"))
        monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        code, out, st = run_doctor()
    assert code == 1 and st["anthropic"] == ["fail"], out
    assert "Anthropic rejected ANTHROPIC_API_KEY (401)" in out and "console.anthropic.com" in out
    assert len(fake.requests) == 1  # a 401 is not retried
    assert ANTHROPIC_KEY not in out


def test_anthropic_overloaded_is_a_warning(home, monkeypatch):
    with FakeAnthropic() as fake:
        fake.script(error(529), error(529))
        monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        code, out, st = run_doctor()
    assert code == 0 and st["anthropic"] == ["warn"] and "busy" in out, out


def test_claude_proposer_without_key(home, tmp_path):
    cfg = tmp_path / "ratchet.toml"
    cfg.write_text('proposer = "claude"\n')
    code, out, st = run_doctor(cfg)
    assert code == 1 and st["anthropic"] == ["fail"] and "ANTHROPIC_API_KEY is not set" in out, out


# ---- config, hosts, data ----


def test_config_typo_names_the_key(home, tmp_path):
    cfg = tmp_path / "ratchet.toml"
    cfg.write_text("budget_s = 30\nnoise_repeat = 5\n")
    code, out, st = run_doctor(cfg)
    assert code == 1 and st == {"config": ["fail"]}, out
    assert "noise_repeat: unknown setting (typo?)" in out and "deploy/ratchet.toml" in out


def host_health(name, address, up, gpus=(), free_disk_bytes=None, error=""):
    """A loop.runners.ssh_host.HostHealth look-alike (what health() returns)."""
    return SimpleNamespace(name=name, address=address, up=up, gpus=list(gpus), cpus=None,
                           free_disk_bytes=free_disk_bytes, error=error)


def test_ssh_hosts_through_health(home, tmp_path):
    from loop.config import load_settings

    cfg = tmp_path / "ratchet.toml"
    cfg.write_text('runner = "ssh"\n[[hosts]]\nname = "gpu1"\naddress = "gpu1.lab"\ngpus = 2\n'
                   '[[hosts]]\nname = "gpu2"\naddress = "gpu2.lab"\n[[hosts]]\nname = "gpu3"\naddress = "gpu3.lab"\n')
    settings = load_settings(cfg)
    gpu = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_used_mib": 1, "memory_total_mib": 81559}
    health = [host_health("gpu1", "gpu1.lab", True, [gpu, {**gpu, "index": 1}], free_disk_bytes=500 << 30),
              host_health("gpu2", "gpu2.lab", False, error="connection refused"),
              host_health("gpu3", "gpu3.lab", True, [gpu], free_disk_bytes=3 << 30)]
    checks = check_runner(settings, ssh_health=lambda: health)
    assert [(c.name, c.status) for c in checks] == [("host gpu1", "ok"), ("host gpu2", "fail"), ("host gpu3", "warn")]
    assert "2 GPU(s) NVIDIA H100 80GB HBM3" in checks[0].detail and "500 GiB free" in checks[0].detail
    assert "connection refused" in checks[1].detail and "bootstrap-gpu-host.sh --check" in checks[1].fix


def test_ssh_host_down_for_real(home, tmp_path):
    """The real SSHRunner health against a closed port: one fail line naming the host."""
    pytest.importorskip("loop.runners.ssh")
    cfg = tmp_path / "ratchet.toml"
    cfg.write_text(f'runner = "ssh"\n[[hosts]]\nname = "gone"\naddress = "127.0.0.1"\nport = {free_port()}\n')
    code, out, st = run_doctor(cfg)
    assert code == 1 and st["host gone"] == ["fail"], out
    line = next(x for x in out.splitlines() if "host gone" in x)
    assert "127.0.0.1" in line and "bootstrap-gpu-host.sh" in line


def test_ssh_without_hosts(home, tmp_path):
    cfg = tmp_path / "ratchet.toml"
    cfg.write_text('runner = "ssh"\n')
    code, out, st = run_doctor(cfg)
    assert code == 1 and st["hosts"] == ["fail"] and "[[hosts]]" in out, out


def test_data_fingerprint_mismatch(home, data_dir):
    link = home / "data" / data_dir.name
    link.unlink()
    shutil.copytree(data_dir, link)
    from trainer.data import load_manifest

    rel = sorted(load_manifest(link)["fingerprints"])[0]
    with open(link / rel, "ab") as f:
        f.write(b"\0")
    code, out, st = run_doctor()
    assert code == 1 and st["data"] == ["fail"], out
    assert f"fingerprint mismatch for {rel}" in out and "`ratchet data prepare`" in out


def test_data_not_prepared_is_a_warning(home, data_dir):
    (home / "data" / data_dir.name).unlink()
    code, out, st = run_doctor()
    assert code == 0 and st["data"] == ["warn"] and "ratchet data prepare" in out, out


# ---- masking ----


def test_mask_and_redact():
    secrets = secrets_in({"SLACK_BOT_TOKEN": "xoxb-1-2-abcdef", "ANTHROPIC_API_KEY": ANTHROPIC_KEY},
                         (f"postgresql://u:{DB_PASSWORD}@h/db",))
    text = f"a xoxb-1-2-abcdef b {ANTHROPIC_KEY} c postgresql://u:{DB_PASSWORD}@h/db"
    out = mask(text, secrets)
    assert "xoxb-1-2-abcdef" not in out and ANTHROPIC_KEY not in out and DB_PASSWORD not in out
    assert redact(ANTHROPIC_KEY) == f"sk-ant-…({len(ANTHROPIC_KEY)} chars)"
    assert Check("x", "ok", "d").fix == ""
