"""Tests of the backend fixtures in tests/conftest.py themselves."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from typing import Optional
from sqlalchemy import ForeignKey
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

REPO = Path(__file__).resolve().parent.parent


def _make_tables(conn) -> sa.MetaData:
    md = sa.MetaData()
    parent = sa.Table(
        "cc_parent", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("n", sa.Integer, nullable=False, server_default="0"),
    )
    sa.Table(
        "cc_child", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("parent_id", sa.Integer, sa.ForeignKey(parent.c.id), nullable=False),
    )
    md.create_all(conn)
    return md


def test_select_one(engine, backend):
    expected = {"sqlite": "sqlite", "postgresql": "postgresql", "mariadb": "mysql"}[backend]
    assert engine.dialect.name in (expected, "mariadb")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    assert engine.pool.checkedout() == 0
    # server backends point at the host/port given by the environment
    # (tests/run.py rewrites them when it starts a throwaway server)
    prefix = {"postgresql": "COUNTERCACHE_PG", "mariadb": "COUNTERCACHE_MYSQL"}.get(backend)
    if prefix:
        default_port = {"postgresql": 5432, "mariadb": 3306}[backend]
        assert engine.url.port == int(os.environ.get(f"{prefix}_PORT") or default_port)
        assert engine.url.host == (os.environ.get(f"{prefix}_HOST") or "127.0.0.1")
        assert engine.url.database.startswith("countercache_test")


def test_recorder_counts_executemany_once(engine, statements, real_count):
    with engine.begin() as conn:
        md = _make_tables(conn)
        conn.execute(md.tables["cc_parent"].insert(), [{"id": i} for i in range(1, 6)])
    parent = md.tables["cc_parent"]
    upd = parent.update().where(parent.c.id == sa.bindparam("pid")).values(n=sa.bindparam("new_n"))
    with statements.record() as rec:
        with engine.begin() as conn:
            conn.execute(upd, [{"pid": i, "new_n": i * 10} for i in range(1, 6)])
            conn.execute(sa.text("UPDATE cc_parent SET n = n + 1 WHERE id = 1"))
            conn.execute(sa.select(sa.func.count()).select_from(parent))
        # real_count runs on its own connection and is not recorded
        assert real_count("SELECT count(*) FROM cc_parent WHERE n > :x", x=20) == 3
    assert len(rec) == 3, rec
    assert [many for _, _, many in rec] == [True, False, False]
    assert len(rec.updates_to("cc_parent")) == 2
    assert rec.updates_to("cc_child") == []
    assert rec.updates_to("cc_paren") == []
    # the listener is gone after the block
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    assert len(rec) == 3


def test_updates_to_matches_quoted_names():
    from conftest import Recording

    rec = Recording([
        ('UPDATE "Post" SET x=1', {}, False),
        ("update `post` set x=1", {}, False),
        ("UPDATE post SET x=1", {}, False),
        ("UPDATE main.post SET x=1", {}, False),
        ("UPDATE posts SET x=1", {}, False),
        ("SELECT 1 FROM post", {}, False),
    ])
    assert len(rec.updates_to("post")) == 4
    assert len(rec) == 6


@pytest.mark.parametrize("round_", [1, 2])
def test_tables_are_dropped_between_tests(engine, backend, round_):
    # whichever round runs second sees what the cleanup after the first left
    with engine.connect() as conn:
        names = sa.inspect(conn).get_table_names()
        assert names == [], f"schema leaked from an earlier test: {names}"
        _make_tables(conn)
        conn.commit()
        assert sorted(sa.inspect(conn).get_table_names()) == ["cc_child", "cc_parent"]


@pytest.mark.postgresql_only
def test_postgresql_only_marker(engine, backend):
    assert backend == "postgresql"


@pytest.mark.mariadb_only
def test_mariadb_only_marker(engine, backend):
    assert backend == "mariadb"


def _run_pytest_subprocess(tmp_path: Path, test_src: str, extra_env: dict[str, str], *args: str):
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(test_src))
    (tmp_path / "conftest.py").write_text(
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location(\n"
        f"    'cc_repo_conftest', {str(REPO / 'tests' / 'conftest.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "globals().update({k: v for k, v in vars(mod).items() if not k.startswith('__')})\n"
    )
    env = dict(os.environ, **extra_env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


_UNREACHABLE_ENV = {
    "COUNTERCACHE_PG_HOST": "127.0.0.1",
    "COUNTERCACHE_PG_PORT": "1",
    "COUNTERCACHE_MYSQL_HOST": "127.0.0.1",
    "COUNTERCACHE_MYSQL_PORT": "1",
}
_INNER = """
    def test_uses_engine(engine):
        pass
"""


def test_unreachable_backend_fails_under_ci(tmp_path):
    res = _run_pytest_subprocess(
        tmp_path, _INNER, dict(_UNREACHABLE_ENV, CI="true"),
        "--backend", "postgresql", "--backend", "mariadb",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "2 failed" in out, out
    assert "postgresql backend unreachable at postgresql+psycopg://postgres@127.0.0.1:1/" in out, out
    assert "mariadb backend unreachable at mysql+pymysql://root@127.0.0.1:1/" in out, out


def test_unreachable_backend_skips_outside_ci(tmp_path):
    res = _run_pytest_subprocess(
        tmp_path, _INNER, dict(_UNREACHABLE_ENV, CI="false", COUNTERCACHE_BACKENDS="postgresql,mariadb"),
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "2 skipped" in out, out
    assert "backend unreachable" in out, out


def test_leaked_connection_fails_the_test(tmp_path):
    res = _run_pytest_subprocess(
        tmp_path,
        """
        import sqlalchemy as sa
        LEAK = []

        def test_leaks(engine):
            conn = engine.connect()
            conn.execute(sa.text("SELECT 1"))
            LEAK.append(conn)

        def test_next_one_is_clean(engine):
            assert engine.pool.checkedout() == 0
        """,
        {"CI": "true"},
        "--backend", "sqlite",
    )
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "1 connection(s) still checked out of the sqlite engine pool" in out, out
    # reported at teardown of the leaking test; the pool is reset for the next
    assert "ERROR at teardown of test_leaks[sqlite]" in out, out
    assert "2 passed" in out and "1 error" in out, out


@pytest.mark.postgresql_only
@pytest.mark.parametrize("strategy", ["bulk", "deferred", "trigger"])
def test_parents_in_a_schema_of_their_own(engine, strategy):
    """PostgreSQL's ``FOR NO KEY UPDATE OF`` takes an unqualified name: the
    key-ordered lock of several parents in a schema locks them by an alias."""
    from countercache import counter_cache as cc

    class Base(DeclarativeBase):
        pass

    class Owner(Base):
        __tablename__ = "owners"
        __table_args__ = {"schema": "ccapp"}
        id: Mapped[int] = mapped_column(primary_key=True)
        pets: Mapped[list["Pet"]] = relationship()
        pet_count: Mapped[int] = cc("pets", strategy=strategy)

    class Pet(Base):
        __tablename__ = "pets"
        __table_args__ = {"schema": "ccapp"}
        id: Mapped[int] = mapped_column(primary_key=True)
        owner_id: Mapped[Optional[int]] = mapped_column(ForeignKey("ccapp.owners.id"))

    with engine.begin() as c:
        c.execute(sa.text("DROP SCHEMA IF EXISTS ccapp CASCADE; CREATE SCHEMA ccapp"))
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            a, b = Owner(), Owner()
            s.add_all([a, b])
            s.flush()
            s.add_all([Pet(owner_id=a.id), Pet(owner_id=b.id), Pet(owner_id=b.id)])
            s.commit()
        with engine.connect() as c:
            rows = c.execute(sa.text("SELECT o.pet_count, (SELECT count(*) FROM ccapp.pets p WHERE p.owner_id = o.id) "
                                 "FROM ccapp.owners o ORDER BY o.id")).all()
        assert [tuple(r) for r in rows] == [(1, 1), (2, 2)]
    finally:
        with engine.begin() as c:
            c.execute(sa.text("DROP SCHEMA IF EXISTS ccapp CASCADE"))
