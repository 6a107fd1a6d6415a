"""Settings: one `ratchet.toml` plus RATCHET_* environment variables; every default works offline on a laptop.

Reads configuration only; never touches the database or the workspace.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


def default_home() -> Path:
    """`$RATCHET_HOME`, else `~/.ratchet`."""
    return Path(os.environ.get("RATCHET_HOME", Path.home() / ".ratchet")).expanduser()


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


class HostConfig(BaseModel):
    """One GPU host for the SSH runner (`[[hosts]]` in ratchet.toml)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    address: str
    port: int = Field(default=22, ge=1, le=65535)
    user: str = "ratchet"
    key: Optional[Path] = Field(default=None, description="private key file; default: the SSH agent / ~/.ssh")
    known_hosts: Optional[Path] = Field(default=None, description="strict known_hosts file; default: <home>/known_hosts, "
                                                                 "a new host's key accepted once and then pinned")
    gpus: int = Field(default=1, ge=1, description="slots on this host: one per GPU")
    cpu_only: bool = Field(default=False, description="a CPU host (tests, debugging): one slot, no nvidia-smi")
    workdir: str = Field(default="~/ratchet", description="where the trainer, data and experiments live on the host")
    python: str = Field(default="python3", description="interpreter on the host that runs the harness "
                                                       "(<workdir>/venv/bin/python when the bootstrap made one)")


class ScaleConfig(BaseModel):
    """One rung of the scale ladder (`[[scales]]`): a larger configuration a gain must transfer to."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    budget_s: Optional[float] = Field(default=None, gt=0, description="training seconds; default budget_mult × the run's")
    budget_mult: float = Field(default=1.0, gt=0)
    scale: dict = Field(default_factory=dict, description="ctx.scale overrides, e.g. {depth_mult = 1.5}")
    gpus: int = Field(default=1, ge=1, description="GPUs of one host per promotion run at this scale: the run "
                                                   "holds that many slots (README: Scales on several GPUs)")


def default_scales() -> list[ScaleConfig]:
    """s0: the loop's own; s1: depth ×1.5, budget ×3; s2: depth ×2, budget ×9."""
    return [ScaleConfig(name="s0"), ScaleConfig(name="s1", budget_mult=3.0, scale={"depth_mult": 1.5}),
            ScaleConfig(name="s2", budget_mult=9.0, scale={"depth_mult": 2.0})]


class Settings(BaseSettings):
    """All settings. Seconds for times; val_bpb thresholds in bits per byte.

    Precedence: explicit arguments > environment (RATCHET_<NAME>) > ratchet.toml > defaults.
    Unknown keys in ratchet.toml are errors, so a typo never silently falls back to a default.
    """

    model_config = SettingsConfigDict(env_prefix="RATCHET_", extra="forbid", validate_default=True)

    home: Path = Field(default_factory=default_home, description="state directory: database, data, workspace, logs")
    database_url: Optional[str] = Field(default=None, description="SQLAlchemy URL; default SQLite in home")
    workspace: Optional[Path] = Field(default=None, description="the research git repo; default <home>/workspace")
    run: str = Field(default="main", pattern=r"^[A-Za-z0-9._-]+$", description="run name; branch ratchet/<run>")

    corpus: str = "shakespeare"
    vocab_size: Optional[int] = Field(default=None, gt=256, le=65536,
                                      description="BPE vocabulary; default 8192 for web corpora, else 4096")
    corpus_base_url: Optional[str] = Field(default=None, description="a mirror of the web corpus's shards "
                                                                     "(air-gapped hosts)")

    budget_s: float = Field(default=60.0, gt=0, description="training time budget per experiment, seconds")
    grace_s: Optional[float] = Field(default=None, ge=0, description="extra seconds before a run is killed")
    eval_tokens: Optional[int] = Field(default=None, gt=0)
    seq_len: Optional[int] = Field(default=None, gt=0)
    device: str = "auto"

    noise_repeats: int = Field(default=3, ge=2, description="baseline runs that measure the noise floor")
    min_delta: float = Field(default=0.0003, ge=0, description="smallest val_bpb gain ever kept")
    noise_z: float = Field(default=2.0, ge=0, description="a keep must beat head by z·σ")
    confirm: Literal["paired", "seeds", "none"] = Field(
        default="paired", description="how a passing change is confirmed before it becomes head: paired = a run of "
        "it and a run of head started together on its hardware class, judged on the difference; seeds = new-seed "
        "re-runs of it, judged on their mean; none = kept at once")
    confirm_runs: int = Field(default=1, ge=0, description="confirmation pairs (paired) or new-seed re-runs "
                                                           "(seeds) a passing change needs; 0: keep at once")
    hardware: str = Field(default="", description="pin the run to one hardware class: a glob on device_name or "
                                                  "host name (`NVIDIA H100*`); empty: any")

    proposer: Optional[Literal["offline", "claude"]] = None  # None: claude when ANTHROPIC_API_KEY is set
    claude_model: str = Field(default="claude-fable-5-2", description="Anthropic model id for the Claude proposer "
                                                                      "(default: the strongest the SDK lists)")
    claude_max_tokens: int = Field(default=16_000, gt=0, description="output tokens per answer, thinking included")
    claude_repair_turns: int = Field(default=2, ge=0, description="turns to fix edits that fail to apply/validate")
    claude_history_rows: int = Field(default=40, gt=0, description="experiments shown to Claude")
    claude_max_retries: int = Field(default=4, ge=0, description="SDK retries on 429 / 529 / 5xx / connection errors")
    claude_timeout_s: float = Field(default=120.0, gt=0)
    proposer_concurrency: Optional[int] = Field(default=None, ge=1, le=64,
                                                description="most Claude requests in flight; default one per slot "
                                                            "(at most 64); fewer when the API rate-limits")
    claude_prices: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="USD per million tokens by model prefix, overriding loop/pricing.py")
    timezone: str = Field(default="UTC", description="IANA zone for budget days and the digest's cron")
    digest_cron: str = Field(default="0 9 * * *", description="crontab (minute hour dom month dow) of the daily digest")
    budget_gpu_hours_per_day: Optional[float] = Field(default=None, gt=0, description="None: no cap")
    budget_gpu_hours_total: Optional[float] = Field(default=None, gt=0)
    budget_claude_usd_per_day: Optional[float] = Field(default=None, gt=0)
    budget_claude_usd_total: Optional[float] = Field(default=None, gt=0)
    runner: Literal["local", "ssh", "ray"] = "local"
    standby: bool = Field(default=True, description="local runner: keep the next harness started on each slot "
                                                    "(torch loaded, waiting), so an experiment starts at once")
    hosts: list[HostConfig] = Field(default_factory=list, description="SSH runner hosts")
    ray_address: Optional[str] = Field(default=None, description="Ray cluster address (ray://… or host:port); "
                                                                 "None starts a local Ray instance")
    ray_num_gpus: float = Field(default=1.0, ge=0, description="GPUs per experiment task on Ray (0: CPU tasks)")
    health_interval_s: float = Field(default=60.0, gt=0, description="host health checks, seconds apart")
    scales: list[ScaleConfig] = Field(default_factory=default_scales, description="the scale ladder")
    promote_scale: str = Field(default="s1", description="default target of `promote`")
    promote_seeds: int = Field(default=2, ge=1, description="runs per side at the larger scale")
    auto_promote_every: Optional[int] = Field(default=None, gt=0, description="promote head every N keeps; off")
    prune: bool = Field(default=True, description="stop runs whose loss curve is clearly behind head's")
    prune_after: float = Field(default=0.3, ge=0, le=1, description="fraction of the budget before pruning may act")
    prune_margin: float = Field(default=0.05, ge=0, description="relative smoothed-loss margin behind head's curve")
    sandbox: bool = Field(default=True, description="contain train.py (Linux): no network, an unprivileged user, "
                                                    "read-only outside its directory, resource limits (README: Trust model)")
    sandbox_user: str = Field(default="nobody", description="user name or uid experiments run as when the "
                                                            "service runs as root")
    sandbox_memory_gb: float = Field(default=0.0, ge=0, description="address-space limit per CPU experiment, GiB; "
                                                                    "default 0 = 80% of the host's RAM; never on CUDA")
    sandbox_max_processes: int = Field(default=4096, ge=8, description="processes and threads of the sandbox user, "
                                                                       "all its experiments together")
    sandbox_max_file_gb: float = Field(default=16.0, gt=0, description="largest file an experiment may write, GiB")
    sandbox_max_open_files: int = Field(default=4096, ge=64, description="open files per experiment process")
    seed: int = 0

    # Slack (bot/slack_app.py): used when SLACK_BOT_TOKEN and SLACK_APP_TOKEN (Socket Mode) or
    # SLACK_SIGNING_SECRET (HTTP mode) are set; tokens come from the environment only, never from this file.
    slack_channel: str = Field(default="", description="channel id (C…) for posts; default $SLACK_CHANNEL")
    slack_api_url: str = Field(default="", description="Web API base URL; default $SLACK_API_URL or "
                                                       "https://slack.com/api/ (GovSlack: https://slack-gov.com/api/)")
    slack_mode: Optional[Literal["socket", "http"]] = None  # None: socket with SLACK_APP_TOKEN, else http
    slack_http_host: str = "0.0.0.0"
    slack_http_port: int = Field(default=3000, ge=0, le=65535, description="HTTP mode: port of /slack/events")
    slack_roles: dict[Literal["viewer", "operator", "admin"], list[str]] = Field(
        default_factory=dict, description="role → Slack user ids (U…/W…) and user-group ids (S…); others are viewers")
    slack_daily_thread: bool = Field(default=False, description="discarded / crashed / invalid / pruned posts go "
                                                                "into one thread per day instead of the channel")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {v!r} (an IANA name such as Europe/Berlin)") from None
        return v

    @field_validator("digest_cron")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        from loop.scheduler import crontab_trigger

        try:
            crontab_trigger(v, "UTC")
        except (ValueError, IndexError) as e:
            raise ValueError(f"not a crontab expression ({e}): {v!r}") from None
        return v

    @model_validator(mode="after")
    def _derive(self) -> "Settings":
        self.home = Path(self.home).expanduser()
        if self.workspace is None:
            self.workspace = self.home / "workspace"
        self.slack_channel = self.slack_channel or os.environ.get("SLACK_CHANNEL", "")
        self.slack_api_url = self.slack_api_url or os.environ.get("SLACK_API_URL", "") or "https://slack.com/api/"
        if not self.slack_api_url.endswith("/"):
            self.slack_api_url += "/"
        if self.vocab_size is None:
            from trainer.data import default_vocab_size

            self.vocab_size = default_vocab_size(self.corpus)
        return self

    @property
    def db_url(self) -> str:
        """The database URL: RATCHET_DATABASE_URL / database_url, else `<home>/ratchet.db`."""
        return self.database_url or f"sqlite:///{(self.home / 'ratchet.db').resolve()}"

    @property
    def proposer_name(self) -> str:
        """`offline` unless configured, or an Anthropic key is present."""
        if self.proposer:
            return self.proposer
        return "claude" if os.environ.get("ANTHROPIC_API_KEY") else "offline"

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("RATCHET_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)


ENV_NOT_SETTINGS = frozenset({"RATCHET_CONFIG"})  # RATCHET_ variables read that are not settings


def env_typos(environ=None) -> list[str]:
    """RATCHET_<NAME> environment variables that are no setting but nearly spell one — a typo the environment
    source would otherwise ignore — as 'RATCHET_BUGDET_S: unknown setting (did you mean RATCHET_BUDGET_S?)'.
    Names far from every setting (a deployment's own variables) are left alone."""
    import difflib

    environ = os.environ if environ is None else environ
    known = sorted({f"RATCHET_{name.upper()}" for name in Settings.model_fields} | ENV_NOT_SETTINGS)
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("RATCHET_") or upper in known:
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.85)
        if close:
            out.append(f"{name}: unknown setting (did you mean {close[0]}?)")
    return out


def load_settings(config: Optional[Path] = None, **overrides) -> Settings:
    """Settings from `config` (or RATCHET_CONFIG), the environment and `overrides` (None values ignored).

    Raises ConfigError with the offending key named (a typo in ratchet.toml or in a RATCHET_ variable, a bad value).
    """
    previous = os.environ.get("RATCHET_CONFIG")
    if config is not None:
        if not Path(config).is_file():
            raise ConfigError(f"config file not found: {config}")
        os.environ["RATCHET_CONFIG"] = str(config)  # the TOML source reads it; put back below
    try:
        typos = env_typos()
        if typos:
            raise ConfigError("invalid configuration: " + "; ".join(typos))
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"]) or "config"
            msg = "unknown setting (typo?)" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{key}: {msg}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    finally:
        if config is not None:  # never leak one call's config file into the next
            if previous is None:
                os.environ.pop("RATCHET_CONFIG", None)
            else:
                os.environ["RATCHET_CONFIG"] = previous
