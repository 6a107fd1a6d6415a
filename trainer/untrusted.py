"""Text that came from a proposal's code (an error line, a log tail): made safe to store, post and show.

Such text is data, never evidence for a decision. Cleaning truncates it, drops control characters and
replaces secret-shaped strings (API keys, tokens, passwords in URLs, private keys) with `[redacted]`.
"""

from __future__ import annotations

import re

MAX_LINE = 300  # characters kept of one line
MAX_LINES = 20  # lines kept of a tail
REDACTED = "[redacted]"

# Secret shapes, by the issuers' documented prefixes: Slack (xox?-, xapp-), Anthropic (sk-ant-), OpenAI-style
# (sk-), GitHub (ghp_, github_pat_), AWS access key ids (AKIA…), Hugging Face (hf_), bearer headers, the password
# of a URL's userinfo, `password=`/`token=`-style assignments, and PEM private-key blocks.
_SECRETS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S),
    re.compile(r"\b(xox[abposr]|xapp)-[A-Za-z0-9-]{6,}"),
    re.compile(r"\bsk-(ant-)?[A-Za-z0-9_-]{10,}"),
    re.compile(r"\b(ghp|gho|ghs|ghu|hf)_[A-Za-z0-9]{16,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password@host
    re.compile(r"(?i)\b(pass(word)?|passwd|secret|token|api[_-]?key|auth)\b(\s*[=:]\s*)(['\"]?)[^\s'\",;]{4,}"),
]
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")
# Long opaque tokens (base64/hex-like: letters and digits mixed, no path separators).
_LONG_SECRET = re.compile(r"\b(?=[A-Za-z0-9+_-]*\d)(?=[A-Za-z0-9+_-]*[A-Za-z])[A-Za-z0-9+_-]{32,}={0,2}")


def redact(text: str) -> str:
    """`text` with every secret-shaped substring replaced by `[redacted]` (assignments keep their key)."""
    for pat in _SECRETS:
        if "pass(word)?" in pat.pattern:
            text = pat.sub(lambda m: f"{m.group(1)}{m.group(3)}{REDACTED}", text)
        else:
            text = pat.sub(REDACTED, text)
    return _LONG_SECRET.sub(REDACTED, text)


def clean_line(text: object, limit: int = MAX_LINE) -> str:
    """One line of untrusted text: the first non-empty line, control characters removed, secrets redacted, at
    most `limit` characters (an ellipsis marks a cut)."""
    s = str(text)
    s = redact(_CONTROL.sub("", s))
    line = next((ln.strip() for ln in s.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[:limit - 1] + "…"


def clean_lines(lines, n: int = MAX_LINES, limit: int = MAX_LINE) -> list[str]:
    """The last `n` lines of untrusted text (a list of lines or one string), each cleaned as by clean_line
    but keeping indentation. Secrets that span lines (a PEM block) are redacted before the split."""
    text = lines if isinstance(lines, str) else "\n".join(str(x) for x in (lines or []))
    out = []
    for ln in redact(_CONTROL.sub("", text)).splitlines()[-n:]:
        ln = ln.rstrip()
        out.append(ln if len(ln) <= limit else ln[:limit - 1] + "…")
    return out
