"""Tests for the offline proposer: constants, device presets, edits, no repeats, determinism."""

import difflib
from pathlib import Path

import pytest

from loop.proposers.base import Proposal, ProposalError, ProposalExhausted, Proposer, ResearchState, TriedEdit
from loop.proposers.offline import (
    OfflineProposer,
    candidate_mutations,
    kept_directions,
    preset_suffix,
    read_constants,
)
from loop.validate import normalised_ast_hash, validate_proposal
from tests.test_validate import TRAIN_PY

TEMPLATE = Path(__file__).resolve().parents[1] / "trainer" / "templates" / "train.py"
PARENT = "a" * 40
FACTORS = (0.5, 0.7, 1.4, 2.0)
# Untried candidates of TRAIN_PY on a CPU (see test_exhausts_every_candidate_once).
CPU_CANDIDATES = 31


def constants(source=TRAIN_PY):
    return {c.name: c for c in read_constants(source)}


def new_texts(name, source=TRAIN_PY, factors=FACTORS):
    return [m.new_text for m in candidate_mutations(constants(source)[name], factors)]


def changed_lines(old, new):
    """(removed, added) lines of a one-line edit."""
    diff = [d for d in difflib.ndiff(old.splitlines(), new.splitlines()) if d[:2] in ("- ", "+ ")]
    assert len(diff) == 2, diff
    return diff[0][2:], diff[1][2:]


def exhaust(proposer, source=TRAIN_PY, parent=PARENT, history=None):
    """Propose until exhausted, recording each as a discarded experiment; returns the proposals."""
    history = list(history or [])
    proposals = []
    while True:
        try:
            p = proposer.propose(source, parent, history)
        except ProposalExhausted:
            return proposals
        proposals.append(p)
        history.append(TriedEdit(parent, p.edit_key, "discard", 1.0, p.description))
        assert len(proposals) <= 500, "never exhausted"


# ---- reading constants ----

def test_reads_module_level_literals():
    found = constants()
    assert found["MATRIX_LR"].value == 0.02 and found["MATRIX_LR"].text == "0.02"
    assert found["DEPTH_CUDA"].value == 8
    assert found["USE_QK_NORM"].value is True
    assert found["ATTN_BIAS_INIT"].value == -2.0 and found["ATTN_BIAS_INIT"].text == "-2.0"
    assert found["OPTIMIZER"].options == ("adamw", "muon", "sgd")
    assert found["LABEL"].options == ()
    assert "GPTConfig" not in found and "depth" not in found


def test_skips_non_literals_and_rebound_names():
    source = TRAIN_PY.replace(
        "# ---- GPT Model ----",
        "HIDDEN = WIDTH * 4\nTWICE = 1\nTWICE = 2\nPAIR = (1, 2)\nA = B = 3\nlower = 5\nNOTHING = None\n"
        "# ---- GPT Model ----")
    found = constants(source)
    for name in ("HIDDEN", "TWICE", "PAIR", "A", "B", "lower", "NOTHING"):
        assert name not in found


# ---- mutations ----

def test_power_of_two_ints_double_or_halve():
    assert new_texts("DEPTH_CPU") == ["8", "2"]
    assert new_texts("BATCH_SIZE_CPU") == ["64", "16"]
    source = "ONE = 1\n"
    assert new_texts("ONE", source) == ["2"]


def test_other_ints_scale_round_and_stay_positive():
    assert new_texts("WIDTH") == ["48", "67", "134", "192"]
    assert new_texts("THREE", "THREE = 3\n") == ["2", "4", "6"]
    assert new_texts("ZERO", "ZERO = 0\n") == []
    assert new_texts("OFF", "OFF = -1\n") == []


def test_floats_are_formatted_compactly():
    assert new_texts("MATRIX_LR") == ["0.01", "0.014", "0.028", "0.04"]
    assert new_texts("X", "X = 0.1\n", factors=(3.0,)) == ["0.3"]  # not 0.30000000000000004
    assert new_texts("ATTN_BIAS_INIT") == ["-1.0", "-1.4", "-2.8", "-4.0"]


def test_momenta_and_fractions_stay_below_one():
    assert new_texts("ADAM_BETA2", "ADAM_BETA2 = 0.95\n") == ["0.975", "0.965", "0.93", "0.9"]
    assert new_texts("WARMDOWN_RATIO", "WARMDOWN_RATIO = 0.6\n") == ["0.3", "0.42", "0.84"]


def test_bool_flips_and_str_picks_listed_options():
    assert new_texts("USE_QK_NORM") == ["False"]
    assert new_texts("OPTIMIZER") == ['"muon"', '"sgd"']
    assert new_texts("LABEL") == []
    single = "MODE = 'a'  # one of: 'a', \"b\", 'naïve'\n"
    assert new_texts("MODE", single) == ["'b'", "'naïve'"]


def test_str_option_proposal_keeps_the_comment():
    source = TRAIN_PY.replace('OPTIMIZER = "adamw"', 'OPTIMIZER = "naïve"').replace(
        '# one of: "adamw"', '# one of: "naïve", "adamw"')
    history = []
    proposer = OfflineProposer(seed=3)
    while True:
        p = proposer.propose(source, PARENT, history)
        history.append(TriedEdit(PARENT, p.edit_key, "discard"))
        if p.edit_key.startswith("OPTIMIZER="):
            break
    old, new = changed_lines(source, p.source)
    assert old.startswith('OPTIMIZER = "naïve"     # one of: "naïve", "adamw", "muon", "sgd"')
    assert new == old.replace('"naïve"', p.edit_key.split("=", 1)[1], 1)
    assert constants(p.source)["OPTIMIZER"].value in ("adamw", "muon", "sgd")


# ---- proposals ----

def test_proposal_fields_and_one_line_change():
    p = OfflineProposer(seed=0).propose(TRAIN_PY, PARENT, [])
    assert isinstance(p, Proposal)
    assert p.proposer == "offline" and p.usage == {} and p.cost_usd == 0.0
    name, new = p.edit_key.split("=", 1)
    c = constants()[name]
    assert p.description == f"{name} {c.text} → {new}"
    assert p.hypothesis.endswith(".")
    old_line, new_line = changed_lines(TRAIN_PY, p.source)
    # only the literal changes: the same line with old literal swapped for the new one
    assert new_line == old_line.replace(f"{name} = {c.text}", f"{name} = {new}", 1)
    assert "#" not in old_line or old_line.split("#", 1)[1] == new_line.split("#", 1)[1]


def test_every_proposal_parses_and_validates():
    seen = set()
    for p in exhaust(OfflineProposer(seed=1)):
        verdict = validate_proposal(TRAIN_PY, {"train.py": p.source}, seen_hashes=seen)
        assert verdict.ok, (p.edit_key, verdict.reason)
        seen.add(verdict.ast_hash)


def test_exhausts_every_candidate_once():
    proposals = exhaust(OfflineProposer(seed=2))
    keys = [p.edit_key for p in proposals]
    assert len(keys) == len(set(keys)) == CPU_CANDIDATES
    with pytest.raises(ProposalExhausted):
        OfflineProposer(seed=2).propose(
            TRAIN_PY, PARENT, [TriedEdit(PARENT, k, "discard") for k in keys])


def test_tried_pairs_are_per_parent():
    tried = [TriedEdit(PARENT, p.edit_key, "discard") for p in exhaust(OfflineProposer(seed=4))]
    # the same edits on a new head are new experiments
    assert len(exhaust(OfflineProposer(seed=4), parent="b" * 40, history=tried)) == CPU_CANDIDATES


def test_any_status_counts_as_tried():
    keys = [p.edit_key for p in exhaust(OfflineProposer(seed=5))]
    statuses = ["keep", "crash", "queued", "running", "invalid"]
    history = [TriedEdit(PARENT, k, statuses[i % len(statuses)]) for i, k in enumerate(keys)]
    with pytest.raises(ProposalExhausted):
        OfflineProposer(seed=5).propose(TRAIN_PY, PARENT, history)


def test_edits_tried_on_head_that_the_history_no_longer_shows_count_as_tried():
    """On a long plateau the history holds only the recent experiments; research_state's tried_on_head holds
    every edit key tried on head, and those are never proposed again."""
    keys = [p.edit_key for p in exhaust(OfflineProposer(seed=5))]
    state = ResearchState(tried_on_head=frozenset(keys[:-1]))
    assert OfflineProposer(seed=6).propose(TRAIN_PY, PARENT, [], state).edit_key == keys[-1]
    with pytest.raises(ProposalExhausted):
        OfflineProposer(seed=6).propose(TRAIN_PY, PARENT, [], ResearchState(tried_on_head=frozenset(keys)))


def test_unparsable_head_is_a_proposal_error_not_exhaustion():
    with pytest.raises(ProposalError) as info:
        OfflineProposer().propose("def (:\n", PARENT, [])
    assert not isinstance(info.value, ProposalExhausted)


def test_deterministic_with_a_seed():
    def keys(seed):
        return [p.edit_key for p in exhaust(OfflineProposer(seed=seed))]
    assert keys(7) == keys(7)
    assert keys(7) != keys(8)


def test_rejects_bad_factors():
    with pytest.raises(ValueError):
        OfflineProposer(factors=(1.0, 2.0))
    with pytest.raises(ValueError):
        OfflineProposer(factors=(-0.5,))


def test_is_a_proposer():
    assert isinstance(OfflineProposer(), Proposer)
    assert OfflineProposer.name == "offline"


# ---- device presets ----

def edited_names(device, source=TRAIN_PY):
    return {p.edit_key.split("=")[0] for p in exhaust(OfflineProposer(device=device), source)}


def test_cpu_never_touches_cuda_presets():
    names = edited_names("cpu")
    assert {"DEPTH_CPU", "BATCH_SIZE_CPU"} <= names
    assert not any(n.endswith("_CUDA") for n in names)
    assert "SEED_OFFSET" not in names  # a seed is noise, not an idea


def test_cuda_never_touches_cpu_presets():
    names = edited_names("cuda:0")
    assert {"DEPTH_CUDA", "BATCH_SIZE_CUDA", "MATRIX_LR"} <= names
    assert not any(n.endswith("_CPU") for n in names)


def test_mps_uses_its_own_presets_or_falls_back_to_cpu():
    assert preset_suffix(read_constants(TRAIN_PY), "mps") == "CPU"
    with_mps = TRAIN_PY.replace("BATCH_SIZE_CUDA = 64", "BATCH_SIZE_CUDA = 64\nBATCH_SIZE_MPS = 16")
    names = edited_names("mps", with_mps)
    assert "BATCH_SIZE_MPS" in names
    assert not any(n.endswith(("_CPU", "_CUDA")) for n in names)


# ---- direction preference and hypotheses ----

def test_kept_directions_from_descriptions():
    history = [
        TriedEdit("p1", "MATRIX_LR=0.02", "keep", 1.1, "MATRIX_LR 0.01 → 0.02"),
        TriedEdit("p2", "DEPTH_CPU=2", "keep", 1.0, "DEPTH_CPU 4 → 2"),
        TriedEdit("p2", "WIDTH=192", "discard", 1.3, "WIDTH 96 → 192"),
        TriedEdit("p3", "x", "keep", 0.9, "rewrote attention (claude)"),
    ]
    assert kept_directions(history) == {"MATRIX_LR": 1, "DEPTH_CPU": -1}


def test_prefers_the_direction_that_was_kept():
    history = [TriedEdit("old", "MATRIX_LR=0.02", "keep", 1.1, "MATRIX_LR 0.01 → 0.02")]
    firsts = [OfflineProposer(seed=s).propose(TRAIN_PY, PARENT, history).edit_key for s in range(200)]
    up = sum(k in ("MATRIX_LR=0.028", "MATRIX_LR=0.04") for k in firsts)
    down = sum(k in ("MATRIX_LR=0.01", "MATRIX_LR=0.014") for k in firsts)
    # uniform choice would give each ~2/31 of 200 ≈ 13; following up adds ~half the draws
    assert up > 60 and down < 30


def test_hypotheses_fit_the_constant():
    by_key = {p.edit_key: p for p in exhaust(OfflineProposer(seed=0))}
    assert "faster convergence within the budget" in by_key["MATRIX_LR=0.04"].hypothesis
    assert "more stable updates" in by_key["MATRIX_LR=0.01"].hypothesis
    assert "capacity" in by_key["DEPTH_CPU=8"].hypothesis
    assert "gradient" in by_key["BATCH_SIZE_CPU=64"].hypothesis
    assert "warmup" in by_key["WARMUP_STEPS=20"].hypothesis
    assert "weight decay" in by_key["WEIGHT_DECAY=0.2"].hypothesis.lower()
    assert by_key["USE_QK_NORM=False"].hypothesis.startswith("Turning QK norm off")
    assert by_key["USE_QK_NORM=False"].description == "USE_QK_NORM True → False"
    assert by_key['OPTIMIZER="muon"'].description == 'OPTIMIZER "adamw" → "muon"'


# ---- the real template ----

@pytest.mark.skipif(not TEMPLATE.exists(), reason="trainer/templates/train.py not written yet")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_template_proposals_validate(device):
    source = TEMPLATE.read_text()
    seen = {normalised_ast_hash(source)}
    proposals = exhaust(OfflineProposer(seed=0, device=device), source)
    assert proposals
    for p in proposals:
        verdict = validate_proposal(source, {"train.py": p.source}, seen_hashes=seen)
        assert verdict.ok, (p.edit_key, verdict.reason)
        seen.add(verdict.ast_hash)


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_the_cached_candidates_are_every_mutable_constants_mutations_in_order(device):
    from loop.proposers.offline import _all_candidates, _mutable

    for source in (TRAIN_PY, TEMPLATE.read_text()):
        consts = read_constants(source)
        preset = preset_suffix(consts, device)
        expected = [m for c in consts if _mutable(c, preset) for m in candidate_mutations(c, FACTORS)]
        assert list(_all_candidates(source, device, FACTORS)) == expected
        assert _all_candidates(source, device, FACTORS) is _all_candidates(source, device, FACTORS)


def test_a_cached_head_still_skips_what_was_tried_since():
    proposer, history = OfflineProposer(seed=5, factors=FACTORS), []
    keys = []
    for _ in range(CPU_CANDIDATES):  # the same head every time: its candidates come from the cache
        p = proposer.propose(TRAIN_PY, PARENT, history)
        keys.append(p.edit_key)
        history.append(TriedEdit(PARENT, p.edit_key, "discard", 1.0, p.description))
    assert len(set(keys)) == CPU_CANDIDATES
    with pytest.raises(ProposalExhausted):
        proposer.propose(TRAIN_PY, PARENT, history)
