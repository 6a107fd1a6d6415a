"""The chat commands shared by every chat backend: each declared once, with its grammar, role, help and handler.

Knows nothing about which chat it runs in (backends only carry text in and replies out) and changes nothing
itself: every handler goes through the control API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from loop.control import Control, ControlError

MAX_COMMAND_CHARS = 4000
ROLES = ("viewer", "operator", "admin")


class ParseError(ValueError):
    """Malformed or unknown command; the message ends with the help text."""


@dataclass
class Command:
    """One parsed command line: the registry name (`promote_cancel`), its keyword arguments, the text typed."""

    name: str
    args: dict = field(default_factory=dict)
    text: str = ""


@dataclass
class Reply:
    """What a backend shows. `public`: a state change to announce to everyone, not just the sender."""

    text: str
    ok: bool = True
    public: bool = False


# ---- the registry (Errbot's @botcmd: name, arguments, role, help and handler in one place) ----


@dataclass(frozen=True)
class Spec:
    """One command. `words`: what is typed before the arguments ("promote cancel"); `name`: what the role
    check and the audit log call it ("promote_cancel"); `args`: the arguments as the help shows them;
    `parse(rest, words)`: the text after `words` → the handler's keyword arguments (raises ParseError)."""

    words: str
    name: str
    args: str
    role: str
    help: str
    parse: Callable[[str, str], dict]
    run: Callable[..., Reply]


COMMANDS: dict[str, Spec] = {}  # name → Spec, in help order


def _no_args(rest: str, words: str) -> dict:
    if rest:
        raise _fail(f"`{words}` takes no arguments")
    return {}


def _experiment_id(rest: str, words: str) -> dict:
    ident = rest.lstrip("#")
    if not ident.isdigit():
        raise _fail(f"{words} takes an experiment id, e.g. `{words} 12`, got {rest!r}")
    return {"id": int(ident)}


def command(words: str, *, role: str, help: str, args: str = "", parse=_no_args, name: str = ""):
    """Register the decorated handler `fn(control, user, **parse(rest, words)) -> Reply` as a command.

    `role`: the least role that may run it (one of ROLES). `name` defaults to `words` with underscores
    ("promote cancel" → "promote_cancel"). Two commands may share their words when one takes no arguments:
    the bare words go to that one (`budget` / `budget gpu 24h/day`). Raises ValueError for an unknown role or
    a name registered twice.
    """
    def register(fn: Callable[..., Reply]) -> Callable[..., Reply]:
        spec = Spec(words, name or words.replace(" ", "_"), args, role, help, parse, fn)
        if role not in ROLES or spec.name in COMMANDS:
            raise ValueError(f"command {spec.name!r}: unknown role {role!r} or registered twice")
        COMMANDS[spec.name] = spec
        return fn

    return register


# ---- the commands, in the order the help lists them ----


@command("status", role="viewer", help="the run at a glance: head, noise floor, counts, what is training")
def status(control: Control, user: str) -> Reply:
    return Reply(format_status(control.status()))


def _pause_args(rest: str, words: str) -> dict:
    now = rest.split(" ", 1)[0].lower() == "now"
    return {"now": now, "reason": rest[3:].strip() if now else rest}


# Anyone may pause (safety first).
@command("pause", args="[now] [reason]", role="viewer", parse=_pause_args,
         help="start no new experiment (now: also kill the running ones)")
def pause(control: Control, user: str, now: bool, reason: str) -> Reply:
    return Reply(control.pause(user, now=now, reason=reason), public=True)


@command("resume", role="operator", help="start experiments again")
def resume(control: Control, user: str) -> Reply:
    return Reply(control.resume(user), public=True)


def _history_args(rest: str, words: str) -> dict:
    if not rest:
        return {"n": 10}
    if not rest.isdigit() or not 1 <= int(rest) <= 1000:
        raise _fail(f"history takes a number from 1 to 1000, got {rest!r}")
    return {"n": int(rest)}


@command("history", args="[N]", role="viewer", parse=_history_args, help="the last N experiments (default 10)")
def history(control: Control, user: str, n: int) -> Reply:
    return Reply(format_history(control.history(n)))


@command("show", args="<id>", role="viewer", parse=_experiment_id,
         help="one experiment: numbers, the keep rule's verdict, the diff")
def show(control: Control, user: str, id: int) -> Reply:
    return Reply(format_experiment(control.show(id)))


@command("diff", args="<id>", role="viewer", parse=_experiment_id, help="only the experiment's diff")
def diff(control: Control, user: str, id: int) -> Reply:
    e = control.show(id)
    return Reply(e.diff.rstrip() or f"#{e.id} has no diff ({e.kind}, {e.status})")


@command("revert", args="<id>", role="operator", parse=_experiment_id,
         help="undo the last keep: head goes back to that experiment's parent")
def revert(control: Control, user: str, id: int) -> Reply:
    return Reply(control.revert(user, id), public=True)


def _promote_args(rest: str, words: str) -> dict:
    """`promote`, `promote 12`, `promote head to s2`, `promote to s2`."""
    parts = rest.split()
    scale = None
    if "to" in parts:
        k = parts.index("to")
        if k != len(parts) - 2:
            raise _fail("promote takes `to <scale>` last, e.g. `promote 12 to s2`")
        scale, parts = parts[-1], parts[:k]
    if len(parts) > 1:
        raise _fail(f"promote takes one experiment id or `head`, got {' '.join(parts)!r}")
    target = parts[0].lstrip("#") if parts else "head"
    if target != "head" and not target.isdigit():
        raise _fail(f"promote takes an experiment id or `head`, e.g. `promote 12`, got {target!r}")
    return {"id": None if target == "head" else int(target), "scale": scale}


@command("promote", args="[<id>|head] [to <scale>]", role="operator", parse=_promote_args,
         help="does the gain transfer? train it and the reference at a larger scale")
def promote(control: Control, user: str, id: int | None, scale: str | None) -> Reply:
    return Reply(control.promote(user, id, scale), public=True)


def _promotion_id(rest: str, words: str) -> dict:
    if len(rest.split()) != 1 or not rest.lstrip("#").isdigit():
        raise _fail("promote cancel takes a promotion id, e.g. `promote cancel 3`")
    return {"id": int(rest.lstrip("#"))}


@command("promote cancel", args="<id>", role="operator", parse=_promotion_id, help="stop a promotion")
def promote_cancel(control: Control, user: str, id: int) -> Reply:
    return Reply(control.cancel_promotion(user, id), public=True)


def _hint_text(rest: str, words: str) -> dict:
    if not rest:
        raise _fail("hint needs some text, e.g. `hint try a longer warmup`")
    return {"text": rest}


@command("hint", args="<text>", role="viewer", parse=_hint_text,
         help="a suggestion for the proposer (read as data, not as orders)")
def hint(control: Control, user: str, text: str) -> Reply:
    h = control.hint(user, text)
    return Reply(f"hint #{h.id} noted; the proposer sees it with the next proposal", public=True)


@command("budget", role="viewer", help="GPU-hours and Claude USD used / left, per day and in total")
def budget(control: Control, user: str) -> Reply:
    from bot.digest import budget_bar

    return Reply("budget (used / cap):\n" + "\n".join("  " + budget_bar(c) for c in control.budget()))


def _budget_args(rest: str, words: str) -> dict:
    from loop.budget import BudgetError, parse_budget

    try:
        resource, period, limit = parse_budget(rest)
    except BudgetError as e:
        raise _fail(str(e)) from None
    return {"resource": resource, "period": period, "limit": limit}


@command("budget", name="budget_set", args="<gpu|claude> <amount>/day | <amount> total", role="operator",
         parse=_budget_args, help="change a cap, e.g. `budget gpu 24h/day`, `budget claude $40/day`")
def budget_set(control: Control, user: str, resource: str, period: str, limit: float | None) -> Reply:
    return Reply(control.set_budget(user, resource=resource, period=period, limit=limit), public=True)


@command("digest", role="viewer", help="post the digest of the last 24 h now, with the progress plot")
def digest(control: Control, user: str) -> Reply:
    control.request_digest(user)
    return Reply("digest requested: it is posted in a moment")


@command("hosts", role="viewer", help="each host and slot: up/down, busy/idle, what it trains, last error")
def hosts(control: Control, user: str) -> Reply:
    return Reply(format_hosts(control.hosts()))


@command("help", role="viewer", help="this text")
def show_help(control: Control, user: str) -> Reply:
    return Reply(HELP)


# ---- derived from the registry: the help text and the role table ----


def _help_line(spec: Spec) -> str:
    """`  usage  help (role)`, the help in one column; a usage too long for its column gets a line of its own."""
    usage = f"{spec.words} {spec.args}".strip()
    text = spec.help + ("" if spec.role == "viewer" else f" ({spec.role})")
    return f"  {usage:<22}  {text}" if len(usage) <= 22 else f"  {usage}\n{'':26}{text}"


HELP = "commands:\n" + "\n".join(_help_line(s) for s in COMMANDS.values())
REQUIRED_ROLE = {s.name: s.role for s in COMMANDS.values()}  # the least role each command needs


# ---- parse, check the role, execute, audit ----


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
    word, rest = head.lower().lstrip("/"), rest.strip()
    spec, rest = _find(word, rest)
    if spec is None:
        raise _fail(f"unknown command {head!r}")
    return Command(spec.name, spec.parse(rest, spec.words), text)


def _find(word: str, rest: str) -> tuple[Spec | None, str]:
    """The command `word rest` names, and the text of its arguments. A two-word command (`promote cancel 3`)
    wins over a one-word one; of two sharing their words, the bare words go to the one without arguments."""
    parts = rest.split(None, 1)  # "cancel 3" → ["cancel", "3"]
    for spec in COMMANDS.values():
        if parts and spec.words == f"{word} {parts[0]}":
            return spec, parts[1] if len(parts) > 1 else ""
    same = [s for s in COMMANDS.values() if s.words == word]
    if len(same) > 1:
        same = [s for s in same if bool(s.args) == bool(rest)]
    return (same[0] if same else None), rest


def role_allows(role: str, command: str) -> bool:
    """True when `role` is at least the role REQUIRED_ROLE names for `command` (unknown commands: admin)."""
    need = REQUIRED_ROLE.get(command, "admin")
    return role in ROLES and ROLES.index(role) >= ROLES.index(need)


def execute(cmd: Command, control: Control, user: str) -> Reply:
    """Run a parsed command against the control API. ControlError becomes a failed reply."""
    spec = COMMANDS.get(cmd.name)
    if spec is None:
        return Reply(f"not implemented: {cmd.name}\n\n{HELP}", ok=False)
    try:
        return spec.run(control, user, **cmd.args)
    except ControlError as e:
        return Reply(str(e), ok=False)


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
    for p in st.promotions:
        lines.append(f"promotion #{p.id} to {p.scale}: {p.status}")
    if st.proposals_in_flight:
        n, limit = st.proposals_in_flight
        lines.append(f"proposals being written: {n} (at most {limit} at once)")
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
             f"hardware: {e.device_name or 'not reported'} on host {e.host or '-'}"
             + (f" (must train on {e.hardware})" if e.hardware and e.status == "queued" else "") if e.host else "",
             f"parent {e.parent_commit[:10]} → commit {e.commit[:10]}" if e.commit else ""]
    d = e.decision or {}
    if d.get("pruned"):
        lines.append(f"pruned: {d['pruned'].get('reason', '')}")
    if "verdict" in d:  # a pruned run has no verdict, only its pruning record
        on = f" on {d['hardware'] or 'unnamed hardware'}" if "hardware" in d else ""
        what = "paired with head" if d.get("stage") == "paired" else "vs head"
        lines.append(f"rule: {d['verdict']}: {d['val_bpb']:.4f} {what} {d['head_val_bpb']:.4f}{on} "
                     f"(Δ {d['delta']:+.4f}; needs < −{d['threshold']:.4f}, from max({d['min_delta']}, "
                     f"{d['z']}·σ {d['sigma']:.4f}))")
        if d.get("paired_head_runs"):
            lines.append(f"paired runs: it {', '.join(f'{v:.4f}' for v in d['runs'][1:])}, head "
                         f"{', '.join(f'{v:.4f}' for v in d['paired_head_runs'])} (started together; the rule judged "
                         f"the mean difference)")
        elif d.get("runs"):
            first = d.get("first_run") or {}
            lines.append(f"runs: {', '.join(f'{v:.4f}' for v in d['runs'])} (the rule judged their mean); first "
                         f"run alone: {first.get('verdict', '?')}")
    if e.log_tail:
        lines.append("log tail:\n" + e.log_tail)
    if e.diff:
        lines.append(e.diff.rstrip())
    return "\n".join(x for x in lines if x)
