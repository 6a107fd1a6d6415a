"""Settings: one `ratchet.toml` plus RATCHET_* environment variables; every default works offline on a laptop.

Reads configuration only; never touches the database or the workspace.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


def default_home() -> Path:
    """`$RATCHET_HOME`, else `~/.ratchet`."""
    return Path(os.environ.get("RATCHET_HOME", Path.home() / ".ratchet")).expanduser()


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


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
    vocab_size: int = Field(default=4096, gt=256, le=65536)

    budget_s: float = Field(default=60.0, gt=0, description="training time budget per experiment, seconds")
    grace_s: Optional[float] = Field(default=None, ge=0, description="extra seconds before a run is killed")
    eval_tokens: Optional[int] = Field(default=None, gt=0)
    seq_len: Optional[int] = Field(default=None, gt=0)
    device: str = "auto"

    noise_repeats: int = Field(default=3, ge=2, description="baseline runs that measure the noise floor")
    min_delta: float = Field(default=0.0003, ge=0, description="smallest val_bpb gain ever kept")
    noise_z: float = Field(default=2.0, ge=0, description="a keep must beat head by z·σ")

    proposer: Optional[Literal["offline", "claude"]] = None  # None: claude when ANTHROPIC_API_KEY is set
    claude_model: str = Field(default="claude-opus-4-8", description="Anthropic model id for the Claude proposer")
    claude_max_tokens: int = Field(default=8192, gt=0)
    claude_repair_turns: int = Field(default=2, ge=0, description="turns to fix edits that fail to apply/validate")
    claude_history_rows: int = Field(default=40, gt=0, description="experiments shown to Claude")
    claude_max_retries: int = Field(default=4, ge=0, description="SDK retries on 429 / 529 / 5xx / connection errors")
    claude_timeout_s: float = Field(default=120.0, gt=0)
    claude_prices: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="USD per million tokens by model prefix, overriding loop/pricing.py")
    runner: Literal["local"] = "local"
    seed: int = 0

    @model_validator(mode="after")
    def _derive(self) -> "Settings":
        self.home = Path(self.home).expanduser()
        if self.workspace is None:
            self.workspace = self.home / "workspace"
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


def load_settings(config: Optional[Path] = None, **overrides) -> Settings:
    """Settings from `config` (or RATCHET_CONFIG), the environment and `overrides` (None values ignored).

    Raises ConfigError with the offending key named (a typo in ratchet.toml, a bad value).
    """
    if config is not None:
        if not Path(config).is_file():
            raise ConfigError(f"config file not found: {config}")
        os.environ["RATCHET_CONFIG"] = str(config)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"]) or "config"
            msg = "unknown setting (typo?)" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{key}: {msg}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
