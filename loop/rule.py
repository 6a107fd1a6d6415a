"""The ratchet rule: from the baseline repeats to a noise floor, and from a result to keep or discard.

Pure functions of numbers; no I/O.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


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


def _spread(values: Sequence[float]) -> tuple[float, int]:
    """(Σ (x − x̄)², n − 1) of one group of runs; (0, 0) for fewer than two (they add nothing)."""
    if len(values) < 2:
        return 0.0, 0
    m = statistics.fmean(values)
    return sum((x - m) ** 2 for x in values), len(values) - 1


class SpreadPool:
    """Groups of runs of the same code, each kept as its (Σ (x − x̄)², n − 1), for a pooled σ re-pooled often:
    `set` replaces one group's runs (by key), `sigma` pools every group by the rule of pooled_sigma. In numpy
    over the groups' spreads, not in Python over their values: a long run confirms thousands of changes and
    σ is re-pooled at every confirmation."""

    def __init__(self):
        self._index: dict[object, int] = {}
        self._ss = np.zeros(64)
        self._dof = np.zeros(64)

    def set(self, key: object, values: Sequence[float]) -> None:
        """The runs (val_bpb) of group `key` are now `values`; fewer than two add nothing."""
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self._index)
            if i == len(self._ss):
                self._ss, self._dof = np.resize(self._ss, 2 * i), np.resize(self._dof, 2 * i)
        self._ss[i], self._dof[i] = _spread(values)

    def sigma(self, extra: Sequence[Sequence[float]] = (), outlier_ratio: float = 5.0) -> float:
        """pooled_sigma over the groups set and the `extra` groups (not kept). Raises ValueError when no group
        has two values."""
        n = len(self._index)
        more = np.array([_spread(g) for g in extra], dtype=float).reshape(-1, 2)
        ss, dof = np.concatenate([self._ss[:n], more[:, 0]]), np.concatenate([self._dof[:n], more[:, 1]])
        has = dof > 0
        ss, dof = ss[has], dof[has]
        if not len(ss):
            raise ValueError("the noise floor needs at least one group of two runs")
        if len(ss) >= 3:
            spread = np.sqrt(ss / dof)
            within = spread <= outlier_ratio * np.median(spread)
            if within.any():
                ss, dof = ss[within], dof[within]
        return float(np.sqrt(ss.sum() / dof.sum()))


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
    return SpreadPool().sigma(groups, outlier_ratio)


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
