"""The command line, run as a subprocess the way users run it."""

from __future__ import annotations

import subprocess
import sys

import pytest


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
    ],
)
def test_errors_are_one_line_exit_2(args, message):
    done = countercache(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("countercache: error:"), done.stderr
    assert message in lines[0]
    assert "Traceback" not in done.stderr
