"""The ratchet rule: from the baseline repeats to a noise floor, and from a result to keep or discard.

Pure functions of numbers; no I/O.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Optional, Sequence


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


def pooled_sigma(groups: Sequence[Sequence[float]], outlier_ratio: float = 5.0) -> float:
    """σ pooled over groups of runs of the same code: sqrt(Σ_g Σ_i (x_gi − x̄_g)² / Σ_g (n_g − 1)).

    The standard pooled variance (e.g. Wikipedia, "Pooled variance"): each group contributes n−1 degrees
    of freedom around its own mean, so groups of different code (the baseline repeats, a confirmed change
    and its re-runs) estimate one shared run-to-run noise. Groups of fewer than two values add nothing.
    With three groups or more, a group whose own standard deviation exceeds outlier_ratio × the median
    group's is left out: code that behaves differently by seed (one seed diverges) is not noise, and one
    such group would otherwise inflate σ for the rest of the run. For normal noise a pair's spread passes
    5 × the median spread in under 0.1% of pairs (|Z| > 3.4).
    Raises ValueError when no group has two values.
    """
    spreads = []
    for g in groups:
        if len(g) >= 2:
            m = statistics.fmean(g)
            spreads.append((sum((x - m) ** 2 for x in g), len(g) - 1))
    if not spreads:
        raise ValueError("the noise floor needs at least one group of two runs")
    if len(spreads) >= 3:
        cap = outlier_ratio * statistics.median((ss / dof) ** 0.5 for ss, dof in spreads)
        spreads = [(ss, dof) for ss, dof in spreads if (ss / dof) ** 0.5 <= cap] or spreads
    return (sum(ss for ss, _ in spreads) / sum(dof for _, dof in spreads)) ** 0.5


def decide(val_bpb: float, head_val_bpb: float, sigma: float, *, min_delta: float = 0.0003,
           z: float = 2.0, head_n: Optional[int] = None) -> Decision:
    """Keep iff val_bpb < head − max(min_delta, z·σ); anything else is discarded.

    The margin guards against keeping noise: with z = 2 a change that does nothing is kept in
    roughly 2% of tries (one-sided normal tail), and min_delta keeps a near-zero σ from letting
    rounding-level gains through. head_n: head_val_bpb is the mean of that many runs, so the
    difference has standard error σ·√(1 + 1/head_n) and the margin is z times that (the same 2%).
    """
    threshold = max(min_delta, z * sigma * (1 + 1 / head_n) ** 0.5 if head_n else z * sigma)
    verdict = "keep" if val_bpb < head_val_bpb - threshold else "discard"
    return Decision(verdict, val_bpb, head_val_bpb, sigma, z, min_delta, threshold, val_bpb - head_val_bpb)


def decide_paired(cand_runs: Sequence[float], head_runs: Sequence[float], sigma: float, *,
                  min_delta: float = 0.0003, z: float = 2.0) -> Decision:
    """Paired confirmation: k runs of the candidate and k of head, each pair started together on one hardware
    class. Keep iff the mean paired difference d̄ = mean(cand_i − head_i) < −max(min_delta, z·σ·√(2/k)).

    Both runs of a pair see the same host speed and the same moment of its drift, so both cancel in the
    difference; each difference has variance 2σ² (two independent runs), hence √(2/k) for the mean of k.
    With z = 2 a change that does nothing passes in roughly 2% of pairs; the stored `sigma` is σ·√(2/k),
    the standard error of d̄. Raises ValueError for no pairs or unequal lengths.
    """
    if not cand_runs or len(cand_runs) != len(head_runs):
        raise ValueError("paired confirmation needs k ≥ 1 runs of each side")
    k = len(cand_runs)
    d = statistics.fmean(c - h for c, h in zip(cand_runs, head_runs))
    se = sigma * (2 / k) ** 0.5
    threshold = max(min_delta, z * se)
    c, h = statistics.fmean(cand_runs), statistics.fmean(head_runs)
    return Decision("keep" if d < -threshold else "discard", c, h, se, z, min_delta, threshold, d)
