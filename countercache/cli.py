"""The ``countercache`` command line.

``countercache demo [--url URL] [--strategy bulk|per_row|deferred] [--migrate]`` runs the example
Q&A application (on a SQLite file by default) and shows its counters beside
the real counts (``--migrate``: schema by ``alembic upgrade head`` with the
checkout's ``migrations/``). Errors print one line on stderr and exit with code 2.

``countercache bench [--url URL] [--workload NAME ...] [--contender NAME ...]
[--repeat N] [--children N] [--parents N] [--json] [--plot FILE.png]`` times
the counters against the alternatives; it runs the ``bench`` package of the
source checkout (``bench/`` next to ``countercache/``), which parses its own
options (``countercache bench --help``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .config import STRATEGIES
from .errors import CounterCacheError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"countercache: error: {message}\n")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="countercache", description="Counter columns kept exact by SQLAlchemy.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = commands.add_parser("demo", help="run the example Q&A application and show its counters")
    demo.add_argument("--url", help="database URL (default: a SQLite file in the temp directory)")
    demo.add_argument("--strategy", choices=STRATEGIES, help="one strategy (default: each in turn)")
    demo.add_argument(
        "--migrate", action="store_true",
        help="create the schema with `alembic upgrade head` (migrations/) instead of create_all",
    )
    commands.add_parser(
        "bench", add_help=False,  # its options and --help belong to bench.main
        help="time the counters against the alternatives (source checkout only; see bench --help)",
    )
    return parser


def _bench(argv: list[str]) -> int:
    """Run ``bench.main.main(argv)`` from the source checkout this package lives in."""
    import importlib

    from . import __file__ as package_file

    bench_dir = Path(package_file).resolve().parent.parent / "bench"
    if not (bench_dir / "main.py").is_file():
        raise CounterCacheError(
            f"the bench package is not at {bench_dir}: `countercache bench` runs from a "
            "source checkout (pip install -e .)"
        )
    root = str(bench_dir.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    bench_main = importlib.import_module("bench.main")
    if Path(bench_main.__file__).resolve().parent != bench_dir:
        raise CounterCacheError(
            f"`import bench` found {Path(bench_main.__file__).parent}, not {bench_dir}"
        )
    return int(bench_main.main(argv, prog="countercache bench"))


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from sqlalchemy import create_engine

    from . import demo

    url = args.url or "sqlite:///" + os.path.join(tempfile.gettempdir(), "countercache-demo.sqlite")
    engine = create_engine(url)
    console = Console()
    console.print(f"countercache demo on [bold]{engine.url.render_as_string()}[/bold]")
    runs = [demo.run(engine, s, migrate=args.migrate) for s in ([args.strategy] if args.strategy else STRATEGIES)]
    engine.dispose()

    for run in runs:
        table = Table(title=f"strategy {run.strategy!r}: {run.transactions} transactions")
        table.add_column("user")
        table.add_column("question_count", justify="right")
        table.add_column("SELECT count(*)", justify="right")
        table.add_column("", justify="center")
        for name, stored, real in run.rows:
            table.add_row(name, str(stored), str(real), "[green]=[/green]" if stored == real else "[red]≠[/red]")
        console.print(table)

    kinds = sorted({k for run in runs for k in run.statements})
    stats = Table(title="statements emitted by the whole script")
    stats.add_column("statement")
    for run in runs:
        stats.add_column(run.strategy, justify="right")
    for kind in kinds:
        stats.add_row(kind, *(str(run.statements.get(kind, 0)) for run in runs))
    console.print(stats)
    exact = all(run.exact for run in runs)
    console.print("[green]every counter equals its real count[/green]" if exact else "[red]drift found[/red]")
    return 0 if exact else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "bench":
            return _bench(rest)
        if args.command == "demo":
            return _demo(args)
    except (CounterCacheError, OSError) as exc:
        sys.stderr.write(f"countercache: error: {exc}\n")
        return 2
    except Exception as exc:  # a database or driver error: one line, no traceback
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(exc, (SQLAlchemyError, ImportError)):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            sys.stderr.write(f"countercache: error: {first}\n")
            return 2
        raise
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
