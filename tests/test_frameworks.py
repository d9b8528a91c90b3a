"""Flask-SQLAlchemy and SQLModel (issue 17): the docs' examples on every
backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_counts

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def run_example(name: str, url: str, cwd: Path) -> str:
    """Run ``docs/examples/<name>`` on ``url``; it prints what its ``.out`` shows."""
    done = subprocess.run([sys.executable, str(EXAMPLES / name), url], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = "\n".join(line.rstrip() for line in done.stdout.splitlines()).strip()
    assert printed == (EXAMPLES / name).with_suffix(".out").read_text().strip()
    return printed


def url_of(engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def test_flask_example(engine, tmp_path):
    run_example("flask_app.py", url_of(engine), tmp_path)
    assert assert_counts(engine) == {1: 4}
