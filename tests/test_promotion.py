"""Promotion on CPU with tiny scales: both sides run with the scale's overrides, the verdict is stored,
`promoted` advances only on a transfer, and a train.py that ignores ctx.scale is caught."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.commands import format_status
from db.models import BudgetLedger, Event, Experiment, Promotion, Run
from db.session import create_tables, make_engine, session_scope
from loop.config import ScaleConfig, Settings
from loop.control import Control, ControlError
from loop.engine import Engine
from loop.promotion import promoted_ref
from loop.promotion import judge
from loop.runners.base import Handle, Outcome, Runner, Slot
from loop.runners.local import LocalRunner
from loop.workspace import Workspace
from tests.conftest import TINY_TRAIN_PY
from tests.test_engine import FixedProposer, rows, slow_baseline, tick_until
from trainer.result import Result

# A baseline any sane learning rate beats, capped at 60 steps so results depend on the seed, not on how
# busy the machine is (a time budget on a shared CPU would make the comparison noisy).
SLOW = slow_baseline(TINY_TRAIN_PY)
# The tiny model trained data parallel (ctx.data_parallel), each rank saying how many ranks there are
DP = TINY_TRAIN_PY.replace(
    "    opt = torch.optim.AdamW", "    step_model = ctx.data_parallel(model)\n    opt = torch.optim.AdamW").replace(
    "loss = F.cross_entropy(model(x)", "loss = F.cross_entropy(step_model(x)").replace(
    "if ctx.should_stop():", "if ctx.should_stop() or step >= 30:").replace(
    "    return model", "    print('RANK', ctx.rank, 'OF', ctx.world_size, flush=True)\n    return model")


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


# ---- multi-GPU scales: one job on N slots of one host ----


def test_placement_takes_n_free_slots_of_one_host_else_drains_else_fails():
    from loop.placement import Placement, place

    a = [Slot(f"a:gpu{i}", "a") for i in range(2)]
    b = [Slot(f"b:gpu{i}", "b") for i in range(4)]
    every = a + b
    # best fit: a has exactly 2 free, b has 3; a is taken, b keeps its larger gap
    assert [s.name for s in place(2, a + b[1:], every).slots] == ["a:gpu0", "a:gpu1"]
    assert [s.name for s in place(3, a + b[1:], every).slots] == ["b:gpu1", "b:gpu2", "b:gpu3"]
    # not enough free on one host: drain the host with N slots in all that has the most free now (ties: the first)
    assert place(4, [a[0], b[0], b[1]], every) == Placement(drain="b")
    assert place(2, [a[0], b[0], b[1]], every).slots == (b[0], b[1])
    assert place(2, [a[0], b[0]], every) == Placement(drain="a")
    # a host that is down is neither used nor drained; with no other host large enough the job just waits
    assert place(3, b[:3], every, down={"b"}) == place(3, [], every, down={"b"})
    assert place(3, [], every, down={"b"}).drain is None and not place(3, [], every, down={"b"}).error
    # no host has N slots: it can never run
    err = place(5, a + b, every).error
    assert "needs 5 GPUs" in err and "the largest host, b, has 4" in err
    # one slot needs no placement
    assert place(1, b, every).slots == (b[0],)


def test_slots_taken_together_list_their_devices():
    from loop.runners.base import Job, harness_args
    from trainer.harness import default_grace_s
    from trainer.sandbox import SandboxConfig

    g = [Slot(f"h:gpu{i}", "h", {"CUDA_VISIBLE_DEVICES": str(i)}) for i in range(3)]
    two = Slot.together([g[2], g[0]])
    assert two.name == "h:gpu2+h:gpu0" and two.names == ("h:gpu2", "h:gpu0") and two.gpus == 2
    assert two.env["CUDA_VISIBLE_DEVICES"] == "2,0" and g[0].names == ("h:gpu0",) and g[0].gpus == 1
    with pytest.raises(ValueError):
        Slot.together([g[0], Slot("k:gpu0", "k")])
    job = Job(exp_id=1, source="", workdir=None, data_dir="/d", budget_s=100.0, nproc=2)
    args = harness_args(job, SandboxConfig())
    assert args[args.index("--nproc") + 1] == "2" and "--nproc" not in harness_args(
        Job(exp_id=1, source="", workdir=None, data_dir="/d", budget_s=100.0), SandboxConfig())
    assert job.grace == default_grace_s(100.0) == 40.0  # the harness's own default, as README says


class _FakeHandle(Handle):
    """A run that ends when the test says so."""

    def __init__(self, job, slot):
        self.exp_id, self.job, self.slot = job.exp_id, job, slot
        self._out = None

    def finish(self, val_bpb=2.0, wall=10.0):
        self._out = Outcome(Result(status="ok", val_bpb=val_bpb, seed=self.job.seed, params=1000),
                            self.slot.name, self.slot.host, wall)

    def done(self):
        return self._out is not None

    def outcome(self):
        return self._out

    def kill(self, reason):  # as the runners report a run killed on purpose
        self._out = Outcome(Result(status="crash", error=f"aborted: {reason}", seed=self.job.seed), self.slot.name,
                            self.slot.host, 1.0, aborted=reason)


class _FakeRunner(Runner):
    """Slots that train nothing: each start is a _FakeHandle, kept in `started`."""

    name = "fake"

    def __init__(self, slots):
        self._slots, self.started = list(slots), []

    def slots(self):
        return list(self._slots)

    def start(self, job, slot, on_done):
        self.started.append(_FakeHandle(job, slot))
        return self.started[-1]


def _ready_for_promotion(tmp_path, runner, scales, proposals=(), **kw):
    """An engine past its loop's first phase (noise floor measured, head a change of the baseline), no training."""
    path = tmp_path / "ws"
    path.mkdir()
    (path / "train.py").write_text(DP)
    ws = Workspace.init(path, force=True)
    settings = Settings(home=tmp_path / "home", workspace=ws.path, budget_s=1.0, noise_repeats=2, eval_tokens=2048,
                        grace_s=30, device="cpu", prune=False, promote_seeds=1, confirm_runs=0,
                        scales=[ScaleConfig(name="s0"), *scales], promote_scale=scales[0].name)
    db = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    create_tables(db)

    class Fast(FixedProposer):
        fast = True

    eng = Engine(settings, db, ws, runner, Fast(list(proposals)), Path(kw.pop("data_dir", tmp_path)), **kw)
    run = eng.setup()
    cand = ws.commit_experiment(0, run.baseline_commit, DP.replace("LR = 0.02", "LR = 0.03"), "candidate")
    with session_scope(db) as s:
        r = s.get(Run, run.id)
        r.head_commit, r.noise_sigma, r.head_val_bpb = cand, 0.01, 2.0
        s.add(r)
        for v in (1.99, 2.01):  # head measured on the fake hosts' class (unnamed), as control runs leave it
            s.add(Experiment(run_id=run.id, kind="confirm", status="keep", commit=cand, parent_commit=cand,
                             val_bpb=v, device_name="", params=1000))
    return eng, db


def test_a_multi_gpu_run_drains_its_host_and_books_n_times_its_wall_time(tmp_path):
    slots = [Slot("a:gpu0", "a"), Slot("b:gpu0", "b"), Slot("b:gpu1", "b")]
    runner = _FakeRunner(slots)
    more = [lambda src, lr=lr: src.replace("LR = 0.03", f"LR = {lr}") for lr in (0.011, 0.012, 0.013, 0.014, 0.015)]
    eng, db = _ready_for_promotion(tmp_path, runner, [ScaleConfig(name="dp2", gpus=2)], more)
    eng.tick()
    assert sorted(h.slot.name for h in runner.started) == ["a:gpu0", "b:gpu0", "b:gpu1"]  # every slot trains
    control = Control(db, "main", eng)
    control.promote("olga")
    by_slot = {h.slot.name: h for h in runner.started}
    by_slot["b:gpu0"].finish()
    eng.tick()
    assert len(runner.started) == 3  # b is drained: its free slot waits for the other one
    by_slot["a:gpu0"].finish()
    eng.tick()
    assert [h.slot.name for h in runner.started[3:]] == ["a:gpu0"]  # a's slot is not held: a proposal trains there
    assert runner.started[3].job.nproc == 1
    hosts = {r["slot"]: r for r in control.hosts()}
    assert hosts["b:gpu0"]["busy"] is False and hosts["b:gpu1"]["busy"] is True
    by_slot["b:gpu1"].finish()
    eng.tick()
    multi = runner.started[4]
    assert multi.slot.name == "b:gpu0+b:gpu1" and multi.job.nproc == 2 and multi.slot.gpus == 2
    hosts = {r["slot"]: r for r in control.hosts()}
    assert hosts["b:gpu0"]["busy"] and hosts["b:gpu1"]["busy"]
    assert hosts["b:gpu0"]["exp_id"] == hosts["b:gpu1"]["exp_id"] == multi.exp_id
    runner.started[3].finish()
    eng.tick()
    assert all(h.slot.host == "a" for h in runner.started[5:])  # nothing else on b while it trains
    multi.finish(val_bpb=2.1, wall=10.0)
    eng.tick()
    second = next(h for h in runner.started if h.job.nproc == 2 and h is not multi)
    assert second.slot.name == "b:gpu0+b:gpu1"
    second.finish(val_bpb=2.0, wall=10.0)
    eng.tick()
    p = rows(db, Promotion)[0]
    assert p.status == "done" and p.verdict, p.result
    gpu_s = {e.experiment_id: e.amount for e in rows(db, BudgetLedger) if e.kind == "gpu_seconds"}
    assert gpu_s[multi.exp_id] == gpu_s[second.exp_id] == 20.0  # 2 GPUs × 10 s
    promo = [e for e in rows(db, Experiment) if e.kind == "promotion"]
    assert {e.slot for e in promo} == {"b:gpu0+b:gpu1"} and {e.host for e in promo} == {"b"}


def test_a_train_py_that_ignores_ctx_scale_is_reported(tmp_path):
    """A scale that resizes the model, whose runs report the parameter count head had at the small scale (what the
    harness reports for a train.py that ignores ctx.scale): no verdict, nothing promoted."""
    runner = _FakeRunner([Slot("a:gpu0", "a"), Slot("a:gpu1", "a")])
    eng, db = _ready_for_promotion(tmp_path, runner, [ScaleConfig(name="wide", scale={"width": 64})],
                                   max_experiments=0)
    Control(db, "main", eng).promote("olga")  # head
    for _ in range(10):
        eng.tick()
        for h in runner.started:
            if not h.done():
                h.finish(val_bpb=1.9 if h.job.exp_id % 2 else 2.0)
        if rows(db, Promotion)[0].status not in ("queued", "running"):
            break
    p = rows(db, Promotion)[0]
    assert len(runner.started) == 2 and all(h.job.scale == {"width": 64} for h in runner.started)
    assert p.status == "done" and p.verdict == "scale_ignored", p.result
    assert "ignores ctx.scale" in p.result["reason"] and "1,000" in p.result["reason"]
    assert rows(db, Run)[0].promoted_commit == ""  # no false verdict, no promotion
    assert any(ev.kind == "promotion" and "ignores ctx.scale" in ev.text for ev in rows(db, Event))


def test_cancel_a_running_promotion(tmp_path):
    runner = _FakeRunner([Slot("a:gpu0", "a"), Slot("a:gpu1", "a")])
    eng, db = _ready_for_promotion(tmp_path, runner, [ScaleConfig(name="wide", scale={"width": 64})],
                                   max_experiments=0)
    control = Control(db, "main", eng)
    control.promote("olga", None)
    eng.tick()
    assert len(runner.started) == 2 and all(h.job.scale == {"width": 64} for h in runner.started)
    assert "promotion #1 to wide: running" in format_status(control.status())
    assert control.cancel_promotion("olga", 1) == "promotion #1 cancelled by olga"
    eng.tick()  # kills the runs
    eng.tick()  # records what they report
    assert not eng.handles and all(h.done() for h in runner.started)
    runs = [e for e in rows(db) if e.kind == "promotion"]
    assert len(runs) == 2 and all(e.status == "aborted" and "cancelled" in e.reason for e in runs)
    assert rows(db, Promotion)[0].status == "cancelled" and rows(db, Run)[0].promoted_commit == ""
    with pytest.raises(ControlError, match="already cancelled"):
        control.cancel_promotion("olga", 1)
    eng.tick()
    assert len(runner.started) == 2  # nothing of it is started again


def test_a_scale_needing_more_gpus_than_any_host_has_fails_clearly(tmp_path):
    runner = _FakeRunner([Slot("a:gpu0", "a"), Slot("a:gpu1", "a"), Slot("b:gpu0", "b")])
    eng, db = _ready_for_promotion(tmp_path, runner, [ScaleConfig(name="dp3", gpus=3)], max_experiments=0)
    Control(db, "main", eng).promote("olga")
    eng.tick()
    p = rows(db, Promotion)[0]
    assert not runner.started and p.status == "failed"
    assert p.result["reason"] == "scale dp3 needs 3 GPUs (slots) on one host; the largest host, a, has 2"
    assert all(e.status == "crash" and e.reason == p.result["reason"] for e in rows(db) if e.kind == "promotion")
    ev = [e for e in rows(db, Event) if e.kind == "promotion"]
    assert len(ev) == 1 and ev[0].text == f"promotion #1 failed: {p.result['reason']}"
    eng.tick()  # and it stays failed: nothing waits for slots that will never be free
    assert not runner.started and len([e for e in rows(db, Event) if e.kind == "promotion"]) == 1


def test_a_promotion_to_a_two_gpu_scale_trains_each_side_on_two_slots_end_to_end(tmp_path, data_dir):
    """Through the real engine and local runner: 2 CPU slots, a scale with gpus = 2; each side of the promotion
    is one harness run with two ranks (gloo) holding both slots, scored once; the verdict is stored."""
    runner = LocalRunner("cpu", cpu_slots=2, standby=True)
    eng, db = _ready_for_promotion(tmp_path, runner, [ScaleConfig(name="dp2", gpus=2)], data_dir=data_dir,
                                   max_experiments=0)
    Control(db, "main", eng).promote("olga")
    tick_until(eng, lambda: rows(db, Promotion)[0].status not in ("queued", "running"), timeout=120)
    p = rows(db, Promotion)[0]
    runs = [e for e in rows(db) if e.kind == "promotion"]
    assert sorted(e.edit_key for e in runs) == ["candidate", "reference"]
    assert all(e.status == "keep" and e.val_bpb for e in runs), [(e.status, e.reason, e.log_tail) for e in runs]
    assert p.status == "done" and p.verdict in ("transfers", "does_not_transfer", "inconclusive"), p.result
    for e in runs:  # one job holding both slots (tests/test_harness.py checks what two ranks do inside one)
        assert e.slot == "local:cpu0+local:cpu1" and e.host == "local"
    gpu_s = {r.experiment_id: r.amount for r in rows(db, BudgetLedger) if r.kind == "gpu_seconds"}
    assert all(gpu_s[e.id] == pytest.approx(2 * e.wall_seconds) for e in runs)
