"""Running the matrix: repetitions x workloads x contenders, interleaved.

For every repetition, every workload runs once per contender before the
next workload starts, the contenders' order rotating from one repetition to
the next: a slow minute of the machine hits all of them alike. Each
contender run gets a fresh schema (drop, create), a fresh engine, fresh
model classes; only the workload's timed callable is timed. After each run
every parent's counter is compared with ``SELECT count(*)`` of its children.

``hot`` runs for a fixed time and counts transactions instead: its cells
keep committed/failed counts and committed/s per run, and its ratio is
committed/s over that of ``none`` (higher is better).

With a latency proxy (``--latency-ms``), every cell also keeps the round
trips per transaction of each run, read from the proxy's count around the
timed part: ``txn`` divides by its number of transactions, ``batch``,
``delete``, ``move`` and ``noop`` are one transaction each, and ``hot``
counts its measured window alone, divided by the transactions that finished
in it (committed and failed).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import clear_mappers

from . import schema
from .contenders import Contender, _first_line
from .workloads import WORKLOADS, HotResult, Sizes


@dataclass
class Cell:
    """One workload x contender: its timings and verdict."""

    workload: str
    contender: str
    #: ok | WRONG | skipped | unavailable | error
    status: str = "ok"
    note: str = ""
    times: list[float] = field(default_factory=list)
    #: parents whose counter was off after a run (max over runs); None: not kept
    drift: int | None = None
    #: sum of absolute errors (max over runs)
    drift_total: int | None = None
    ratio: float | None = None
    #: ``hot`` only, one entry per run
    committed: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    #: ``hot`` only: failure kinds over all runs
    errors: Counter[str] = field(default_factory=Counter)
    #: round trips per transaction, one entry per run (only behind a latency proxy)
    round_trips: list[float] = field(default_factory=list)

    @property
    def trips_per_txn(self) -> float | None:
        return statistics.median(self.round_trips) if self.round_trips else None

    @property
    def tx_per_s(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    @property
    def seconds(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    @property
    def spread(self) -> float | None:
        """How much the runs scatter: their median absolute deviation over
        their median (0.05: a typical run is 5% off the median). None below 3 runs."""
        values = self.rates if self.rates else self.times
        if len(values) < 3:
            return None
        middle = statistics.median(values)
        return statistics.median(abs(v - middle) for v in values) / middle if middle else None

    @property
    def measured(self) -> bool:
        return self.status in ("ok", "WRONG") and bool(self.times)


@dataclass
class Run:
    backend: str
    server_version: str
    url: str
    sizes: Sizes
    repeat: int
    workloads: list[str]
    contenders: list[str]
    cells: dict[tuple[str, str], Cell]
    descriptions: dict[str, str]
    #: the delay of the latency proxy each direction (None: no proxy, no round trips)
    latency_ms: float | None = None

    def cell(self, workload: str, contender: str) -> Cell:
        return self.cells[(workload, contender)]


def probe(url: str) -> tuple[str, str]:
    """Connect once: ``(backend name, server version)``; raises on failure."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            info = connection.dialect.server_version_info or ()
            dialect = connection.dialect
            name = "mariadb" if getattr(dialect, "is_mariadb", False) else dialect.name
            return name, ".".join(str(p) for p in info)
    finally:
        engine.dispose()


def _drop_everything(engine: Engine, contender: Contender, models: schema.Models) -> None:
    with engine.begin() as connection:
        models.metadata.drop_all(connection)
        contender.uninstall(connection)


def run_one(
    url: str,
    contender: Contender,
    workload: str,
    sizes: Sizes,
    around: Callable[[Callable[[], None]], None] | None = None,
) -> tuple[float, tuple[int, int] | None]:
    """One contender on one workload: ``(seconds, (parents off, total error) or None)``.

    ``around(timed)``, when given, runs the timed part (a profiler, say).
    """
    elapsed, drift, _, _ = run_measured(url, contender, workload, sizes, around)
    return elapsed, drift


def run_measured(
    url: str,
    contender: Contender,
    workload: str,
    sizes: Sizes,
    around: Callable[[Callable[[], Any]], Any] | None = None,
    trips: Callable[[], int] | None = None,
) -> tuple[float, tuple[int, int] | None, Any, float | None]:
    """:func:`run_one`, plus what the timed part returned (``hot``: a :class:`HotResult`)
    and the round trips per transaction (None unless ``trips`` reads a proxy's count)."""
    work = WORKLOADS[workload]
    backend = sa.engine.make_url(url).get_backend_name()
    models: schema.Models | None = None
    engine: Engine | None = None
    cleanup: Callable[[], None] = lambda: None
    try:
        models = contender.models()
        engine = create_engine(url, **work.engine_options(backend, sizes))
        work.configure(engine, backend)
        _drop_everything(engine, contender, models)
        with engine.begin() as connection:
            models.metadata.create_all(connection)
            contender.after_create(connection)
        timed, cleanup = work.prepare(engine, models, sizes, contender.install, trips)
        gc.collect()
        trips_before = trips() if trips is not None else 0
        start = time.perf_counter()
        if around is None:
            outcome = timed()
        else:
            outcome = around(timed)
        elapsed = time.perf_counter() - start
        per_txn = _per_transaction(work, sizes, outcome, trips() - trips_before if trips is not None else None)
        cleanup()
        cleanup = lambda: None
        drift = None
        contender.before_check(engine)
        if contender.keeps_count:
            with engine.connect() as connection:
                drift = schema.drift(connection, models)
        return elapsed, drift, outcome, per_txn
    finally:
        try:
            cleanup()
            if engine is not None and models is not None:
                _drop_everything(engine, contender, models)
        finally:
            if engine is not None:
                engine.dispose()
            contender.teardown()
            clear_mappers()


def _per_transaction(work: Any, sizes: Sizes, outcome: Any, counted: int | None) -> float | None:
    """Round trips per transaction: ``hot`` its window's count over the transactions in it."""
    if isinstance(outcome, HotResult):
        done = outcome.committed + outcome.failed
        return outcome.round_trips / done if outcome.round_trips is not None and done else None
    return counted / work.transactions(sizes) if counted is not None else None


def run(
    url: str,
    contenders: list[Contender],
    workloads: list[str],
    sizes: Sizes,
    repeat: int,
    probed: tuple[str, str] | None = None,
    progress: Callable[[str], Any] = lambda message: None,
    trips: Callable[[], int] | None = None,
    latency_ms: float | None = None,
    shown_url: str | None = None,
) -> Run:
    """The matrix. ``trips`` reads the latency proxy's round trips (``url``
    points at the proxy then; ``shown_url`` is the database's, for the report)."""
    backend, version = probed or probe(url)
    cells: dict[tuple[str, str], Cell] = {}
    for contender in contenders:
        reason = contender.skip_reason(backend) or contender.unavailable_reason()
        for workload in workloads:
            cell = cells[(workload, contender.name)] = Cell(workload, contender.name)
            if reason:
                cell.status, cell.note = reason.split(":", 1)[0], reason
    for rep in range(repeat):
        for workload in workloads:
            shift = rep % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                cell = cells[(workload, contender.name)]
                if cell.status not in ("ok", "WRONG"):
                    continue
                progress(f"{rep + 1}/{repeat} {workload} {contender.name}")
                try:
                    elapsed, drift, outcome, per_txn = run_measured(url, contender, workload, sizes, trips=trips)
                except sa.exc.OperationalError:
                    raise  # the database went away: stop the whole run
                except Exception as exc:  # noqa: BLE001 - reported per contender
                    _fail(cells, contender, workload, exc)
                    continue
                cell.times.append(elapsed)
                if per_txn is not None:
                    cell.round_trips.append(per_txn)
                if isinstance(outcome, HotResult):
                    cell.committed.append(outcome.committed)
                    cell.failed.append(outcome.failed)
                    cell.rates.append(outcome.tx_per_s)
                    cell.errors.update(outcome.errors)
                if drift is not None:
                    off, total = drift
                    cell.drift = max(cell.drift or 0, off)
                    cell.drift_total = max(cell.drift_total or 0, total)
                    if off:
                        cell.status = "WRONG"
                        cell.note = f"{cell.drift} parents off by {cell.drift_total} in all"
    for workload in workloads:
        floor = cells.get((workload, "none"))
        if workload == "hot":  # throughput: higher is better
            base = floor.tx_per_s if floor is not None and floor.measured else None
            for contender in contenders:
                cell = cells[(workload, contender.name)]
                if cell.measured and base and cell.tx_per_s is not None:
                    cell.ratio = cell.tx_per_s / base
            continue
        base = floor.seconds if floor is not None and floor.measured else None
        for contender in contenders:
            cell = cells[(workload, contender.name)]
            if cell.measured and base:
                cell.ratio = cell.seconds / base  # type: ignore[operator]
    return Run(
        backend=backend,
        server_version=version,
        url=sa.engine.make_url(shown_url or url).render_as_string(hide_password=True),
        sizes=sizes,
        repeat=repeat,
        workloads=workloads,
        contenders=[c.name for c in contenders],
        cells=cells,
        descriptions={w: WORKLOADS[w].describe(sizes) for w in workloads},
        latency_ms=latency_ms,
    )


def _fail(cells: dict[tuple[str, str], Cell], contender: Contender, workload: str, exc: BaseException) -> None:
    """A contender that raised: unavailable everywhere if it cannot even declare its models."""
    message = _first_line(exc)
    if contender.name == "aggregated":
        # a third-party package that may not support this SQLAlchemy: say so
        for (w, c), cell in cells.items():
            if c == contender.name:
                cell.status, cell.note, cell.times = "unavailable", f"unavailable: {message}", []
        return
    cell = cells[(workload, contender.name)]
    cell.status, cell.note, cell.times = "error", f"error: {message}", []
    cell.committed, cell.failed, cell.rates, cell.round_trips = [], [], [], []
