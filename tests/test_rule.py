"""The ratchet rule: keep iff val_bpb < head − max(min_delta, z·σ)."""

import pytest

from loop.rule import decide, noise_floor


def test_noise_floor_is_the_sample_std():
    assert noise_floor([1.0, 1.2, 1.4]) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        noise_floor([1.0])


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
