"""The command line of the benchmark.

::

    countercache bench [--url URL] [--workload NAME ...] [--contender NAME ...]
                       [--repeat N] [--children N] [--parents N]
                       [--processes N | --workers N] [--threads [N]] [--seconds S]
                       [--latency-ms X] [--json] [--plot FILE.png]

The default workloads are batch, txn, delete, move and noop; ``hot`` (N
worker processes committing small transactions against one parent for S
seconds, reported in transactions per second; ``--threads``: N threads of
one process instead) runs only when named: ``--workload hot``.
``--latency-ms X`` (database servers only) puts one loopback proxy
(:mod:`bench.latency`) between every contender and the database, delaying
each direction by X ms (0: counting only), and reports round trips per
transaction next to the times. Default database: a SQLite file in the temp
directory. Usage and connection errors print one line on stderr and exit
with code 2. Exit code 1 when a countercache strategy drifted or failed,
else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from .workloads import DEFAULT_WORKLOADS, WORKLOADS, Sizes


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"countercache: error: {message}\n")
        raise SystemExit(2)


def _positive(minimum: int) -> Any:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {number}")
        return number

    return parse


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {value}")
    return number


def _latency(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return number


def parser(prog: str = "countercache bench") -> argparse.ArgumentParser:
    from .contenders import contender_names, every_contender_name

    p = _Parser(
        prog=prog,
        description="Time countercache against the alternatives (median of repetitions, "
        "ratio to no counter in the same run) and check every counter afterwards.",
    )
    p.add_argument("--url", help="database URL (default: a SQLite file in the temp directory)")
    p.add_argument("--workload", action="extend", nargs="+", metavar="NAME", choices=list(WORKLOADS),
                   help=f"workloads to run (default: {', '.join(DEFAULT_WORKLOADS)}; "
                   f"also: {', '.join(w for w in WORKLOADS if w not in DEFAULT_WORKLOADS)})")
    p.add_argument("--contender", action="extend", nargs="+", metavar="NAME", choices=every_contender_name(),
                   help=f"contenders to run (default: all of {', '.join(contender_names())}; "
                   "also: sharded4, sharded64, trigger; `none` is always added)")
    p.add_argument("--repeat", type=_positive(1), default=3, help="repetitions (median taken; default 3)")
    p.add_argument("--children", type=_positive(2), default=10_000,
                   help="children per batch (txn: a tenth, delete/move: a half; default 10000)")
    p.add_argument("--parents", type=_positive(2), default=100, help="parents (default 100)")
    p.add_argument("--processes", "--workers", dest="workers", type=_positive(1), default=8, metavar="N",
                   help="hot: worker processes on the one parent, each with its own pool (default 8; "
                   "--workers is the same)")
    p.add_argument("--threads", nargs="?", type=_positive(1), const=0, default=None, metavar="N",
                   help="hot: run the workers as threads of one process sharing one Engine "
                   "(the old mode); N sets their count")
    p.add_argument("--seconds", type=_seconds, default=5.0,
                   help="hot: measured seconds per run, after a warm-up of a fifth of it (at most 1 s; default 5)")
    p.add_argument("--latency-ms", type=_latency, default=None, metavar="X",
                   help="route every connection through a loopback proxy delaying each direction by X ms "
                   "(0: no delay, round trips still counted) and report round trips per transaction; "
                   "database servers only")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--plot", metavar="FILE.png", help="draw the ratios into a PNG file (matplotlib)")
    return p


def default_url() -> str:
    return "sqlite:///" + os.path.join(tempfile.gettempdir(), "countercache-bench.sqlite")


def main(argv: Sequence[str] | None = None, prog: str = "countercache bench") -> int:
    args = parser(prog).parse_args(argv)
    try:
        return _run(args)
    except Exception as exc:  # a database or driver error: one line, no traceback
        from sqlalchemy.exc import ArgumentError, SQLAlchemyError

        from countercache.errors import CounterCacheError

        if isinstance(exc, (SQLAlchemyError, ArgumentError, CounterCacheError, ImportError, OSError)):
            text = str(exc).strip()
            first = text.splitlines()[0] if text else type(exc).__name__
            sys.stderr.write(f"countercache: error: {first}\n")
            return 2
        raise


def _run(args: argparse.Namespace) -> int:
    url = args.url or default_url()
    if args.latency_ms is None:
        return _run_at(args, url, None)
    from .latency import LatencyProxy, target_of

    try:
        host, port = target_of(url)
    except ValueError as exc:  # SQLite: a usage error like the others
        parser().error(str(exc))
    with LatencyProxy(host, port, args.latency_ms) as proxy:
        return _run_at(args, url, proxy)


def _run_at(args: argparse.Namespace, url: str, proxy: Any) -> int:
    """The run, against ``url`` directly or (``proxy``) through the latency proxy."""
    from rich.console import Console

    from countercache.config import ALL_STRATEGIES

    from . import contenders as contenders_mod
    from . import report, runner

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("--plot needs matplotlib: pip install -e '.[bench]'") from None
    shown_url = url
    if proxy is not None:
        url = proxy.url(url)
    probed = runner.probe(url)  # connection errors surface here, before any model is declared
    wanted = set(args.contender or contenders_mod.contender_names()) | {"none"}
    chosen = [c for c in contenders_mod.all_contenders() if c.name in wanted]
    workloads = [w for w in WORKLOADS if w in set(args.workload or DEFAULT_WORKLOADS)]
    sizes = Sizes(children=args.children, parents=args.parents, workers=args.threads or args.workers,
                  seconds=args.seconds, threads=args.threads is not None)

    through: dict[str, Any] = {"shown_url": shown_url}
    if proxy is not None:
        through.update(trips=lambda: proxy.round_trips, latency_ms=args.latency_ms)
    err = Console(stderr=True)
    if err.is_terminal and not args.json:
        with err.status("countercache bench") as status:
            result = runner.run(url, chosen, workloads, sizes, args.repeat, probed,
                                progress=lambda m: status.update(f"countercache bench: {m}"), **through)
    else:
        result = runner.run(url, chosen, workloads, sizes, args.repeat, probed, **through)

    if args.json:
        sys.stdout.write(json.dumps(report.as_json(result), indent=2) + "\n")
    else:
        out = Console()
        if not out.is_terminal:
            out = Console(width=200)  # a pipe or a file: do not wrap the table at 80 columns
        report.print_table(result, out)
    if args.plot:
        report.plot(result, args.plot)
        if not args.json:
            Console().print(f"plot written to {args.plot}")
    bad = [
        cell for cell in result.cells.values()
        if (cell.contender in ALL_STRATEGIES or cell.contender.startswith("sharded")) and cell.status in ("WRONG", "error")
    ]
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
