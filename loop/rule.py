"""The ratchet rule: from the baseline repeats to a noise floor, and from a result to keep or discard.

Pure functions of numbers; no I/O.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class Decision:
    """The rule's inputs and verdict, stored with the experiment. val_bpb values in bits per byte."""

    verdict: str  # keep | discard
    val_bpb: float
    head_val_bpb: float
    sigma: float
    z: float
    min_delta: float
    threshold: float  # max(min_delta, z·σ)
    delta: float  # val_bpb − head_val_bpb (negative is better)

    def as_dict(self) -> dict:
        return asdict(self)


def noise_floor(values: Sequence[float]) -> float:
    """σ: the sample standard deviation (n−1) of val_bpb over repeated runs of the same code.

    Raises ValueError for fewer than two values.
    """
    if len(values) < 2:
        raise ValueError("the noise floor needs at least two runs")
    return statistics.stdev(values)


def decide(val_bpb: float, head_val_bpb: float, sigma: float, *, min_delta: float = 0.0003,
           z: float = 2.0) -> Decision:
    """Keep iff val_bpb < head − max(min_delta, z·σ); anything else is discarded.

    The margin guards against keeping noise: with z = 2 a change that does nothing is kept in
    roughly 2% of tries (one-sided normal tail), and min_delta keeps a near-zero σ from letting
    rounding-level gains through.
    """
    threshold = max(min_delta, z * sigma)
    verdict = "keep" if val_bpb < head_val_bpb - threshold else "discard"
    return Decision(verdict, val_bpb, head_val_bpb, sigma, z, min_delta, threshold, val_bpb - head_val_bpb)
