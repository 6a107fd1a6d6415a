"""pyproject.toml is honest: every third-party import is declared (the package's in `dependencies` or an extra, the
tests' and benchmarks' also in `dev`), every declared dependency is used, and an optional extra's package is imported
only behind a guard that names the extra, so a plain install imports and runs without it."""

from __future__ import annotations

import ast
import functools
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = ("bot", "loop", "trainer", "db")
FIRST_PARTY = set(PACKAGE) | {"tests", "bench"}
NOT_IMPORTED = {"psycopg"}  # SQLAlchemy loads the driver that a postgresql+psycopg:// URL names


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement (PEP 503): "psycopg[binary]>=3.1" → "psycopg"."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
CORE = {_name(r) for r in PROJECT["dependencies"]}
EXTRAS = {k: {_name(r) for r in v if not r.startswith("ratchet[")} for k, v in PROJECT["optional-dependencies"].items()}
DEV = EXTRAS["dev"] | {d for r in PROJECT["optional-dependencies"]["dev"] if r.startswith("ratchet[")
                       for extra in r[len("ratchet["):-1].split(",") for d in EXTRAS[extra]}
OPTIONAL = {d: extra for extra, ds in EXTRAS.items() if extra != "dev" for d in ds}
DISTRIBUTIONS = packages_distributions()  # top-level import name → distributions that install it


def third_party_imports(*dirs: str) -> list:
    """(distribution, file, module ast, import node) for every import of a package that is neither stdlib nor ours."""
    return [found for d in dirs for found in _imports_in(d)]


@functools.cache
def _imports_in(directory: str) -> tuple:
    found = []
    for path in sorted((REPO / directory).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                    dist = _name(DISTRIBUTIONS.get(top, [top])[0])
                    found.append((dist, path.relative_to(REPO), tree, node))
    return tuple(found)


def test_every_third_party_import_is_declared_and_every_dependency_used():
    package = {(dist, str(f)) for dist, f, _, _ in third_party_imports(*PACKAGE)}
    undeclared = sorted(f"{f}: {d}" for d, f in package if d not in CORE and d not in OPTIONAL)
    assert not undeclared, f"imported but not in pyproject's dependencies or an extra: {undeclared}"
    unused = CORE - {d for d, _ in package} - NOT_IMPORTED
    assert not unused, f"declared but never imported by {PACKAGE} (test-only? move it to dev): {sorted(unused)}"
    dev = {(dist, str(f)) for dist, f, _, _ in third_party_imports("tests", "bench")}
    missing = sorted(f"{f}: {d}" for d, f in dev if d not in CORE | DEV)
    assert not missing, f"the tests or benchmarks import what `pip install -e '.[dev]'` does not install: {missing}"


def test_an_optional_extra_is_imported_only_behind_a_guard_that_names_it():
    """Each import of an extra's package sits in `try: … except ImportError:` whose handler names
    `ratchet[<extra>]`, or in a module that already did that at its top (its later imports cannot fail)."""
    bad = []
    for dist, f, tree, node in third_party_imports(*PACKAGE):
        extra = OPTIONAL.get(dist)
        if extra is None or dist in CORE:
            continue
        guards = [t for t in ast.walk(tree) if isinstance(t, ast.Try) and any(
            "ImportError" in ast.unparse(h) and f"ratchet[{extra}]" in ast.unparse(h) for h in t.handlers)]
        guarded = {id(n) for t in guards for stmt in t.body for n in ast.walk(stmt)}
        if id(node) not in guarded and not any(t in tree.body for t in guards):
            bad.append(f"{f}:{node.lineno} ({dist}, extra {extra})")
    assert not bad, f"unguarded imports of optional packages: {bad}"


def test_without_the_extras_the_error_names_the_extra_to_install(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from bot.cli import app
    from bot.doctor import check_runner
    from bot.serve import ServeError, make_runner
    from loop.config import Settings
    from trainer.data import CorpusError, check_parquet

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # None in sys.modules: the import fails
    with pytest.raises(CorpusError, match=re.escape("pip install 'ratchet[parquet]'")):
        check_parquet(tmp_path / "shard_00000.parquet")
    monkeypatch.setenv("RATCHET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RATCHET_CONFIG", raising=False)
    (tmp_path / "shard_00000.parquet").write_bytes(b"PAR1")
    result = CliRunner().invoke(app, ["data", "prepare", "--corpus", f"parquet:{tmp_path}"])
    assert result.exit_code == 2 and "pip install 'ratchet[parquet]'" in result.output  # not eaten as markup

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "loop.runners.ray_runner", raising=False)
    settings = Settings(home=tmp_path, runner="ray")
    with pytest.raises(ServeError, match=re.escape("pip install 'ratchet[ray]'")):
        make_runner(settings)
    [check] = check_runner(settings)
    assert check.status == "fail" and check.fix == "pip install 'ratchet[ray]'"
