"""The research repo (loop.workspace) against real git: init, run branches, experiment commits,
compare-and-swap fast-forwards, diffs, 3-way rebase, and never disturbing the working tree."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from loop.workspace import EXPERIMENTS_REF, PROGRAM, TEMPLATE, Workspace, WorkspaceError

SCRIPT = "A = 1\nB = 2\n\n\ndef f():\n    return A + B\n\n\nC = 3\n"


@pytest.fixture(autouse=True)
def no_identity(tmp_path, monkeypatch):
    """An empty HOME and no system config: no git identity anywhere."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(var, raising=False)


def git(ws: Workspace, *args: str) -> str:
    return subprocess.run(["git", "-C", str(ws.path), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.init(tmp_path / "ws")


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def test_init_commits_template_and_program_on_main(ws):
    assert ws.exists()
    assert git(ws, "symbolic-ref", "HEAD") == "refs/heads/main"
    head = ws.head_commit()
    assert len(head) == 40
    assert ws.read_file(head) == TEMPLATE.read_text()
    assert ws.read_file(head, "program.md") == PROGRAM.read_text()
    assert git(ws, "ls-tree", "--name-only", head).split() == ["program.md", "train.py"]
    assert git(ws, "log", "-1", "--format=%s|%an <%ae>|%cn <%ce>", head) == (
        "baseline: train.py and program.md|ratchet <ratchet@localhost>|ratchet <ratchet@localhost>")
    assert git(ws, "status", "--porcelain") == ""


def test_program_is_shipped_and_substantial():
    text = PROGRAM.read_text()
    assert 50 <= len(text.splitlines()) <= 100
    for word in ("val_bpb", "noise floor", "train.py", "ctx.train_batches", "ctx.should_stop", "ctx.scale"):
        assert word in text


def test_init_is_idempotent(ws):
    head = ws.head_commit()
    (ws.path / "notes.txt").write_text("mine\n")
    again = Workspace.init(ws.path)
    assert again.head_commit() == head
    assert git(ws, "rev-list", "--count", "HEAD") == "1"
    assert (ws.path / "notes.txt").read_text() == "mine\n"


def test_init_refuses_non_empty_non_workspace(tmp_path):
    d = tmp_path / "busy"
    d.mkdir()
    (d / "thesis.tex").write_text("\\documentclass{article}\n")
    with pytest.raises(WorkspaceError, match="not empty"):
        Workspace.init(d)
    assert not (d / ".git").exists() and not (d / "train.py").exists()
    ws = Workspace.init(d, force=True)
    assert ws.exists()
    # force commits the baseline only; the person's own file stays untracked
    assert git(ws, "ls-tree", "--name-only", "HEAD").split() == ["program.md", "train.py"]
    assert (d / "thesis.tex").exists()


def test_exists_false_for_missing_and_plain_dirs(tmp_path):
    assert not Workspace(tmp_path / "nope").exists()
    assert not Workspace(tmp_path).exists()
    assert not (tmp_path / "nope").exists()  # the constructor creates nothing


def test_run_branch_names(ws):
    assert ws.run_branch("lr-sweep_2.1") == "ratchet/lr-sweep_2.1"
    for bad in ("", "a b", "a/b", "..", "x..y", ".hidden", "x.lock", "ü"):
        with pytest.raises(WorkspaceError):
            ws.run_branch(bad)


def test_ensure_run_branch(ws):
    base = ws.head_commit()
    assert ws.branch_tip("r1") is None
    assert ws.ensure_run_branch("r1", "main") == base
    assert git(ws, "rev-parse", "refs/heads/ratchet/r1") == base
    c = ws.commit_experiment(1, base, edit(SCRIPT, "A = 1", "A = 5"), "exp 1")
    ws.set_branch("r1", c)
    assert ws.ensure_run_branch("r1", base) == c  # an existing branch is left where it is
    with pytest.raises(WorkspaceError):
        ws.ensure_run_branch("r2", "no-such-ref")


def test_commit_experiment(ws):
    base = ws.ensure_run_branch("r", "main")
    source = edit(ws.read_file(base), "DEPTH_CPU = 4", "DEPTH_CPU = 6")
    sha = ws.commit_experiment(42, base, source, "DEPTH_CPU 4 → 6\n\nhypothesis: more capacity")
    tip = git(ws, "rev-parse", EXPERIMENTS_REF)
    assert git(ws, "rev-list", "--parents", "-n", "1", tip).split()[1:] == [sha]  # the first: no earlier tip
    assert git(ws, "log", "-1", "--format=%s", tip) == "experiments #42"
    assert git(ws, "rev-parse", f"{sha}^") == base
    assert git(ws, "diff", "--name-only", base, sha) == "train.py"
    assert ws.read_file(sha) == source
    assert ws.read_file(sha, "program.md") == ws.read_file(base, "program.md")
    assert git(ws, "log", "-1", "--format=%B", sha).startswith("DEPTH_CPU 4 → 6")
    assert ws.branch_tip("r") == base and ws.head_commit("main") == base


def test_fast_forward(ws):
    base = ws.ensure_run_branch("r", "main")
    c1 = ws.commit_experiment(1, base, SCRIPT, "one")
    c2 = ws.commit_experiment(2, c1, edit(SCRIPT, "B = 2", "B = 7"), "two")
    ws.fast_forward("r", c1, base)
    assert ws.branch_tip("r") == c1
    with pytest.raises(WorkspaceError):  # stale expected_old: the branch is at c1 now
        ws.fast_forward("r", c2, base)
    assert ws.branch_tip("r") == c1
    side = ws.commit_experiment(3, base, edit(SCRIPT, "C = 3", "C = 9"), "side")
    with pytest.raises(WorkspaceError, match="not a descendant"):
        ws.fast_forward("r", side, c1)
    assert ws.branch_tip("r") == c1
    ws.fast_forward("r", c2, c1)
    assert ws.branch_tip("r") == c2


def test_set_branch(ws):
    base = ws.ensure_run_branch("r", "main")
    c = ws.commit_experiment(1, base, SCRIPT, "one")
    ws.set_branch("r", c)
    assert ws.branch_tip("r") == c
    ws.set_branch("r", base)  # backwards too: the database is the truth after a crash
    assert ws.branch_tip("r") == base
    with pytest.raises(WorkspaceError):
        ws.set_branch("r", "0" * 40)


def test_diff(ws):
    base = ws.head_commit()
    c1 = ws.commit_experiment(1, base, SCRIPT, "one")
    c2 = ws.commit_experiment(2, c1, edit(SCRIPT, "B = 2", "B = 7"), "two")
    d = ws.diff(c1, c2)
    assert "--- a/train.py" in d and "+++ b/train.py" in d
    assert "-B = 2\n+B = 7\n" in d
    assert ws.diff(c1, c1) == ""


def rebase_source(ws, parent, change, new_head):
    """The change parent → change re-applied to new_head's train.py, as the keep policy rebases a result."""
    return ws.merge_text(ws.read_file(parent), ws.read_file(new_head), ws.read_file(change))


def test_rebase_source(ws):
    base = ws.head_commit()
    p = ws.commit_experiment(1, base, SCRIPT, "parent")
    change = ws.commit_experiment(2, p, edit(SCRIPT, "A = 1", "A = 10"), "A 1 → 10")
    new_head = ws.commit_experiment(3, p, edit(SCRIPT, "C = 3", "C = 30"), "C 3 → 30")
    merged = rebase_source(ws, p, change, new_head)
    assert merged == SCRIPT.replace("A = 1", "A = 10").replace("C = 3", "C = 30")
    clash = ws.commit_experiment(4, p, edit(SCRIPT, "A = 1", "A = 20"), "A 1 → 20")
    assert rebase_source(ws, p, change, clash) is None
    with pytest.raises(WorkspaceError):
        rebase_source(ws, p, "0" * 40, new_head)


def test_user_edits_survive(ws):
    """A person editing train.py (and staging something) is never disturbed by the loop."""
    mine = ws.read_file("HEAD") + "\n# my local note\n"
    (ws.path / "train.py").write_text(mine)
    (ws.path / "scratch.py").write_text("x = 1\n")
    git(ws, "add", "scratch.py")
    status = git(ws, "status", "--porcelain")
    index = git(ws, "ls-files", "--stage")

    base = ws.ensure_run_branch("r", "main")
    c1 = ws.commit_experiment(1, base, SCRIPT, "one")
    ws.fast_forward("r", c1, base)
    c2 = ws.commit_experiment(2, c1, edit(SCRIPT, "B = 2", "B = 7"), "two")
    ws.set_branch("r", c2)
    ws.diff(c1, c2)
    rebase_source(ws, c1, c2, c1)
    Workspace.init(ws.path)

    assert (ws.path / "train.py").read_text() == mine
    assert git(ws, "status", "--porcelain") == status
    assert git(ws, "ls-files", "--stage") == index
    assert ws.head_commit() == base  # main never moved


def test_user_hooks_and_signing_are_ignored(ws):
    hooks = ws.path / ".git" / "hooks"
    hooks.mkdir(exist_ok=True)
    for name in ("pre-commit", "commit-msg", "reference-transaction"):
        (hooks / name).write_text("#!/bin/sh\nexit 1\n")
        (hooks / name).chmod(0o755)
    git(ws, "config", "commit.gpgsign", "true")
    base = ws.ensure_run_branch("r", "main")
    c = ws.commit_experiment(1, base, SCRIPT, "one")
    ws.fast_forward("r", c, base)
    assert ws.branch_tip("r") == c


def test_concurrent_keeps_race_safely(ws):
    """Experiments committed in parallel; of several keeps from the same head exactly one wins."""
    from concurrent.futures import ThreadPoolExecutor

    base = ws.ensure_run_branch("r", "main")
    sources = [edit(SCRIPT, "A = 1", f"A = {i + 10}") for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        shas = list(pool.map(lambda i: ws.commit_experiment(i, base, sources[i], f"exp {i}"), range(8)))
    assert [ws.read_file(s) for s in shas] == sources

    def keep(sha):
        try:
            ws.fast_forward("r", sha, base)
            return sha
        except WorkspaceError:
            return None

    with ThreadPoolExecutor(8) as pool:
        winners = [s for s in pool.map(keep, shas) if s]
    assert len(winners) == 1 and ws.branch_tip("r") == winners[0]


def test_every_experiment_commit_stays_reachable_and_a_held_lock_is_respected(ws):
    base = ws.head_commit()
    first = ws.commit_experiment(5, base, edit(SCRIPT, "A = 1", "A = 2"), "first")
    second = ws.commit_experiment(5, base, edit(SCRIPT, "A = 1", "A = 3"), "second")  # a re-commit of #5
    assert first != second
    for sha in (first, second):  # both ancestors of the ref: `git gc` keeps them
        assert subprocess.run(["git", "-C", str(ws.path), "merge-base", "--is-ancestor", sha, EXPERIMENTS_REF]
                              ).returncode == 0
    ref_file = ws.path / ".git" / EXPERIMENTS_REF
    assert ref_file.read_text() == git(ws, "rev-parse", EXPERIMENTS_REF) + "\n"
    lock = ref_file.with_name("experiments.lock")
    lock.write_text("")  # another writer (git update-ref) holds the ref
    tip = ref_file.read_text()
    with pytest.raises(WorkspaceError, match="#6"):
        ws.commit_experiment(6, base, edit(SCRIPT, "A = 1", "A = 4"), "locked")
    assert lock.exists() and ref_file.read_text() == tip  # theirs stays; the ref did not move
    old = time.time() - 60  # a lock this old was left by a crash: removed, and the commit goes through
    os.utime(lock, (old, old))
    third = ws.commit_experiment(6, base, edit(SCRIPT, "A = 1", "A = 4"), "after a crash")
    assert not lock.exists() and git(ws, "rev-parse", f"{EXPERIMENTS_REF}^2") == third
    gc = subprocess.run(["git", "-C", str(ws.path), "gc", "-q", "--prune=now"], capture_output=True, text=True)
    assert gc.returncode == 0, gc.stderr
    assert [ws.read_file(c) for c in (first, second, third)] == [Workspace(ws.path).read_file(c)
                                                                 for c in (first, second, third)]
    assert git(ws, "cat-file", "-t", first) == "commit" and git(ws, "fsck", "--no-dangling") == ""
    assert not ref_file.exists()  # gc moved the ref into packed-refs: the next store continues from there
    packed_tip = git(ws, "rev-parse", EXPERIMENTS_REF)
    fourth = ws.commit_experiment(7, base, edit(SCRIPT, "A = 1", "A = 7"), "after gc")
    assert git(ws, "rev-list", "--parents", "-n", "1", EXPERIMENTS_REF).split()[1:] == [packed_tip, fourth]


def test_a_commit_that_another_writer_overtakes_is_refused_and_stored_again(ws, monkeypatch):
    base = ws.head_commit()
    first = ws.commit_experiment(1, base, edit(SCRIPT, "A = 1", "A = 2"), "first")
    refs = ws._dulwich().refs
    read_ref = refs.read_ref
    other = []

    def overtaken(name):  # another process stores its experiment between this store's read and its swap
        old = read_ref(name)
        if not other:
            other.append(Workspace(ws.path).commit_experiment(2, base, edit(SCRIPT, "A = 1", "A = 5"), "other"))
        return old

    monkeypatch.setattr(refs, "read_ref", overtaken)
    with pytest.raises(WorkspaceError, match=f"#3: {EXPERIMENTS_REF} moved"):
        ws.commit_experiment(3, base, edit(SCRIPT, "A = 1", "A = 6"), "third")
    assert git(ws, "rev-parse", f"{EXPERIMENTS_REF}^2") == other[0]  # theirs stands; nothing was lost
    third = ws.commit_experiment(3, base, edit(SCRIPT, "A = 1", "A = 6"), "third again")  # the caller's retry
    for sha in (first, other[0], third):
        assert subprocess.run(["git", "-C", str(ws.path), "merge-base", "--is-ancestor", sha, EXPERIMENTS_REF]
                              ).returncode == 0


def test_a_committed_source_read_back_is_what_git_stored(ws):
    base = ws.head_commit()
    source = edit(ws.read_file(base), "DEPTH_CPU = 4", "DEPTH_CPU = 5") + "# é ✓\n"
    sha = ws.commit_experiment(9, base, source, "exp 9")
    assert ws.read_file(sha) == source
    assert Workspace(ws.path).read_file(sha) == source == git(ws, "cat-file", "blob", f"{sha}:train.py") + "\n"
