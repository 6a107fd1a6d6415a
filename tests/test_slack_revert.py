"""Control.revert and `revert <id>` in the shared grammar: only head's experiment, database first, the branch
follows, head's val_bpb becomes the parent's recorded mean."""

from __future__ import annotations

import pytest
from sqlmodel import Session, select

from bot.commands import handle
from db.models import Event, Experiment, Run
from db.session import session_scope
from loop import events
from loop.control import Control, ControlError
from tests.test_engine import make_engine_for


def keep(eng, ws, parent: str, val: float, const: str) -> Experiment:
    """Record a kept experiment on `parent` (its own commit changing `const`), moving head and the branch."""
    src = ws.read_file(parent)
    name, value = const.split("=")
    lines = [f"{name.strip()} = {value.strip()}  # changed" if ln.startswith(name.strip() + " =") else ln
             for ln in src.splitlines()]
    with session_scope(eng.db) as s:
        run = s.get(Run, eng.run_id)
        exp = Experiment(run_id=run.id, kind="experiment", status="proposed", parent_commit=parent,
                         description=const)
        s.add(exp)
        s.flush()
        exp.commit = ws.commit_experiment(exp.id, parent, "\n".join(lines) + "\n", f"exp {exp.id}")
        before = run.head_val_bpb
        exp.status, exp.val_bpb = "keep", val
        run.head_commit, run.head_val_bpb, run.head_runs = exp.commit, val, [val]
        s.add(events.experiment_event(exp, run, before))
        s.add_all([run, exp])
        s.flush()
        s.expunge(exp)
    ws.fast_forward(eng.settings.run, exp.commit, parent)
    return exp


@pytest.fixture
def measured(tmp_path, data_dir, tiny_workspace):
    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace)
    base = eng.get_run().baseline_commit
    with session_scope(db) as s:
        run = s.get(Run, eng.run_id)
        for i, v in enumerate((2.30, 2.32, 2.34)):
            s.add(Experiment(run_id=run.id, kind="baseline", status="keep", commit=base, parent_commit=base,
                             val_bpb=v, seed=i))
        run.noise_sigma, run.head_val_bpb, run.head_runs = 0.02, 2.32, [2.30, 2.32, 2.34]
        s.add(run)
    return eng, Control(db, eng.settings.run, eng), tiny_workspace, base


def run_row(control) -> Run:
    with Session(control.db) as s:
        return s.exec(select(Run)).one()


def test_revert_walks_head_back_one_keep_at_a_time(measured):
    eng, control, ws, base = measured
    a = keep(eng, ws, base, 2.20, "LR = 0.03")
    b = keep(eng, ws, a.commit, 2.10, "DIM = 48")
    text = control.revert("dana", b.id)
    assert text.startswith(f"reverted #{b.id} DIM = 48 by dana: head back to {a.commit[:10]}")
    assert "2.1000 → 2.2000" in text
    run = run_row(control)
    assert (run.head_commit, run.head_val_bpb, run.head_runs) == (a.commit, 2.20, [2.20])
    assert ws.branch_tip("main") == a.commit

    with session_scope(eng.db) as s:  # a promotion run of the baseline, at a larger scale: not a run of head's
        s.add(Experiment(run_id=eng.run_id, kind="promotion", status="keep", commit=base, parent_commit=base,
                         scale="s1", val_bpb=1.50))
    control.revert("dana", a.id)
    run = run_row(control)
    assert run.head_commit == base and run.head_val_bpb == pytest.approx(2.32) and len(run.head_runs) == 3
    assert ws.branch_tip("main") == base
    with Session(control.db) as s:
        reverted = s.exec(select(Event).where(Event.kind == "reverted").order_by(Event.id)).all()
        assert [e.experiment_id for e in reverted] == [b.id, a.id] and reverted[0].payload["by"] == "dana"
        for e in (s.get(Experiment, a.id), s.get(Experiment, b.id)):
            assert e.status == "discard" and e.decision["reverted"]["by"] == "dana"


def test_revert_refuses_anything_but_heads_experiment(measured):
    eng, control, ws, base = measured
    a = keep(eng, ws, base, 2.20, "LR = 0.03")
    b = keep(eng, ws, a.commit, 2.10, "DIM = 48")
    with pytest.raises(ControlError, match=rf"#{a.id} is not head \(head is #{b.id}\)"):
        control.revert("dana", a.id)
    with pytest.raises(ControlError, match="no experiment #999"):
        control.revert("dana", 999)
    with Session(control.db) as s:
        baseline_id = s.exec(select(Experiment.id).where(Experiment.kind == "baseline")).first()
    with pytest.raises(ControlError, match="not a kept experiment"):
        control.revert("dana", baseline_id)
    control.revert("dana", b.id)
    with pytest.raises(ControlError, match="not a kept experiment"):  # already reverted
        control.revert("dana", b.id)
    assert run_row(control).head_commit == a.commit and ws.branch_tip("main") == a.commit


def test_revert_in_the_shared_grammar_needs_an_operator(measured):
    eng, control, ws, base = measured
    a = keep(eng, ws, base, 2.20, "LR = 0.03")
    r = handle(f"revert {a.id}", control, user="<@U1>", backend="slack", role="viewer")
    assert not r.ok and r.text == "`revert` needs the operator role; you are viewer"
    r = handle(f"revert #{a.id}", control, user="<@U2>", backend="slack", role="operator")
    assert r.ok and r.public and r.text.startswith(f"reverted #{a.id}")
    r = handle(f"revert {a.id}", control, user="sam", backend="shell")  # the shell is admin
    assert not r.ok and "not a kept experiment" in r.text
