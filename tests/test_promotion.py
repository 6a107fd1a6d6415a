"""Promotion on CPU with tiny scales: both sides run with the scale's overrides, the verdict is stored,
`promoted` advances only on a transfer, and a train.py that ignores ctx.scale is caught."""

from __future__ import annotations

import pytest

from bot.commands import format_status
from db.models import Event, Promotion, Run
from db.session import create_tables, make_engine
from loop.config import ScaleConfig, Settings
from loop.control import Control, ControlError
from loop.engine import Engine, promoted_ref
from loop.promotion import judge
from loop.runners.local import LocalRunner
from loop.workspace import Workspace
from tests.conftest import TINY_TRAIN_PY
from tests.test_engine import FixedProposer, rows, tick_until

# A baseline any sane learning rate beats, capped at 60 steps so results depend on the seed, not on how
# busy the machine is (a time budget on a shared CPU would make the comparison noisy).
SLOW = TINY_TRAIN_PY.replace("LR = 0.02", "LR = 0.001").replace("if ctx.should_stop():",
                                                                 "if ctx.should_stop() or step >= 60:")


def test_judge():
    common = dict(delta_small=-0.05, sigma_small=0.01, params_small={"reference": 10, "candidate": 10},
                  params_large={"reference": 20, "candidate": 20}, overrides={"width": 64})
    assert judge([2.0, 2.02], [1.8, 1.83], **common).verdict == "transfers"
    assert judge([2.0, 2.02], [2.05, 2.03], **common).verdict == "does_not_transfer"
    assert judge([2.0, 2.02], [2.02, 1.99], **common).verdict == "inconclusive"
    ignored = judge([2.0], [1.8], **{**common, "params_large": {"reference": 10, "candidate": 10}})
    assert ignored.verdict == "scale_ignored" and "ignores ctx.scale" in ignored.reason
    # a budget-only scale cannot be caught by parameter counts, and is judged normally
    assert judge([2.0, 2.02], [1.8, 1.83], **{**common, "overrides": {}, "params_large": common["params_small"]}
                 ).verdict == "transfers"


def promotion_engine(tmp_path, data_dir, baseline_src):
    path = tmp_path / "ws"
    path.mkdir()
    (path / "train.py").write_text(baseline_src)
    ws = Workspace.init(path, force=True)
    settings = Settings(home=tmp_path / "home", workspace=ws.path, budget_s=20.0, noise_repeats=2, eval_tokens=2048,
                        grace_s=30, device="cpu", prune=False, promote_seeds=2, confirm_runs=0,
                        scales=[ScaleConfig(name="s0"), ScaleConfig(name="wide", budget_mult=1.0, scale={"width": 64})],
                        promote_scale="wide")
    db = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    create_tables(db)
    proposer = FixedProposer([lambda src: src.replace("LR = 0.001", "LR = 0.02")])
    eng = Engine(settings, db, ws, LocalRunner("cpu", standby=True), proposer, data_dir, max_experiments=1)
    eng.setup()
    tick_until(eng, lambda: eng.finished())
    return eng, db, ws


def test_a_promotion_runs_both_sides_at_the_scale_and_advances_promoted(tmp_path, data_dir):
    eng, db, ws = promotion_engine(tmp_path, data_dir, SLOW)
    kept = [e for e in rows(db) if e.kind == "experiment"][0]
    assert kept.status == "keep"
    control = Control(db, "main", eng)
    text = control.promote("olga", kept.id)
    assert text.startswith("promotion #1 requested by olga") and "at wide" in text
    tick_until(eng, lambda: rows(db, Promotion)[0].status not in ("queued", "running"), timeout=240)
    p = rows(db, Promotion)[0]
    runs = [e for e in rows(db) if e.kind == "promotion"]
    assert len(runs) == 4 and all(e.scale_overrides == {"width": 64} and e.budget_s == 20.0 for e in runs)
    assert sorted(e.edit_key for e in runs) == ["candidate", "candidate", "reference", "reference"]
    assert all(e.params > kept.params for e in runs)  # the scale really resized the model
    run = rows(db, Run)[0]
    assert p.status == "done" and p.verdict == "transfers", p.result
    assert p.result["delta_large"] < 0 and len(p.result["reference_runs"]) == 2
    assert run.promoted_commit == kept.commit
    assert ws._git("rev-parse", promoted_ref("main")).stdout.decode().strip() == kept.commit
    assert any(ev.kind == "promotion" and "transfers" in ev.text for ev in rows(db, Event))
    # with the same reference, promoting again compares against the promoted commit: nothing to compare
    with pytest.raises(ControlError, match="nothing to compare"):
        control.promote("olga", kept.id)


def test_a_train_py_that_ignores_ctx_scale_is_reported(tmp_path, data_dir):
    deaf = SLOW.replace('int(ctx.scale.get("width", DIM))', "DIM")
    eng, db, ws = promotion_engine(tmp_path, data_dir, deaf)
    kept = [e for e in rows(db) if e.kind == "experiment"][0]
    Control(db, "main", eng).promote("olga", None)  # head
    tick_until(eng, lambda: rows(db, Promotion)[0].status not in ("queued", "running"), timeout=240)
    p = rows(db, Promotion)[0]
    assert p.candidate_exp_id == kept.id and p.verdict == "scale_ignored"
    assert "ignores ctx.scale" in p.result["reason"]
    assert rows(db, Run)[0].promoted_commit == ""  # no false verdict, no promotion


def test_cancel_and_bad_requests(tmp_path, data_dir, tiny_workspace):
    from tests.test_engine import make_engine_for

    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace)
    control = Control(db, "main", eng)
    with pytest.raises(ControlError, match="nothing to compare"):
        control.promote("olga")  # head is the baseline
    base = rows(db, Run)[0]
    with pytest.raises(ControlError, match="no scale 'xl'"):
        control.promote("olga", None, "xl")
    with pytest.raises(ControlError, match="no experiment #99"):
        control.promote("olga", 99)
    with pytest.raises(ControlError, match="no promotion #7"):
        control.cancel_promotion("olga", 7)
    assert base.promoted_commit == ""


def test_promotion_event_renders_with_a_plot_in_the_shell(tmp_path):
    import io

    from rich.console import Console

    from bot.shell import ShellBackend
    from db.session import session_scope
    from loop import events

    db = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    create_tables(db)
    with session_scope(db) as s:
        run = Run(name="main", branch="ratchet/main", workspace="/w", baseline_commit="a", head_commit="b", budget_s=5)
        s.add(run)
        s.flush()
        result = judge([2.0, 2.01], [1.8, 1.82], delta_small=-0.05, sigma_small=0.01, params_small={},
                       params_large={}, overrides={}).as_dict()
        s.add(events.run_event(run, "promotion", "promotion #1 to s1: transfers", promotion_id=1, verdict="transfers",
                               result=result, scale="s1"))
    buf = io.StringIO()
    shell = ShellBackend(Control(db, "main"), Console(file=buf, width=200), read_commands=False,
                         digest_dir=tmp_path / "d")
    assert shell.deliver() == 1
    assert "promotion #1 to s1: transfers" in buf.getvalue() and (tmp_path / "d" / "promotion-1.png").exists()


def test_cancel_a_running_promotion(tmp_path, data_dir):
    # the baseline and the experiment stop at 60 steps as elsewhere; the promotion's runs (scaled) train on
    eng, db, ws = promotion_engine(tmp_path, data_dir, SLOW.replace("step >= 60", "(step >= 60 and not ctx.scale)"))
    control = Control(db, "main", eng)
    control.promote("olga", None)
    tick_until(eng, lambda: any(getattr(h, "kind", "") == "promotion" for h in eng.handles.values()))
    assert "promotion #1 to wide: running" in format_status(control.status())
    assert control.cancel_promotion("olga", 1) == "promotion #1 cancelled by olga"
    tick_until(eng, lambda: not eng.handles, timeout=60)
    runs = [e for e in rows(db) if e.kind == "promotion"]
    assert runs and all(e.status == "aborted" and "cancelled" in e.reason for e in runs)
    assert rows(db, Promotion)[0].status == "cancelled" and rows(db, Run)[0].promoted_commit == ""
    with pytest.raises(ControlError, match="already cancelled"):
        control.cancel_promotion("olga", 1)
