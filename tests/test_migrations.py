"""Migrations on SQLite and PostgreSQL: head equals db/models.py, upgrades keep data, round trips, adoption of a
database made before migrations, and the start-up refusal that names `ratchet db upgrade`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import MetaData, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from db import migrate
from db.models import BudgetLedger, Event, Experiment, Promotion, Run
from db.session import create_tables, make_engine, session_scope

REPO = Path(__file__).resolve().parents[1]
FIRST = "0001"
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def reflect(engine) -> MetaData:
    md = MetaData()
    md.reflect(engine)
    return md


def fill_at_first_revision(engine) -> None:
    """Rows as ratchet wrote them at 0001: a run, a kept and a crashed experiment, an event, a ledger entry,
    a host. Inserted through reflected tables, so JSON and datetimes take each dialect's own path."""
    md = reflect(engine)
    t = md.tables
    with engine.begin() as c:
        c.execute(t["runs"].insert(), [dict(
            id=1, name="main", branch="ratchet/main", workspace="/w", baseline_commit="a" * 40, head_commit="b" * 40,
            head_val_bpb=2.05, head_runs=[2.06, 2.04], noise_sigma=0.006, budget_s=60.0, device="cpu",
            state="paused", pause_reason="lunch", pause_now=False, created_at=T0, updated_at=T0)])
        common = dict(run_id=1, parent_commit="a" * 40, proposer="offline", edit_key="", ast_hash="h", host="local",
                      slot="cpu", cost_usd=0.0, usage={}, attempts=1, workdir="/w/exp", created_at=T0)
        for row in [
            dict(id=1, kind="experiment", status="keep", reason="", commit="b" * 40, description="LR 0.02 → 0.04",
                 hypothesis="faster", diff="-LR = 0.02\n+LR = 0.04\n", seed=1, val_bpb=2.04,
                 decision={"verdict": "keep", "threshold": 0.012}, log_tail="ok", curve=[[0.5, 5.1], [1.0, 4.2]],
                 finished_at=T0, **common),
            dict(id=2, kind="experiment", status="crash", reason="NaN loss", commit="c" * 40, description="d",
                 hypothesis="", diff="", seed=2, decision={}, log_tail="Traceback …", curve=[], **common)]:
            c.execute(t["experiments"].insert(), [row])
        c.execute(t["events"].insert(), [dict(id=1, run_id=1, experiment_id=1, kind="kept", text="✓ kept #1",
                                              payload={"delta": -0.01}, created_at=T0, delivered_at=None,
                                              delivery_ref="", attempts=0)])
        c.execute(t["budget_ledger"].insert(), [dict(id=1, day="2026-01-02", run_id=1, experiment_id=1,
                                                     kind="gpu_seconds", amount=61.5, created_at=T0)])
        c.execute(t["hosts"].insert(), [dict(id=1, name="local", runner="local", address="", slots=1, state="up",
                                             last_error="", last_seen=T0)])
        if engine.dialect.name == "postgresql":  # explicit ids: move the sequences past them
            for table in ("runs", "experiments", "events", "budget_ledger", "hosts"):
                c.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 10)"))


def assert_first_revision_rows(engine) -> None:
    """The rows of fill_at_first_revision read back through the current models."""
    with Session(engine) as s:
        run = s.exec(select(Run)).one()
        assert (run.name, run.state, run.pause_reason, run.head_runs, run.budget_s) == \
            ("main", "paused", "lunch", [2.06, 2.04], 60.0)
        assert run.created_at == T0
        exps = s.exec(select(Experiment).order_by(Experiment.id)).all()
        assert [(e.id, e.status, e.val_bpb) for e in exps] == [(1, "keep", 2.04), (2, "crash", None)]
        assert exps[0].decision == {"verdict": "keep", "threshold": 0.012}
        assert exps[0].curve == [[0.5, 5.1], [1.0, 4.2]] and exps[0].diff == "-LR = 0.02\n+LR = 0.04\n"
        assert exps[0].description == "LR 0.02 → 0.04" and exps[1].log_tail == "Traceback …"
        ev = s.exec(select(Event)).one()
        assert (ev.kind, ev.text, ev.payload, ev.experiment_id) == ("kept", "✓ kept #1", {"delta": -0.01}, 1)
        assert s.exec(select(BudgetLedger)).one().amount == 61.5


# ---- head equals the models ----


def test_upgrade_empty_database_to_head_matches_models(db_url):
    eng = make_engine(db_url)
    st = migrate.schema_state(eng)
    assert st.empty and st.current is None and st.head == migrate.revisions()[-1]
    assert migrate.upgrade(eng) == st.head
    assert migrate.schema_diff(eng) == []  # compare_metadata: no table, column, type, index, unique or FK differs
    assert set(migrate.schema_state(eng).tables) == _model_tables()
    migrate.check_schema(eng)  # no error at head
    assert migrate.upgrade(eng) == st.head  # idempotent


def _model_tables() -> set[str]:
    from sqlmodel import SQLModel

    return set(SQLModel.metadata.tables)


def test_apscheduler_table_is_left_alone(db_url):
    eng = make_engine(db_url)
    migrate.upgrade(eng)
    with eng.begin() as c:  # the scheduler's job store lives in the same database
        c.execute(text("CREATE TABLE apscheduler_jobs (id VARCHAR(191) PRIMARY KEY, next_run_time FLOAT, "
                       "job_state BYTEA)" if eng.dialect.name == "postgresql" else
                       "CREATE TABLE apscheduler_jobs (id VARCHAR(191) PRIMARY KEY, next_run_time FLOAT, "
                       "job_state BLOB)"))
    assert migrate.schema_diff(eng) == []  # autogenerate would otherwise propose dropping it
    migrate.downgrade(eng, "base")
    assert "apscheduler_jobs" in inspect(eng).get_table_names()
    assert migrate.schema_state(eng).empty  # still counts as brand new for start-up


def test_create_tables_equals_migrations_and_is_stamped(db_url):
    eng = make_engine(db_url)
    create_tables(eng)
    create_tables(eng)  # idempotent
    st = migrate.schema_state(eng)
    assert st.at_head
    assert migrate.schema_diff(eng) == []


def test_every_revision_has_a_docstring_and_one_head():
    revs = list(migrate.script_directory().walk_revisions())
    assert len(migrate.script_directory().get_heads()) == 1
    assert [r.revision for r in reversed(revs)] == [f"{i:04d}" for i in range(1, len(revs) + 1)]
    for r in revs:
        assert r.doc and migrate.describe(r.revision) != r.revision
        assert "sqlmodel" not in Path(r.path).read_text()  # revisions are frozen: they never import the app


# ---- upgrading data ----


def test_upgrade_keeps_the_data_of_the_first_revision(db_url):
    eng = make_engine(db_url)
    assert migrate.upgrade(eng, FIRST) == FIRST
    fill_at_first_revision(eng)
    with pytest.raises(migrate.SchemaError, match=r"database schema is at 0001 .* run `ratchet db upgrade`"):
        migrate.check_schema(eng)
    assert migrate.upgrade(eng) == migrate.head_revision()
    assert migrate.schema_diff(eng) == []
    assert_first_revision_rows(eng)
    with Session(eng) as s:  # what 0002 added, on rows that existed before it
        assert s.exec(select(Run)).one().promoted_commit == ""
        e = s.get(Experiment, 1)
        assert (e.scale, e.scale_overrides, e.budget_s, e.promotion_id) == ("", {}, None, None)
    with session_scope(eng) as s:  # and the new table and foreign key work
        p = Promotion(run_id=1, candidate_exp_id=1, candidate_commit="b" * 40, reference_commit="a" * 40,
                      scale="s1", scale_overrides={"depth_mult": 1.5}, budget_s=180.0)
        s.add(p)
        s.flush()
        s.add(Experiment(run_id=1, kind="promotion", promotion_id=p.id, scale="s1", budget_s=180.0))
    with pytest.raises(IntegrityError):
        with session_scope(eng) as s:
            s.add(Experiment(run_id=1, kind="promotion", promotion_id=999))


def test_downgrade_upgrade_round_trip_with_data(db_url):
    eng = make_engine(db_url)
    migrate.upgrade(eng, FIRST)
    fill_at_first_revision(eng)
    migrate.upgrade(eng)
    with session_scope(eng) as s:
        s.get(Run, 1).promoted_commit = "b" * 40
    with session_scope(eng) as s:  # a confirm run and its candidate: the column 0003 adds
        s.add(Experiment(run_id=1, kind="confirm", confirms_id=1, status="keep", val_bpb=2.1))
    indexes = {i["name"] for i in inspect(eng).get_indexes("experiments")}
    assert {"ix_experiments_run_id_ast_hash", "ix_experiments_run_id_status"} <= indexes  # 0004's
    assert "ix_experiments_run_id_parent_commit" in indexes  # 0005's
    assert "ix_experiments_run_id_commit_device_name" in indexes and "ix_experiments_run_id_commit" not in indexes
    with Session(eng) as s:  # 0007's column, on rows that existed before it
        assert {e.direction for e in s.exec(select(Experiment)).all()} == {""}
    assert "ix_experiments_run_id_device_name" in indexes  # 0006's
    with session_scope(eng) as s:  # 0006's columns: a result's hardware class and the per-class σ
        s.add(Experiment(run_id=1, kind="experiment", status="keep", val_bpb=2.0, device_name="NVIDIA H100 x1"))
        s.get(Run, 1).class_sigma = {"NVIDIA H100 x1": 0.002}
    assert migrate.downgrade(eng, "-1") == "0007"  # 0008: the two-column commit index again
    assert "ix_experiments_run_id_commit" in {i["name"] for i in inspect(eng).get_indexes("experiments")}
    assert migrate.downgrade(eng, "-1") == "0006"
    assert "direction" not in {c["name"] for c in inspect(eng).get_columns("experiments")}
    assert migrate.downgrade(eng, "-1") == "0005"
    assert not {"device_name", "hardware"} & {c["name"] for c in inspect(eng).get_columns("experiments")}
    assert "class_sigma" not in {c["name"] for c in inspect(eng).get_columns("runs")}
    with eng.begin() as c:
        c.execute(text("DELETE FROM experiments WHERE kind = 'experiment' AND val_bpb = 2.0"))
    assert migrate.downgrade(eng, "-1") == "0004"
    assert not {"ix_experiments_run_id_commit", "ix_experiments_run_id_parent_commit"} & {
        i["name"] for i in inspect(eng).get_indexes("experiments")}
    assert migrate.downgrade(eng, "-1") == "0003"
    assert not {"ix_experiments_run_id_ast_hash", "ix_experiments_run_id_status"} & {
        i["name"] for i in inspect(eng).get_indexes("experiments")}
    assert migrate.downgrade(eng, "-1") == "0002"
    assert "confirms_id" not in {c["name"] for c in inspect(eng).get_columns("experiments")}
    assert migrate.downgrade(eng, FIRST) == FIRST
    cols = {c["name"] for c in inspect(eng).get_columns("experiments")}
    assert "scale" not in cols and "promotions" not in inspect(eng).get_table_names()
    with eng.connect() as c:
        assert c.execute(text("SELECT count(*) FROM experiments")).scalar() == 3  # the confirm run's row too
    with eng.begin() as c:
        c.execute(text("DELETE FROM experiments WHERE kind = 'confirm'"))  # back to fill_at_first_revision's rows
    assert migrate.upgrade(eng) == migrate.head_revision()
    assert migrate.schema_diff(eng) == []
    assert_first_revision_rows(eng)
    assert migrate.downgrade(eng, "base") is None
    assert migrate.schema_state(eng).tables == []
    assert migrate.upgrade(eng) == migrate.head_revision() and migrate.schema_diff(eng) == []


def test_database_made_before_migrations_is_adopted(db_url):
    """create_all of the 0001-era models left tables and no alembic_version: upgrade recognises them."""
    eng = make_engine(db_url)
    migrate.upgrade(eng, FIRST)
    fill_at_first_revision(eng)
    with eng.begin() as c:
        c.execute(text("DROP TABLE alembic_version"))
    with pytest.raises(migrate.SchemaError, match="no schema version .*run `ratchet db upgrade`"):
        migrate.check_schema(eng)
    assert migrate.adopt_revision(eng) == FIRST
    assert migrate.upgrade(eng) == migrate.head_revision()
    assert migrate.schema_diff(eng) == []
    assert_first_revision_rows(eng)


def test_unknown_tables_are_not_adopted(tmp_path):
    eng = make_engine(f"sqlite:///{tmp_path / 'odd.db'}")
    with eng.begin() as c:
        c.execute(text("CREATE TABLE runs (id INTEGER PRIMARY KEY, colour TEXT)"))
    with pytest.raises(migrate.SchemaError, match="match no revision .*unexpected \\['runs.colour'\\]"):
        migrate.upgrade(eng)


def test_newer_database_is_refused(tmp_path):
    eng = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    migrate.upgrade(eng)
    with eng.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(migrate.SchemaError, match="0099, which this version of ratchet does not know"):
        migrate.ensure_schema(eng)


# ---- start-up ----


def test_open_database_upgrades_only_a_new_empty_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    eng = migrate.open_database(url)  # brand new: migrated at once
    assert migrate.schema_state(eng).at_head
    migrate.downgrade(eng, FIRST)
    with pytest.raises(migrate.SchemaError) as e:
        migrate.open_database(url)
    assert str(e.value) == ("database schema is at 0001 (initial tables), this version needs "
                            f"{migrate.describe(migrate.head_revision())}: run `ratchet db upgrade`")
    assert migrate.current_revision(eng) == FIRST  # refused, not touched


def test_open_database_masks_the_password():
    with pytest.raises(migrate.SchemaError) as e:
        migrate.open_database("postgresql://ratchet:s3cret-pw@127.0.0.1:1/ratchet?connect_timeout=2")
    assert "s3cret-pw" not in str(e.value) and "cannot open the database" in str(e.value)


def cli(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_serve_refuses_an_out_of_date_schema_and_names_the_fix(db_url, tmp_path, data_dir):
    from tests.test_serve import serve_env

    home = tmp_path / "home"
    env = serve_env(home, data_dir, RATCHET_DATABASE_URL=db_url)
    eng = make_engine(db_url)
    migrate.upgrade(eng, FIRST)
    fill_at_first_revision(eng)

    p = cli("serve", "--max-experiments", "1", env=env)
    assert p.returncode == 2, p.stdout + p.stderr
    head = migrate.describe(migrate.head_revision())
    assert f"database schema is at 0001 (initial tables), this version needs {head}: run `ratchet db upgrade`" \
        in p.stderr
    assert migrate.current_revision(eng) == FIRST and not (home / "workspace").exists()  # nothing started

    p = cli("db", "current", env=env)
    assert p.returncode == 1 and "run `ratchet db upgrade`" in p.stdout
    p = cli("db", "upgrade", env=env)
    assert p.returncode == 0, p.stderr
    assert f"0001 (initial tables) → {head}" in p.stdout
    p = cli("db", "current", env=env)
    assert p.returncode == 0 and f"{head} (head)" in p.stdout
    assert_first_revision_rows(eng)


def test_db_cli_downgrade_and_adopt(tmp_path):
    env = {**__import__("os").environ, "RATCHET_HOME": str(tmp_path)}
    env.pop("RATCHET_DATABASE_URL", None)
    assert cli("db", "upgrade", env=env).returncode == 0
    p = cli("db", "downgrade", FIRST, env=env)
    assert p.returncode == 0 and "→ 0001 (initial tables)" in p.stdout
    eng = make_engine(f"sqlite:///{tmp_path / 'ratchet.db'}")
    with eng.begin() as c:
        c.execute(text("DROP TABLE alembic_version"))
    p = cli("db", "upgrade", env=env)
    assert p.returncode == 0 and "none (tables made before migrations) → " in p.stdout
    p = cli("db", "upgrade", env=env)
    assert "nothing to do" in p.stdout


# ---- new revisions ----


def test_new_revision_autogenerates_from_the_models(tmp_path, monkeypatch):
    """`ratchet db revision -m` on a copy of the migrations: with the models at head there is nothing to do;
    the next id follows the last one."""
    copy = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(migrate, "MIGRATIONS", copy)
    head = migrate.head_revision()
    path = migrate.new_revision("nothing pending")
    assert path.parent == copy / "versions" and path.name.startswith(f"{int(head) + 1:04d}_nothing_pending")
    body = path.read_text()
    assert f"down_revision: Union[str, Sequence[str], None] = {head!r}" in body
    upgrade = body.split("def upgrade() -> None:")[1].split("def downgrade")[0]
    assert "op." not in upgrade and "pass" in upgrade  # the models add nothing the revisions lack
    assert migrate.head_revision() == f"{int(head) + 1:04d}"
