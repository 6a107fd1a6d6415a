"""Block Kit rendering of outbox events and command replies: pure functions from data to Slack payloads.

Never calls Slack and never changes state; bot/slack_app.py and bot/notifier.py send what these build.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

# action_id of each button; bot/slack_app.py registers one listener per id.
PAUSE = "ratchet_pause"
RESUME = "ratchet_resume"
REVERT = "ratchet_revert"
PROMOTE = "ratchet_promote"
SHOW_DIFF = "ratchet_diff"

# Message metadata that makes a post findable again after a crash (conversations.history).
EVENT_METADATA_TYPE = "ratchet_event"
DAILY_METADATA_TYPE = "ratchet_daily"

# Kinds rendered as one compact line; with slack_daily_thread they go into the day's thread.
COMPACT_KINDS = frozenset({"discarded", "crashed", "invalid", "pruned", "aborted", "baseline_run", "infra_failed",
                           "confirming"})
MARK = {"kept": "✓", "discarded": "✗", "crashed": "!", "invalid": "⊘", "pruned": "✂", "aborted": "■",
        "paused": "⏸", "resumed": "▶", "baseline": "≈", "baseline_run": "·", "infra_failed": "↻", "hint": "✎",
        "reverted": "↩", "proposer_error": "!", "budget": "$", "digest": "📈", "rebased": "↷", "confirming": "🔁",
        "host_down": "▼",
        "host_up": "▲", "promotion": "⇪", "promotion_requested": "⇪", "promotion_started": "⇪",
        "promotion_cancelled": "⇪", "corpus_small": "⚠"}
# A promotion's verdict (loop/promotion.py judge) → its mark and words.
VERDICTS = {"transfers": ("✅", "transfers"), "does_not_transfer": ("❌", "does not transfer"),
            "inconclusive": ("❔", "inconclusive"), "scale_ignored": ("⚠️", "no verdict: train.py ignores ctx.scale")}

SECTION_MAX = 3000  # characters of a section's text
HEADER_MAX = 150
FIELD_MAX = 2000
FALLBACK_MAX = 3000  # the notification text we send next to blocks
DIFF_CHUNK = 2800  # characters of diff per thread message
DIFF_MAX_MESSAGES = 5

_MENTION = re.compile(r"&lt;@([UW][A-Z0-9]+)&gt;")


@dataclass
class Message:
    """One Slack message: fallback `text` (notifications, screen readers), Block Kit `blocks`, and whether
    it may go into the day's thread (`compact`)."""

    text: str
    blocks: list = field(default_factory=list)
    compact: bool = False


# ---- text helpers ----


def escape(text: Any) -> str:
    """Escape &, <, > for mrkdwn (so text from a proposal cannot @channel or fake a link); user mentions
    written as <@U…> by the bot itself stay mentions."""
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MENTION.sub(r"<@\1>", s)


def truncate(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def first_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of `text`, at most `limit` characters."""
    for line in (text or "").splitlines():
        if line.strip():
            return truncate(line.strip(), limit)
    return ""


def _bpb(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _plain(text: str, limit: int = 75) -> dict:
    return {"type": "plain_text", "text": truncate(text, limit), "emoji": True}


def _mrkdwn(text: str, limit: int = SECTION_MAX) -> dict:
    return {"type": "mrkdwn", "text": truncate(text, limit) or " "}


def section(text: str, accessory: Optional[dict] = None) -> dict:
    """A section block with mrkdwn `text` (already escaped), cut to Slack's 3000 characters."""
    b = {"type": "section", "text": _mrkdwn(text)}
    if accessory:
        b["accessory"] = accessory
    return b


def context(*texts: str) -> dict:
    """A context block: small grey mrkdwn lines (at most 10)."""
    return {"type": "context", "elements": [_mrkdwn(t, FIELD_MAX) for t in texts[:10] if t]}


# ---- buttons ----


def confirm(title: str, text: str, ok: str, deny: str = "Cancel", danger: bool = False) -> dict:
    """A confirm dialog for a button (title ≤ 100, text ≤ 300, buttons ≤ 30 characters)."""
    d = {"title": _plain(title, 100), "text": _mrkdwn(text, 300), "confirm": _plain(ok, 30),
         "deny": _plain(deny, 30)}
    if danger:
        d["style"] = "danger"
    return d


def button(text: str, action_id: str, value: str = "", style: Optional[str] = None,
           confirm_: Optional[dict] = None) -> dict:
    """A button element; `style` is None, "primary" or "danger"."""
    b = {"type": "button", "text": _plain(text), "action_id": action_id, "value": value or action_id}
    if style:
        b["style"] = style
    if confirm_:
        b["confirm"] = confirm_
    return b


def pause_button() -> dict:
    """The on-call path on every post: Pause (danger style) behind a confirm dialog."""
    return button("Pause", PAUSE, "pause", "danger",
                  confirm("Pause the run?", "No new experiment will start; the running ones finish. "
                          "Start again with `/ratchet resume`.", "Pause", danger=True))


def resume_button() -> dict:
    """Resume (operator), shown on posts that report a pause."""
    return button("Resume", RESUME, "resume", "primary")


def revert_button(exp_id: int) -> dict:
    """Revert a kept experiment (operator), behind a confirm dialog."""
    return button("Revert", REVERT, str(exp_id), None,
                  confirm(f"Revert #{exp_id}?", f"Head goes back to the parent of #{exp_id} and the branch "
                          "follows. The experiment stays in the history as discarded.", "Revert", danger=True))


def promote_button(exp_id: int) -> dict:
    """Promote a kept experiment to a larger scale (operator)."""
    return button("Promote", PROMOTE, str(exp_id), "primary")


def diff_button(exp_id: int) -> dict:
    """Show the experiment's diff in the post's thread."""
    return button("Show diff", SHOW_DIFF, str(exp_id))


def actions(*elements: dict) -> dict:
    """An actions block of buttons."""
    return {"type": "actions", "elements": list(elements)}


# ---- events ----


def kept_blocks(ev) -> list[dict]:
    """A kept experiment: description, hypothesis, val_bpb before → after with Δ and %, the noise floor,
    training seconds, host, experiment id; buttons Promote, Revert, Show diff, Pause.

    `ev` is an outbox Event of kind "kept" (payload from loop/events.experiment_event).
    """
    p = ev.payload or {}
    exp_id = ev.experiment_id
    desc = p.get("description") or f"experiment {exp_id}"
    before, after = p.get("head_val_bpb"), p.get("val_bpb")
    blocks = [{"type": "header", "text": _plain(f"✓ Kept #{exp_id}: {desc}", HEADER_MAX)}]
    if p.get("hypothesis"):
        blocks.append(section(f"*Hypothesis:* {escape(p['hypothesis'])}"))
    fields = [f"*val_bpb*\n{_bpb(before)} → {_bpb(after)}"]
    if before and after is not None:
        d = after - before
        fields.append(f"*Δ*\n{d:+.4f} ({100 * d / before:+.2f}%)")
    decision = p.get("decision") or {}
    sigma = p.get("sigma")
    floor = f"σ {_bpb(sigma)}" if sigma is not None else "not measured"
    if decision.get("threshold") is not None:
        floor += f" · keep below −{decision['threshold']:.4f}"
    fields.append(f"*Noise floor*\n{floor}")
    secs = p.get("training_seconds")
    where = escape(p.get("host") or p.get("slot") or "?") + (f" ({escape(p['device_name'])})"
                                                              if p.get("device_name") else "")
    fields.append(f"*Training*\n{secs:.1f} s on {where}" if secs is not None else f"*Training*\non {where}")
    blocks.append({"type": "section", "fields": [_mrkdwn(f, FIELD_MAX) for f in fields]})
    blocks.append(context(f"experiment #{exp_id}" + (f" · commit `{p['commit'][:10]}`" if p.get("commit") else "")))
    blocks.append(actions(promote_button(exp_id), revert_button(exp_id), diff_button(exp_id), pause_button()))
    return blocks


def compact_blocks(ev) -> list[dict]:
    """Discarded / crashed / invalid / pruned / aborted (and baseline repeats): one line with a Pause button."""
    mark = MARK.get(ev.kind, "•")
    return [section(f"{mark} {escape(first_line(ev.text, 500))}", accessory=pause_button())]


def state_title(ev) -> str:
    """The bold title of a state change: "Paused", "API key rejected", "Budget reached", ..."""
    payload = ev.payload or {}
    reason = str(payload.get("reason") or "")
    if ev.kind == "paused" and "API key rejected" in (reason + ev.text):
        return "API key rejected: the run is paused"
    if ev.kind in ("budget_reached", "budget_hit") or (
            ev.kind == "paused" and (payload.get("budget") or reason.startswith("budget:"))):
        return "Budget reached" + (": the run is paused" if ev.kind == "paused" else "")
    return {"paused": "Paused", "resumed": "Resumed", "baseline": "Baseline measured", "reverted": "Reverted",
            "hint": "Hint", "proposer_error": "Proposer failing", "budget_changed": "Budget changed",
            "digest": "Digest"}.get(ev.kind, ev.kind.replace("_", " ").capitalize())


def state_blocks(ev) -> list[dict]:
    """A state change (paused, resumed, budget reached, API key rejected, reverted, ...): the title, the
    event's line, and Pause (plus Resume when it reports a pause)."""
    mark = MARK.get("budget" if ev.kind.startswith("budget") else ev.kind, "•")
    title = state_title(ev)
    body = escape(truncate(ev.text, 2500))
    if title.startswith("API key rejected"):
        body += "\nFix `ANTHROPIC_API_KEY`, then `/ratchet resume`."
    buttons = [resume_button(), pause_button()] if ev.kind == "paused" else [pause_button()]
    return [section(f"{mark} *{escape(title)}*\n{body}"), actions(*buttons)]


def _count(n: Any) -> str:
    """A parameter count, short: 12.3M, 850.0k, 999."""
    n = int(n)
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 \
        else str(n)


def promotion_blocks(ev, promotion: Optional[dict] = None) -> list[dict]:
    """A promotion's result: the verdict; Δ val_bpb at the loop's scale with the run's noise floor vs Δ at the
    larger scale with its standard error over the paired seeds; the scale (and, from `promotion` when given,
    its budget and overrides); parameter counts; the reason; Show diff of the candidate and Pause.

    `ev` is an outbox Event of kind "promotion" (payload {promotion_id, verdict, result, scale,
    candidate_exp_id}, result from loop/promotion.py Transfer.as_dict, or {reason} when it failed);
    `promotion` optionally {budget_s, scale_overrides, seeds} of the promotions row.
    """
    p = ev.payload or {}
    r = p.get("result") or {}
    pid, scale, verdict = p.get("promotion_id", "?"), str(p.get("scale") or "?"), str(p.get("verdict") or "")
    cand = p.get("candidate_exp_id")
    mark, words = VERDICTS.get(verdict, ("✗", "failed") if not verdict else ("•", verdict.replace("_", " ")))
    out = [{"type": "header", "text": _plain(f"⇪ Promotion #{pid} to {scale}: {words}", HEADER_MAX)}]
    small, sigma = r.get("delta_small"), r.get("sigma_small")
    large, se = r.get("delta_large"), r.get("se_large")
    pairs = min(len(r.get("reference_runs") or []), len(r.get("candidate_runs") or []))
    fields = [f"*Verdict*\n{mark} {escape(words)}",
              "*Candidate*\n" + (f"#{cand}" if cand is not None else "head")]
    if verdict:
        fields.append("*Δ at the loop's scale*\n" + ("n/a" if small is None else f"{small:+.4f}")
                      + (f" (noise σ {sigma:.4f})" if sigma is not None else " (noise not measured)"))
        fields.append(f"*Δ at {escape(scale)}*\n" + ("n/a" if large is None else f"{large:+.4f}"
                                                      + (f" ± {se:.4f}" if se is not None else ""))
                      + (f" ({pairs} paired seed{'s' if pairs != 1 else ''})" if pairs else ""))
    where = escape(scale)
    if promotion:
        bits = [f"{promotion['budget_s']:g} s" if promotion.get("budget_s") else "",
                ", ".join(f"{escape(k)} {escape(v)}" for k, v in (promotion.get("scale_overrides") or {}).items())]
        where += "".join(f" · {b}" for b in bits if b)
    fields.append(f"*Scale*\n{where}")
    params_s, params_l = r.get("params_small") or {}, r.get("params_large") or {}
    if params_l.get("candidate"):
        fields.append("*Parameters (candidate)*\n" + (f"{_count(params_s['candidate'])} → "
                                                       if params_s.get("candidate") else "")
                      + f"{_count(params_l['candidate'])} at {escape(scale)}")
    out.append({"type": "section", "fields": [_mrkdwn(f, FIELD_MAX) for f in fields]})
    if r.get("reason"):
        out.append(context(escape(truncate(str(r["reason"]), 1500))))
    buttons = [diff_button(int(cand))] if cand is not None else []
    out.append(actions(*buttons, pause_button()))
    return out


def promotion_message(ev, promotion: Optional[dict] = None) -> Message:
    """The post of a promotion's result (promotion_blocks); its plot goes into the thread (bot/notifier.py)."""
    text = truncate(f"⇪ {escape(ev.text)}", FALLBACK_MAX)
    try:
        return Message(text, promotion_blocks(ev, promotion))
    except (KeyError, TypeError, ValueError, AttributeError):
        return Message(text, [section(text, accessory=pause_button())])


def event_message(ev) -> Message:
    """The post for one outbox event. Never raises for an unknown kind or a sparse payload: it falls back
    to the event's one-line text."""
    text = truncate(f"{MARK.get(ev.kind, '•')} {escape(ev.text)}", FALLBACK_MAX)
    try:
        if ev.kind == "kept" and ev.experiment_id is not None:
            return Message(text, kept_blocks(ev))
        if ev.kind == "promotion":
            return promotion_message(ev)
        if ev.kind in COMPACT_KINDS:
            return Message(text, compact_blocks(ev), compact=True)
        return Message(text, state_blocks(ev))
    except (KeyError, TypeError, ValueError, AttributeError):
        return Message(text, [section(text, accessory=pause_button())])


def digest_message(ev, text: str) -> Message:
    """A digest post: `text` (bot/digest.py's digest_text) in a code block, so its columns line up."""
    body = reply_text(text) if "\n" in text else escape(text)
    return Message(truncate(f"📈 {escape(first_line(text, 200))}", FALLBACK_MAX),
                   [section(f"📈 *Digest*\n{truncate(body, 2900)}"), actions(pause_button())])


def plot_filename(run: str, ev) -> str:
    """The file name of an event's plot in Slack, unique per run and event: how a restart recognises an upload
    already in the post's thread (`ratchet-main-digest-42.png`)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(run)).strip("-") or "run"
    return f"ratchet-{slug}-{ev.kind}-{ev.id}.png"


def plot_comment(ev) -> str:
    """The line that introduces an event's plot in its thread."""
    if ev.kind == "digest":
        return "📈 Progress plot: every experiment's val_bpb coloured by status, head's running best as a step line"
    if ev.kind == "promotion":
        scale = escape((ev.payload or {}).get("scale") or "the larger scale")
        return f"⇪ val_bpb at {scale}, reference vs candidate, paired seeds joined"
    return f"{MARK.get(ev.kind, '•')} plot"


def event_metadata(ev) -> dict:
    """Message metadata carrying the event id: how a restart finds posts that were never marked delivered."""
    return {"event_type": EVENT_METADATA_TYPE, "event_payload": {"id": ev.id, "kind": ev.kind}}


def daily_thread_message(day: str, tz: str = "UTC") -> Message:
    """The parent post of one day's thread of compact lines (`day` as YYYY-MM-DD in the zone `tz`)."""
    text = f"Experiments on {day} ({tz}): discarded, crashed, invalid and pruned runs are in this thread"
    return Message(text, [section(f"🧵 *{day}* ({escape(tz)}): discarded, crashed, invalid and pruned runs are in "
                                  "this thread", accessory=pause_button())])


def daily_metadata(day: str) -> dict:
    """Metadata of a day's thread parent, so a restart reuses the thread."""
    return {"event_type": DAILY_METADATA_TYPE, "event_payload": {"day": day}}


def reverted_blocks(blocks: list[dict], user: str) -> list[dict]:
    """A kept post's blocks after a revert: Promote and Revert removed, a "reverted by" line added."""
    out = []
    for b in blocks or []:
        if b.get("type") == "actions":
            kept = [e for e in b.get("elements", []) if e.get("action_id") not in (REVERT, PROMOTE)]
            if kept:
                out.append({**b, "elements": kept})
        else:
            out.append(b)
    out.insert(max(0, len(out) - 1), context(f"↩ reverted by {escape(user)}"))
    return out


# ---- replies ----


def reply_text(text: str) -> str:
    """A command reply as mrkdwn: several lines (status, history, help, show) in a code block, so columns
    line up; one line as escaped text."""
    text = text.rstrip()
    if "\n" in text:
        return truncate("```\n" + escape(text).replace("```", "`\u200b``") + "\n```", 39000)
    return truncate(escape(text), 39000)


def diff_messages(diff: str, exp_id: int) -> list[str]:
    """The diff as thread messages of at most DIFF_CHUNK characters each, in code blocks, cut at lines;
    at most DIFF_MAX_MESSAGES, the last one saying what was left out."""
    if not diff.strip():
        return [f"#{exp_id} has no diff"]
    lines, chunks, cur = escape(diff.rstrip()).replace("```", "`\u200b``").splitlines(), [], ""
    for line in lines:
        line = truncate(line, DIFF_CHUNK - 10)
        if len(cur) + len(line) + 1 > DIFF_CHUNK:
            chunks.append(cur)
            cur = ""
        cur += line + "\n"
    if cur:
        chunks.append(cur)
    head = f"diff of #{exp_id}" + (f" (part 1/{len(chunks)})" if len(chunks) > 1 else "")
    out = [("" if i else head + "\n") + f"```\n{c.rstrip()}\n```" for i, c in enumerate(chunks[:DIFF_MAX_MESSAGES])]
    if len(chunks) > DIFF_MAX_MESSAGES:
        out[-1] += f"\n… {len(chunks) - DIFF_MAX_MESSAGES} more part(s) left out; `/ratchet show {exp_id}` has it all"
    return out
