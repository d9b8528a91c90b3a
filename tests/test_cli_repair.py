"""``countercache check`` and ``countercache reconcile``, run as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

TESTS = Path(__file__).resolve().parent


def countercache(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run([sys.executable, "-m", "countercache.cli", *args],
                          capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


@pytest.fixture
def url(engine):
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE cli_forums (id INTEGER PRIMARY KEY, post_count INTEGER NOT NULL DEFAULT 0)"))
        conn.execute(text("CREATE TABLE cli_posts (id INTEGER PRIMARY KEY, forum_id INTEGER REFERENCES cli_forums (id))"))
        conn.execute(text("INSERT INTO cli_forums (id, post_count) VALUES (1, 2), (2, 0), (3, 1)"))
        conn.execute(text("INSERT INTO cli_posts (id, forum_id) VALUES (1, 1), (2, 1), (3, 3)"))
    return engine.url.render_as_string(hide_password=False)


def common(url, *extra):
    return ("--url", url, "--models", "cli_models", *extra)


def test_check_clean_then_drift_then_reconcile(url, engine):
    done = countercache("check", *common(url))
    assert done.returncode == 0, done.stderr
    assert "0 drifted" in done.stdout

    with engine.begin() as conn:  # raw SQL behind the ORM's back
        conn.execute(text("INSERT INTO cli_posts (id, forum_id) VALUES (4, 2), (5, 2)"))
        conn.execute(text("UPDATE cli_forums SET post_count = 9 WHERE id = 3"))

    done = countercache("check", *common(url, "--json", "--batch-size", "2"))
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert doc["drift"] == [
        {"counter": "Forum.post_count", "pk": 2, "stored": 0, "actual": 2},
        {"counter": "Forum.post_count", "pk": 3, "stored": 9, "actual": 1},
    ]
    assert doc["drifted"] == 2

    done = countercache("reconcile", *common(url, "--dry-run", "--counter", "Forum.post_count"))
    assert done.returncode == 1 and "2 drifted" in done.stdout

    done = countercache("reconcile", *common(url, "--json"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["repaired"] == 2

    done = countercache("check", *common(url))
    assert done.returncode == 0 and "0 drifted" in done.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--counter", "Forum.thread_count"),
         "--counter Forum.thread_count: no such counter; the counters of --models: Forum.post_count"),
        (("--batch-size", "0"), "--batch-size must be at least 1, not 0"),
    ],
)
def test_usage_errors_exit_2_with_one_line(url, extra, message):
    done = countercache("check", *common(url, *extra))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"countercache: error: {message}"], done.stderr


@pytest.mark.parametrize("models", ["cli_models.py", "tests/cli_models.py", "TESTS/cli_models.py"])
def test_models_by_file_path(url, models, tmp_path):
    """Issue 17: ``--models blog/models.py`` said "No module named 'blog/models'"."""
    cwd = {"cli_models.py": TESTS, "tests/cli_models.py": TESTS.parent}.get(models, tmp_path)
    models = models.replace("TESTS", str(TESTS))  # an absolute path, outside the working directory
    done = countercache("check", "--url", url, "--models", models, "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counters"] == ["Forum.post_count"]


def test_models_path_that_is_no_file_hints_at_a_dotted_name(url):
    done = countercache("check", "--url", url, "--models", "blog/models.py")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "countercache: error: --models blog/models.py: no such Python file; give the path of "
        "a .py file or a dotted module name (blog.models)"], done.stderr


def test_json_prints_sums_as_numbers(engine):
    """Issue 17: on MariaDB ``SUM()`` comes back as a Decimal, printed as ``"actual": "398"``."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE cli_shops (id INTEGER PRIMARY KEY, revenue INTEGER NOT NULL DEFAULT 0)"))
        conn.execute(text("CREATE TABLE cli_sales (id INTEGER PRIMARY KEY, "
                          "shop_id INTEGER REFERENCES cli_shops (id), amount INTEGER NOT NULL)"))
        conn.execute(text("INSERT INTO cli_shops (id, revenue) VALUES (1, 0), (2, 5)"))
        conn.execute(text("INSERT INTO cli_sales (id, shop_id, amount) VALUES (1, 1, 300), (2, 1, 98)"))
    url = engine.url.render_as_string(hide_password=False)
    done = countercache("check", "--url", url, "--models", "cli_sum_models", "--json")
    assert done.returncode == 1, done.stderr
    assert '"actual": 398' in done.stdout, done.stdout
    assert json.loads(done.stdout)["drift"] == [
        {"counter": "Shop.revenue", "pk": 1, "stored": 0, "actual": 398},
        {"counter": "Shop.revenue", "pk": 2, "stored": 5, "actual": 0},
    ]


@pytest.mark.parametrize(
    "args",
    [
        ("check", "--url", "postgresql+psycopg://nobody@127.0.0.1:1/none", "--models", "cli_models"),
        ("check", "--url", "sqlite://", "--models", "no_such_module"),
        ("reconcile", "--models", "cli_models"),
    ],
)
def test_connection_and_usage_errors(args):
    done = countercache(*args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_without_counter_the_counters_of_the_database_at_url(url, tmp_path):
    """``--models`` of two declarative bases whose tables live in two databases:
    without ``--counter``, those whose tables are at ``--url`` (issue 16)."""
    both = common(url, "--models", "cli_other_models")
    done = countercache("check", *both, "--json")
    assert done.returncode == 0, done.stderr  # (was: exit 2, no such table cli_members)
    assert json.loads(done.stdout)["counters"] == ["Forum.post_count"]
    done = countercache("reconcile", *both, "--counter", "Member.order_count")
    assert done.returncode == 2 and "Member.order_count: no tables cli_members, cli_orders" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    (tmp_path / "empty.db").touch()  # (an empty database: a file that is not there is refused as such)
    done = countercache("check", *common(f"sqlite:///{tmp_path / 'empty.db'}"))
    assert done.returncode == 2 and "no counter has its tables in the database" in done.stderr, done.stderr


def test_json_values_keep_their_precision():
    """A Decimal a float would round is printed as text; others as numbers."""
    from decimal import Decimal

    from countercache.cli import _json_value

    assert json.loads(json.dumps([Decimal("398"), Decimal("12.50"), Decimal("12345678901234567.99")],
                                 default=_json_value)) == [398, 12.5, "12345678901234567.99"]


@pytest.mark.parametrize("source, message", [
    ("x = (\n", "importing it raised SyntaxError: '(' was never closed"),
    ("raise RuntimeError('boom at import')\n", "importing it raised RuntimeError: boom at import"),
])
def test_models_that_fail_to_import_are_one_line_and_exit_2(url, tmp_path, source, message):
    """A --models module whose import raises (a syntax error, its own exception) is a
    usage error: one line, exit 2, not a traceback and 1, which means drift found
    (outside tester)."""
    (tmp_path / "broken_models.py").write_text(source)
    done = countercache("check", "--url", url, "--models", "broken_models", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("countercache: error: --models broken_models: "), done.stderr
    assert message in lines[0], done.stderr
