"""``countercache check`` and ``reconcile`` on the forum of ``forum.py``.

Prints each command and what it printed, as in a terminal. The docs show
this transcript (``repair_cli.out``); the tests run the script and compare.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": str(HERE), "COLUMNS": "80", "NO_COLOR": "1"}


def run(*argv: str, expect: int) -> None:
    print("$", shlex.join(a if not a.startswith("/") else Path(a).name for a in argv))
    if argv[0] == "countercache":
        argv = (sys.executable, "-m", "countercache.cli", *argv[1:])
    else:
        argv = (sys.executable, *argv[1:])
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    print(done.stdout + done.stderr, end="")
    print(f"$ echo $?\n{done.returncode}\n")
    assert done.returncode == expect, done.returncode


URL = "sqlite:///forum.db"
run("python", str(HERE / "forum.py"), expect=0)
run("countercache", "check", "--url", URL, "--models", "forum", expect=1)
run("countercache", "check", "--url", URL, "--models", "forum", "--json", expect=1)
run("countercache", "reconcile", "--url", URL, "--models", "forum",
    "--counter", "Forum.post_count", "--dry-run", expect=1)
run("countercache", "reconcile", "--url", URL, "--models", "forum", expect=0)
run("countercache", "check", "--url", URL, "--models", "forum", expect=0)
