"""What every proposer returns and accepts: Proposal, TriedEdit, the Proposer protocol, errors.
Nothing here talks to a network, the database or the GPU."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


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


class ProposalError(Exception):
    """The proposer could not produce a proposal (reason in str)."""


class ProposalExhausted(ProposalError):
    """Nothing left to try from this parent: every candidate edit was already tried."""


@runtime_checkable
class Proposer(Protocol):
    """Writes the next proposal for a run.

    `propose(head_source, parent, history)`: `head_source` is head's train.py text,
    `parent` head's commit, `history` the earlier experiments of the run (any parent).
    Raises ProposalError (ProposalExhausted when nothing is left to try).
    """

    name: str

    def propose(self, head_source: str, parent: str, history: Sequence[TriedEdit]) -> Proposal: ...
