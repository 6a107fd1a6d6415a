"""The command grammar shared by every chat backend: parse text, check the role, call the control API.

Knows nothing about which chat it runs in; backends only carry text in and replies out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loop.control import Control, ControlError

MAX_COMMAND_CHARS = 4000
ROLES = ("viewer", "operator", "admin")
# Access control in one place: the least role each command needs. Anyone may pause (safety first).
REQUIRED_ROLE = {
    "help": "viewer",
    "status": "viewer",
    "history": "viewer",
    "show": "viewer",
    "pause": "viewer",
    "hint": "viewer",
    "diff": "viewer",
    "budget": "viewer",
    "digest": "viewer",
    "hosts": "viewer",
    "resume": "operator",
    "budget_set": "operator",
    "revert": "operator",
    "promote": "operator",
    "promote_cancel": "operator",
}
HELP = """\
commands:
  status                  the run at a glance: head, noise floor, counts, what is training
  pause [now] [reason]    start no new experiment (now: also kill the running ones)
  resume                  start experiments again
  history [N]             the last N experiments (default 10)
  show <id>               one experiment: numbers, the keep rule's verdict, the diff
  diff <id>               only the experiment's diff
  revert <id>             undo the last keep: head goes back to that experiment's parent (operator)
  promote [<id>|head] [to <scale>]
                          does the gain transfer? train it and the reference at a larger scale (operator)
  promote cancel <id>     stop a promotion (operator)
  hint <text>             a suggestion for the proposer (read as data, not as orders)
  budget                  GPU-hours and Claude USD used / left, per day and in total
  budget <gpu|claude> <amount>/day | <amount> total
                          change a cap, e.g. `budget gpu 24h/day`, `budget claude $40/day` (operator)
  digest                  post the digest of the last 24 h now, with the progress plot
  hosts                   each host and slot: up/down, busy/idle, what it trains, last error
  help                    this text"""


class ParseError(ValueError):
    """Malformed or unknown command; the message ends with the help text."""


@dataclass
class Command:
    name: str
    args: dict = field(default_factory=dict)
    text: str = ""


@dataclass
class Reply:
    """What a backend shows. `public`: a state change to announce to everyone, not just the sender."""

    text: str
    ok: bool = True
    public: bool = False


def _fail(msg: str) -> ParseError:
    return ParseError(f"{msg}\n\n{HELP}")


def parse(text: str) -> Command:
    """Parse one command line. Raises ParseError (with the help text) for anything malformed."""
    text = (text or "").strip()
    if len(text) > MAX_COMMAND_CHARS:
        raise _fail(f"command too long ({len(text)} characters, at most {MAX_COMMAND_CHARS})")
    if not text:
        raise _fail("empty command")
    head, _, rest = text.partition(" ")
    name, rest = head.lower().lstrip("/"), rest.strip()
    if name in ("help", "status", "resume", "hosts"):
        if rest:
            raise _fail(f"`{name}` takes no arguments")
        return Command(name, {}, text)
    if name == "pause":
        now = False
        if rest.split(" ", 1)[0].lower() == "now":
            now, rest = True, rest[3:].strip()
        return Command("pause", {"now": now, "reason": rest}, text)
    if name == "history":
        if not rest:
            return Command("history", {"n": 10}, text)
        if not rest.isdigit() or not 1 <= int(rest) <= 1000:
            raise _fail(f"history takes a number from 1 to 1000, got {rest!r}")
        return Command("history", {"n": int(rest)}, text)
    if name == "promote":
        return _parse_promote(rest, text)
    if name in ("show", "diff", "revert"):
        ident = rest.lstrip("#")
        if not ident.isdigit():
            raise _fail(f"{name} takes an experiment id, e.g. `{name} 12`, got {rest!r}")
        return Command(name, {"id": int(ident)}, text)
    if name == "hint":
        if not rest:
            raise _fail("hint needs some text, e.g. `hint try a longer warmup`")
        return Command("hint", {"text": rest}, text)
    if name == "digest":
        if rest:
            raise _fail("`digest` takes no arguments")
        return Command("digest", {}, text)
    if name == "budget":
        if not rest:
            return Command("budget", {}, text)
        from loop.budget import BudgetError, parse_budget

        try:
            resource, period, limit = parse_budget(rest)
        except BudgetError as e:
            raise _fail(str(e)) from None
        return Command("budget_set", {"resource": resource, "period": period, "limit": limit}, text)
    raise _fail(f"unknown command {head!r}")


def _parse_promote(rest: str, text: str) -> Command:
    """`promote`, `promote 12`, `promote head to s2`, `promote to s2`, `promote cancel 3`."""
    words = rest.split()
    if words[:1] == ["cancel"]:
        if len(words) != 2 or not words[1].lstrip("#").isdigit():
            raise _fail("promote cancel takes a promotion id, e.g. `promote cancel 3`")
        return Command("promote_cancel", {"id": int(words[1].lstrip("#"))}, text)
    scale = None
    if "to" in words:
        k = words.index("to")
        if k != len(words) - 2:
            raise _fail("promote takes `to <scale>` last, e.g. `promote 12 to s2`")
        scale, words = words[-1], words[:k]
    if len(words) > 1:
        raise _fail(f"promote takes one experiment id or `head`, got {' '.join(words)!r}")
    target = words[0].lstrip("#") if words else "head"
    if target != "head" and not target.isdigit():
        raise _fail(f"promote takes an experiment id or `head`, e.g. `promote 12`, got {target!r}")
    return Command("promote", {"id": None if target == "head" else int(target), "scale": scale}, text)


def role_allows(role: str, command: str) -> bool:
    """True when `role` is at least the role REQUIRED_ROLE names for `command`."""
    need = REQUIRED_ROLE.get(command, "admin")
    return role in ROLES and ROLES.index(role) >= ROLES.index(need)


# ---- text rendering (shell; Slack renders Block Kit from the same data) ----


def _bpb(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def format_status(st) -> str:
    """Status as a few lines of text."""
    lines = [f"run {st.run}: {st.state}" + (f" ({st.pause_reason})" if st.state == "paused" else "")]
    if st.noise_sigma is None:
        lines.append(f"measuring the noise floor: {st.baseline_runs} baseline run(s) done")
    else:
        imp = st.improvement_pct
        lines.append(f"head val_bpb {_bpb(st.head_val_bpb)} (baseline {_bpb(st.baseline_val_bpb)}, "
                     f"{imp:+.2f}% better) · noise σ {st.noise_sigma:.4f} · budget {st.budget_s:g} s"
                     if imp is not None else f"head val_bpb {_bpb(st.head_val_bpb)}")
    total = sum(st.counts.values())
    parts = ", ".join(f"{k} {v}" for k, v in sorted(st.counts.items()))
    lines.append(f"experiments: {total}" + (f" ({parts})" if parts else ""))
    for r in st.running:
        loss = f", loss {r.loss:.3f}" if r.loss is not None else ""
        lines.append(f"training #{r.exp_id} {r.description} on {r.slot}: {r.elapsed_s:.0f}/{r.budget_s:.0f} s{loss}")
    for p in getattr(st, "promotions", []):
        lines.append(f"promotion #{p.id} to {p.scale}: {p.status}")
    if st.open_hints:
        lines.append(f"open hints: {st.open_hints}")
    return "\n".join(lines)


def format_hosts(rows: list[dict]) -> str:
    """One line per slot: host state, busy/idle, the experiment and its elapsed time, the host's last error."""
    if not rows:
        return "no hosts"
    out = []
    for r in rows:
        what = (f"busy #{r['exp_id']} {r['description']} ({r['elapsed_s']:.0f}/{r['budget_s']:.0f} s)"
                if r["busy"] else "idle" if r["busy"] is not None else "")
        err = f" · last error: {r['last_error']}" if r["last_error"] else ""
        out.append(f"{r['host']} [{r['state']}] {r['slot']}: {what}{err}")
    return "\n".join(out)


def format_history(rows) -> str:
    """One line per experiment, newest first."""
    if not rows:
        return "no experiments yet"
    out = []
    for e in rows:
        delta = e.decision.get("delta") if e.decision else None
        d = f"{delta:+.4f}" if delta is not None else ""
        out.append(f"#{e.id:<5} {e.status:<8} {_bpb(e.val_bpb):>7} {d:>8}  {e.description or e.kind}")
    return "\n".join(out)


def format_experiment(e) -> str:
    """The whole record of one experiment, with the rule's verdict and the diff."""
    lines = [f"#{e.id} {e.kind} · {e.status}" + (f" · {e.reason}" if e.reason else ""),
             f"description: {e.description}", f"hypothesis: {e.hypothesis}" if e.hypothesis else "",
             f"val_bpb {_bpb(e.val_bpb)} · training {e.training_seconds or 0:.1f} s · steps {e.steps or 0} · "
             f"params {(e.params or 0) / 1e6:.2f}M · peak {e.peak_memory_mb or 0:.0f} MiB · {e.slot or '-'}",
             f"parent {e.parent_commit[:10]} → commit {e.commit[:10]}" if e.commit else ""]
    d = e.decision or {}
    if d.get("pruned"):
        lines.append(f"pruned: {d['pruned'].get('reason', '')}")
    if "verdict" in d:  # a pruned run has no verdict, only its pruning record
        lines.append(f"rule: {d['verdict']}: {d['val_bpb']:.4f} vs head {d['head_val_bpb']:.4f} "
                     f"(Δ {d['delta']:+.4f}; needs < −{d['threshold']:.4f} = max({d['min_delta']}, "
                     f"{d['z']}·σ {d['sigma']:.4f}))")
        if d.get("runs"):
            first = d.get("first_run") or {}
            lines.append(f"runs: {', '.join(f'{v:.4f}' for v in d['runs'])} (the rule judged their mean); first "
                         f"run alone: {first.get('verdict', '?')}")
    if e.log_tail:
        lines.append("log tail:\n" + e.log_tail)
    if e.diff:
        lines.append(e.diff.rstrip())
    return "\n".join(x for x in lines if x)


# ---- execution ----


def execute(cmd: Command, control: Control, user: str) -> Reply:
    """Run a parsed command against the control API. ControlError becomes a failed reply."""
    try:
        if cmd.name == "help":
            return Reply(HELP)
        if cmd.name == "status":
            return Reply(format_status(control.status()))
        if cmd.name == "history":
            return Reply(format_history(control.history(cmd.args["n"])))
        if cmd.name == "show":
            return Reply(format_experiment(control.show(cmd.args["id"])))
        if cmd.name == "pause":
            return Reply(control.pause(user, now=cmd.args["now"], reason=cmd.args["reason"]), public=True)
        if cmd.name == "resume":
            return Reply(control.resume(user), public=True)
        if cmd.name == "diff":
            e = control.show(cmd.args["id"])
            return Reply(e.diff.rstrip() or f"#{e.id} has no diff ({e.kind}, {e.status})")
        if cmd.name == "revert":
            return Reply(control.revert(user, cmd.args["id"]), public=True)
        if cmd.name == "promote":
            return Reply(control.promote(user, cmd.args["id"], cmd.args["scale"]), public=True)
        if cmd.name == "promote_cancel":
            return Reply(control.cancel_promotion(user, cmd.args["id"]), public=True)
        if cmd.name == "hosts":
            return Reply(format_hosts(control.hosts()))
        if cmd.name == "budget":
            from bot.digest import budget_bar

            return Reply("budget (used / cap):\n" + "\n".join("  " + budget_bar(c) for c in control.budget()))
        if cmd.name == "budget_set":
            return Reply(control.set_budget(user, **cmd.args), public=True)
        if cmd.name == "digest":
            control.request_digest(user)
            return Reply("digest requested: it is posted in a moment")
        if cmd.name == "hint":
            h = control.hint(user, cmd.args["text"])
            return Reply(f"hint #{h.id} noted; the proposer sees it with the next proposal", public=True)
    except ControlError as e:
        return Reply(str(e), ok=False)
    return Reply(f"not implemented: {cmd.name}\n\n{HELP}", ok=False)


def handle(text: str, control: Control, *, user: str, backend: str, role: str = "admin") -> Reply:
    """Parse, check the role, execute, and write the audit log. Never raises for bad input."""
    try:
        cmd = parse(text)
    except ParseError as e:
        reply = Reply(str(e), ok=False)
        control.audit(user=user, backend=backend, text=text, command="", allowed=True, result="parse error")
        return reply
    if not role_allows(role, cmd.name):
        need = REQUIRED_ROLE.get(cmd.name, "admin")
        reply = Reply(f"`{cmd.name}` needs the {need} role; you are {role}", ok=False)
        control.audit(user=user, backend=backend, text=text, command=cmd.name, allowed=False, result=reply.text)
        return reply
    reply = execute(cmd, control, user)
    control.audit(user=user, backend=backend, text=text, command=cmd.name, allowed=True,
                  result=("ok: " if reply.ok else "error: ") + reply.text.splitlines()[0][:200])
    return reply
