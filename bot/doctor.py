"""`ratchet doctor`: checks config, database and schema, Slack, the Anthropic key, hosts and data; one line each.

Reads and asks only (auth.test, a 1-token request, a health check); never migrates, prepares or writes state,
and never prints a secret: every token, key and password is masked in what it prints.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from rich.console import Console
from rich.text import Text

SECRET_ENV = ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET", "ANTHROPIC_API_KEY")
COLOURS = {"ok": "green", "warn": "yellow", "fail": "red"}
LOW_DISK_BYTES = 20 << 30  # a host workdir with less free space than this is a warning


@dataclass
class Check:
    """One line of the report: `status` ok | warn | fail, `what` was checked, `detail` found, `fix` what to do."""

    name: str
    status: str
    detail: str
    fix: str = ""


# ---- secrets ----


def redact(secret: str) -> str:
    """How a secret is shown: its kind prefix (`xoxb-`, `sk-ant-`) and length, never its content."""
    head = ""
    for prefix in ("xoxb-", "xoxp-", "xapp-", "sk-ant-", "sk-"):
        if secret.startswith(prefix):
            head = prefix
            break
    return f"{head}…({len(secret)} chars)"


def secrets_in(env: Mapping[str, str], urls: tuple[str, ...] = ()) -> list[str]:
    """The secret values to mask: the tokens and key from `env`, and the passwords inside database `urls`."""
    from sqlalchemy.engine import make_url

    out = [env[k].strip() for k in SECRET_ENV if env.get(k, "").strip()]
    for url in (*urls, env.get("RATCHET_DATABASE_URL", "")):
        if not url:
            continue
        try:
            pw = make_url(url).password
        except Exception:
            continue
        if pw:
            out.append(str(pw))
    return sorted({s for s in out if len(s) >= 4}, key=len, reverse=True)


def mask(text: str, secrets: list[str]) -> str:
    """`text` with every secret in `secrets` replaced by its redacted form."""
    for s in secrets:
        text = text.replace(s, redact(s))
    return text


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else e.__class__.__name__)[:limit]


# ---- checks ----


def check_config(config: Optional[Path]):
    """Load the settings. Returns (Check, Settings or None)."""
    from loop.config import ConfigError, load_settings

    where = str(config or os.environ.get("RATCHET_CONFIG") or "no ratchet.toml: defaults and RATCHET_* variables")
    try:
        s = load_settings(config)
    except ConfigError as e:
        return Check("config", "fail", f"{where}: {e}", "fix the named key (README, Configuration; every setting "
                                                        "is listed in deploy/ratchet.toml)"), None
    return Check("config", "ok", f"{where}: home {s.home}, runner {s.runner}, proposer {s.proposer_name}"), s


def check_database(settings) -> Check:
    """Connect and compare the schema's revision with this version's head; never creates or migrates."""
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from db import migrate
    from db.session import make_engine

    url = settings.db_url
    shown = migrate.safe_url(url)
    if url.startswith("sqlite:///") and ":memory:" not in url:
        path = Path(url[len("sqlite:///"):].split("?")[0])
        if not path.exists():
            return Check("database", "warn", f"{shown} does not exist yet",
                         "`ratchet serve` creates it (or `ratchet db upgrade` now)")
    try:
        engine = make_engine(url)
    except (ArgumentError, ValueError) as e:
        return Check("database", "fail", f"malformed URL {shown}: {e.__class__.__name__}",
                     "set RATCHET_DATABASE_URL / database_url to e.g. postgresql://user:password@host:5432/ratchet")
    try:
        st = migrate.schema_state(engine)
        if st.at_head:
            return Check("database", "ok", f"{shown}: schema at {migrate.describe(st.current)}, the head")
        if st.empty:
            return Check("database", "warn", f"{shown} is empty (no tables yet)",
                         "`ratchet serve` creates them (or `ratchet db upgrade` now)")
        try:
            migrate.check_schema(engine)
            return Check("database", "ok", f"{shown}: schema at head")  # upgraded meanwhile
        except migrate.SchemaError as e:
            detail, _, fix = str(e).rpartition(": ")
            return Check("database", "fail", f"{shown}: {detail}", fix)
    except (SQLAlchemyError, OSError) as e:
        return Check("database", "fail", f"cannot connect to {shown}: {_first_line(getattr(e, 'orig', None) or e)}",
                     "is the server up and the URL right? check RATCHET_DATABASE_URL / database_url")
    finally:
        engine.dispose()


def check_slack(settings, env: Mapping[str, str]) -> list[Check]:
    """When SLACK_BOT_TOKEN is set: the configuration (mode, channel), auth.test of the bot token at
    settings.slack_api_url and, in Socket Mode, apps.connections.open of the app token."""
    from slack_sdk import WebClient
    from slack_sdk.errors import SlackApiError

    from bot.slack_app import SlackConfig, SlackConfigError

    bot = env.get("SLACK_BOT_TOKEN", "").strip()
    if not bot:
        extra = " (SLACK_APP_TOKEN is set but unused without SLACK_BOT_TOKEN)" if env.get("SLACK_APP_TOKEN") else ""
        return [Check("slack", "ok", f"not configured: serve uses the shell chat{extra}")]
    out = []
    try:
        cfg = SlackConfig.from_settings(settings, env)
        out.append(Check("slack config", "ok", f"{cfg.mode} mode, channel {cfg.channel}, API {cfg.api_url}"))
    except SlackConfigError as e:
        cfg = None
        out.append(Check("slack config", "fail", str(e), "see README, Connect to Slack"))
    api_url = settings.slack_api_url
    client = WebClient(token=bot, base_url=api_url, timeout=15)
    try:
        a = client.auth_test().data
        out.append(Check("slack bot token", "ok", f"auth.test: bot @{a.get('user')} in {a.get('team')} "
                                                  f"({a.get('team_id')})"))
    except SlackApiError as e:
        out.append(Check("slack bot token", "fail", f"Slack rejected SLACK_BOT_TOKEN: {e.response.get('error')}",
                         "set SLACK_BOT_TOKEN to the Bot User OAuth Token (xoxb-…) under Install App; reinstall "
                         "the app if it was revoked"))
    except Exception as e:  # connection refused, DNS, timeout
        out.append(Check("slack bot token", "fail", f"cannot reach Slack at {api_url}: {_first_line(e)}",
                         "check the network / proxy, or SLACK_API_URL"))
    app = env.get("SLACK_APP_TOKEN", "").strip()
    if app and (cfg is None or cfg.mode == "socket"):
        try:
            WebClient(token=app, base_url=api_url, timeout=15).apps_connections_open(app_token=app)
            out.append(Check("slack app token", "ok", "apps.connections.open: Socket Mode can connect"))
        except SlackApiError as e:
            out.append(Check("slack app token", "fail", f"Slack rejected SLACK_APP_TOKEN: {e.response.get('error')}",
                             "generate an app-level token (xapp-…) with connections:write under Basic "
                             "Information and enable Socket Mode"))
        except Exception as e:
            out.append(Check("slack app token", "fail", f"cannot reach Slack at {api_url}: {_first_line(e)}",
                             "check the network / proxy, or SLACK_API_URL"))
    return out


def check_anthropic(settings, env: Mapping[str, str]) -> Check:
    """When ANTHROPIC_API_KEY is set (or proposer = claude): one 1-token Messages request to the configured
    model (ANTHROPIC_BASE_URL honoured) — it costs a few input tokens."""
    import anthropic

    key = env.get("ANTHROPIC_API_KEY", "").strip()
    if not key:
        if settings.proposer == "claude":
            return Check("anthropic", "fail", "proposer = claude but ANTHROPIC_API_KEY is not set",
                         "set ANTHROPIC_API_KEY (console.anthropic.com → API keys), or proposer = \"offline\"")
        return Check("anthropic", "ok", "ANTHROPIC_API_KEY not set: the offline proposer is used")
    from loop.proposers.claude import make_client

    client = make_client(api_key=key, base_url=env.get("ANTHROPIC_BASE_URL") or None, max_retries=1,
                         timeout=min(settings.claude_timeout_s, 30.0))
    model = settings.claude_model
    try:
        m = client.messages.create(model=model, max_tokens=1, messages=[{"role": "user", "content": "ping"}])
        used = getattr(m, "usage", None)
        tokens = f" ({used.input_tokens} tokens in, {used.output_tokens} out)" if used else ""
        return Check("anthropic", "ok", f"key accepted; {model} answered{tokens}")
    except anthropic.AuthenticationError as e:
        return Check("anthropic", "fail", f"Anthropic rejected ANTHROPIC_API_KEY ({e.status_code})",
                     "create a key at console.anthropic.com → API keys and set ANTHROPIC_API_KEY")
    except anthropic.PermissionDeniedError as e:
        return Check("anthropic", "fail", f"the key may not use {model} ({e.status_code})",
                     "check the key's workspace and model access, or set claude_model")
    except anthropic.NotFoundError:
        return Check("anthropic", "fail", f"model {model} not found (404)", "set claude_model to a model id your "
                                                                           "key can use")
    except (anthropic.RateLimitError, anthropic.InternalServerError) as e:
        return Check("anthropic", "warn", f"key accepted, but the API is busy now ({e.status_code})",
                     "nothing to fix if it passes later; the proposer retries and backs off")
    except anthropic.BadRequestError as e:
        return Check("anthropic", "warn", f"key accepted; the test request was refused (400: {_first_line(e, 120)})",
                     "check claude_model")
    except anthropic.APIConnectionError as e:
        return Check("anthropic", "fail", f"cannot reach the Anthropic API at {client.base_url}: {_first_line(e)}",
                     "check the network / proxy, or ANTHROPIC_BASE_URL")
    except anthropic.APIStatusError as e:
        return Check("anthropic", "warn", f"unexpected answer {e.status_code}: {_first_line(e, 120)}",
                     "try again; see status.anthropic.com")


def check_runner(settings, ssh_health: Optional[Callable] = None) -> list[Check]:
    """The runner: local (torch sees the configured device), ssh (each [[hosts]] entry through
    loop/runners/ssh.py's health: connect, GPUs, free disk, Python), ray (installed; the cluster is not asked)."""
    if settings.runner == "local":
        try:
            import torch

            from trainer.worker import pick_device

            dev = pick_device(settings.device)
            if dev.type == "cuda" and not torch.cuda.is_available():
                return [Check("runner", "fail", f"device {settings.device} configured but torch {torch.__version__} "
                                                f"sees no CUDA GPU", "install the CUDA build of torch, or device = "
                                                                     "\"auto\"")]
        except Exception as e:
            return [Check("runner", "fail", f"local runner: {_first_line(e)}", "check device and the torch install")]
        note = "" if dev.type != "cpu" or settings.device == "cpu" else " (no GPU found: training on CPU)"
        return [Check("runner", "ok", f"local runner on {dev.type}, torch {torch.__version__}{note}")]
    if settings.runner == "ray":
        if importlib.util.find_spec("ray") is None:
            return [Check("runner", "fail", "runner = \"ray\" but Ray is not installed", "pip install 'ratchet[ray]'")]
        return [Check("runner", "ok", f"ray runner at {settings.ray_address or 'a local Ray instance'} "
                                      f"(not checked here)")]
    if not settings.hosts:
        return [Check("hosts", "fail", "runner = \"ssh\" but no [[hosts]] in ratchet.toml",
                      "add a [[hosts]] entry per GPU host (README, GPU hosts over SSH)")]
    if ssh_health is None:
        from loop.runners.ssh import SSHRunner

        def ssh_health():
            # As serve builds it (host keys recorded where serve records them).
            runner = SSHRunner(settings.hosts, known_hosts_file=settings.home / "known_hosts",
                               connect_timeout_s=10.0, op_timeout_s=20.0)
            try:
                return runner.health()
            finally:
                runner.close(kill_running=False)
    out = []
    for h in ssh_health():
        name = f"host {h.name}"
        if not h.up:
            out.append(Check(name, "fail", f"{h.address}: {h.error or 'down'}",
                             "check address, user and key; on the host run `bash bootstrap-gpu-host.sh --check` "
                             "(deploy/bootstrap-gpu-host.sh)"))
            continue
        what = f"{len(h.gpus)} GPU(s) " + ", ".join(sorted({g.get('name', '?') for g in h.gpus})) if h.gpus else \
            f"{h.cpus or '?'} CPUs (cpu_only)"
        disk = h.free_disk_bytes
        detail = f"{h.address}: up, {what}" + (f", {disk / 2**30:.0f} GiB free in the workdir" if disk else "")
        if disk is not None and disk < LOW_DISK_BYTES:
            out.append(Check(name, "warn", detail, "free disk space in the host's workdir"))
        else:
            out.append(Check(name, "ok", detail))
    return out


def check_sandbox(settings) -> Check:
    """What the proposal sandbox enforces on this machine (local runner; SSH and Ray hosts sandbox their own runs):
    fail when it is on but cannot run (nothing would train), warn for each protection that is missing."""
    if settings.runner != "local":
        return Check("sandbox", "ok", f"{settings.runner} runner: each host's harness sandboxes its own runs "
                                      "(deploy/bootstrap-gpu-host.sh installs bubblewrap)")
    from loop.runners.base import sandbox_config
    from trainer.sandbox import describe, features

    f = features(sandbox_config(settings))
    line = describe(f)
    if f["mode"] == "unavailable":
        return Check("sandbox", "fail", line, "install bubblewrap (apt-get install bubblewrap uidmap), or set "
                                              "sandbox = false to run proposals unconfined (README, Trust model)")
    if f["missing"]:
        return Check("sandbox", "warn", line, "README, Trust model: what each missing protection needs")
    return Check("sandbox", "ok", line)


def check_data(settings) -> Check:
    """The configured corpus's preparation in <home>/data: present, and its fingerprints (tokenizer, byte table,
    validation shard) match the manifest (trainer.data.verify_fingerprints)."""
    from trainer import data as tdata

    d = tdata.data_dir_for(settings.home, settings.corpus, settings.vocab_size)
    if not tdata.is_prepared(d, settings.corpus, settings.vocab_size):
        return Check("data", "warn", f"{settings.corpus} (vocab {settings.vocab_size}) not prepared in {d}",
                     "`ratchet data prepare` (serve prepares it at start)")
    try:
        m = tdata.verify_fingerprints(d)
    except (tdata.FingerprintError, OSError, ValueError, KeyError) as e:
        return Check("data", "fail", f"{d}: {_first_line(e)}", "`ratchet data prepare` rebuilds a preparation "
                                                                "whose fingerprints fail")
    return Check("data", "ok", f"{settings.corpus} vocab {settings.vocab_size}: {len(m['fingerprints'])} "
                               f"fingerprints match in {d}")


def run_checks(config: Optional[Path] = None, env: Mapping[str, str] = os.environ,
               ssh_health: Optional[Callable] = None) -> tuple[list[Check], object]:
    """Every check, in order: config, database, slack, anthropic, runner / hosts, sandbox, data. Returns (checks, the
    Settings or None). A config that does not load stops the rest (they need it)."""
    first, settings = check_config(config)
    if settings is None:
        return [first], None
    checks = [first]
    for fn in (lambda: [check_database(settings)], lambda: check_slack(settings, env),
               lambda: [check_anthropic(settings, env)], lambda: check_runner(settings, ssh_health),
               lambda: [check_sandbox(settings)], lambda: [check_data(settings)]):
        try:
            checks += fn()
        except Exception as e:  # a check that breaks is a failed check, not a crashed doctor
            checks.append(Check("doctor", "fail", f"a check raised {e.__class__.__name__}: {_first_line(e)}",
                                "report this as a bug"))
    return checks, settings


def format_check(c: Check) -> str:
    """One line: `ok    database      sqlite:///…: schema at 0002 (…)` and, when not ok, `→ fix`."""
    line = f"{c.status:<5} {c.name:<16} {c.detail}"
    return line + (f"  → {c.fix}" if c.fix and c.status != "ok" else "")


def doctor(config: Optional[Path] = None, console: Optional[Console] = None,
           env: Mapping[str, str] = os.environ) -> int:
    """Run the checks and print one masked line each. Returns 1 when any check failed, else 0."""
    console = console or Console(highlight=False)
    checks, settings = run_checks(config, env)
    secrets = secrets_in(env, (settings.db_url,) if settings is not None else ())
    for c in checks:
        line = mask(format_check(c), secrets)
        status, rest = line[:5], line[5:]
        console.print(Text.assemble((status, COLOURS.get(c.status, "")), rest), soft_wrap=True)
    fails = sum(c.status == "fail" for c in checks)
    warns = sum(c.status == "warn" for c in checks)
    console.print(f"{len(checks)} checks: {fails} failed, {warns} warnings" if fails or warns else
                  f"{len(checks)} checks: all ok")
    return 1 if fails else 0
