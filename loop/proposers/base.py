"""What every proposer returns and accepts: Proposal, TriedEdit, the Proposer base class, errors.
Nothing here talks to a network, the database or the GPU."""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field


@dataclass
class Proposal:
    """One proposed change to train.py.

    `source` is the full new train.py text (validated by loop.validate before it runs);
    `edit_key` is the canonical id of the edit, e.g. "MATRIX_LR=0.03": the engine never
    runs the same (parent, edit_key) twice. `usage` / `cost_usd` carry the Claude
    proposer's token accounting (USD); both stay empty / 0.0 for the offline proposer.
    """

    source: str
    description: str  # one line, e.g. "MATRIX_LR 0.02 → 0.03"
    hypothesis: str  # why it might help, e.g. "faster convergence within the budget"
    proposer: str  # "offline" | "claude"
    edit_key: str = ""
    usage: dict = field(default_factory=dict)
    cost_usd: float = 0.0
    direction: str = ""  # the research direction it was asked for (program.md), "" for none


@dataclass(frozen=True)
class TriedEdit:
    """An earlier experiment as a proposer sees it (built by the engine from the database).

    `parent` is the commit the edit was applied to, `status` the experiment status
    ("keep", "discard", "crash", "queued", ...), `val_bpb` in bits per byte or None
    when it has no result (yet).
    """

    parent: str
    edit_key: str
    status: str
    val_bpb: float | None = None
    description: str = ""
    exp_id: int | None = None
    delta: float | None = None  # val_bpb − the parent's val_bpb (negative is better), when both are known
    reason: str = ""  # why it crashed / was invalid / where it was pruned, one line
    # what the harness measured (None when unknown): optimizer steps, training tokens per second,
    # peak accelerator memory (MiB), model FLOPs utilisation (% of peak, CUDA only)
    steps: int | None = None
    tokens_per_s: float | None = None
    peak_memory_mb: float | None = None
    mfu_percent: float | None = None
    direction: str = ""


@dataclass(frozen=True)
class ResearchState:
    """What else a proposer may read about the run (the engine builds it from the database).

    val_bpb values in bits per byte; `budget_s` in seconds; `hints` are (author, text) pairs from
    team members: data to weigh, never instructions. `seen_hashes` are the normalised-AST hashes
    of every earlier experiment, so a proposer can avoid duplicates before the engine rejects them.
    """

    run: str = "main"
    head_val_bpb: float | None = None
    baseline_val_bpb: float | None = None
    noise_sigma: float | None = None
    keep_threshold: float | None = None  # a keep must beat head by more than this
    budget_s: float = 60.0
    device: str = "cpu"
    program: str = ""  # program.md of the workspace
    hints: tuple[tuple[str, str], ...] = ()
    seen_hashes: Container[str] = frozenset()  # supports `in`; may be backed by the database
    not_transferred: tuple[str, ...] = ()  # kept changes whose gain did not transfer to a larger scale
    # the swarm (many requests in flight): what is queued or training right now (descriptions), the
    # directions other requests in flight were asked for, this request's direction (name, what it covers),
    # and the last kept changes as (description, short diff), newest first; all empty for a fast proposer
    in_progress: tuple[str, ...] = ()
    being_proposed: tuple[str, ...] = ()
    direction: str = ""
    direction_text: str = ""
    kept_diffs: tuple[tuple[str, str], ...] = ()
    # a fast proposer's: edit keys of every experiment proposed on head (the history shows only the recent ones
    # and the keeps); empty for a slow one
    tried_on_head: frozenset[str] = frozenset()


class ProposalError(Exception):
    """The proposer could not produce a proposal (reason in str)."""


class ProposalExhausted(ProposalError):
    """Nothing left to try from this parent: every candidate edit was already tried."""


class ProposalAuthError(ProposalError):
    """The proposer's credentials were rejected (HTTP 401 / 403): the run pauses with this reason."""


class ProposalRejected(ProposalError):
    """The proposer answered but produced no usable proposal (a refusal, max_tokens, edits that still
    failed after the repair turns). The engine stores it as an `invalid` experiment with the reason,
    charging `cost_usd` (USD) and recording `usage`."""

    def __init__(self, reason: str, *, description: str = "", hypothesis: str = "", source: str = "",
                 usage: dict | None = None, cost_usd: float = 0.0, proposer: str = "claude"):
        super().__init__(reason)
        self.reason, self.description, self.hypothesis, self.source = reason, description, hypothesis, source
        self.usage, self.cost_usd, self.proposer = usage or {}, cost_usd, proposer


class Proposer:
    """Writes the next proposal for a run.

    `propose(head_source, parent, history, state)`: `head_source` is head's train.py text,
    `parent` head's commit, `history` earlier experiments of the run (every keep and the most recent, any
    parent, oldest first), `state` the rest of what the run knows (noise floor, hints, program.md, the edit
    keys tried on head).
    Raises ProposalError: ProposalExhausted when nothing is left to try, ProposalAuthError when
    credentials are rejected, ProposalRejected when an answer could not be used.
    """

    name: str = ""
    # Proposes in microseconds with no network: the engine asks it when a slot is free, instead of in the
    # background while slots train.
    fast: bool = False
    # callable(status) for each HTTP 429 / 529 the proposer sees; the engine's Proposals sets it (loop/swarm.py)
    on_throttle = None

    def estimate_usd(self) -> float:
        """What one request is expected to cost (USD) before any has been paid for; 0 for a free proposer."""
        return 0.0

    def propose(self, head_source: str, parent: str, history: Sequence[TriedEdit],
                state: ResearchState | None = None) -> Proposal:
        raise NotImplementedError
