"""deploy/: the example ratchet.toml stays in step with Settings; the compose file, Dockerfile, systemd unit and
env template say what they must; the built package carries the migrations. No Docker needed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from bot.config_example import example_toml, uncommented
from bot.doctor import SECRET_ENV
from loop.config import HostConfig, ScaleConfig, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


pytestmark = pytest.mark.usefixtures("restore_environ")


# ---- ratchet.toml ----


def test_example_config_is_generated_from_settings():
    assert (DEPLOY / "ratchet.toml").read_text() == example_toml(), \
        "deploy/ratchet.toml is stale: python -m bot.config_example > deploy/ratchet.toml"


def test_example_config_mentions_every_setting():
    text = (DEPLOY / "ratchet.toml").read_text()
    for name in Settings.model_fields:
        assert re.search(rf"^#({re.escape(name)} = |\[\[{re.escape(name)}\]\])", text, re.M), name
    for model, table in ((HostConfig, "hosts"), (ScaleConfig, "scales")):
        for name in model.model_fields:
            assert re.search(rf"^#   {re.escape(name)}: ", text, re.M), f"[[{table}]] {name}"


def test_example_config_parses_as_is_and_uncommented(tmp_path, monkeypatch):
    for k in ("RATCHET_HOME", "RATCHET_DATABASE_URL", "RATCHET_DEVICE", "RATCHET_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    as_is = load_settings(DEPLOY / "ratchet.toml")
    assert as_is.model_dump(exclude={"home", "workspace"}) == Settings().model_dump(exclude={"home", "workspace"})
    path = tmp_path / "all.toml"
    path.write_text(uncommented((DEPLOY / "ratchet.toml").read_text()))
    s = load_settings(path)
    assert s.runner == "local" and s.proposer == "claude" and s.hosts[0].name == "gpu1"
    assert [x.name for x in s.scales] == [x.name for x in Settings().scales]
    assert s.slack_roles["operator"] == ["U0123ABC", "S0ONCALL"]


# ---- compose ----


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yml").read_text())


def test_compose_postgres_has_a_volume_and_a_health_check(compose):
    pg = compose["services"]["postgres"]
    assert pg["image"].startswith("postgres:")
    vol = pg["volumes"][0].split(":")
    assert vol[0] in compose["volumes"] and vol[1] == "/var/lib/postgresql/data"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert pg["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_compose_ratchet_waits_for_postgres_then_upgrades_then_serves(compose):
    r = compose["services"]["ratchet"]
    assert r["depends_on"]["postgres"]["condition"] == "service_healthy"
    cmd = " ".join(r["entrypoint"])
    assert re.search(r"ratchet db upgrade && exec ratchet serve", cmd)
    assert r["build"]["dockerfile"] == "deploy/Dockerfile" and (DEPLOY / r["build"]["context"]).resolve() == REPO
    url = r["environment"]["RATCHET_DATABASE_URL"]
    assert url == "postgresql://ratchet:${POSTGRES_PASSWORD}@postgres:5432/ratchet"
    home = [v for v in r["volumes"] if v.endswith(":/var/lib/ratchet")]
    assert home and home[0].split(":")[0] in compose["volumes"]
    mounts = [v.split(":")[0] for v in r["volumes"] if v.startswith("./")]
    assert all((DEPLOY / m).exists() for m in mounts) and "./ratchet.toml" in mounts
    assert r["restart"] == "unless-stopped" and r["env_file"] == ".env"


def test_compose_holds_no_secret(compose):
    text = (DEPLOY / "compose.yml").read_text()
    for key in SECRET_ENV:
        assert key not in yaml.safe_dump(compose["services"]["ratchet"].get("environment", {}))
    assert not re.search(r"xox[bpa]-|xapp-|sk-ant-", text)


# ---- Dockerfile ----


def test_dockerfile_has_cpu_and_cuda_variants():
    text = (DEPLOY / "Dockerfile").read_text()
    pin = re.search(r'"torch==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f"ARG TORCH_VERSION={pin}" in text and "ARG VARIANT=cpu" in text
    stages = re.findall(r"^FROM (\S+) AS (\S+)", text, re.M)
    assert [s[1] for s in stages] == ["base-cpu", "base-cuda", "final"]
    assert stages[1][0] == "${CUDA_IMAGE}" and re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+", text, re.M)
    assert stages[2][0] == "base-${VARIANT}"
    cpu, cuda = text.split("AS base-cpu")[1].split("AS base-cuda")
    assert "download.pytorch.org/whl/cpu" in cpu and '"torch==${TORCH_VERSION}"' in cpu
    assert "download.pytorch.org" not in cuda.split("AS final")[0] and '"torch==${TORCH_VERSION}"' in cuda
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (REPO / src).exists(), src
    assert re.search(r"^USER ratchet$", text, re.M) and 'ENTRYPOINT ["ratchet"]' in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for src in re.findall(r"^COPY (\S+) ", text, re.M):
        assert f"!{src.rstrip('/')}" in ignore or f"!{src.rstrip('/')}/" in ignore, src


# ---- systemd ----


def unit_file(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values]}} (keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        k, _, v = line.partition("=")
        section.setdefault(k, []).append(v)
    return out


def test_systemd_unit():
    u = unit_file(DEPLOY / "ratchet.service")
    s = u["Service"]
    assert s["Restart"] == ["on-failure"] and s["User"] == ["ratchet"] and s["User"] != ["root"]
    assert s["EnvironmentFile"] == ["/etc/ratchet/ratchet.env"]
    assert s["WorkingDirectory"] == ["/var/lib/ratchet"]
    assert s["ExecStartPre"][0].endswith("ratchet db upgrade") and s["ExecStart"][0].endswith("ratchet serve")
    assert "RATCHET_CONFIG=/etc/ratchet/ratchet.toml" in s["Environment"]
    assert u["Install"]["WantedBy"] == ["multi-user.target"]
    assert not any(k in (DEPLOY / "ratchet.service").read_text().split("EnvironmentFile")[0].split("[Service]")[1]
                   for k in ("xoxb-", "sk-ant-"))


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_unit_verifies(tmp_path):
    """systemd's own parser: no unknown keys or bad values (a missing ExecStart binary is expected here)."""
    unit = tmp_path / "ratchet.service"
    unit.write_text((DEPLOY / "ratchet.service").read_text())
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (p.stdout + p.stderr).splitlines()
                if "ratchet.service" in line and "/opt/ratchet/venv/bin/ratchet" not in line
                and "not executable" not in line and "No such file" not in line]
    assert not [x for x in problems if re.search(r"Unknown (key|section)|Failed to parse|Invalid", x)], problems


def test_env_template_lists_every_secret_and_fills_none():
    text = (DEPLOY / "ratchet.env.example").read_text()
    for key in (*SECRET_ENV, "RATCHET_DATABASE_URL", "POSTGRES_PASSWORD"):
        assert re.search(rf"^#?{key}=", text, re.M), key
    assert not re.search(r"^SLACK_|^ANTHROPIC_", text, re.M)  # secrets commented out until filled in


# ---- packaging ----


def test_wheel_ships_the_migrations(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("bot", "loop", "trainer", "db"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (whl,) = (tmp_path / "dist").glob("ratchet-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    versions = sorted((REPO / "db" / "migrations" / "versions").glob("[0-9]*.py"))
    for need in ("db/migrate.py", "db/migrations/env.py", "db/migrations/script.py.mako",
                 *(f"db/migrations/versions/{v.name}" for v in versions)):
        assert need in names, need


# ---- the proposal sandbox (README: Trust model) ----


def test_every_deployment_can_run_proposals_as_a_uid_that_owns_nothing(compose):
    docker = (DEPLOY / "Dockerfile").read_text()
    for base in docker.split("AS base-")[1:3]:  # both variants install bubblewrap and newuidmap
        assert "bubblewrap" in base.split("AS ")[0] and "uidmap" in base.split("AS ")[0]
    assert re.search(r"usermod --add-subuids \d+-\d+ --add-subgids \d+-\d+ ratchet", docker)
    opts = compose["services"]["ratchet"]["security_opt"]
    assert {"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"} <= set(opts)
    s = unit_file(DEPLOY / "ratchet.service")["Service"]
    assert s["Delegate"] == ["memory pids"]
    assert "NoNewPrivileges" not in s and "ProtectControlGroups" not in s  # newuidmap is setuid; cgroup writable
    unit = (DEPLOY / "ratchet.service").read_text()
    assert "apt-get install bubblewrap uidmap" in unit and "usermod --add-subuids" in unit
    boot = (DEPLOY / "bootstrap-gpu-host.sh").read_text()
    assert "bubblewrap uidmap" in boot and "usermod --add-subuids" in boot and "command -v bwrap" in boot
    ci = (REPO / ".ci" / "run").read_text()
    assert "bubblewrap uidmap" in ci and "ratchetsvc" in ci
