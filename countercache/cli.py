"""The ``countercache`` command line.

``countercache demo [--url URL] [--strategy bulk|per_row|deferred|sharded] [--migrate]`` runs the example
Q&A application (on a SQLite file by default) and shows its counters beside
the real counts (``--migrate``: schema by ``alembic upgrade head`` with the
checkout's ``migrations/``). It writes only its own tables (``users``,
``questions``, ``countercache_shards``, ``alembic_version`` with ``--migrate``,
and the marker ``countercache_demo``), dropping and re-creating them on each
run, and refuses a database holding any other table. Errors print one line
on stderr and exit with code 2.

``countercache check|reconcile|fold --url URL --models MODULE [--counter Class.attr]
[--batch-size N] [--json]`` checks, repairs, or folds the shard deltas of
``sharded`` counters into their columns: the counters named, or those whose
tables are in the database at URL.

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
from decimal import Decimal
from pathlib import Path
from typing import Any, Sequence

from . import _registry, repair, scope, shards
from .config import STRATEGIES
from .errors import CounterCacheError


_DEMO_WRITES = (
    "Runs the example Q&A application and shows its counters beside the real counts. "
    "It creates, drops and re-creates on every run the tables users, questions and "
    "countercache_shards (with --migrate also alembic_version), plus a marker table "
    "countercache_demo; it refuses (exit 2) a database that holds any other table, "
    "or these tables without the marker."
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        if self.prog == "countercache" and "required: command" in message:
            # no command at all: the usage and the list of commands, then the error
            sys.stderr.write(self.format_help() + "\n")
            message = "a command is required"
        sys.stderr.write(f"countercache: error: {message}\n")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="countercache", description="Counter columns kept exact by SQLAlchemy.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                     title="commands", metavar="command")
    demo = commands.add_parser(
        "demo", help="run the example Q&A application and show its counters",
        description=_DEMO_WRITES,
    )
    demo.add_argument("--url", help="database URL, empty or used by the demo before "
                                    "(default: a SQLite file in the temp directory)")
    demo.add_argument("--strategy", choices=STRATEGIES, help="one strategy (default: each in turn)")
    demo.add_argument(
        "--migrate", action="store_true",
        help="create the schema with `alembic upgrade head` (migrations/) instead of create_all",
    )
    for name, summary in (
        ("check", "find counters that differ from the real counts (exit 1 when any does)"),
        ("reconcile", "correct counters that differ from the real counts"),
        ("fold", "move the pending shard deltas of sharded counters into their columns"),
    ):
        sub = commands.add_parser(name, help=summary)
        sub.add_argument("--url", required=True, help="database URL")
        sub.add_argument("--models", required=True, action="append",
                         help="the module that declares the models: a dotted name (blog.models) "
                              "or the path of its file (blog/models.py) (repeatable)")
        sub.add_argument("--counter", action="append", default=[],
                         help="Class.attribute of a counter (repeatable; default: every counter "
                              "whose tables are in the database)")
        sub.add_argument("--batch-size", type=int, default=1000,
                         help="parents per batch (default 1000)")
        sub.add_argument("--json", action="store_true", help="print one JSON document")
        if name == "reconcile":
            sub.add_argument("--dry-run", action="store_true",
                             help="only report, like check (exit 1 when drift is found)")
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
    found = Path(str(bench_main.__file__)).resolve().parent
    if found != bench_dir:
        raise CounterCacheError(f"`import bench` found {found}, not {bench_dir}")
    return int(bench_main.main(argv, prog="countercache bench"))


def _sync_url(url: str, *, existing: bool) -> Any:
    """``--url``, refused in one line where the commands cannot use it: an async driver
    (an application's settings often hold one), or (``existing``) a SQLite file that is
    not there, which connecting would create empty."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if getattr(parsed.get_dialect(), "is_async", False):
        raise CounterCacheError(
            f"--url {parsed.render_as_string()}: {parsed.drivername} is an async driver; give the synchronous "
            "one (postgresql+psycopg://, mysql+pymysql://, sqlite://)")
    database = parsed.database or ""
    if existing and parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:") \
            and not database.startswith("file:") and not os.path.exists(database):
        raise CounterCacheError(f"--url {parsed.render_as_string()}: no SQLite database file {database}")
    return parsed


def _load(args: argparse.Namespace) -> tuple[list[Any], Any]:
    """Import ``--models``, resolve ``--counter``, connect: ``(counters, engine)``."""
    import importlib

    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import configure_mappers

    if args.batch_size < 1:
        raise CounterCacheError(f"--batch-size must be at least 1, not {args.batch_size}")
    sys.path.insert(0, os.getcwd())
    for module in args.models:
        try:
            importlib.import_module(_module_name(module))
        except ImportError as exc:
            raise CounterCacheError(f"--models {module}: cannot import it ({exc})") from None
        except CounterCacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - the module's own error while importing: one line, exit 2
            first = (str(exc).strip().splitlines() or [""])[0]
            raise CounterCacheError(f"--models {module}: importing it raised {type(exc).__name__}"
                                    + (f": {first}" if first else "")) from None
    configure_mappers()
    for name in args.counter:  # (a --counter naming no counter fails before connecting)
        try:
            _registry.lookup(name)
        except CounterCacheError as exc:
            known = sorted(c.name for c in _registry.all_counters() if c.parent is not None)
            raise CounterCacheError(f"--counter {exc}; the counters of --models: "
                                    f"{', '.join(known) or 'none'}") from None
    if not any(c.parent is not None for c in _registry.all_counters()):
        raise CounterCacheError(f"--models {', '.join(args.models)}: declares no counter")
    engine = create_engine(_sync_url(args.url, existing=True))
    try:
        with engine.connect() as conn:  # a bad URL or server: one line, exit 2
            conn.execute(text("SELECT 1"))
        # without --counter: the counters whose tables are in this database
        return scope.counters_for(engine, tuple(args.counter)), engine
    except BaseException:
        engine.dispose()
        raise


def _module_name(value: str) -> str:
    """``--models``: a dotted module name as given, or the module of a ``.py`` file's path.

    A file under the working directory is imported by its dotted path from
    there (``blog/models.py`` -> ``blog.models``); one elsewhere from the
    top of its package (the first folder up without an ``__init__.py``).
    """
    if not (value.endswith(".py") or "/" in value or os.sep in value):
        return value
    path = Path(value)
    if path.is_dir() and (path / "__init__.py").is_file():
        path = path / "__init__.py"
    if path.suffix != ".py" or not path.is_file():
        dotted = value.removesuffix(".py").strip("/").replace("/", ".").replace(os.sep, ".")
        raise CounterCacheError(f"--models {value}: no such Python file; give the path of a .py "
                                f"file or a dotted module name ({dotted})")
    path = path.resolve()
    try:
        parts = list(path.with_suffix("").relative_to(Path.cwd().resolve()).parts)
    except ValueError:  # outside the working directory: from the top of its package
        parts = [path.stem]
        folder = path.parent
        while (folder / "__init__.py").is_file():
            parts.insert(0, folder.name)
            folder = folder.parent
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _json_value(value: Any) -> Any:
    """JSON for what drivers return: a Decimal as a number (integral: an int; a
    float where the float is the same number), else, and where a float would
    round it (12345678901234567.99), text: JSON readers parse numbers as floats."""
    if isinstance(value, Decimal):
        if value == value.to_integral_value():
            return int(value)
        as_float = float(value)
        return as_float if Decimal(repr(as_float)) == value else str(value)
    return str(value)


def _fold(args: argparse.Namespace) -> int:
    """``fold``: exit 0 once every pending shard delta found is in its column."""
    import json

    from rich.console import Console

    counters, engine = _load(args)
    folded: dict[str, int] = {}
    console = Console(stderr=True)
    try:
        for counter in counters:
            attribute = getattr(counter.cls, counter.key)
            if console.is_terminal and not args.json:
                with console.status(f"folding {counter.name}") as status:
                    folded[counter.name] = shards.fold(
                        engine, attribute, batch_size=args.batch_size,
                        progress=lambda c, done: status.update(f"folding {c.name}: {done:,} shard rows"))
            else:
                folded[counter.name] = shards.fold(engine, attribute, batch_size=args.batch_size)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps({"folded": folded, "total": sum(folded.values())}))
    else:
        for name, rows in folded.items():
            print(f"{name}: {rows:,} shard row(s) folded")
    return 0


def _repair(args: argparse.Namespace) -> int:
    """``check`` and ``reconcile``: exit 0 when clean (or repaired), 1 on drift found, 2 on error."""
    import json

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
    from sqlalchemy import func, select

    counters, engine = _load(args)
    fix = args.command == "reconcile" and not args.dry_run
    console = Console(stderr=True)
    show_progress = console.is_terminal and not args.json
    drifts: list[repair.Drift] = []
    try:
        if show_progress:
            with Progress(TextColumn("{task.description}"), BarColumn(),
                          TextColumn("{task.completed:,}/{task.total:,} parents"),
                          TimeElapsedColumn(), console=console) as bar:
                for counter in counters:
                    with engine.connect() as conn:
                        total = conn.scalar(
                            select(func.count()).select_from(counter.parent.table)  # type: ignore[union-attr,arg-type]
                        )
                    task = bar.add_task(counter.name, total=total)
                    run = repair.reconcile if fix else repair.check
                    drifts += run(engine, getattr(counter.cls, counter.key),  # type: ignore[arg-type]
                                  batch_size=args.batch_size,
                                  progress=lambda c, done, task=task: bar.update(task, completed=done))  # type: ignore[misc]
        else:
            run = repair.reconcile if fix else repair.check
            drifts = run(engine, *(getattr(c.cls, c.key) for c in counters),  # type: ignore[arg-type]
                         batch_size=args.batch_size)
    finally:
        engine.dispose()

    def name(d: repair.Drift) -> str:
        return d.name

    if args.json:
        doc = {
            "drift": [{"counter": name(d), "pk": d.pk, "stored": d.stored, "actual": d.actual} for d in drifts],
            "counters": [c.name for c in counters],
            "drifted": len(drifts),
            "repaired": len(drifts) if fix else 0,
        }
        print(json.dumps(doc, default=_json_value))
    else:
        out = Console()
        table = Table(title=("repaired" if fix else "drift found") if drifts else None)
        for column in ("counter", "pk", "stored", "actual"):
            table.add_column(column, justify="left" if column == "counter" else "right")
        per_counter: dict[str, int] = {}
        for d in drifts:
            per_counter[name(d)] = per_counter.get(name(d), 0) + 1
        for d in drifts[:50]:
            table.add_row(name(d), str(d.pk), str(d.stored), str(d.actual))
        if drifts:
            out.print(table)
            if len(drifts) > 50:
                out.print(f"... and {len(drifts) - 50} more")
        summary = Table(title="summary")
        summary.add_column("counter")
        summary.add_column("drifted parents", justify="right")
        for counter in counters:
            summary.add_row(counter.name, str(per_counter.get(counter.name, 0)))
        out.print(summary)
        verb = "repaired" if fix else "found"
        out.print(f"{len(drifts)} drifted counter value(s) {verb}", highlight=False)
    return 1 if drifts and not fix else 0


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from sqlalchemy import create_engine

    from . import demo  # (not at the top: importing it declares the demo's models)

    url = args.url or "sqlite:///" + os.path.join(tempfile.gettempdir(), "countercache_demo.sqlite")
    engine = create_engine(_sync_url(url, existing=False))
    console = Console()
    console.print(f"countercache demo on [bold]{engine.url.render_as_string()}[/bold]")
    runs = [demo.run(engine, s, migrate=args.migrate) for s in ([args.strategy] if args.strategy else STRATEGIES)]
    engine.dispose()

    for run in runs:
        table = Table(title=f"strategy {run.strategy!r}: {run.transactions} transactions "
                            "(stored counter / real value)")
        table.add_column("user")
        for name in demo.COUNTERS:
            table.add_column(name, justify="right")
        for user, values in run.rows:
            cells = []
            for stored, real in values.values():
                mark = "[green]=[/green]" if stored == real else "[red]≠[/red]"
                cells.append(f"{stored} {mark} {real}")
            table.add_row(user, *cells)
        console.print(table)
        if run.folded is not None:
            console.print(f"sharded: exact() {'matched' if run.exact_before_fold else '[red]did not match[/red]'} "
                          f"the real values before the fold; fold() moved {run.folded} shard rows into the columns")

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
        if args.command in ("check", "reconcile"):
            return _repair(args)
        if args.command == "fold":
            return _fold(args)
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
