"""The command line, run as a subprocess the way users run it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import sqlalchemy as sa


def countercache(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "countercache.cli", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def test_demo_on_each_backend(engine, tmp_path):
    url = engine.url.render_as_string(hide_password=False)
    engine.dispose()
    done = countercache("demo", "--url", url)
    assert done.returncode == 0, done.stderr
    assert "every counter equals its real count" in done.stdout
    for strategy in ("bulk", "per_row"):
        assert f"strategy '{strategy}'" in done.stdout
    assert "≠" not in done.stdout


def tables(engine):
    return set(sa.inspect(engine).get_table_names())


@pytest.mark.parametrize("migrate", [False, True], ids=["create_all", "migrate"])
def test_demo_refuses_a_database_it_did_not_create(engine, migrate):
    """Issue 17: pointed at a copy of an application's database, the demo
    replaced its ``users`` table (and ``alembic_version`` with --migrate)."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE users (id INTEGER PRIMARY KEY, email VARCHAR(100))"))
        conn.execute(sa.text("INSERT INTO users (id, email) VALUES (1, 'a@example.com')"))
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('app_rev_42')"))
    url = engine.url.render_as_string(hide_password=False)
    done = countercache("demo", "--url", url, "--strategy", "bulk", *(["--migrate"] if migrate else []))
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "holds tables the demo did not create (alembic_version, users)" in lines[0], lines[0]
    assert tables(engine) == {"users", "alembic_version"}
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id, email FROM users")).all() == [(1, "a@example.com")]
        assert conn.scalar(sa.text("SELECT version_num FROM alembic_version")) == "app_rev_42"


def test_demo_runs_again_on_its_own_database_only(engine):
    url = engine.url.render_as_string(hide_password=False)
    for args in (("--strategy", "bulk"), ("--strategy", "deferred", "--migrate")):
        done = countercache("demo", "--url", url, *args)
        assert done.returncode == 0, done.stderr
    assert tables(engine) == {"users", "questions", "countercache_shards", "alembic_version",
                              "countercache_demo"}
    with engine.begin() as conn:  # somebody else's table in the demo's database
        conn.execute(sa.text("CREATE TABLE invoices (id INTEGER PRIMARY KEY)"))
    done = countercache("demo", "--url", url, "--strategy", "bulk")
    assert done.returncode == 2 and "did not create (invoices)" in done.stderr, done.stderr
    assert "invoices" in tables(engine)


def test_demo_help_says_what_it_writes():
    done = countercache("demo", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for name in ("users", "questions", "countercache_shards", "alembic_version", "countercache_demo"):
        assert name in text
    assert "refuses" in text


def test_no_arguments_prints_usage_and_the_commands():
    """Issue 17: was only "the following arguments are required: command"."""
    done = countercache()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("usage: countercache"), done.stderr
    for command in ("demo", "check", "reconcile", "fold", "bench"):
        assert f"\n    {command} " in done.stderr or f"\n    {command}\n" in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "countercache: error: a command is required"


def test_demo_default_is_sqlite_and_one_strategy():
    done = countercache("demo", "--strategy", "per_row")
    assert done.returncode == 0, done.stderr
    assert "sqlite" in done.stdout and "strategy 'per_row'" in done.stdout
    assert "strategy 'bulk'" not in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("demo", "--strategy", "sometimes"), "invalid choice: 'sometimes'"),
        (("demo", "--url", "postgresql+psycopg://nobody@127.0.0.1:1/none"), "connection"),
        (("demo", "--url", "nosuchdialect://x"), "error"),
        (("frobnicate",), "invalid choice"),
        # (an application's settings often hold an async URL: one line, not SQLAlchemy's greenlet error)
        (("demo", "--url", "postgresql+asyncpg://postgres@127.0.0.1/x"), "postgresql+asyncpg is an async driver"),
        (("check", "--url", "sqlite+aiosqlite:////tmp/cc_cli_x.db", "--models", "tests/cli_models.py"),
         "sqlite+aiosqlite is an async driver"),
        # (a mistyped SQLite path: not created empty by a check)
        (("check", "--url", "sqlite:////tmp/cc_cli_no_such_dir/typo.db", "--models", "tests/cli_models.py"),
         "no SQLite database file /tmp/cc_cli_no_such_dir/typo.db"),
    ],
)
def test_errors_are_one_line_exit_2(args, message):
    done = countercache(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("countercache: error:"), done.stderr
    assert message in lines[0]
    assert "Traceback" not in done.stderr
    assert not os.path.exists("/tmp/cc_cli_no_such_dir")
