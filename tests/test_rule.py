"""The ratchet rule: keep iff val_bpb < head − max(min_delta, z·σ)."""

import pytest

from loop.rule import decide, pooled_sigma


def test_keep_needs_to_beat_head_by_the_noise_margin():
    assert decide(1.90, 2.00, 0.01).verdict == "keep"  # beats by 0.10 > 2σ = 0.02
    assert decide(1.99, 2.00, 0.01).verdict == "discard"  # 0.01 < 2σ
    assert decide(1.98, 2.00, 0.01).verdict == "discard"  # exactly 2σ is not enough
    assert decide(2.10, 2.00, 0.01).verdict == "discard"
    # a tiny σ falls back to min_delta
    assert decide(1.9999, 2.0, 0.0).verdict == "discard"
    assert decide(1.999, 2.0, 0.0).verdict == "keep"
    d = decide(1.9, 2.0, 0.01, min_delta=0.001, z=3)
    assert d.as_dict() == {"verdict": "keep", "val_bpb": 1.9, "head_val_bpb": 2.0, "sigma": 0.01, "z": 3,
                           "min_delta": 0.001, "threshold": 0.03, "delta": pytest.approx(-0.1)}


def test_pooled_sigma_over_groups_of_runs_of_one_code():
    # Σ(x − x̄)² = 2 (baseline) + 2 (pair) over 2 + 1 degrees of freedom
    assert pooled_sigma([[1.0, 2.0, 3.0], [5.0, 7.0]]) == pytest.approx((4 / 3) ** 0.5)
    assert pooled_sigma([[1.0, 2.0, 3.0], [4.0]]) == pytest.approx(1.0)  # a single run adds nothing
    with pytest.raises(ValueError):
        pooled_sigma([[1.0], [2.0]])


def test_pooled_sigma_leaves_out_code_that_behaves_differently_by_seed():
    steady = [[2.0, 2.01, 1.99], [1.9, 1.91], [1.8, 1.79], [1.7, 1.71]]
    assert pooled_sigma(steady + [[1.6, 9.0]]) == pytest.approx(pooled_sigma(steady))
    assert pooled_sigma(steady + [[1.6, 9.0]], outlier_ratio=1e9) > 1  # without the guard it would dominate
    assert pooled_sigma([[1.0, 1.1], [2.0, 5.0]]) > 1  # two groups: no median to judge by, both count


def test_decide_counts_the_reference_s_own_noise():
    from loop.rule import decide

    # against the mean of n runs the difference has standard error σ·√(1 + 1/n)
    assert decide(0.995, 1.0, 0.002, head_n=1).threshold == pytest.approx(2 * 0.002 * 2 ** 0.5)
    assert decide(0.995, 1.0, 0.002, head_n=4).threshold == pytest.approx(2 * 0.002 * 1.25 ** 0.5)
    assert decide(0.995, 1.0, 0.002).threshold == pytest.approx(0.004)  # head_n unknown: z·σ as before


def test_decide_paired_judges_the_mean_difference():
    from loop.rule import decide_paired

    d = decide_paired([0.990], [0.996], 0.002)  # one pair: se = σ·√2, margin 2·se ≈ 0.0057
    assert d.verdict == "keep" and d.delta == pytest.approx(-0.006) and d.sigma == pytest.approx(0.002 * 2 ** 0.5)
    assert decide_paired([0.992], [0.996], 0.002).verdict == "discard"  # −0.004 is inside the margin
    # the pairs' common shift (a faster host, a drift) cancels: both runs 0.05 lower changes nothing
    assert decide_paired([0.940], [0.946], 0.002).verdict == "keep"
    two = decide_paired([0.990, 0.994], [0.995, 0.998], 0.002)  # two pairs: se = σ, margin 0.004
    assert two.threshold == pytest.approx(0.004) and two.delta == pytest.approx(-0.0045) and two.verdict == "keep"
    with pytest.raises(ValueError):
        decide_paired([0.99], [], 0.002)
