"""Like-for-like comparisons (issue 20): every result names its hardware, the rule compares a result only with
head's runs on the same hardware class, paired confirmation cancels host speed and drift, σ per class, pinning.

A simulated fleet (tests/simfleet.py) through the real engine, keep policy, git workspace and SQLite: runs finish
at once, so each test takes a second or two.
"""

from __future__ import annotations

import pytest
from sqlmodel import Session, select

from db.models import Event, Experiment, Promotion, Run
from db.session import session_scope
from loop import hardware
from tests.simfleet import SimFleet, SimHost, SimProposer, build, is_gain, run_until_finished, score

H100 = "NVIDIA H100 80GB HBM3 x1"
A100 = "NVIDIA A100-SXM4-80GB x1"


pytestmark = pytest.mark.usefixtures("whole_rounds")  # tests/conftest.py: rounds not cut by the wall clock


def rows(db, model=Experiment):
    with Session(db) as s:
        return s.exec(select(model).order_by(model.id)).all()


def first_ks(n: int, gain: bool, seed: int = 0, fraction: float = 0.1) -> list[int]:
    """The first n edit numbers that are (gain=True) or are not real gains in the simulation."""
    return [k for k in range(1, 400) if is_gain(k, fraction, seed) == gain][:n]


def test_the_harness_names_the_cpu_model():
    import torch

    from trainer.worker import cpu_model, device_name

    name = device_name(torch.device("cpu"))
    assert name == cpu_model() and name and "cores" not in name


def test_every_result_records_its_hardware_and_host(tmp_path):
    fleet = SimFleet([SimHost("fast", H100, 2.0), SimHost("slow", A100, 1.0)], seed=1)
    eng, db = build(tmp_path, fleet, max_experiments=6)
    run_until_finished(eng)
    measured = [e for e in rows(db) if e.val_bpb is not None]
    assert measured and all(e.device_name == {"fast": H100, "slow": A100}[e.host] for e in measured)
    assert eng.slot_class == {"fast:gpu0": H100, "slow:gpu0": A100}
    texts = [ev for ev in rows(db, Event) if ev.kind in ("kept", "discarded", "baseline_run")]
    assert texts and all(ev.text.endswith(f"on {ev.payload['device_name']}") for ev in texts)
    run = rows(db, Run)[0]
    assert set(run.class_sigma) <= {H100, A100} and run.class_sigma  # σ is kept per class
    from bot.commands import format_experiment

    assert f"hardware: {measured[-1].device_name} on host {measured[-1].host}" in format_experiment(measured[-1])


def test_a_candidate_on_a_fast_host_is_not_kept_against_head_on_a_slow_one(tmp_path):
    """Head measured on slow hosts only; changes that do nothing then train on a fast host (0.02 lower there):
    the class-blind rule would keep them; this one runs head on the fast class first and discards them."""
    slow, fast = SimHost("slow", A100, 1.0, slots=2), SimHost("fast", H100, 2.0, slots=2)
    fleet = SimFleet([slow], seed=2)
    nulls = first_ks(4, gain=False, seed=2)
    eng, db = build(tmp_path, fleet, SimProposer(order=list(nulls)), max_experiments=4)
    while len(fleet.log) < 3:  # the three baseline repeats started on the slow host
        eng.tick()
    fleet.set_hosts([fast])  # from now on every run trains on the fast class
    run_until_finished(eng)
    exps = rows(db)
    search = [e for e in exps if e.kind == "experiment"]
    assert [e.device_name for e in search] == [H100] * 4
    assert [e.status for e in search] == ["discard"] * 4, [(e.status, e.decision) for e in search]
    run = rows(db, Run)[0]
    assert run.head_commit == run.baseline_commit
    controls = [e for e in exps if e.kind == "confirm" and e.commit == run.baseline_commit]
    assert controls and all(e.device_name == H100 and e.hardware == H100 for e in controls)
    # the verdicts were taken against head's runs on the fast class, never the slow one's — against which every
    # one of them would have passed (the class-blind rule's false keep)
    slow_head = [e.val_bpb for e in exps if e.kind == "baseline"]
    assert all(e.device_name == A100 for e in exps if e.kind == "baseline")
    assert all(e.val_bpb < min(slow_head) - 0.01 for e in search)
    assert all((e.decision.get("first_run") or e.decision)["hardware"] == H100 for e in search)
    # the first two results came back together: one pair of control runs of head (CONTROL_RUNS) serves both
    asked = [ev for ev in rows(db, Event) if ev.kind == "confirming" and "where head has no run yet" in ev.text]
    assert len(asked) == 1 and len(asked[0].payload["confirm_ids"]) == 2
    first_two = [c.val_bpb for c in controls[:2]]
    assert all(e.decision.get("first_run", e.decision)["reference_runs"] == first_two for e in search[:2])


@pytest.mark.parametrize("confirm", ["paired", "seeds"])
def test_paired_confirmation_on_a_drifting_host_keeps_a_gain_and_discards_a_null_change(tmp_path, confirm):
    """One host whose speed rises as the run goes on (the drift bench/search.py saw): later runs look better than
    head's early ones, so changes that do nothing pass their first run. A paired confirmation (it and head
    started together) cancels the drift: every null change is discarded and the real gain kept. New-seed
    confirmation (`seeds`) compares with head's old runs and keeps a null change."""
    gain, nulls = first_ks(1, gain=True, seed=3)[0], first_ks(6, gain=False, seed=3)
    fleet = SimFleet([SimHost("drifty", H100, 1.0, slots=2)], drift=-0.5, horizon=40, sigma=0.0005, seed=3)
    eng, db = build(tmp_path, fleet, SimProposer(order=nulls + [gain]), max_experiments=7, confirm=confirm,
                    confirm_runs=1)
    run_until_finished(eng)
    search = [e for e in rows(db) if e.kind == "experiment"]
    null_rows = [e for e in search if e.edit_key.split("@")[0] != f"SIM_EDIT_{gain}"]
    passed_first = [e for e in null_rows if (e.decision.get("first_run") or e.decision).get("verdict") == "keep"]
    assert passed_first  # the drift made null changes pass their first run
    if confirm == "seeds":
        assert any(e.status == "keep" for e in null_rows)  # and new seeds, later still, confirm them
        return
    assert all(e.status == "discard" for e in null_rows), [(e.edit_key, e.decision) for e in null_rows]
    kept = [e for e in search if e.status == "keep"]
    assert [e.edit_key for e in kept] == [f"SIM_EDIT_{gain}"]
    d = kept[0].decision
    assert d["stage"] == "paired" and len(d["paired"]) == 1 and len(d["paired_head_runs"]) == 1
    c, h = (next(e for e in rows(db) if e.id == i) for i in d["paired"][0])
    assert (c.commit, h.commit) == (kept[0].commit, kept[0].parent_commit)
    assert h.id == c.id + 1 and c.hardware == h.hardware == H100  # queued, and started, together


def test_sigma_is_kept_per_class_from_unselected_runs(tmp_path):
    """σ of a class pools the runs of that class only (by commit), proposals' first runs left out and a kept
    change's confirmation runs apart from head's later control runs; a class's own σ is used once it has
    MIN_CLASS_DOF degrees of freedom, the run's pooled σ before. Head's reference: its unselected runs."""
    fleet = SimFleet([SimHost("a", A100)])
    eng, db = build(tmp_path, fleet, max_experiments=0)
    with session_scope(db) as s:
        run = s.get(Run, eng.run_id)

        def add(kind, commit, parent, cls, v):
            s.add(Experiment(run_id=run.id, kind=kind, commit=commit, parent_commit=parent, device_name=cls,
                             status="keep", val_bpb=v))
            s.flush()

        for v in (1.000, 1.004, 1.008):
            add("baseline", "base", "base", A100, v)
        for v in (0.980, 0.981):
            add("baseline", "base", "base", H100, v)
        add("experiment", "c1", "base", H100, 0.900)  # a selected first run: not noise
        add("confirm", "c1", "base", H100, 0.972)  # its confirmation, kept: selected too
        a, h = hardware.measure_class(s, run, A100), hardware.measure_class(s, run, H100)
        assert a == {"sigma": pytest.approx(0.004), "dof": 2}
        assert h == {"sigma": pytest.approx(0.000707, abs=1e-6), "dof": 1}
        assert run.class_sigma[A100]["sigma"] == pytest.approx(0.004)
        assert run.noise_sigma == pytest.approx(((0.004 ** 2 * 2 + 0.000707 ** 2) / 3) ** 0.5, rel=1e-3)
        assert hardware.sigma_for(run, A100) == run.noise_sigma  # 2 dof < MIN_CLASS_DOF: the pooled σ
        # c1 is head: with no control run yet its reference is its own runs, or nothing for paired confirmation
        assert hardware.runs_on(s, run.id, "c1", H100) == [0.900, 0.972]
        assert hardware.runs_on(s, run.id, "c1", H100, unselected=True) == []
        for v in (0.975, 0.979):
            add("confirm", "c1", "c1", H100, v)  # control runs of head c1
        assert hardware.runs_on(s, run.id, "c1", H100, unselected=True) == [0.975, 0.979]
        assert hardware.measure_class(s, run, H100)["dof"] == 2  # the controls pair up, not with 0.972
        for v in (1.002, 1.010, 0.998):
            add("confirm", "base", "base", A100, v)
        hardware.measure_class(s, run, A100)
        assert run.class_sigma[A100]["dof"] == 5
        assert hardware.sigma_for(run, A100) == run.class_sigma[A100]["sigma"] != run.noise_sigma
        assert hardware.runs_on(s, run.id, "base", A100) == [1.008, 1.002, 1.010, 0.998]  # the latest four


def test_a_pinned_run_trains_only_on_its_class(tmp_path):
    """`hardware = "NVIDIA H100*"`: a slot of another class trains once (its class is not known before), that
    result is re-queued, and the slot takes nothing after; a host-name glob pins by host."""
    fleet = SimFleet([SimHost("a", A100, slots=2), SimHost("h", H100, slots=1)], seed=4)
    eng, db = build(tmp_path, fleet, max_experiments=5, hardware="NVIDIA H100*")
    run_until_finished(eng)
    measured = [e for e in rows(db) if e.val_bpb is not None]
    assert measured and all(e.device_name == H100 for e in measured)
    assert sum(1 for r in fleet.log if r["host"] == "a") == 2  # one probe per A100 slot, then never again
    assert any("the run is pinned to NVIDIA H100*" in (e.reason or "") for e in rows(db)) or all(
        e.host == "h" for e in rows(db) if e.host)
    assert hardware.allowed("gpu-h*", None, "gpu-h3") is True and hardware.allowed("gpu-h*", A100, "gpu-a1") is False
    assert hardware.allowed("NVIDIA H100*", None, "gpu-a1") is None  # not known yet: its first result tells


def test_promotion_pairs_train_on_one_class_and_the_verdict_names_it(tmp_path):
    from loop import promotion
    from loop.config import Settings

    fleet = SimFleet([SimHost("a", A100)])
    eng, db = build(tmp_path, fleet, max_experiments=0)
    with session_scope(db) as s:
        run = s.get(Run, eng.run_id)
        p = Promotion(run_id=run.id, candidate_commit="cand", reference_commit="ref", scale="s1", budget_s=60,
                      seeds=2, status="running")
        s.add(p)
        s.flush()
        exps = promotion.runs_for(p)
        for e in exps:
            s.add(e)
        s.flush()
        promotion.pair_on(s, exps[0], H100)  # seed 0's reference starts on an H100: its candidate must follow
        assert exps[1].hardware == H100 and exps[2].hardware == exps[3].hardware == ""
        for e, (cls, v) in zip(exps, [(H100, 1.00), (H100, 0.98), (A100, 1.10), (H100, 0.90)]):
            e.status, e.device_name, e.val_bpb, e.params = "keep", cls, v, 1000
        s.flush()
        promotion.judge_finished(s, run, p.id, Settings())
        assert p.result["hardware"] == [H100] and p.result["pairs_on_other_classes"] == 1
        assert p.result["candidate_runs"] == [0.98]  # the A100/H100 pair of seed 1 is not compared
    assert any(f"on {H100}" in ev.text for ev in rows(db, Event) if ev.kind == "promotion")


def test_a_fleet_that_names_no_hardware_is_one_class(tmp_path):
    """Runners and results that report no device_name (older harnesses): one class "", the rule as before."""
    fleet = SimFleet([SimHost("x", H100, slots=2)], report_hardware=False, seed=5)
    eng, db = build(tmp_path, fleet, max_experiments=8)
    run_until_finished(eng)
    run = rows(db, Run)[0]
    assert set(run.class_sigma) == {""}
    assert not any(e.kind == "confirm" and e.commit == run.baseline_commit and e.confirms_id
                   and "control" in e.description and e.id < 6 for e in rows(db))  # no control needed for head
    assert score(db, fleet)["false_keeps"] == 0
