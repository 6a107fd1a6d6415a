"""The example ratchet.toml (deploy/ratchet.toml), generated from Settings' fields: every setting, commented.

Regenerate after adding a setting: `python -m bot.config_example > deploy/ratchet.toml` (tests/test_deploy.py
fails until the file matches). Reads loop/config.py only.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from loop.config import HostConfig, ScaleConfig, Settings

# For each setting whose Field has no description, or whose default is None / empty and so needs an example
# value: (description or None to keep the Field's, how the default is described or None, an example value).
NOTES: dict[str, tuple[str | None, str | None, Any]] = {
    "home": (None, "$RATCHET_HOME, else ~/.ratchet", "/var/lib/ratchet"),
    "database_url": ("SQLAlchemy URL (postgresql://… for PostgreSQL); better set RATCHET_DATABASE_URL, it holds a "
                     "password", "SQLite <home>/ratchet.db", "postgresql://ratchet:CHANGE_ME@localhost:5432/ratchet"),
    "workspace": (None, "<home>/workspace", "/var/lib/ratchet/workspace"),
    "corpus": ("training corpus: shakespeare | stdlib | climbmix[:N] | fineweb-edu[:N] (web corpora over HTTP, N "
               "train shards) | parquet:https://…/shard_{:05d}.parquet[:N] | parquet:DIR (a text column; last "
               "shard is validation) | text:GLOB", None, None),
    "vocab_size": ("BPE vocabulary size, 257..65536 (tokens are uint16)", "8192 for web corpora, else 4096", 8192),
    "corpus_base_url": (None, "the corpus's own (Hugging Face)", "https://mirror.example/climbmix"),
    "grace_s": ("seconds past the budget before a run is a timeout (the last step and the export)",
                "30 + budget_s / 10", 90.0),
    "eval_tokens": ("validation tokens scored for val_bpb", "2^14 on CPU, 2^22 on CUDA", 4194304),
    "seq_len": ("sequence length handed to train.py (ctx.seq_len)", "train.py's own (256 on CPU, 2048 on CUDA)",
                2048),
    "device": ("auto (cuda, then mps, then cpu) | cuda | mps | cpu", None, None),
    "proposer": ("offline (hyperparameter search, no network) | claude (Anthropic API)",
                 "claude when ANTHROPIC_API_KEY is set, else offline", "claude"),
    "claude_max_tokens": ("output tokens per Claude answer (thinking included), at most", None, None),
    "proposer_concurrency": ("most Claude requests in flight (the swarm); lowered while the API rate-limits",
                             "one per slot, at most 64", 16),
    "claude_timeout_s": ("seconds per Anthropic request", None, None),
    "claude_prices": (None, "{} (loop/pricing.py's table)",
                      {"claude-opus-4": {"input": 5.0, "output": 25.0, "cache_write": 6.25, "cache_read": 0.5}}),
    "budget_gpu_hours_per_day": ("GPU-hour cap per budget day (slot wall time); `budget` commands override it",
                                 "no cap", 24.0),
    "budget_gpu_hours_total": ("GPU-hour cap over the whole run", "no cap", 500.0),
    "budget_claude_usd_per_day": ("Claude spend cap per budget day, USD", "no cap", 40.0),
    "budget_claude_usd_total": ("Claude spend cap over the whole run, USD", "no cap", 1000.0),
    "runner": ("where experiments train: local (this machine) | ssh ([[hosts]] below) | ray (a Ray cluster)",
               None, None),
    "ray_address": (None, None, "ray://ray-head.lab.example:10001"),
    "auto_promote_every": (None, None, 5),
    "seed": ("base seed: baseline repeats use seed, seed+1, …; experiment N uses seed+N", None, None),
    "slack_channel": (None, "$SLACK_CHANNEL", "C0123456789"),
    "slack_api_url": (None, "$SLACK_API_URL, else https://slack.com/api/", "https://slack.com/api/"),
    "slack_mode": ("socket (Socket Mode, no public URL) | http (/slack/events behind your HTTPS proxy)",
                   "socket with SLACK_APP_TOKEN, else http", "socket"),
    "slack_http_host": ("HTTP mode: interface /slack/events listens on", None, None),
    "slack_roles": (None, "{} (everyone is a viewer)", {"operator": ["U0123ABC", "S0ONCALL"], "admin": ["U0456DEF"]}),
}
# Fields of the [[hosts]] / [[scales]] tables without a description of their own.
SUB_NOTES = {
    "name": "unique name (letters, digits, . _ -)",
    "address": "host name or IP the service connects to",
    "port": "SSH port",
    "user": "remote user (the bootstrap script creates `ratchet`)",
    "budget_mult": "training seconds = budget_mult × the run's budget_s, unless budget_s is set",
}
TABLES = {"hosts": HostConfig, "scales": ScaleConfig}
HOST_EXAMPLE = {"name": "gpu1", "address": "gpu1.lab.example", "user": "ratchet", "key": "~/.ssh/ratchet_ed25519",
                "gpus": 8}


class ExampleError(ValueError):
    """A setting cannot be documented: it has no description and no entry in NOTES."""


# ---- TOML rendering ----


def toml_value(v: Any) -> str:
    """A Python value as TOML: strings (basic, JSON-escaped), numbers, booleans, arrays, inline tables."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}" if v else "{}"
    if hasattr(v, "__fspath__"):
        return json.dumps(str(v), ensure_ascii=False)
    raise TypeError(f"no TOML for {type(v).__name__}")


def toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _default(field) -> Any:
    if field.default is not PydanticUndefined:
        return field.default
    if field.default_factory is not None:
        return field.default_factory()
    return PydanticUndefined


def _plain(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return {k: _plain(x) for k, x in v.model_dump(exclude_defaults=True).items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _wrap(text: str, prefix: str = "# ", width: int = 110) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, initial_indent=prefix, subsequent_indent=prefix) or [prefix.rstrip()]


# ---- the file ----


def _setting(name: str, field) -> list[str]:
    desc, default_text, example = NOTES.get(name, (None, None, None))
    desc = desc or field.description
    if not desc:
        raise ExampleError(f"setting {name!r} has no description: give its Field a description, or add it to "
                           f"NOTES in bot/config_example.py")
    default = _default(field)
    shown = example if default is None or default == {} or name in ("home", "slack_channel", "slack_api_url") \
        else default
    if shown is None:
        raise ExampleError(f"setting {name!r} defaults to None: add an example value to NOTES")
    if default_text is None:
        default_text = toml_value(default) if default not in (None, PydanticUndefined) else "not set"
    said = "default" in desc.lower()  # the description already says it
    lines = _wrap(f"{desc}." if said else f"{desc}. Default: {default_text}.")
    lines.append(f"#{name} = {toml_value(_plain(shown))}")
    return lines


def _table(name: str, field) -> list[str]:
    model = TABLES[name]
    default = _default(field)
    lines = _wrap(f"[[{name}]]: {field.description}. Default: "
                  f"{'none' if not default else ', '.join(x.name for x in default)}.")
    lines.append("# Keys of each entry:")
    for sub, f in model.model_fields.items():
        d = _default(f)
        d_text = "required" if d is PydanticUndefined else f"default {toml_value(d) if d is not None else 'not set'}"
        desc = f.description or SUB_NOTES.get(sub)
        if not desc:
            raise ExampleError(f"[[{name}]] key {sub!r} has no description: add one to its Field or to SUB_NOTES")
        lines += _wrap(f"{sub}: {desc} ({d_text})", prefix="#   ")
    entries = [_plain(x) for x in default] if default else [HOST_EXAMPLE]
    for e in entries:
        lines.append(f"#[[{name}]]")
        lines += [f"#{toml_key(k)} = {toml_value(v)}" for k, v in e.items()]
    return lines


def example_toml() -> str:
    """The whole example file: a header, every scalar setting commented out with its default (or an example
    where the default is unset), then the [[hosts]] and [[scales]] tables. Uncommenting a `#key = …` line
    gives a valid setting. Raises ExampleError when a setting cannot be documented."""
    out = [
        "# ratchet.toml — every setting of Ratchet (loop/config.py) with its default; uncomment to change one.",
        "# Generated by `python -m bot.config_example > deploy/ratchet.toml` (tests/test_deploy.py keeps it current).",
        "#",
        "# Path: --config or RATCHET_CONFIG. Each setting can also come from the environment as RATCHET_<NAME>",
        "# (which wins over this file). An unknown key is an error that names it.",
        "# Secrets never go here: SLACK_BOT_TOKEN, SLACK_APP_TOKEN, SLACK_SIGNING_SECRET, ANTHROPIC_API_KEY and",
        "# RATCHET_DATABASE_URL (it holds the password) come from the environment only (deploy/ratchet.env.example).",
        "",
    ]
    tables = []
    for name, field in Settings.model_fields.items():
        if name in TABLES:
            tables.append((name, field))
            continue
        out += _setting(name, field) + [""]
    out.append("# ---- tables: keep them at the end (every key after a [[table]] line belongs to that table) ----")
    out.append("")
    for name, field in tables:
        out += _table(name, field) + [""]
    return "\n".join(out).rstrip() + "\n"


def uncommented(text: str) -> str:
    """The example with every setting and table line uncommented (`#key = …`, `#[[…]]`): for the test that
    the example values are valid too."""
    return "\n".join(line[1:] if re.match(r"#(\[\[|[A-Za-z_\"])", line) else line for line in text.splitlines())


if __name__ == "__main__":
    sys.stdout.write(example_toml())
