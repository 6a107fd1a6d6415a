"""Block Kit rendering (bot/blocks.py) without Slack: every payload checked against Block Kit's limits."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from bot import blocks
from bot.commands import COMMANDS, HELP, ParseError, command, parse, role_allows
from tests.fakes.slack_api import _block_problem


def ev(kind, text, payload=None, exp_id=None, id=1):
    return SimpleNamespace(id=id, kind=kind, text=text, payload=payload or {}, experiment_id=exp_id,
                           created_at=datetime(2026, 5, 4, 10, 3, tzinfo=timezone.utc))


KEPT = ev("kept", "kept #12 WARMDOWN_RATIO 0.5 → 0.7: val_bpb 2.1042 → 2.0871 (-0.0171, -0.81%, noise σ 0.0061)",
          {"status": "keep", "val_bpb": 2.0871, "head_val_bpb": 2.1042, "sigma": 0.0061,
           "description": "WARMDOWN_RATIO 0.5 → 0.7", "hypothesis": "a longer warm-down <lowers> the final loss",
           "training_seconds": 60.04, "host": "gpu-1", "slot": "gpu-1:0", "commit": "abcdef0123456789",
           "decision": {"verdict": "keep", "threshold": 0.0122}}, exp_id=12)


def all_text(bs) -> str:
    import json

    return json.dumps(bs, ensure_ascii=False)


def buttons(bs) -> dict:
    out = {}
    for b in bs:
        for e in b.get("elements", []) if b["type"] == "actions" else [b.get("accessory") or {}]:
            if e.get("type") == "button":
                out[e["action_id"]] = e
    return out


def test_kept_post_has_the_numbers_and_the_four_buttons():
    bs = blocks.kept_blocks(KEPT)
    assert _block_problem(bs) is None
    text = all_text(bs)
    for piece in ("Kept #12", "WARMDOWN_RATIO 0.5 → 0.7", "2.1042 → 2.0871", "-0.0171 (-0.81%)", "σ 0.0061",
                  "keep below −0.0122", "60.0 s on gpu-1", "experiment #12", "abcdef0123"):
        assert piece in text, piece
    assert "&lt;lowers&gt;" in text  # proposal text is escaped
    b = buttons(bs)
    assert list(b) == [blocks.PROMOTE, blocks.REVERT, blocks.SHOW_DIFF, blocks.PAUSE]
    assert b[blocks.PROMOTE]["value"] == b[blocks.REVERT]["value"] == b[blocks.SHOW_DIFF]["value"] == "12"
    assert "confirm" in b[blocks.REVERT] and "confirm" in b[blocks.PAUSE]
    assert b[blocks.PAUSE]["style"] == "danger"


@pytest.mark.parametrize("kind,text", [
    ("discarded", "discarded #4 MATRIX_LR 0.004 → 0.008: val_bpb 2.1110 vs head 2.1042"),
    ("crashed", "crash #5 DIM 32 → 64: RuntimeError: shapes\nTraceback (most recent call last):\n  ..."),
    ("invalid", "invalid #6 something: imports os"),
    ("pruned", "pruned #7 LR 0.02 → 0.04: loss curve behind head at 40%"),
])
def test_failed_experiments_are_one_compact_line_with_pause(kind, text):
    m = blocks.event_message(ev(kind, text))
    assert m.compact and len(m.blocks) == 1 and _block_problem(m.blocks) is None
    line = m.blocks[0]["text"]["text"]
    assert "\n" not in line and text.splitlines()[0][:40].replace(">", "&gt;") in line
    assert m.blocks[0]["accessory"]["action_id"] == blocks.PAUSE


def test_state_changes_carry_pause_and_a_paused_post_offers_resume():
    paused = blocks.event_message(ev("paused", "paused by <@U1>: lunch", {"by": "<@U1>", "reason": "lunch"}))
    assert not paused.compact and _block_problem(paused.blocks) is None
    assert "*Paused*" in all_text(paused.blocks) and "<@U1>" in paused.blocks[0]["text"]["text"]  # mention kept
    assert list(buttons(paused.blocks)) == [blocks.RESUME, blocks.PAUSE]
    key = blocks.event_message(ev("paused", "paused by ratchet: Anthropic API key rejected",
                                  {"by": "ratchet", "reason": "Anthropic API key rejected"}))
    assert "API key rejected" in all_text(key.blocks) and "ANTHROPIC_API_KEY" in all_text(key.blocks)
    budget = blocks.event_message(ev("budget_reached", "daily GPU budget reached: 86400 s"))
    assert "Budget reached" in all_text(budget.blocks)
    capped = blocks.event_message(ev("paused", "paused by ratchet: budget: gpu/day (24.0 h used of 24.0 h)",
                                     {"by": "ratchet", "reason": "budget: gpu/day (24.0 h used of 24.0 h)",
                                      "budget": "gpu/day"}))
    assert "Budget reached: the run is paused" in all_text(capped.blocks)
    changed = blocks.event_message(ev("budget_changed", "budget gpu/day set to 24.0 h by <@U1>"))
    assert "Budget changed" in all_text(changed.blocks) and "Budget reached" not in all_text(changed.blocks)
    for kind in ("resumed", "baseline", "reverted", "hint", "proposer_error", "something_new"):
        m = blocks.event_message(ev(kind, f"{kind} happened"))
        assert _block_problem(m.blocks) is None and blocks.PAUSE in buttons(m.blocks), kind


def test_text_cannot_ping_the_channel_or_break_limits():
    m = blocks.event_message(ev("hint", "hint #3 from <@U1>: <!channel> try <https://x|this> & that " + "x" * 5000))
    t = all_text(m.blocks)
    assert "<!channel>" not in t and "&lt;!channel&gt;" in t and "&amp; that" in t and "<@U1>" in t
    assert _block_problem(m.blocks) is None and len(m.text) <= blocks.FALLBACK_MAX


def test_a_sparse_payload_falls_back_to_the_line():
    m = blocks.event_message(ev("kept", "kept #9 x", {"val_bpb": None}, exp_id=9))
    assert _block_problem(m.blocks) is None and "Kept #9" in all_text(m.blocks)
    m = blocks.event_message(SimpleNamespace(id=2, kind="kept", text="kept #9", payload={"sigma": "bad"},
                                             experiment_id=9, created_at=None))
    assert _block_problem(m.blocks) is None and blocks.PAUSE in buttons(m.blocks)


def test_metadata_daily_thread_and_revert_update():
    assert blocks.event_metadata(ev("kept", "x", id=42)) == {"event_type": "ratchet_event",
                                                              "event_payload": {"id": 42, "kind": "kept"}}
    d = blocks.daily_thread_message("2026-05-04")
    assert "2026-05-04" in d.text and _block_problem(d.blocks) is None
    after = blocks.reverted_blocks(blocks.kept_blocks(KEPT), "<@U2>")
    assert _block_problem(after) is None and list(buttons(after)) == [blocks.SHOW_DIFF, blocks.PAUSE]
    assert "reverted by <@U2>" in all_text(after)


def test_diff_is_split_into_code_blocks_at_lines():
    diff = "".join(f"-LR = {i}\n+LR = {i + 1}\n" for i in range(2000))
    parts = blocks.diff_messages(diff, 7)
    assert len(parts) == blocks.DIFF_MAX_MESSAGES and parts[0].startswith("diff of #7 (part 1/")
    assert all(p.count("```") == 2 and len(p) < 4000 for p in parts)
    assert "more part(s) left out" in parts[-1]
    assert blocks.diff_messages("--- a\n+++ b\n", 3) == ["diff of #3\n```\n--- a\n+++ b\n```"]


def test_replies_keep_columns_in_a_code_block():
    assert blocks.reply_text("one line with `code` & <b>") == "one line with `code` &amp; &lt;b&gt;"
    multi = blocks.reply_text(HELP)
    assert multi.startswith("```\n") and multi.endswith("\n```")


def test_grammar_revert_promote_diff_and_their_roles():
    assert parse("revert #12").args == {"id": 12} and parse("promote 3").name == "promote"
    assert parse("diff 4").name == "diff"
    with pytest.raises(ParseError, match="revert takes an experiment id"):
        parse("revert head")
    assert role_allows("viewer", "pause") and role_allows("viewer", "diff")
    for cmd in ("resume", "revert", "promote"):
        assert not role_allows("viewer", cmd) and role_allows("operator", cmd) and role_allows("admin", cmd)
    assert "revert <id>" in HELP and "promote" in HELP and "diff <id>" in HELP


def test_the_help_and_the_role_table_come_from_one_declaration_per_command():
    for spec in COMMANDS.values():
        assert (f"{spec.help} (operator)" in HELP) == (not role_allows("viewer", spec.name)), spec.name
    assert "start experiments again (operator)" in HELP  # the hand-written help once left resume's role out
    with pytest.raises(ValueError, match="registered twice"):
        command("status", role="viewer", help="again")(lambda control, user: None)
    with pytest.raises(ValueError, match="unknown role"):
        command("frobnicate", role="owner", help="anything")(lambda control, user: None)
    assert "frobnicate" not in COMMANDS and COMMANDS["status"].help != "again"


def test_the_manifest_matches_the_app():
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    from bot.slack_app import SLASH_COMMAND

    m = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "slack-manifest.yml").read_text())
    scopes = set(m["oauth_config"]["scopes"]["bot"])
    assert {"chat:write", "commands", "files:write", "app_mentions:read", "channels:history", "groups:history",
            "usergroups:read", "users:read"} <= scopes
    assert [c["command"] for c in m["features"]["slash_commands"]] == [SLASH_COMMAND]
    assert m["settings"]["event_subscriptions"]["bot_events"] == ["app_mention"]
    assert m["settings"]["interactivity"]["is_enabled"] and m["settings"]["socket_mode_enabled"]


@pytest.mark.parametrize("verdict,words", [("transfers", "✅ transfers"), ("does_not_transfer", "❌ does not transfer"),
                                           ("inconclusive", "❔ inconclusive"),
                                           ("scale_ignored", "no verdict: train.py ignores ctx.scale"),
                                           ("", "✗ failed")])
def test_a_promotion_post_for_every_verdict(verdict, words):
    result = {"delta_small": -0.03, "sigma_small": 0.0061, "delta_large": 0.001 if verdict else None,
              "se_large": 0.002, "reference_runs": [2.0, 2.01], "candidate_runs": [2.0, 2.012],
              "params_small": {"candidate": 3_400_000}, "params_large": {"candidate": 3_400_000},
              "reason": "Δ +0.0010 at scale: <no> gain"} if verdict else {"reason": "no completed pair: crash OOM"}
    e = ev("promotion", f"promotion #3 to s2: {verdict or 'failed'}",
           {"promotion_id": 3, "verdict": verdict, "result": result, "scale": "s2", "candidate_exp_id": None})
    msg = blocks.event_message(e)
    assert _block_problem(msg.blocks) is None and not msg.compact
    text = all_text(msg.blocks)
    assert "Promotion #3 to s2" in text and words in text and "*Candidate*\\nhead" in text
    assert ("Δ at s2" in text) == bool(verdict) and ("&lt;no&gt;" in text or not verdict)
    assert list(buttons(msg.blocks)) == [blocks.PAUSE]  # head: no single experiment's diff to show


def test_a_promotion_with_a_sparse_payload_still_renders():
    msg = blocks.event_message(ev("promotion", "promotion #4 to s1: transfers", {"verdict": "transfers"}))
    assert _block_problem(msg.blocks) is None and "transfers" in all_text(msg.blocks)


def test_plot_file_names_are_unique_per_run_and_event():
    e = ev("digest", "digest", id=42)
    assert blocks.plot_filename("main", e) == "ratchet-main-digest-42.png"
    assert blocks.plot_filename("my run/ü", e) == "ratchet-my-run-digest-42.png"
