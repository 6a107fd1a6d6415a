"""The engine end to end with the real local runner, real git and real text (tiny model, 1 s budgets); questions
of engine policy alone (a rebase, a bounded run's end) on the simulated fleet of tests/simfleet.py."""

from __future__ import annotations

import time

import pytest
from sqlmodel import Session, select

from db.models import BudgetLedger, Event, Experiment, Run
from db.session import create_tables, make_engine
from loop.config import Settings
from loop.control import Control
from loop.engine import Engine
from loop.proposers.base import Proposal, ProposalExhausted, Proposer
from loop.proposers.offline import OfflineProposer
from loop.runners.local import LocalRunner


def make_engine_for(tmp_path, data_dir, ws, proposer=None, **kw):
    # confirm_runs=0: these tests are about other things, and a keep on one run keeps them short;
    # test_a_passing_change_is_confirmed_before_it_becomes_head covers new-seed confirmation with real training,
    # tests/test_hardware.py paired confirmation
    settings = Settings(home=tmp_path / "home", workspace=ws.path, budget_s=kw.pop("budget_s", 1.0),
                        noise_repeats=kw.pop("noise_repeats", 2), eval_tokens=2048, grace_s=30, device="cpu",
                        confirm_runs=kw.pop("confirm_runs", 0), confirm=kw.pop("confirm", "seeds"),
                        prune=kw.pop("prune", True))
    db = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    create_tables(db)
    # no standby: on the CPU it starts only once a run's training is over, so here it would save nothing
    runner = LocalRunner("cpu", standby=kw.pop("standby", False))
    eng = Engine(settings, db, ws, runner, proposer or OfflineProposer(seed=1), data_dir, **kw)
    eng.setup()
    return eng, db


def slow_baseline(src: str) -> str:
    """TINY_TRAIN_PY with a deliberately slow LR (0.001) and at most 60 steps: tests that need a gain to show up
    compare runs of the same length, however loaded the machine is (fewer steps only if the budget ends first)."""
    assert "        if ctx.should_stop():" in src
    return src.replace("LR = 0.02", "LR = 0.001").replace("        if ctx.should_stop():",
                                                          "        if ctx.should_stop() or step >= 60:")


def tick_until(eng, cond, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        eng.tick()
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the engine")


def wait_until(cond, timeout=120):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def rows(db, model=Experiment):
    with Session(db) as s:
        return s.exec(select(model).order_by(model.id)).all()


class FixedProposer(Proposer):
    """Hands out prepared train.py texts in order (to exercise invalid and crashing proposals)."""

    name = "fixed"

    def __init__(self, sources):
        self.sources = list(sources)

    def propose(self, head_source, parent, history, state=None):
        if not self.sources:
            raise ProposalExhausted("no more prepared proposals")
        src = self.sources.pop(0)(head_source)
        return Proposal(source=src, description=f"fixed #{len(history) + 1}", hypothesis="test", proposer="fixed",
                        edit_key=str(len(history)))


def test_baseline_then_experiments_with_the_ratchet_rule(tmp_path, data_dir, tiny_workspace):
    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace, max_experiments=3)
    tick_until(eng, lambda: eng.finished())
    exps = rows(db)
    base = [e for e in exps if e.kind == "baseline"]
    search = [e for e in exps if e.kind == "experiment"]
    assert [e.status for e in base] == ["keep", "keep"] and len({e.seed for e in base}) == 2
    assert len(search) == 3 and all(e.status in ("keep", "discard", "crash", "timeout", "invalid", "pruned")
                                    for e in search), [(e.status, e.reason) for e in search]
    run = rows(db, Run)[0]
    assert run.noise_sigma is not None and run.noise_sigma >= 0
    for e in search:
        assert e.diff.startswith("--- a/train.py") and e.description and e.hypothesis
        if e.status in ("keep", "discard"):
            d = e.decision
            assert d["verdict"] == e.status and d["val_bpb"] == e.val_bpb and d["sigma"] == run.noise_sigma
            assert (e.val_bpb < d["head_val_bpb"] - d["threshold"]) == (e.status == "keep")
    kept = [e for e in search if e.status == "keep"]
    assert run.head_commit == (kept[-1].commit if kept else run.baseline_commit)
    assert tiny_workspace.branch_tip("main") == run.head_commit  # branch and database agree
    kinds = [ev.kind for ev in rows(db, Event)]
    assert kinds.count("baseline_run") == 2 and "baseline" in kinds
    assert sum(kinds.count(k) for k in ("kept", "discarded", "crashed", "invalid", "pruned")) == 3
    assert len([r for r in rows(db, BudgetLedger) if r.kind == "gpu_seconds"]) == 5


def test_invalid_and_crashing_proposals(tmp_path, data_dir, tiny_workspace):
    proposer = FixedProposer([
        lambda src: "import os\n" + src,  # file access: invalid, never runs
        lambda src: src.replace("    step = 0\n", "    step = 0\n    raise RuntimeError('exploded')\n"),
        lambda src: src.replace("LR = 0.02", "LR = 0.03"),
    ])
    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace, proposer=proposer, max_experiments=3)
    tick_until(eng, lambda: eng.finished())
    search = [e for e in rows(db) if e.kind == "experiment"]
    assert [e.status for e in search[:2]] == ["invalid", "crash"]
    assert "`os` import" in search[0].reason and search[0].commit == "" and search[0].started_at is None
    assert "RuntimeError: exploded (train.py:" in search[1].reason and "exploded" in search[1].log_tail
    assert search[2].status in ("keep", "discard")
    texts = [ev.text for ev in rows(db, Event)]
    assert any(t.startswith("invalid #") for t in texts) and any(t.startswith("crash #") for t in texts)


def test_pause_graceful_and_now(tmp_path, data_dir, tiny_workspace):
    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace, budget_s=3.0)
    control = Control(db, "main", eng)
    tick_until(eng, lambda: bool(eng.handles))
    first = next(iter(eng.handles))
    control.pause("alice", reason="checking something")
    tick_until(eng, lambda: not eng.handles)
    time.sleep(0.5)
    eng.tick()
    exps = rows(db)
    assert len(exps) == 1 and exps[0].id == first and exps[0].status == "keep"  # finished; nothing new started
    assert control.status().state == "paused"

    control.resume("bob")
    tick_until(eng, lambda: bool(eng.handles))
    second = next(iter(eng.handles))
    control.pause("carol", now=True, reason="on-call stop")
    tick_until(eng, lambda: not eng.handles, timeout=30)
    exp = [e for e in rows(db) if e.id == second][0]
    assert exp.status == "aborted" and "on-call stop" in exp.reason
    assert [ev.kind for ev in rows(db, Event) if ev.kind in ("paused", "resumed")] == ["paused", "resumed", "paused"]


def test_restart_requeues_running_and_moves_the_branch(tmp_path, data_dir, tiny_workspace):
    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace, budget_s=20.0)
    tick_until(eng, lambda: bool(eng.handles))
    exp_id = next(iter(eng.handles))
    pid = eng.handles[exp_id].pid
    # simulate a crash of the service: the engine object is dropped, its harness process keeps running
    base = tiny_workspace.head_commit("HEAD")
    tiny_workspace.set_branch("main", tiny_workspace.commit_experiment(999, base, "# stray\n", "stray"))
    eng2, _ = make_engine_for(tmp_path, data_dir, tiny_workspace)
    exp = [e for e in rows(db) if e.id == exp_id][0]
    assert exp.status == "queued" and exp.attempts == 1
    assert tiny_workspace.branch_tip("main") == rows(db, Run)[0].head_commit
    import os

    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the orphaned run was killed, not left to compete for the CPU
    tick_until(eng2, lambda: exp_id in eng2.handles)  # and it is re-run
    eng2.stop()


def test_next_proposal_is_prepared_while_the_slot_trains(tmp_path, data_dir, tiny_workspace):
    class Recording(OfflineProposer):
        """The offline proposer made slow (as Claude is), noting whether an experiment was training when asked."""

        fast = False

        def __init__(self, db_url):
            super().__init__(seed=3)
            self.db, self.busy = make_engine(db_url), []

        def propose(self, head_source, parent, history, state=None):
            self.busy.append(any(e.status == "running" for e in rows(self.db)))
            assert state is not None and state.noise_sigma is not None and state.program
            return super().propose(head_source, parent, history, state)

    from loop import swarm

    proposer = Recording(f"sqlite:///{tmp_path / 'r.db'}")
    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace, proposer=proposer, max_experiments=3)
    # answers taken to need longer than a run (as Claude's do on short runs): asked as soon as a slot trains
    eng.proposals.latency = swarm.Latency(default_s=1000.0, window=0)
    tick_until(eng, lambda: eng.finished())
    # all but the first were made during training, but for the one asked when a queued proposal no longer
    # applied to a head that moved under it (stored invalid, its slot then free)
    refused = sum(1 for e in rows(db) if e.status == "invalid" and "new head" in e.reason)
    assert len(proposer.busy) >= 3 and sum(proposer.busy) >= len(proposer.busy) - 1 - refused


def test_merge_text_moves_a_change_onto_a_new_head(tiny_workspace):
    from tests.conftest import TINY_TRAIN_PY

    new_head = TINY_TRAIN_PY.replace("WEIGHT_DECAY = 0.0", "WEIGHT_DECAY = 0.1")
    change = TINY_TRAIN_PY.replace("LR = 0.02", "LR = 0.04")
    merged = tiny_workspace.merge_text(TINY_TRAIN_PY, new_head, change)
    assert "WEIGHT_DECAY = 0.1" in merged and "LR = 0.04" in merged
    clash = TINY_TRAIN_PY.replace("WEIGHT_DECAY = 0.0", "WEIGHT_DECAY = 0.2")
    assert tiny_workspace.merge_text(TINY_TRAIN_PY, new_head, clash) is None


def test_pruning_stops_a_deliberately_bad_run_early(tmp_path, data_dir, tiny_workspace):
    proposer = FixedProposer([lambda src: src.replace("LR = 0.02", "LR = 0.0")])  # never learns
    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace, proposer=proposer, budget_s=6.0, max_experiments=1)
    tick_until(eng, lambda: eng.finished())
    exp = [e for e in rows(db) if e.kind == "experiment"][0]
    assert exp.status == "pruned" and exp.reason.startswith("pruned at")
    info = exp.decision["pruned"]
    assert info["loss"] > info["head_loss"] * 1.05 and info["elapsed_s"] >= 0.3 * 6.0
    assert info["saved_s"] > 0 and exp.training_seconds < 6.0
    assert any(ev.kind == "pruned" for ev in rows(db, Event))
    from bot.commands import format_experiment

    assert f"pruned: {exp.reason}" in format_experiment(exp)  # `show` of a pruned run (no rule verdict)
    base = [e for e in rows(db) if e.kind == "baseline"]
    assert all(len(e.curve) > 3 for e in base)  # head's curve, kept for comparison


def test_two_slots_finishing_on_the_same_parent_one_kept_one_rebased(tmp_path, whole_rounds):
    """Both changes beat head; the second to be recorded is rebased onto the new head and must confirm there, so
    the branch only ever moves forward from the head it was compared with. A simulated fleet (tests/simfleet.py:
    real engine, git and SQLite; runs finish at once), so both results are in before the next tick, which records
    them as one batch (one transaction) in which the first keep makes the second's parent stale."""
    from tests.simfleet import SimFleet, SimHost, SimProposer, build, is_gain, run_until_finished

    gains = [k for k in range(1, 400) if is_gain(k, 0.1)][:2]
    fleet = SimFleet([SimHost("h", "NVIDIA H100 80GB HBM3 x1", slots=2)], sigma=0.0005)
    eng, db = build(tmp_path, fleet, SimProposer(order=gains), max_experiments=3, noise_repeats=2,
                    confirm_runs=0)
    ws = eng.workspace
    tick_until(eng, lambda: [getattr(h, "kind", "") for h in eng.handles.values()].count("experiment") == 2)
    eng.tick()
    assert sorted(e.status for e in rows(db) if e.kind == "experiment")[:2] == ["discard", "keep"]
    run_until_finished(eng)
    search = [e for e in rows(db) if e.kind == "experiment"]
    first, second, confirm = search
    assert first.parent_commit == second.parent_commit  # both trained against the same head
    kept, stale = (first, second) if first.status == "keep" else (second, first)
    assert kept.status == "keep" and stale.status == "discard" and stale.decision["stale_parent"]
    assert f"rebased as #{confirm.id}" in stale.reason
    # the rebased change carries both edits: its own, merged onto the kept one
    src = ws.read_file(confirm.commit)
    assert confirm.parent_commit == kept.commit and all(f"\nSIM_EDIT_{k} = 1\n" in src for k in gains)
    assert confirm.status == "keep"  # two real gains beat one
    run = rows(db, Run)[0]
    assert ws.branch_tip("main") == run.head_commit == confirm.commit


def test_hosts_command_shows_slots_and_what_they_train(tmp_path, data_dir, tiny_workspace):
    from bot.commands import handle

    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace, budget_s=5.0)
    control = Control(db, "main", eng)
    tick_until(eng, lambda: bool(eng.handles))
    reply = handle("hosts", control, user="u", backend="shell")
    assert reply.ok and reply.text.startswith("local [up] local:cpu: busy #1 baseline repeat 1/2")
    eng.stop()
    from db.models import Host

    assert [(h.name, h.state, h.slots) for h in rows(db, Host)] == [("local", "up", 1)]


def test_a_run_with_too_few_steps_is_never_pruned(tmp_path, data_dir, tiny_workspace):
    """On a slow or busy machine the first steps say nothing: no pruning before PRUNE_MIN_STEPS."""
    from loop.pruning import PRUNE_MIN_STEPS

    slow_bad = lambda src: src.replace("LR = 0.02", "LR = 0.0").replace(  # noqa: E731
        "        ctx.log(step, loss)\n", "        ctx.log(step, loss)\n        time.sleep(0.5)\n").replace(
        "import torch\n", "import time\nimport torch\n", 1)
    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace, proposer=FixedProposer([slow_bad]), budget_s=3.0,
                              max_experiments=1)
    tick_until(eng, lambda: eng.finished())
    exp = [e for e in rows(db) if e.kind == "experiment"][0]
    assert exp.steps < PRUNE_MIN_STEPS and exp.status in ("discard", "keep")  # judged on its result, not pruned


def test_a_passing_change_is_confirmed_before_it_becomes_head(tmp_path, data_dir):
    """One slot, a deliberately slow baseline (LR 0.001). Seeds are settings.seed (0) + experiment id, and ids
    run baseline 1–2, then each experiment followed by its confirm run: 3/4, 5/6, 7/8. A clear gain is kept on
    the mean of its two runs; a change whose even-seed run crashes, and one whose even-seed model is spoiled,
    pass on their odd first run and are discarded by their confirmation."""
    from loop.rule import pooled_sigma
    from loop.workspace import Workspace
    from tests.conftest import TINY_TRAIN_PY

    path = tmp_path / "ws"
    path.mkdir()
    (path / "train.py").write_text(slow_baseline(TINY_TRAIN_PY))
    ws = Workspace.init(path, force=True)
    end = "    return model\n"
    proposer = FixedProposer([
        lambda src: src.replace("LR = 0.001", "LR = 0.004"),  # a clear gain, leaving room for more below
        lambda src: src.replace("lr=LR,", "lr=LR * 5,").replace(
            end, "    if ctx.seed % 2 == 0:\n        raise RuntimeError('diverged on this seed')\n" + end),
        lambda src: src.replace("lr=LR,", "lr=LR * 6,").replace(
            end, "    if ctx.seed % 2 == 0:\n        model.head.weight.data.mul_(-50.0)\n" + end),
    ])
    # asked inline when the slot is free (as the offline proposer is): a slow proposer's answers are stored as
    # they arrive, which could give an experiment the id before its predecessor's confirm run (ids are seeds here)
    proposer.fast = True
    eng, db = make_engine_for(tmp_path, data_dir, ws, proposer=proposer, max_experiments=3, budget_s=2.0,
                              confirm_runs=1, prune=False, standby=False)
    assert eng.settings.seed == 0
    seen_confirming = []

    def done():
        seen_confirming.extend(e.id for e in rows(db) if e.status == "confirming")
        return eng.idle()

    tick_until(eng, done, timeout=300)
    exps = {e.id: e for e in rows(db)}
    assert [(e.kind, e.confirms_id) for e in exps.values()] == [
        ("baseline", None), ("baseline", None), ("experiment", None), ("confirm", 3), ("experiment", None),
        ("confirm", 5), ("experiment", None), ("confirm", 7)], [(e.id, e.kind, e.status, e.val_bpb, e.reason[:60])
                                                                for e in exps.values()]
    assert set(seen_confirming) == {3, 5, 7}  # each waited as `confirming` while its re-run trained
    assert [exps[i].seed for i in (3, 4)] == [3, 4] and exps[4].commit == exps[3].commit

    kept, crashed, spoiled = exps[3], exps[5], exps[7]
    base = [exps[1].val_bpb, exps[2].val_bpb]
    runs = [kept.val_bpb, exps[4].val_bpb]
    d = kept.decision
    assert kept.status == "keep" and d["runs"] == runs and d["val_bpb"] == pytest.approx(sum(runs) / 2)
    assert d["first_run"]["verdict"] == "keep" and d["first_run"]["val_bpb"] == kept.val_bpb
    # σ from unselected runs only (the first run passed among tries): the baseline pair, the confirm run alone
    assert d["sigma"] == pytest.approx(pooled_sigma([base])) and d["hardware"] == kept.device_name != ""
    assert exps[4].status == "keep"

    assert crashed.status == "discard" and crashed.decision["first_run"]["verdict"] == "keep"
    assert exps[6].status == "crash" and crashed.reason.startswith("its confirmation run #6 crash:")
    assert "diverged on this seed" in crashed.reason

    assert spoiled.status == "discard" and spoiled.reason.startswith("did not hold up: 2 runs average")
    assert spoiled.decision["first_run"]["verdict"] == "keep" and spoiled.decision["verdict"] == "discard"
    assert exps[8].status == "discard" and exps[8].val_bpb > spoiled.val_bpb + 1

    run = rows(db, Run)[0]
    assert (run.head_commit, run.head_runs) == (kept.commit, runs)
    assert run.head_val_bpb == pytest.approx(sum(runs) / 2) and ws.branch_tip("main") == kept.commit
    assert run.noise_sigma == pytest.approx(pooled_sigma([base]))
    events = [(ev.kind, ev.experiment_id, ev.text) for ev in rows(db, Event) if ev.experiment_id in (3, 5, 7)]
    assert [(k, i) for k, i, _ in events] == [("confirming", 3), ("kept", 3), ("confirming", 5),
                                              ("discarded", 5), ("confirming", 7), ("discarded", 7)]
    assert f"confirming with 1 new seed on {kept.device_name} (#4)" in events[0][2]
    assert "(mean of 2 runs)" in events[1][2]
    assert len([r for r in rows(db, BudgetLedger) if r.kind == "gpu_seconds"]) == 8  # confirm runs are paid for
    from bot.commands import format_experiment

    shown = format_experiment(kept)
    assert f"runs: {runs[0]:.4f}, {runs[1]:.4f} (the rule judged their mean); first run alone: keep" in shown


def test_a_result_whose_row_was_deleted_does_not_hold_up_the_others(tmp_path, data_dir, tiny_workspace):
    """Two baseline repeats finish in the same tick (one batch); one's row was deleted by hand while it
    trained. The other is recorded, both slots are freed, and the engine goes on (it queues a new repeat)."""
    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace)
    eng.runner = LocalRunner("cpu", cpu_slots=2)
    tick_until(eng, lambda: len(eng.handles) == 2)
    wait_until(lambda: all(h.done() for h in eng.handles.values()))
    gone, kept = sorted(eng.handles)
    with Session(db) as s:
        s.delete(s.get(Experiment, gone))
        s.commit()
    eng.tick()
    assert gone not in eng.handles and kept not in eng.handles
    by_id = {e.id: e for e in rows(db)}
    assert gone not in by_id and by_id[kept].status == "keep" and by_id[kept].val_bpb is not None
    tick_until(eng, lambda: rows(db, Run)[0].noise_sigma is not None)  # a third repeat replaced the lost one
    assert len([e for e in rows(db) if e.kind == "baseline" and e.status == "keep"]) == 2


def test_a_bounded_run_is_not_finished_while_its_last_experiment_starts(tmp_path):
    """`ratchet serve --max-experiments N` stops when finished() says so, asked from another thread. A round
    counts its picks towards the limit before they are in `handles`; a look between the two (the runner
    still starting the last experiment) must wait for the round, or the run ends with it left `running`.
    A simulated fleet (tests/simfleet.py): the question is the engine's, not the trainer's."""
    import threading

    from tests.simfleet import SimFleet, SimHost, build

    eng, db = build(tmp_path, SimFleet([SimHost("h", "NVIDIA H100 80GB HBM3 x1")]), max_experiments=1,
                    noise_repeats=2, confirm_runs=0)
    gate, entered, answer = threading.Event(), threading.Event(), []
    start = eng.runner.start

    def slow_start(job, slot, on_done):  # the fleet's start; for the experiment, once the test lets it
        if next(e.kind for e in rows(db) if e.id == job.exp_id) == "experiment":
            entered.set()
            gate.wait(60)
        return start(job, slot, on_done)

    eng.runner.start = slow_start
    ticking = threading.Thread(target=lambda: tick_until(eng, entered.is_set))  # baseline repeats, then the round
    ticking.start()
    assert entered.wait(180)
    assert [e.status for e in rows(db) if e.kind == "experiment"] == ["running"]  # marked, not yet handed over
    asking = threading.Thread(target=lambda: answer.append(eng.finished()))
    asking.start()
    asking.join(0.5)
    assert not answer  # it waits for the round instead of answering True
    gate.set()
    ticking.join(60)
    asking.join(60)
    assert answer == [False] and len(eng.handles) == 1
    tick_until(eng, lambda: eng.finished())
    assert [e.status for e in rows(db) if e.kind == "experiment"][0] in ("keep", "discard")


@pytest.mark.parametrize("db_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_seen_hashes_answers_from_the_run_s_experiments(db_url):
    """The duplicate check asks the indexed column: every hash stored for the run is found (also one stored
    after the question was first asked), another run's is not."""
    import hashlib

    from db.session import session_scope
    from loop.proposals import SeenHashes

    db = make_engine(db_url)
    create_tables(db)
    with session_scope(db) as s:
        run = Run(name="r", branch="ratchet/r", workspace="/ws", baseline_commit="a" * 40, head_commit="a" * 40,
                  budget_s=1.0)
        other = Run(name="o", branch="ratchet/o", workspace="/ws", baseline_commit="a" * 40, head_commit="a" * 40,
                    budget_s=1.0)
        s.add(run)
        s.add(other)
        s.flush()
        run_id, other_id = run.id, other.id

    def h(i):
        return hashlib.sha256(str(i).encode()).hexdigest()

    def store(rid, *hashes):
        with session_scope(db) as s:
            for x in hashes:
                s.add(Experiment(run_id=rid, kind="experiment", status="discard", ast_hash=x))

    store(run_id, *(h(i) for i in range(50)))
    store(other_id, h(1000))
    seen = SeenHashes(db, run_id)
    assert all(h(i) in seen for i in range(50))
    assert h(1000) not in seen and "" not in seen  # another run's hash is not this run's
    assert not any(h(i) in seen for i in range(2000, 2030))
    store(run_id, h(4000))
    assert h(4000) in seen


def test_a_long_plateau_shows_the_recent_history_and_every_edit_tried_on_head(tmp_path, data_dir, tiny_workspace):
    """Thousands of experiments on one head: what the proposer is shown stays bounded (every keep and the
    HISTORY_RECENT most recent), and research_state still names every edit key tried on head."""
    from db.session import session_scope
    from loop.proposals import HISTORY_RECENT

    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace)
    run = eng.get_run()
    n = HISTORY_RECENT + 150
    with session_scope(db) as s:
        s.add(Experiment(run_id=run.id, kind="experiment", status="keep", parent_commit="0" * 40,
                         commit=run.head_commit, edit_key="OLD 1 → 2", val_bpb=1.0))
        for i in range(n):
            s.add(Experiment(run_id=run.id, kind="experiment", status="discard", parent_commit=run.head_commit,
                             commit=f"{i:040x}", edit_key=f"K{i}", val_bpb=1.1))
    history = eng.proposals.history(run)
    assert len(history) == HISTORY_RECENT + 1  # the keep, then the most recent ones
    assert history[0].edit_key == "OLD 1 → 2" and [t.edit_key for t in history[1:]] == [
        f"K{i}" for i in range(n - HISTORY_RECENT, n)]
    assert eng.proposals.research_state(run).tried_on_head == {f"K{i}" for i in range(n)}


def test_only_a_slow_proposer_is_shown_what_is_queued_or_training(tmp_path, data_dir, tiny_workspace):
    """The swarm's part of the prompt (in_progress, the last kept diffs) is read for a slow proposer; a fast one,
    asked inline every round, sees what is queued or training on head through tried_on_head instead, which
    only it reads."""
    from db.session import session_scope

    eng, db = make_engine_for(tmp_path, data_dir, tiny_workspace)
    run = eng.get_run()
    with session_scope(db) as s:
        s.add(Experiment(run_id=run.id, kind="experiment", status="keep", parent_commit="0" * 40, commit="1" * 40,
                         edit_key="OLD 1 → 2", description="old keep", diff="-A = 1\n+A = 2\n", val_bpb=1.0))
        for i, status in enumerate(("running", "queued", "confirming", "discard")):
            s.add(Experiment(run_id=run.id, kind="experiment", status=status, parent_commit=run.head_commit,
                             commit=f"{i:040x}", edit_key=f"K{i}", description=f"idea {i}", val_bpb=1.1))
    fast = eng.proposals.research_state(run)
    assert fast.in_progress == () and fast.kept_diffs == ()
    assert fast.tried_on_head == {"K0", "K1", "K2", "K3"}
    eng.proposals.proposer.fast = False
    slow = eng.proposals.research_state(run)
    assert [line.split(" ", 1)[1] for line in slow.in_progress] == ["idea 0", "idea 1", "idea 2"]
    assert len(slow.kept_diffs) == 1 and slow.kept_diffs[0][0].endswith(" old keep")
    assert slow.tried_on_head == frozenset()  # grows while head stands still; its history and prompt tell it


@pytest.mark.parametrize("epochs", [66.0, 3.5])
def test_a_corpus_the_baseline_sees_many_times_over_is_told_once(tmp_path, epochs):
    # On an H200 the CUDA preset read Shakespeare's training split 66 times in 60 s: val_bpb then gets worse
    # with training, and the rule would reward changes that train less. Told once per run, not per baseline run.
    from tests.simfleet import SimFleet, SimHost, build, run_until_finished

    eng, db = build(tmp_path, SimFleet([SimHost("h", "NVIDIA H200 x1")], epochs=epochs), max_experiments=2)
    run_until_finished(eng)
    with Session(db) as s:
        told = s.exec(select(Event).where(Event.kind == "corpus_small")).all()
        baselines = s.exec(select(Experiment).where(Experiment.kind == "baseline")).all()
    assert len(baselines) >= 3
    if epochs > 4:
        assert len(told) == 1 and "saw the training split 66 times" in told[0].text
        assert "ratchet data prepare --corpus climbmix" in told[0].text
    else:
        assert told == []
