"""The documentation: it builds without warnings, and every example in it runs.

* ``sphinx-build -W --keep-going -b html`` into a temporary directory;
* ``sphinx-build -b doctest`` (the ``.. doctest::`` blocks of the pages);
* every script in ``docs/examples/`` runs in a temporary directory and exits
  0; where ``<script>.out`` exists (the pages show it as the script's
  output), the script must print exactly that (trailing spaces aside).
  ``COUNTERCACHE_UPDATE_DOCS=1 pytest tests/test_docs.py`` rewrites the
  ``.out`` files that a page shows from what the scripts print.

Sphinx and furo come with the ``docs`` extra (``pip install -e ".[docs]"``,
which ``tests/run.py`` installs). Without them these tests skip, or fail
under ``CI=true``. The example scripts need no server (SQLite only).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
EXAMPLES = DOCS / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))
UPDATE = os.environ.get("COUNTERCACHE_UPDATE_DOCS", "") == "1"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


@pytest.fixture(scope="module")
def sphinx() -> None:
    missing = [m for m in ("sphinx", "furo") if importlib.util.find_spec(m) is None]
    if missing:
        message = (f"{' and '.join(missing)} not installed: pip install -e \".[docs]\" "
                   "(tests/run.py does)")
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)


def _sphinx_build(builder: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder,
         "-d", str(out / "doctrees"), str(DOCS), str(out / builder)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )


@pytest.mark.slow  # a full Sphinx build
def test_html_builds_without_warnings(sphinx: None, tmp_path: Path) -> None:
    done = _sphinx_build("html", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    pages = {p.stem for p in (tmp_path / "html").glob("*.html")}
    for page in ("index", "quickstart", "strategies", "configuration", "counters", "bulk",
                 "repair", "alembic", "async", "comparison", "api"):
        assert page in pages
    api = (tmp_path / "html" / "api.html").read_text()
    import countercache

    for name in countercache.__all__:  # every public name has its entry
        assert f'id="countercache.{name}"' in api, name
    assert 'id="countercache.alembic.BackfillCounterOp"' in api


def test_doctests_pass(sphinx: None, tmp_path: Path) -> None:
    done = _sphinx_build("doctest", tmp_path)
    report = (tmp_path / "doctest" / "output.txt").read_text() if (
        tmp_path / "doctest" / "output.txt").exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + report
    summary = re.search(r"(\d+) tests\s+0 failures in tests\s+0 failures in setup code\s+"
                        r"0 failures in cleanup code", report)
    assert summary and int(summary.group(1)) > 0, report


def test_every_example_is_shown() -> None:
    pages = "".join(p.read_text() for p in DOCS.glob("*.rst"))
    for script in SCRIPTS:  # the script, or what it prints (repair_cli.py: a transcript)
        out = script.with_suffix(".out")
        assert f"examples/{script.name}" in pages or f"examples/{out.name}" in pages, (
            f"{script.name} is on no page")
        if out.exists():
            assert f"examples/{out.name}" in pages, f"{out.name} is on no page"


@pytest.mark.slow  # every example in a subprocess
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUNTERCACHE_")}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{script.name} exited {done.returncode}\n{done.stdout}{done.stderr}"
    expected = script.with_suffix(".out")
    printed = "\n".join(line.rstrip() for line in done.stdout.splitlines()).strip() + "\n"
    if UPDATE and f"examples/{expected.name}" in "".join(p.read_text() for p in DOCS.glob("*.rst")):
        expected.write_text(printed)
    elif expected.exists():
        shown = "\n".join(line.rstrip() for line in expected.read_text().splitlines()).strip() + "\n"
        assert printed == shown, (f"{script.name} no longer prints what the docs show in "
                                  f"{expected.name}; rerun with COUNTERCACHE_UPDATE_DOCS=1 "
                                  "and check the pages")


def _requirement_names(block: str) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", line.strip(), maxsplit=1)[0].lower()
            for line in block.splitlines() if line.strip()}


def test_docs_extra_imports_every_documented_module() -> None:
    """Issue 17: in a fresh ``pip install -e ".[docs]"``, autodoc could not import
    ``countercache.alembic`` (the extra lacked Alembic). With every package of
    the other extras hidden, each module the pages document imports."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    extras = cfg["options.extras_require"]
    allowed = _requirement_names(cfg["options"]["install_requires"]) | _requirement_names(extras["docs"])
    others = set().union(*(_requirement_names(extras[name]) for name in extras)) - allowed
    # distribution name -> import name (PyMySQL -> pymysql, sqlalchemy-utils -> sqlalchemy_utils)
    hidden = sorted(name.replace("-", "_") for name in others)
    pages = "".join(p.read_text() for p in DOCS.glob("*.rst"))
    documented = set(re.findall(r"^\.\. (?:automodule|currentmodule):: ([\w.]+)", pages, re.M))
    documented |= {name.rpartition(".")[0] for name in re.findall(
        r"^\.\. auto\w+:: (countercache\.[\w.]+)", pages, re.M)}
    script = (
        "import importlib, importlib.abc, sys\n"
        f"HIDDEN = {hidden!r}\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in HIDDEN:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (not in the docs extra)')\n"
        "sys.meta_path.insert(0, Hide())\n"
        f"for module in {sorted(documented)!r}:\n"
        "    importlib.import_module(module)\n"
    )
    assert "countercache.alembic" in documented
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
