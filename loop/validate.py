"""Static checks every proposal passes before it may run (only train.py, parses, defines
train(ctx), no file/network/process/harness access, small, new). Never executes the code."""

from __future__ import annotations

import ast
import functools
import difflib
import hashlib
import re
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass

TRAIN_PATH = "train.py"

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
    lines = _line_changes(old_source, new_source)  # split once: a fleet validates a proposal per experiment
    diff, changed = _diff_text(_unified_lines(lines.old, lines.new, head_tail=lines.head_tail))
    if new_source == old_source:
        return Verdict(False, "no change", "", diff)

    # A parent that passed and an edit that only swaps literal constants: nothing new can be forbidden
    # (a fleet validates one such proposal per experiment; the full scan is most of the cost).
    literal_edit = _literal_edit_of_clean(old_source, new_source, lines)
    # ...and its hash is the parent's, one statement's piece swapped: no parse or dump of the whole file.
    spliced = _spliced_hash(old_source, new_source, lines) if literal_edit else None
    if spliced is None:
        try:
            tree = ast.parse(new_source, filename=TRAIN_PATH)
        except SyntaxError as exc:
            where = f"line {exc.lineno}: " if exc.lineno else ""
            return Verdict(False, f"does not parse: {where}{exc.msg}", "", diff)
        except ValueError as exc:  # null bytes, on some Python versions
            return Verdict(False, f"does not parse: {exc}", "", diff)
        except (RecursionError, MemoryError):  # the parser's own limits on nesting
            return Verdict(False, "does not parse: nested too deeply", "", diff)

    try:
        if spliced is not None:
            structure, ast_hash = "", spliced
        else:
            structure = "" if literal_edit else _check_structure(tree)
            ast_hash = _hash_tree(tree)  # after the scan: hashing strips docstrings in place
        reason = (
            structure
            or _check_size(changed, max_diff_lines)
            or _check_changed(old_source, new_source, ast_hash)
            or ("duplicate of an earlier experiment" if ast_hash in seen_hashes else "")
        )
    except RecursionError:  # a tree that parses but is too deep to walk (e.g. 1+1+...+1)
        return Verdict(False, "code nested too deeply to check", "", diff)
    if not structure:
        _mark_clean(new_source)
    return Verdict(not reason, reason, ast_hash, diff)


# Sources (by sha256) whose structure passed the full checks: train(ctx) defined, nothing forbidden.
_CLEAN: dict[str, None] = {}
_CLEAN_MAX = 4096
# A whole line `NAME = literal` (optional trailing comment), unindented: the only lines the fast path accepts.
_CONSTANT_LINE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*([^#]+?)\s*(#.*)?\n?")


def _digest(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()


def _mark_clean(source: str) -> None:
    _CLEAN[_digest(source)] = None
    if len(_CLEAN) > _CLEAN_MAX:
        _CLEAN.pop(next(iter(_CLEAN)))


def _is_clean(source: str) -> bool:
    """True when `source` passed the structure checks before, or passes them now (then remembered)."""
    if _digest(source) in _CLEAN:
        return True
    try:
        ok = not _check_structure(ast.parse(source))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    if ok:
        _mark_clean(source)
    return ok


MAX_SPLICED_LINES = 8  # the fast paths take edits of at most this many lines; larger ones are parsed
# What str.splitlines ends a line at besides "\n". The parser ends lines at "\n", "\r\n" and "\r" only: where
# none of these occurs, splitlines' line i is the parser's line i + 1.
_OTHER_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


@functools.lru_cache(maxsize=8)
def _split(source: str) -> tuple[tuple[str, ...], bool]:
    """(source.splitlines(keepends=True), no line break but "\n" in it). Cached: a parent (head) is split
    again for every proposal made on it."""
    return tuple(source.splitlines(keepends=True)), _OTHER_BREAKS.search(source) is None


@dataclass(frozen=True)
class _Lines:
    """Two sources' lines (keepends) compared once for all the checks of one proposal. `changed`: indices of
    the lines that differ when both have as many lines and at most MAX_SPLICED_LINES differ, else None;
    `plain`: only "\n" ends a line in either (indices are then the parser's line numbers - 1); `head_tail`:
    (common leading lines, common trailing lines) when `changed` is known, for the diff."""

    old: Sequence[str]
    new: Sequence[str]
    changed: list[int] | None
    plain: bool

    @property
    def head_tail(self) -> tuple[int, int] | None:
        if not self.changed:
            return None
        return self.changed[0], len(self.old) - 1 - self.changed[-1]


def _line_changes(old_source: str, new_source: str) -> _Lines:
    old, old_plain = _split(old_source)
    new = new_source.splitlines(keepends=True)
    changed = None
    if len(old) == len(new):
        changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
        if len(changed) > MAX_SPLICED_LINES:
            changed = None
    if changed is not None:  # the other lines are old's: only the changed ones can hold another break
        plain = old_plain and not any(_OTHER_BREAKS.search(new[i]) for i in changed)
    else:
        plain = old_plain and _OTHER_BREAKS.search(new_source) is None
    return _Lines(old, new, changed, plain)


def _literal_edit_of_clean(old_source: str, new_source: str, lines: _Lines | None = None) -> bool:
    """True when new differs from a structurally clean old only by replaced whole lines that are, on both
    sides, `NAME = literal` with the same NAME (a number, string, bool or None, as ast.literal_eval reads it).
    `lines`: _line_changes(old_source, new_source), when the caller has it."""
    lines = lines or _line_changes(old_source, new_source)
    if not lines.changed:
        return False
    for a, b in ((lines.old[i], lines.new[i]) for i in lines.changed):
        ma, mb = _CONSTANT_LINE.fullmatch(a), _CONSTANT_LINE.fullmatch(b)
        if not (ma and mb and ma.group(1) == mb.group(1)):
            return False
        for value in (ma.group(2), mb.group(2)):
            try:
                lit = ast.literal_eval(value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return False
            if not (lit is None or type(lit) in (int, float, bool, str)):
                return False
    return _is_clean(old_source)


def normalised_ast_hash(source: str) -> str:
    """sha256 hex of the source's AST without positions or docstrings.

    Comments, blank lines, formatting and docstrings do not change it. Raises SyntaxError
    (or ValueError for null bytes) when the source does not parse, RecursionError when it is
    nested too deeply to walk. Cached: head's source is hashed again for every proposal made on it.
    """
    return _pieces(source).ast_hash


@dataclass(frozen=True)
class _Pieces:
    """A source's normalised dump (what _hash_tree hashes) cut at its top-level statements:
    prefix + ", ".join(pieces) + suffix. `slots` maps a 1-based line number to the index in `pieces` of a
    module-level `NAME = literal` statement that has that line to itself (see _spliced_hash); it is empty
    when the cut could not be checked against the whole dump."""

    ast_hash: str
    prefix: str
    suffix: str
    pieces: tuple[str, ...]
    slots: Mapping[int, int]


@functools.lru_cache(maxsize=32)  # a dump is ~25 bytes per source byte: keep only recent heads
def _pieces(source: str) -> _Pieces:
    """Parse, strip docstrings and dump `source` once, keeping each top-level statement's piece.

    Raises SyntaxError / ValueError when it does not parse, RecursionError when too deep to dump.
    Cached: every proposal on a head splices into the head's pieces.
    """
    tree = ast.parse(source)
    body = list(tree.body)
    slots: dict[int, int] = {}
    for i, node in enumerate(body):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and _is_literal(node.value) and node.col_offset == 0 and node.lineno == node.end_lineno
                and (i == 0 or body[i - 1].end_lineno < node.lineno)
                and (i + 1 == len(body) or body[i + 1].lineno > node.lineno)):
            slots[node.lineno] = id(node)  # → an index into the stripped body below
    _strip_docstrings(tree)
    whole = ast.dump(tree, annotate_fields=True, include_attributes=False)
    pieces = tuple(ast.dump(node, annotate_fields=True, include_attributes=False) for node in tree.body)
    index = {id(node): k for k, node in enumerate(tree.body)}
    joined = ", ".join(pieces)
    at = whole.find(joined) if pieces else -1
    prefix, suffix = (whole[:at], whole[at + len(joined):]) if at >= 0 else ("", "")
    # ast.dump formats a list's items one by one and joins them with ", ": a cut that reassembles to the
    # whole dump stays right when one item is swapped. If it did not (another Python), splice nothing.
    ok = at >= 0 and prefix + joined + suffix == whole
    return _Pieces(
        ast_hash=hashlib.sha256(whole.encode("utf-8")).hexdigest(), prefix=prefix, suffix=suffix, pieces=pieces,
        slots={line: index[node_id] for line, node_id in slots.items() if node_id in index} if ok else {},
    )


def _is_literal(node: ast.expr) -> bool:
    """A number, string, bool or None constant, or a signed number: what a constant line may hold."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
        return isinstance(node, ast.Constant) and type(node.value) in (int, float)
    return isinstance(node, ast.Constant) and (node.value is None or type(node.value) in (int, float, bool, str))


def _spliced_hash(old_source: str, new_source: str, lines: _Lines | None = None) -> str | None:
    """normalised_ast_hash(new_source) without parsing new_source, when new differs from old only in whole
    lines that are, in old, a module-level `NAME = literal` statement alone on its line, and are, in new,
    such a statement too (parsed alone). Each such line is a complete logical line at the top level of
    both files, so new's tree is old's with those statements swapped. None when that cannot be shown
    (then the caller parses); never raises. `lines`: _line_changes(old_source, new_source), if known.
    """
    lines = lines or _line_changes(old_source, new_source)
    if not lines.plain or not lines.changed:  # other line breaks would shift the parser's line numbers
        return None
    old_lines, new_lines, changed = lines.old, lines.new, lines.changed
    try:
        parent = _pieces(old_source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    pieces = list(parent.pieces)
    for i in changed:
        k = parent.slots.get(i + 1)
        # A backslash at a line's end joins the next line to it: then the line is not complete alone.
        if k is None or any(_continues(ln) for ln in (old_lines[i], new_lines[i])) \
                or (i > 0 and _continues(old_lines[i - 1])):
            return None
        try:
            body = ast.parse(new_lines[i]).body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None
        if not (len(body) == 1 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
                and isinstance(body[0].targets[0], ast.Name) and body[0].col_offset == 0
                and _is_literal(body[0].value)):
            return None
        pieces[k] = ast.dump(body[0], annotate_fields=True, include_attributes=False)
    dumped = parent.prefix + ", ".join(pieces) + parent.suffix
    return hashlib.sha256(dumped.encode("utf-8")).hexdigest()


def _continues(line: str) -> bool:
    return line.rstrip().endswith("\\")


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


DIFF_CONTEXT = 3  # lines of context around a change, as git diff and difflib default to


class _TrimmedMatcher(difflib.SequenceMatcher):
    """A SequenceMatcher over whole files that matches only the lines between their common head and tail
    (difflib's matching is slow on long files, and a one-constant edit leaves all but a line or two in
    common); get_grouped_opcodes then adds context as difflib.unified_diff does."""

    def __init__(self, a: Sequence[str], b: Sequence[str], head_tail: tuple[int, int] | None = None):
        # noqa: the base __init__ would index all of b. head_tail: the common leading and trailing line
        # counts, when the caller has compared the lines already.
        self.a, self.b = a, b
        if head_tail is not None:
            self.head, self.tail = head_tail
            return
        shorter = min(len(a), len(b))
        self.head = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), shorter)
        self.tail = next((i for i, (x, y) in enumerate(zip(reversed(a), reversed(b)))
                          if x != y or i >= shorter - self.head), shorter - self.head)

    def get_opcodes(self):
        h, la, lb = self.head, len(self.a) - self.tail, len(self.b) - self.tail
        middle = difflib.SequenceMatcher(None, self.a[h:la], self.b[h:lb]).get_opcodes() if h < max(la, lb) else []
        ops = [("equal", 0, h, 0, h)] if h else []
        ops += [(tag, i1 + h, i2 + h, j1 + h, j2 + h) for tag, i1, i2, j1, j2 in middle if i2 > i1 or j2 > j1]
        if self.tail:
            ops.append(("equal", la, len(self.a), lb, len(self.b)))
        merged = []  # neighbouring equal blocks as one, as difflib gives them
        for op in ops:
            if merged and op[0] == "equal" == merged[-1][0]:
                merged[-1] = ("equal", merged[-1][1], op[2], merged[-1][3], op[4])
            else:
                merged.append(op)
        return merged or [("equal", 0, 0, 0, 0)]


def _unified_lines(a: Sequence[str], b: Sequence[str], n: int = DIFF_CONTEXT,
                   head_tail: tuple[int, int] | None = None) -> list[str]:
    """difflib.unified_diff(a, b, "a/train.py", "b/train.py", n=n) as a list, with _TrimmedMatcher's matching
    (head_tail: passed on to it)."""
    out: list[str] = []
    for group in _TrimmedMatcher(a, b, head_tail).get_grouped_opcodes(n):
        if not out:
            out += ["--- a/train.py\n", "+++ b/train.py\n"]
        first, last = group[0], group[-1]
        out.append(f"@@ -{difflib._format_range_unified(first[1], last[2])} "
                   f"+{difflib._format_range_unified(first[3], last[4])} @@\n")
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                out += [" " + line for line in a[i1:i2]]
                continue
            if tag in ("replace", "delete"):
                out += ["-" + line for line in a[i1:i2]]
            if tag in ("replace", "insert"):
                out += ["+" + line for line in b[j1:j2]]
    return out


def unified_diff(old_source: str, new_source: str) -> tuple[str, int]:
    """Unified diff old → new as (text, number of added + removed lines), git-style paths."""
    return _diff_text(_unified_lines(old_source.splitlines(keepends=True), new_source.splitlines(keepends=True)))


def _diff_text(lines: list[str]) -> tuple[str, int]:
    """_unified_lines' output as unified_diff returns it: (text, number of added + removed lines)."""
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


def _check_structure(tree: ast.Module) -> str:
    """What the fast path may skip for a literal-only edit: train(ctx) defined, nothing forbidden ("" if ok)."""
    return _check_train_def(tree) or _first_offence(tree)


def _check_size(changed: int, max_diff_lines: int) -> str:
    if changed > max_diff_lines:
        return f"diff too large: {changed} changed lines (max {max_diff_lines})"
    return ""


def _check_changed(old_source: str, new_source: str, ast_hash: str) -> str:
    try:  # identical sources were refused before parsing
        old_hash = normalised_ast_hash(old_source)
    except (SyntaxError, ValueError):
        return ""
    if old_hash == ast_hash:
        return "no change to the code (only comments, docstrings or formatting)"
    return ""


def _first_offence(tree: ast.Module) -> str:
    offences = sorted(_Scanner(tree).scan())
    if not offences:
        return ""
    line, _col, _end, what = offences[0]
    return f"forbidden: {what} at line {line}"


class _Scanner(ast.NodeVisitor):
    """Collects (line, col, end col, what) for every forbidden import, name, call or attribute.

    Function parameters shadow builtins (`def forward(self, input)` is fine): a name is
    only forbidden where no enclosing function binds it as a parameter.
    """

    def __init__(self, tree: ast.Module):
        self.tree = tree
        self.aliases = _import_aliases(tree)
        self.params: list[frozenset[str]] = []
        self.found: list[tuple[int, int, int, str]] = []

    def scan(self) -> list[tuple[int, int, int, str]]:
        self.visit(self.tree)
        return self.found

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


def _import_aliases(tree: ast.Module) -> dict[str, str]:
    """Local name → dotted module path for every import in the file (`np` → `numpy`)."""
    aliases = {"np": "numpy"}  # the usual spelling, even before its import is seen
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _forbidden_api(dotted: str) -> str:
    for api in FORBIDDEN_APIS:
        if dotted == api or dotted.startswith(api + "."):
            return api
    return ""


# ---- hashing and helpers ----

def _hash_tree(tree: ast.Module) -> str:
    _strip_docstrings(tree)
    dumped = ast.dump(tree, annotate_fields=True, include_attributes=False)
    return hashlib.sha256(dumped.encode("utf-8")).hexdigest()


def _strip_docstrings(tree: ast.Module) -> None:
    """Drop the leading string expression of the module and of every def/class (in place)."""
    for node in list(_with_bodies(tree)):
        body = node.body
        if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:]


_DEFS = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _with_bodies(tree: ast.Module) -> Iterator[ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]:
    """The module and every def / class in it. A def is a statement, so only statement lists are searched (if,
    for, while, with, try and match bodies), never expressions: a small part of the tree, walked without
    ast.walk's cost."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DEFS):
            yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                stack.extend(c for c in children if isinstance(c, (ast.stmt, ast.excepthandler, ast.match_case)))


def _count_overlapping(text: str, needle: str) -> int:
    count, start = 0, text.find(needle)
    while start != -1:
        count += 1
        start = text.find(needle, start + 1)
    return count


def _preview(text: str, limit: int = 60) -> str:
    first = text.strip().splitlines()[0] if text.strip() else text
    return repr(first if len(first) <= limit else first[:limit] + "…")
