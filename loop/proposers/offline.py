"""Offline proposer: a hyperparameter search that mutates one UPPERCASE constant of train.py
at a time. Needs no network; never repeats a (parent, edit_key) pair; edits only a literal."""

from __future__ import annotations

import ast
import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from loop.proposers.base import Proposal, ProposalError, ProposalExhausted, Proposer, ResearchState, TriedEdit
from loop.validate import parse

DEVICE_SUFFIXES = ("CPU", "CUDA", "MPS")

# Changing these is noise-mining or bookkeeping, not research: a lucky seed would pass the
# ratchet without being a better idea.
SKIP_TOKENS = frozenset({"SEED", "EVERY", "LOG", "VERBOSE"})

# Name parts of constants that live in (0, 1). Momenta are scaled through 1 - beta (their
# averaging horizon): 0.95 becomes 0.9 or 0.975, never 0.475, and never reaches 1 (AdamW raises).
MOMENTUM_TOKENS = frozenset({"BETA", "BETA1", "BETA2", "MOMENTUM", "EMA"})
# Fractions and probabilities are scaled directly but kept below 1.
UNIT_TOKENS = frozenset({"FRAC", "FRACTION", "RATIO", "DROPOUT", "PROB"})

# Chance of following up a direction that was kept before (see OfflineProposer.propose).
FOLLOW_UP_PROB = 0.5

_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_OPTIONS_RE = re.compile(r"one of:(.*)", re.IGNORECASE)
_QUOTED_RE = re.compile(r"\"([^\"]*)\"|'([^']*)'")
_DESCRIPTION_RE = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*) (?P<old>\S+) → (?P<new>\S+)$")

Value = int | float | bool | str


@dataclass(frozen=True)
class Constant:
    """A module-level `NAME = literal` of train.py.

    `line` is 1-based; `start` / `end` are the literal's UTF-8 byte offsets in that line
    (ast col_offset / end_col_offset, the sign included); `text` is the literal as written;
    `options` the choices listed in a trailing `# one of: "a", "b"` comment.
    """

    name: str
    value: Value
    line: int
    start: int
    end: int
    text: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mutation:
    """One candidate edit: `constant` becomes `new_text`; `direction` +1 up, -1 down, 0 other."""

    constant: Constant
    new_value: Value
    new_text: str
    direction: int

    @functools.cached_property
    def edit_key(self) -> str:  # cached: a large fleet filters thousands of candidates per proposal
        return f"{self.constant.name}={self.new_text}"

    @property
    def description(self) -> str:
        return f"{self.constant.name} {self.constant.text} → {self.new_text}"


class OfflineProposer(Proposer):
    """Random one-constant mutations around head, seeded.

    `device` ("cpu", "cuda", "cuda:1", "mps") decides which `_CPU` / `_CUDA` / `_MPS`
    constants are worth mutating: those of its own kind, or `_CPU` on a non-CUDA device
    whose kind has no presets in the file (the template runs mps on the CPU preset).
    `factors` (positive, ≠ 1) scale numbers; see candidate_mutations for each type.
    Raises ValueError for bad factors.
    """

    name = "offline"
    fast = True

    def __init__(self, seed: int = 0, device: str = "cpu",
                 factors: Sequence[float] = (0.5, 0.7, 1.4, 2.0)):
        if not factors or any(f <= 0 or f == 1 for f in factors):
            raise ValueError(f"factors must be positive and not 1, got {tuple(factors)}")
        self.seed = seed
        self.device = device
        self.factors = tuple(factors)
        self._rng = random.Random(seed)

    def propose(self, head_source: str, parent: str, history: Sequence[TriedEdit],
                state: ResearchState | None = None) -> Proposal:
        """Mutate one constant of `head_source`; never an edit_key already tried from `parent` (in `history`
        or in state.tried_on_head).

        Choice: with probability FOLLOW_UP_PROB, among the untried candidates that continue
        a direction kept before (a kept "LR 0.02 → 0.04" makes "LR up" a follow-up), else
        uniformly among all untried candidates. Raises ProposalError when head does not
        parse, ProposalExhausted when every candidate was tried.
        """
        try:
            every = _all_candidates(head_source, self.device, self.factors)
        except SyntaxError as exc:
            raise ProposalError(f"head train.py does not parse: line {exc.lineno}: {exc.msg}") from exc
        tried = {t.edit_key for t in history if t.parent == parent} | (state.tried_on_head if state else set())
        kept = kept_directions(history)
        mutation = self._choose(every, tried, kept)
        if mutation is None:
            raise ProposalExhausted(
                f"no untried offline edit left from {parent[:12]} ({len(tried)} edits tried there)")
        return Proposal(
            source=apply_mutation(head_source, mutation),
            description=mutation.description,
            hypothesis=hypothesis(mutation),
            proposer=self.name,
            edit_key=mutation.edit_key,
        )

    def _choose(self, every: tuple[Mutation, ...], tried: set[str], kept: dict[str, int]) -> Mutation | None:
        """The next mutation (see propose), or None when every candidate was tried."""
        untried = [m for m in every if m.edit_key not in tried]
        if kept and self._rng.random() < FOLLOW_UP_PROB:
            follow_ups = [m for m in untried if m.direction and kept.get(m.constant.name) == m.direction]
            if follow_ups:
                return self._rng.choice(follow_ups)
        return self._rng.choice(untried) if untried else None


@functools.lru_cache(maxsize=16)
def _all_candidates(source: str, device: str, factors: tuple[float, ...]) -> tuple[Mutation, ...]:
    """Every mutation of every mutable constant of `source`, in proposal order (tried ones included).

    Cached: a head is proposed on once per free slot, and its candidates do not change. Raises SyntaxError
    when source does not parse.
    """
    constants = read_constants(source)
    preset = preset_suffix(constants, device)
    return tuple(m for c in constants if _mutable(c, preset) for m in candidate_mutations(c, factors))


def preset_suffix(constants: Sequence[Constant], device: str) -> str:
    """The device suffix whose presets apply on `device`: "CPU", "CUDA" or "MPS".

    Its own kind when the file has presets for it; otherwise "CPU" for any non-CUDA device.
    """
    kind = device.split(":")[0].upper()
    present = {c.name.rsplit("_", 1)[-1] for c in constants}
    if kind in present or kind == "CUDA":
        return kind
    return "CPU"


def _mutable(constant: Constant, preset: str) -> bool:
    tokens = constant.name.split("_")
    if SKIP_TOKENS.intersection(tokens):
        return False
    return tokens[-1] not in DEVICE_SUFFIXES or tokens[-1] == preset


# ---- reading constants ----

def read_constants(source: str) -> list[Constant]:
    """Module-level `NAME = literal` constants in source order.

    Only UPPERCASE names assigned once at module level to an int/float/bool/str literal on
    one line (a leading - or + allowed for numbers). Raises SyntaxError if source does not parse.
    """
    tree = parse(source)
    lines = source.split("\n")
    counts = _assignment_counts(tree)
    found = []
    for node in tree.body:
        constant = _constant(node, lines)
        # A name bound twice: editing the first binding may change nothing.
        if constant is not None and counts.get(constant.name) == 1:
            found.append(constant)
    return found


def _constant(node: ast.stmt, lines: list[str]) -> Constant | None:
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name) and _NAME_RE.match(node.targets[0].id)):
        return None
    value = _literal(node.value)
    if value is None or node.value.lineno != node.value.end_lineno:
        return None
    raw = lines[node.value.lineno - 1].encode("utf-8")
    start, end = node.value.col_offset, node.value.end_col_offset
    options = _options(raw[end:].decode("utf-8")) if isinstance(value, str) else ()
    return Constant(node.targets[0].id, value, node.value.lineno, start, end,
                    raw[start:end].decode("utf-8"), options)


def _literal(node: ast.expr) -> Value | None:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool, str):
        return node.value
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) in (int, float)):
        return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
    return None


def _options(rest: str) -> tuple[str, ...]:
    """Quoted strings after "one of:" in a trailing comment: `# one of: "adamw", "muon"`."""
    comment = rest.strip()
    if not comment.startswith("#"):
        return ()
    match = _OPTIONS_RE.search(comment)
    if not match:
        return ()
    quoted = (a or b for a, b in _QUOTED_RE.findall(match.group(1)))
    return tuple(dict.fromkeys(q for q in quoted if q))


def _assignment_counts(tree: ast.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    counts[name.id] = counts.get(name.id, 0) + 1
    return counts


# ---- mutations ----

def candidate_mutations(constant: Constant, factors: Sequence[float]) -> list[Mutation]:
    """Every one-step change of `constant`, in a stable order, none equal to its value.

    bool: flipped. str: each other listed option. int ≥ 1: ×2 / ÷2 for powers of two,
    else each factor, rounded, at least 1. float ≠ 0: each factor, ~4 significant digits,
    kept in (0, 1) for fractions and momenta in (0, 1); momenta scale 1 - beta.
    """
    value = constant.value
    if isinstance(value, bool):
        return [Mutation(constant, not value, repr(not value), 0)]
    if isinstance(value, str):
        quote = _quote_char(constant.text)
        return [Mutation(constant, o, _str_literal(o, quote), 0) for o in constant.options if o != value]
    if isinstance(value, int):
        new_values = _int_steps(value, factors)
    else:
        new_values = _float_steps(value, factors, _unit_kind(constant))
    return [
        Mutation(constant, new, repr(new), 1 if new > value else -1)
        for new in new_values
    ]


def _int_steps(value: int, factors: Sequence[float]) -> list[int]:
    if value <= 0:  # 0 and negatives are usually sentinels ("off", "auto"); scaling means nothing
        return []
    if value & (value - 1) == 0:
        steps = [value * 2, value // 2]
    else:
        steps = [max(1, round(value * f)) for f in factors]
    return [s for s in dict.fromkeys(steps) if s >= 1 and s != value]


def _unit_kind(constant: Constant) -> str:
    """How a float constant is bounded: "momentum", "unit" or "" (MOMENTUM_TOKENS, UNIT_TOKENS)."""
    tokens = set(constant.name.split("_"))
    if not 0 < constant.value < 1:
        return ""
    if MOMENTUM_TOKENS & tokens:
        return "momentum"
    return "unit" if UNIT_TOKENS & tokens else ""


def _float_steps(value: float, factors: Sequence[float], unit_kind: str = "") -> list[float]:
    # Rounded to 4 significant digits so literals stay short: 0.0030000000000000005 → 0.003.
    if unit_kind == "momentum":
        steps = [float(f"{1 - (1 - value) * f:.4g}") for f in factors]
    else:
        steps = [float(f"{value * f:.4g}") for f in factors]
    if unit_kind:
        steps = [s for s in steps if 0 < s < 1]
    return [s for s in dict.fromkeys(steps) if s != value]


def _quote_char(text: str) -> str:
    return next((ch for ch in text if ch in "\"'"), '"')


def _str_literal(value: str, quote: str) -> str:
    if quote in value or "\\" in value or "\n" in value:
        return repr(value)
    return f"{quote}{value}{quote}"


def apply_mutation(source: str, mutation: Mutation) -> str:
    """Replace only the literal's span in its line; comments and formatting stay.

    Raises ProposalError if the result does not read back as the intended value (a bug).
    """
    c = mutation.constant
    lines = source.split("\n")  # not splitlines(): it also splits on \f, unlike ast
    raw = lines[c.line - 1].encode("utf-8")
    lines[c.line - 1] = (raw[:c.start] + mutation.new_text.encode("utf-8") + raw[c.end:]).decode("utf-8")
    # Only that line changed: reading it back alone checks the rewrite (the whole file is validated later).
    try:
        node = parse(lines[c.line - 1]).body
        after = _literal(node[0].value) if len(node) == 1 and isinstance(node[0], ast.Assign) else None
    except SyntaxError as exc:
        raise ProposalError(f"rewriting {c.name} broke train.py: {exc.msg}") from exc
    if after != mutation.new_value or type(after) is not type(mutation.new_value):
        raise ProposalError(f"rewriting {c.name} did not produce {mutation.new_text}")
    return "\n".join(lines)


# ---- history ----

def kept_directions(history: Sequence[TriedEdit]) -> dict[str, int]:
    """Constant name → +1 / -1: the net direction of its kept numeric edits.

    Reads descriptions written by this proposer ("NAME old → new"); others are ignored.
    """
    net: dict[str, int] = {}  # constant name → kept ups minus kept downs
    for tried in history:
        if tried.status != "keep":
            continue
        match = _DESCRIPTION_RE.match(tried.description.strip())
        if not match:
            continue
        try:
            old, new = ast.literal_eval(match["old"]), ast.literal_eval(match["new"])
        except (ValueError, SyntaxError):
            continue
        if _is_number(old) and _is_number(new) and old != new:
            net[match["name"]] = net.get(match["name"], 0) + (1 if new > old else -1)
    return {name: (1 if n > 0 else -1) for name, n in net.items() if n}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- hypotheses ----

_KINDS: tuple[tuple[frozenset[str], str, str], ...] = (
    # (name parts, when raised, when lowered); the first kind with a part in the name wins
    (frozenset({"WARMUP"}),
     "a longer warmup may stabilise the first steps",
     "a shorter warmup leaves more steps at the full learning rate"),
    (frozenset({"WARMDOWN", "COOLDOWN", "ANNEAL"}),
     "a longer warmdown may anneal to a lower final loss",
     "a shorter warmdown keeps the learning rate high for longer"),
    (frozenset({"WD", "WEIGHT_DECAY"}),
     "stronger weight decay may regularise towards better validation loss",
     "weaker weight decay may let the model fit more within the budget"),
    (frozenset({"LR", "LEARNING"}),
     "a higher learning rate may give faster convergence within the budget",
     "a lower learning rate may give more stable updates"),
    (frozenset({"BATCH", "TOKENS", "ACCUM"}),
     "a larger batch gives less gradient noise, at the cost of fewer steps in the budget",
     "a smaller batch takes more steps in the budget, at the cost of noisier gradients"),
    (frozenset({"DEPTH", "LAYER", "LAYERS", "WIDTH", "DIM", "EMBD", "EMBED", "HIDDEN",
                "HEADS", "HEAD", "MLP", "ASPECT"}),
     "more capacity may lower the loss if the budget still allows enough steps",
     "a smaller model takes more steps in the budget, which may outweigh the lost capacity"),
    (frozenset({"DROPOUT"}),
     "more dropout may regularise",
     "less dropout lets a short run fit faster"),
    (frozenset({"BETA", "BETA1", "BETA2", "MOMENTUM"}),
     "more momentum smooths noisy updates",
     "less momentum reacts faster to the changing loss surface"),
)


def hypothesis(mutation: Mutation) -> str:
    """One readable sentence on why this mutation might lower val_bpb."""
    c = mutation.constant
    if isinstance(mutation.new_value, bool):
        state = "on" if mutation.new_value else "off"
        return f"Turning {_label(c.name)} {state} may lower val_bpb within the fixed budget."
    if isinstance(mutation.new_value, str):
        return f"{mutation.new_text} may suit this model and budget better than {c.text} for {c.name}."
    padded = f"_{c.name}_"
    for kind, up, down in _KINDS:
        if any(f"_{part}_" in padded for part in kind):
            text = up if mutation.direction > 0 else down
            return text[0].upper() + text[1:] + "."
    verb = "Raising" if mutation.direction > 0 else "Lowering"
    return f"{verb} {c.name} may lower val_bpb within the fixed budget."


def _label(name: str) -> str:
    # USE_QK_NORM → "QK norm"; the USE/ENABLE prefix says nothing
    tokens = [t for t in name.split("_") if t not in ("USE", "ENABLE", "ENABLED")] or [name]
    return " ".join(t if len(t) <= 3 else t.lower() for t in tokens)
