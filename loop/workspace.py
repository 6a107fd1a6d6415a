"""The research repo: a plain git repository driven through the `git` CLI, and through dulwich for what
happens once per experiment (its commit, reading a file at a commit) without starting git processes for it.
Only `Workspace.init` touches the working tree or the index; everything else is plumbing on objects and refs."""

from __future__ import annotations

import atexit
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path

import trainer.templates

log = logging.getLogger(__name__)
TEMPLATE = Path(trainer.templates.__file__).parent / "train.py"
PROGRAM = Path(__file__).parent / "program.md"

IDENTITY = {"GIT_AUTHOR_NAME": "ratchet", "GIT_AUTHOR_EMAIL": "ratchet@localhost",
            "GIT_COMMITTER_NAME": "ratchet", "GIT_COMMITTER_EMAIL": "ratchet@localhost"}
# Settings a user's config must not be able to change under us (hooks, signing, line endings).
SAFE_CONFIG = ("core.hooksPath=/dev/null", "commit.gpgsign=false", "core.autocrlf=false",
               "core.safecrlf=false", "core.fsmonitor=false", "init.templateDir=")
BASELINE_MESSAGE = "baseline: train.py and program.md"
_RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")
# Every experiment commit is an ancestor of this ref (see Workspace.commit_experiment), so `git gc` keeps them.
EXPERIMENTS_REF = "refs/ratchet/experiments"
STALE_LOCK_S = 30  # a ref lock this old was left by a crash: writers hold one for a few milliseconds at most


_SHA = re.compile(r"[0-9a-f]{40}")


def _close_repo(ref) -> None:
    ws = ref()
    if ws is not None:
        ws.close()


def _remove_stale_lock(lock: str) -> None:
    """Remove git's lock file `lock` when it is older than STALE_LOCK_S: a writer holds one for milliseconds, so
    an older one was left by a crash, and dulwich (as git) would refuse the ref for good while it stays."""
    try:
        if time.time() - os.stat(lock).st_mtime > STALE_LOCK_S:
            log.warning("removing %s: older than %d s, left by a writer that did not finish", lock, STALE_LOCK_S)
            os.unlink(lock)
    except FileNotFoundError:
        pass  # none, or released meanwhile


def _commit(tree: bytes, parents: list[bytes], message: str):
    """A dulwich Commit by ratchet, now, of `tree` (hex sha) with `parents` (hex shas)."""
    from dulwich.objects import Commit

    who = f"{IDENTITY['GIT_COMMITTER_NAME']} <{IDENTITY['GIT_COMMITTER_EMAIL']}>".encode()
    commit = Commit()
    commit.tree, commit.parents = tree, parents
    commit.author = commit.committer = who
    commit.author_time = commit.commit_time = int(time.time())
    commit.author_timezone = commit.commit_timezone = 0
    commit.message = message.encode("utf-8") + (b"" if message.endswith("\n") else b"\n")
    return commit


class WorkspaceError(RuntimeError):
    """A git command failed or a request was refused (message: git's last stderr line or the reason)."""


def _error(command: str, proc: subprocess.CompletedProcess) -> WorkspaceError:
    lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    return WorkspaceError(f"git {command}: {lines[-1] if lines else f'exit status {proc.returncode}'}")


class Workspace:
    """The research repo at `path`: run branches refs/heads/ratchet/<run>; experiment commits reachable from
    refs/ratchet/experiments."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._repo = None  # dulwich.repo.Repo, opened on first use
        self._repo_lock = threading.Lock()

    def _dulwich(self):
        """The open dulwich Repo (call with _repo_lock held). Closed at exit, so pack files are not left to __del__."""
        if self._repo is None:
            from dulwich.repo import Repo

            self._repo = Repo(str(self.path))
            atexit.register(_close_repo, weakref.ref(self))
        return self._repo

    def close(self) -> None:
        """Close the open object database (a later call opens it again)."""
        with self._repo_lock:
            if self._repo is not None:
                self._repo.close()
                self._repo = None

    # ---- git ----

    def _git(self, *args: str, input: bytes | None = None, check: bool = True,
             env: dict | None = None) -> subprocess.CompletedProcess:
        # Inherited GIT_* (GIT_DIR, GIT_INDEX_FILE, ... from a hook or a parent git) would redirect us.
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        full_env.update(IDENTITY, LC_ALL="C", GIT_TERMINAL_PROMPT="0", **(env or {}))
        cmd = ["git", "-C", str(self.path)]
        for setting in SAFE_CONFIG:
            cmd += ["-c", setting]
        try:
            proc = subprocess.run(cmd + list(args), input=input, capture_output=True, env=full_env)
        except OSError as e:
            raise WorkspaceError(f"cannot run git: {e}") from e
        if check and proc.returncode != 0:
            raise _error(args[0], proc)
        return proc

    def _out(self, *args: str, **kw) -> str:
        return self._git(*args, **kw).stdout.decode("utf-8").strip()

    # ---- creation ----

    @classmethod
    def init(cls, path: Path, *, force: bool = False) -> "Workspace":
        """`ratchet init [DIR]`: create DIR, `git init -b main`, commit train.py (TEMPLATE) and program.md.

        Idempotent: an existing workspace (a git repo with train.py committed) is returned untouched.
        With `force` a non-empty directory is accepted; a train.py or program.md already there is
        kept and committed as the baseline, nothing else in it is added.
        Returns the Workspace. Raises WorkspaceError when DIR is non-empty and not a workspace
        (unless force), is not a directory, or git fails.
        """
        ws = cls(path)
        if ws.exists():
            return ws
        if ws.path.exists() and not ws.path.is_dir():
            raise WorkspaceError(f"{ws.path} exists and is not a directory")
        if ws.path.is_dir() and any(ws.path.iterdir()) and not force:
            raise WorkspaceError(f"{ws.path} is not empty and not a ratchet workspace (use --force to init there)")
        ws.path.mkdir(parents=True, exist_ok=True)
        ws._git("init", "-q", "-b", "main")
        for name, src in (("train.py", TEMPLATE), ("program.md", PROGRAM)):
            if not (ws.path / name).exists():
                (ws.path / name).write_bytes(src.read_bytes())
        ws._git("add", "--", "train.py", "program.md")
        ws._git("commit", "-q", "--no-verify", "-m", BASELINE_MESSAGE, "--", "train.py", "program.md")
        return ws

    def exists(self) -> bool:
        """True when `path` is the top of a git repo whose HEAD has train.py committed."""
        if not self.path.is_dir():
            return False
        top = self._git("rev-parse", "--show-toplevel", check=False)
        if top.returncode != 0 or Path(top.stdout.decode().strip()).resolve() != self.path.resolve():
            return False
        return self._git("cat-file", "-e", "HEAD:train.py", check=False).returncode == 0

    # ---- reading ----

    def head_commit(self, ref: str = "HEAD") -> str:
        """Full sha of the commit `ref` names. Raises WorkspaceError if it names none."""
        return self._out("rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}")

    def read_file(self, commit: str, path: str = "train.py") -> str:
        """Text (UTF-8) of `path` in `commit`. Raises WorkspaceError if it is not there."""
        data = self._read_blob(commit, path) if _SHA.fullmatch(commit) else None
        if data is None:
            data = self._git("cat-file", "blob", f"{commit}:{path}").stdout
        return data.decode("utf-8")

    def _read_blob(self, commit: str, path: str) -> bytes | None:
        """The bytes of a top-level file at a full commit sha through dulwich; None when not found that way."""
        with self._repo_lock:
            try:
                repo = self._dulwich()
                tree = repo[repo[commit.encode()].tree]
                _mode, sha = tree[path.encode()]
                return repo[sha].data
            except (KeyError, AttributeError, ValueError, OSError):
                return None  # let git say what is wrong

    def diff(self, a: str, b: str, path: str = "train.py") -> str:
        """Unified diff of `path` from commit `a` to commit `b` ("" when equal)."""
        return self._git("diff", "--no-color", "--no-ext-diff", "--no-textconv", a, b, "--", path
                         ).stdout.decode("utf-8")

    # ---- refs ----

    def run_branch(self, run: str) -> str:
        """Branch name of a run: "ratchet/<run>". Raises WorkspaceError on a bad run name."""
        if (not _RUN_NAME.fullmatch(run) or run.startswith((".", "-")) or run.endswith((".", ".lock"))
                or ".." in run):
            raise WorkspaceError(f"bad run name {run!r}: use letters, digits, '.', '_', '-'")
        return f"ratchet/{run}"

    def branch_tip(self, run: str) -> str | None:
        """Sha at the tip of ratchet/<run>, or None when the branch does not exist."""
        proc = self._git("rev-parse", "--verify", "--quiet", f"refs/heads/{self.run_branch(run)}^{{commit}}",
                         check=False)
        return proc.stdout.decode().strip() if proc.returncode == 0 else None

    def ensure_run_branch(self, run: str, start: str) -> str:
        """Create ratchet/<run> at commit `start` unless it exists; return its tip (sha)."""
        tip = self.branch_tip(run)
        if tip is not None:
            return tip
        sha = self.head_commit(start)
        ref = f"refs/heads/{self.run_branch(run)}"
        created = self._git("update-ref", "-m", f"ratchet: start run {run}", ref, sha, "", check=False)
        tip = self.branch_tip(run)  # another caller may have created it first: theirs wins
        if tip is None:
            raise _error("update-ref", created)
        return tip

    def commit_experiment(self, exp_id: int, parent: str, source: str, message: str,
                          path: str = "train.py") -> str:
        """Commit `source` as `path` on top of `parent` (parent's tree, that one file replaced); no branch moves.

        Its objects are written loose, as git writes them, and the commit is kept reachable: a commit whose
        parents are the previous tip of refs/ratchet/experiments and this one becomes that ref's tip, so
        `git gc` keeps every experiment commit. Returns the new commit's sha. Raises WorkspaceError when git
        fails, or another writer holds the ref or moved it meanwhile (the caller stores again).
        """
        from dulwich.file import FileLocked
        from dulwich.objects import Blob, Tree

        if "/" in path:
            raise WorkspaceError(f"only top-level files are committed, not {path}")
        parent = parent if _SHA.fullmatch(parent) else self.head_commit(parent)
        with self._repo_lock:
            repo = self._dulwich()
            try:
                parent_tree = repo[repo[parent.encode()].tree]
            except (KeyError, AttributeError, ValueError) as e:
                raise WorkspaceError(f"commit {parent[:12]} not found") from e
            blob = Blob.from_string(source.encode("utf-8"))
            tree = Tree()
            mode = 0o100644
            for entry in parent_tree.items():
                if entry.path == path.encode():
                    mode = entry.mode if entry.mode in (0o100644, 0o100755) else 0o100644
                else:
                    tree.add(entry.path, entry.mode, entry.sha)
            tree.add(path.encode(), mode, blob.id)
            commit = _commit(tree.id, [parent.encode()], message)
            ref = EXPERIMENTS_REF.encode()
            _remove_stale_lock(os.path.join(os.fsdecode(repo.controldir()), EXPERIMENTS_REF + ".lock"))
            old = repo.refs.read_ref(ref)
            empty = Tree()
            log_commit = _commit(empty.id, ([old] if old else []) + [commit.id], f"experiments #{exp_id}")
            for obj in (blob, tree, commit, empty, log_commit):
                repo.object_store.add_object(obj)
            try:  # compare-and-swap under git's <ref>.lock; the objects of a refused commit are left for `git gc`
                moved = (repo.refs.add_if_new(ref, log_commit.id) if old is None
                         else repo.refs.set_if_equals(ref, old, log_commit.id))
            except (OSError, FileLocked) as e:
                raise WorkspaceError(f"cannot store the commit of experiment #{exp_id}: {e}") from e
            if not moved:
                raise WorkspaceError(f"cannot store the commit of experiment #{exp_id}: {EXPERIMENTS_REF} moved")
        return commit.id.decode()

    def fast_forward(self, run: str, commit: str, expected_old: str) -> None:
        """Keep: move ratchet/<run> from `expected_old` to `commit` (compare-and-swap).

        Raises WorkspaceError when `commit` does not descend from `expected_old`, or when the
        branch is no longer at `expected_old` (someone moved it first).
        """
        ref = f"refs/heads/{self.run_branch(run)}"
        new, old = self.head_commit(commit), self.head_commit(expected_old)
        if self._git("merge-base", "--is-ancestor", old, new, check=False).returncode != 0:
            raise WorkspaceError(f"{new[:12]} is not a descendant of {old[:12]}: not a fast-forward")
        self._git("update-ref", "-m", f"ratchet: keep {new[:12]}", ref, new, old)

    def set_ref(self, ref: str, commit: str) -> None:
        """Point any ref under refs/ratchet/ at a commit (e.g. a run's promoted marker)."""
        if not ref.startswith("refs/ratchet/"):
            raise WorkspaceError(f"refusing to move {ref}: only refs/ratchet/* are ours")
        self._git("update-ref", ref, commit)

    def set_branch(self, run: str, commit: str) -> None:
        """Force ratchet/<run> to `commit` (reconciling with the database after a crash)."""
        sha = self.head_commit(commit)
        self._git("update-ref", "-m", f"ratchet: set to {sha[:12]}", f"refs/heads/{self.run_branch(run)}", sha)

    # ---- merging ----

    def merge_text(self, base: str | bytes, ours: str | bytes, theirs: str | bytes) -> str | None:
        """3-way merge of file texts with `git merge-file`: the change base→theirs applied to ours.

        Returns the merged text, or None on conflicts. Raises WorkspaceError when git fails.
        """
        texts = [t.encode("utf-8") if isinstance(t, str) else t for t in (ours, base, theirs)]
        with tempfile.TemporaryDirectory(prefix="ratchet-merge-") as tmp:
            files = [Path(tmp) / name for name in ("ours", "base", "theirs")]
            for f, text in zip(files, texts):
                f.write_bytes(text)
            proc = self._git("merge-file", "-p", *map(str, files), check=False)
        if proc.returncode == 0:
            return proc.stdout.decode("utf-8")
        if 0 < proc.returncode < 128:  # the number of conflicts
            return None
        raise _error("merge-file", proc)
