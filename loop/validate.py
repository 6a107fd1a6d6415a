"""Static checks every proposal passes before it may run (only train.py, parses, defines
train(ctx), no file/network/process/harness access, small, new). Never executes the code."""

from __future__ import annotations

import ast
import collections
import difflib
import functools
import hashlib
import itertools
import threading
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass

TRAIN_PATH = "train.py"
DUPLICATE = "duplicate of an earlier experiment"  # the reason for a proposal whose normalised AST was seen

# CPython 3.11 keeps the AST constructor's recursion depth in interpreter-wide state, so two threads parsing at
# once (the swarm's proposers; also inspect.signature inside pydantic) can fail with the spurious "SystemError:
# AST constructor recursion depth mismatch" (python/cpython#106905). Our own parses take turns, and one hit by a
# parse elsewhere is tried again: each parse resets that state, and the tree it builds is right either way.
_PARSE_LOCK = threading.Lock()
_PARSE_TRIES = 5


def parse(source: str, filename: str = "<unknown>") -> ast.Module:
    """`ast.parse`, safe to call from several threads at once. Raises what ast.parse raises
    (SyntaxError, ValueError for null bytes, RecursionError/MemoryError on deep nesting)."""
    with _PARSE_LOCK:
        for attempt in range(_PARSE_TRIES):
            try:
                return ast.parse(source, filename=filename)
            except SystemError as e:
                if "recursion depth mismatch" not in str(e) or attempt == _PARSE_TRIES - 1:
                    raise


# Modules that reach files, the network, processes or the interpreter's internals.
# The service's own packages are here too: a proposal must never touch the harness.
FORBIDDEN_MODULES = frozenset({
    "os", "sys", "subprocess", "socket", "pathlib", "importlib", "shutil", "io", "builtins",
    "ctypes", "multiprocessing", "threading", "signal", "urllib", "http", "requests", "httpx",
    "pickle", "marshal", "tempfile", "glob", "inspect", "gc", "runpy", "code", "pty",
    "resource", "asyncio", "ftplib", "smtplib", "telnetlib", "ssl", "select", "mmap", "fcntl",
    "posix", "nt", "zipimport", "sqlite3", "shelve", "dbm", "webbrowser",
    "trainer", "loop", "db", "bot",
})

FORBIDDEN_NAMES = frozenset({
    "open", "eval", "exec", "compile", "__import__", "globals", "locals", "vars",
    "breakpoint", "input", "exit", "quit",
})

# Dunders that lead from any object back to builtins, modules or code objects.
FORBIDDEN_DUNDERS = frozenset({
    "__builtins__", "__globals__", "__subclasses__", "__code__", "__class__", "__bases__",
    "__mro__", "__dict__", "__getattribute__", "__loader__", "__spec__", "__import__",
})

# Library APIs that read or write files or start processes (dotted prefixes, after
# resolving import aliases, so `import numpy as np; np.load` is `numpy.load`).
FORBIDDEN_APIS = (
    "torch.load", "torch.save", "torch.hub", "torch.utils.cpp_extension",
    "torch.ops.load_library", "torch.classes.load_library", "torch.multiprocessing",
    "torch.distributed", "torch.serialization", "torch.jit.save", "torch.jit.load",
    "torch.package", "torch.export.save", "torch.export.load", "torch.from_file",
    "torch.utils.tensorboard", "torch.profiler",
    "numpy.load", "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.savetxt",
    "numpy.loadtxt", "numpy.genfromtxt", "numpy.fromfile", "numpy.memmap", "numpy.lib.format",
    "numpy.DataSource",
)

# Attributes that read or write files whatever object they hang off (`t.numpy().tofile(f)`).
FORBIDDEN_METHODS = frozenset({"tofile", "from_file"})

# Allowed modules re-export forbidden ones (`random._os`, `torch.os`); an attribute with
# such a name is a way round the import check.
ESCAPE_ATTRS = frozenset(
    prefix + name
    for name in ("os", "sys", "subprocess", "builtins", "shutil", "socket", "pathlib",
                 "importlib", "ctypes", "pickle", "marshal", "multiprocessing", "threading",
                 "runpy", "tempfile", "urllib", "requests", "httpx")
    for prefix in ("", "_")
)

_ATTR_FUNCS = frozenset({"getattr", "setattr", "delattr"})


@dataclass(frozen=True)
class Verdict:
    """Outcome of validate_proposal.

    `reason` is "" when ok, else one line; `ast_hash` the sha256 hex of the normalised AST
    of the new train.py ("" when it does not parse); `diff` the unified diff old → new
    (a/train.py b/train.py), "" when train.py is missing.
    """

    ok: bool
    reason: str
    ast_hash: str
    diff: str


class EditError(ValueError):
    """An (old_str, new_str) edit could not be applied: old_str must occur exactly once.

    `index` is the 1-based position of the failing edit, `matches` how often old_str occurred.
    """

    def __init__(self, index: int, matches: int, message: str):
        super().__init__(message)
        self.index = index
        self.matches = matches


def validate_proposal(
    old_source: str,
    files: Mapping[str, str],
    *,
    seen_hashes: Container[str] = (),
    max_diff_lines: int = 400,
) -> Verdict:
    """Check a proposal statically; never runs it.

    `files` maps path → full new content and may only hold "train.py"; `seen_hashes` holds
    normalised_ast_hash values of earlier experiments; `max_diff_lines` caps added + removed
    lines. Checks, first failure wins: only train.py, parses, defines train(ctx), nothing
    forbidden, diff size, a change at all, not a duplicate. Raises nothing.
    """
    others = sorted(path for path in files if path != TRAIN_PATH)
    if others:
        return Verdict(False, f"only train.py may change, got: {', '.join(others)}", "", "")
    if TRAIN_PATH not in files:
        return Verdict(False, "train.py missing from the proposal", "", "")
    new_source = files[TRAIN_PATH]
    diff, changed = unified_diff(old_source, new_source)
    if new_source == old_source:
        return Verdict(False, "no change", "", diff)
    try:
        tree = parse(new_source, filename=TRAIN_PATH)
    except SyntaxError as exc:
        where = f"line {exc.lineno}: " if exc.lineno else ""
        return Verdict(False, f"does not parse: {where}{exc.msg}", "", diff)
    except ValueError as exc:  # null bytes, on some Python versions
        return Verdict(False, f"does not parse: {exc}", "", diff)
    except (RecursionError, MemoryError):  # the parser's own limits on nesting
        return Verdict(False, "does not parse: nested too deeply", "", diff)
    try:
        structure = _check_train_def(tree)
        offence, ast_hash = _scan_and_hash(tree, new_source)  # after: it may strip docstrings in place
        reason = (
            structure
            or offence
            or (f"diff too large: {changed} changed lines (max {max_diff_lines})" if changed > max_diff_lines else "")
            or _check_changed(old_source, new_source, ast_hash)
            or (DUPLICATE if ast_hash in seen_hashes else "")
        )
    except RecursionError:  # a tree that parses but is too deep to walk (e.g. 1+1+...+1)
        return Verdict(False, "code nested too deeply to check", "", diff)
    return Verdict(not reason, reason, ast_hash, diff)


@functools.lru_cache(maxsize=8)
def normalised_ast_hash(source: str) -> str:
    """sha256 hex of the source's AST without positions or docstrings.

    Comments, blank lines, formatting and docstrings do not change it. Raises SyntaxError
    (or ValueError for null bytes) when the source does not parse, RecursionError when it is
    nested too deeply to walk. Cached: every proposal on head compares its hash with head's.
    """
    return _scan_and_hash(parse(source), source)[1]


def apply_edits(source: str, edits: Sequence[tuple[str, str]]) -> str:
    """Apply exact (old_str, new_str) replacements in order, each to the previous result.

    Each old_str must occur exactly once (overlapping occurrences count) in the text it is
    applied to. Raises EditError naming the 1-based edit and the number of matches.
    """
    for index, (old, new) in enumerate(edits, start=1):
        if not old:
            raise EditError(index, 0, f"edit {index}: old_str is empty")
        matches = _count_overlapping(source, old)
        if matches != 1:
            found = "not found" if matches == 0 else f"matches {matches} times"
            raise EditError(
                index, matches,
                f"edit {index}: old_str {found} (must match exactly once): {_preview(old)}",
            )
        source = source.replace(old, new, 1)
    return source


def unified_diff(old_source: str, new_source: str) -> tuple[str, int]:
    """Unified diff old → new as (text, number of added + removed lines), git-style paths."""
    lines = list(difflib.unified_diff(old_source.splitlines(keepends=True), new_source.splitlines(keepends=True),
                                      "a/train.py", "b/train.py"))
    body = lines[2:]  # the two header lines are not changes, even if a body line starts "---"
    changed = sum(1 for line in body if line[:1] in "+-")
    # A last line without "\n" would run into the next diff line.
    text = "".join(
        line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
        for line in lines
    )
    return text, changed


# ---- checks ----

def _check_train_def(tree: ast.Module) -> str:
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    if not defs:
        return "no module-level `def train(ctx)`"
    args = defs[-1].args  # the last definition is the one bound at import time
    positional = args.posonlyargs + args.args
    if not positional and args.vararg is None:
        return "`train` must take at least one argument (ctx)"
    # The harness calls train(ctx): anything else required would fail only after start-up.
    required = positional[1:len(positional) - len(args.defaults)]
    required += [a for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
    if required:
        return f"`train` must be callable as train(ctx): `{required[0].arg}` has no default"
    return ""


def _check_changed(old_source: str, new_source: str, ast_hash: str) -> str:
    try:  # identical sources were refused before parsing
        old_hash = normalised_ast_hash(old_source)
    except (SyntaxError, ValueError):
        return ""
    if old_hash == ast_hash:
        return "no change to the code (only comments, docstrings or formatting)"
    return ""


# ---- the scan and the hash, one top-level statement at a time ----

@dataclass
class _Facts:
    """What one top-level statement contributes, a function of its text alone: its imports as (depth, order in
    its breadth-first walk, local name, dotted module) for the file's aliases; its ast.dump with docstrings
    stripped; its offences (line relative to the statement, col, end col, what) per set of the file's aliases."""

    imports: list[tuple[int, int, str, str]]
    dump: str
    offences: dict[tuple, list[tuple[int, int, int, str]]]


# (col, statement text) → _Facts. A proposal is head with a few lines changed, so nearly every statement of it was
# scanned and dumped before: the full parse still decides where each statement starts and ends (an edit that
# changes how the rest of the file parses changes those texts), and only new texts are walked. Bounded: cleared
# when full.
_FACTS: dict[tuple[int, bytes], _Facts] = {}
_FACTS_MAX = 4096


def _scan_and_hash(tree: ast.Module, source: str) -> tuple[str, str]:
    """(the first offence as "forbidden: … at line N", or ""; the normalised AST hash) of a parsed file: equal to
    sha256 of ast.dump of the whole tree without positions or docstrings. May strip docstrings from `tree` in place
    (from statements it has not seen before)."""
    data = source.encode("utf-8")
    # byte offset of each line; bytes.splitlines breaks at \r\n, \r and \n, the line ends ast counts (not \f)
    starts = list(itertools.accumulate(map(len, data.splitlines(keepends=True)), initial=0))
    facts, firsts = [], []
    for node in tree.body:
        # A decorated def's own position is its `def` line: its decorators come before it.
        first = node.decorator_list[0] if getattr(node, "decorator_list", None) else node
        key = (first.col_offset, data[starts[first.lineno - 1] + first.col_offset:
                                      starts[node.end_lineno - 1] + node.end_col_offset])
        f = _FACTS.get(key)
        if f is None:
            f = _Facts(_imports(node), "", {})  # its offences and dump are filled in below
            if len(_FACTS) >= _FACTS_MAX:
                _FACTS.clear()
            _FACTS[key] = f
        facts.append((node, f))
        firsts.append(first.lineno)
    aliases = {"np": "numpy"}  # the usual spelling, even before its import is seen
    for *_, name, dotted in sorted((d, top, i, name, dotted) for top, (_, f) in enumerate(facts)
                                   for d, i, name, dotted in f.imports):  # in ast.walk's breadth-first order
        aliases[name] = dotted
    akey = tuple(sorted(aliases.items()))
    offences = []
    for (node, f), line in zip(facts, firsts):
        found = f.offences.get(akey)
        if found is None:
            scanner = _Scanner(aliases)
            scanner.visit(node)
            found = f.offences[akey] = [(ln - line, col, end, what) for ln, col, end, what in scanner.found]
        for dl, col, end, what in found:
            offences.append((line + dl, col, end, what))
        if not f.dump:
            _strip_docstrings(node)
            f.dump = ast.dump(node, annotate_fields=True, include_attributes=False)
    body = [f.dump for _, f in facts]
    first = tree.body[0] if tree.body else None
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        body = body[1:]  # the module's docstring
    dumped = f"Module(body=[{', '.join(body)}], type_ignores=[])"
    offence = ""
    if offences:
        line, _col, _end, what = min(offences)
        offence = f"forbidden: {what} at line {line}"
    return offence, hashlib.sha256(dumped.encode("utf-8")).hexdigest()


def _imports(node: ast.AST) -> list[tuple[int, int, str, str]]:
    """(depth, order, local name, dotted module) of every import in `node`, breadth first (`np` → `numpy`)."""
    found = []
    for i, (depth, n) in enumerate(_statements(node)):
        if isinstance(n, ast.Import):
            for alias in n.names:
                top = alias.name.split(".")[0]
                found.append((depth, i, alias.asname, alias.name) if alias.asname else (depth, i, top, top))
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            found += [(depth, i, a.asname or a.name, f"{n.module}.{a.name}") for a in n.names]
    return found


class _Scanner(ast.NodeVisitor):
    """Collects (line, col, end col, what) for every forbidden import, name, call or attribute.

    Function parameters shadow builtins (`def forward(self, input)` is fine): a name is
    only forbidden where no enclosing function binds it as a parameter.
    """

    def __init__(self, aliases: dict[str, str]):
        self.aliases = aliases  # local name → dotted module, of the whole file
        self.params: list[frozenset[str]] = []
        self.found: list[tuple[int, int, int, str]] = []

    def _add(self, node: ast.AST, what: str) -> None:
        # Nested attributes share a start: the one ending first is the one evaluated first.
        self.found.append((node.lineno, node.col_offset, node.end_col_offset, what))

    # -- imports --
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_module(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            self._add(node, "relative import")
            return
        module = node.module or ""
        if not self._check_module(node, module):
            if any(alias.name == "*" for alias in node.names):
                # A star import brings in names (`load`, `save`) that no later check can see.
                self._add(node, f"`from {module} import *`")
                return
            for alias in node.names:
                self._check_module(node, f"{module}.{alias.name}")

    def _check_module(self, node: ast.AST, dotted: str) -> bool:
        top = dotted.split(".")[0]
        if top in FORBIDDEN_MODULES:
            self._add(node, f"`{top}` import")
            return True
        api = _forbidden_api(dotted)
        if api:
            self._add(node, f"`{api}` import")
            return True
        return False

    # -- scopes: parameters shadow builtins inside the function only --
    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for child in (*node.decorator_list, node.returns):
            if child is not None:
                self.visit(child)
        self._visit_function(node.args, node.body)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._visit_function(node.args, [node.body])

    def _visit_function(self, args: ast.arguments, body: list[ast.AST]) -> None:
        # Defaults and annotations are evaluated in the enclosing scope.
        for child in (*args.defaults, *args.kw_defaults):
            if child is not None:
                self.visit(child)
        every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
        for arg in every:
            if arg is not None and arg.annotation is not None:
                self.visit(arg.annotation)
        self.params.append(frozenset(a.arg for a in every if a is not None))
        for child in body:
            self.visit(child)
        self.params.pop()

    # -- names, attributes, calls --
    def visit_Name(self, node: ast.Name) -> None:
        if node.id in FORBIDDEN_DUNDERS:
            self._add(node, f"`{node.id}`")
        elif node.id in FORBIDDEN_NAMES and not any(node.id in p for p in self.params):
            self._add(node, f"`{node.id}`")

    def visit_Global(self, node: ast.Global) -> None:
        for name in node.names:
            if name in FORBIDDEN_NAMES:
                self._add(node, f"`global {name}`")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        api = _forbidden_api(self._dotted(node))
        if api:  # the most specific name for it: `torch.multiprocessing`, not `.multiprocessing`
            self._add(node, f"`{api}`")
        else:
            self._check_attr(node, node.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (isinstance(func, ast.Name) and func.id in _ATTR_FUNCS and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            name = node.args[1].value
            if name.startswith("__"):
                self._add(node, f"`{func.id}` of {name!r}")
            else:
                self._check_attr(node, name)
        self.generic_visit(node)

    def _check_attr(self, node: ast.AST, attr: str) -> None:
        if attr in FORBIDDEN_DUNDERS:
            self._add(node, f"`{attr}` access")
        elif attr in FORBIDDEN_METHODS:
            self._add(node, f"`.{attr}`")
        elif attr in ESCAPE_ATTRS:
            self._add(node, f"`.{attr}` access")

    def _dotted(self, node: ast.Attribute) -> str:
        parts: list[str] = []
        cur: ast.AST = node
        while isinstance(cur, ast.Attribute):
            parts.append(cur.attr)
            cur = cur.value
        if not isinstance(cur, ast.Name):
            return ""
        parts.append(self.aliases.get(cur.id, cur.id))
        return ".".join(reversed(parts))


def _forbidden_api(dotted: str) -> str:
    return next((api for api in FORBIDDEN_APIS if dotted == api or dotted.startswith(api + ".")), "")


# ---- hashing and helpers ----

def _strip_docstrings(tree: ast.AST) -> None:
    """Drop the leading string expression of `tree` and of every def/class in it (in place)."""
    for node in list(_with_bodies(tree)):
        body = node.body
        if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:]


_DEFS = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_STATEMENTS = (ast.stmt, ast.excepthandler, ast.match_case)


def _statements(tree: ast.AST) -> Iterator[tuple[int, ast.AST]]:
    """(depth, node) for `tree` (depth 0) and every statement in it, in ast.walk's order (breadth first). Imports
    and defs are statements, so only statements are searched, never expressions: a small part of the tree."""
    todo = collections.deque([(0, tree)])
    while todo:
        depth, node = todo.popleft()
        yield depth, node
        todo.extend((depth + 1, c) for c in ast.iter_child_nodes(node) if isinstance(c, _STATEMENTS))


def _with_bodies(tree: ast.AST) -> Iterator[ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    """`tree` (a module, def or class) and every def / class in it."""
    return (node for _, node in _statements(tree) if isinstance(node, _DEFS))


def _count_overlapping(text: str, needle: str) -> int:
    count, start = 0, text.find(needle)
    while start != -1:
        count += 1
        start = text.find(needle, start + 1)
    return count


def _preview(text: str, limit: int = 60) -> str:
    first = text.strip().splitlines()[0] if text.strip() else text
    return repr(first if len(first) <= limit else first[:limit] + "…")
