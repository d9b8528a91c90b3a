"""The workloads: what is timed, and the untimed set-up before it.

Each workload has a :meth:`Workload.prepare` that builds its data (parents;
for ``delete`` and ``move`` also the children, inserted with Core and
recounted before the contender installs anything) and returns the timed
callable. Only that callable is timed. Object construction and loading the
rows to delete or move are set-up: the timed part is what the ORM and the
counter do (add/delete/re-parent, flush, commit).

Sizes, from ``--children N`` and ``--parents P``:

* ``batch``: one session adds N children (round-robin over P parents), commits.
* ``txn``: N/10 transactions of one child each, round-robin over the parents,
  a new session each.
* ``delete``: N children exist; one flush deletes the first N/2 (every parent
  loses half of its children).
* ``move``: N children exist; one flush moves the children of the first half
  of the parents to the second half (N/2 rows when P is even): the old parents
  end at zero, the new ones double.
* ``noop``: N rows inserted into a table no counter looks at, one flush and
  commit, while the counters exist on other tables.
* ``hot``: contention, not cost, in the shape applications are deployed in.
  ``--processes N`` (default 8; ``--workers`` is the same) forked worker
  processes, each with its own connection pool, commit small transactions
  against a single parent (seeded with 100 children) for ``--seconds``
  (default 5) after a warm-up of a fifth of that (at most 1 s); ``--threads``
  runs N threads of one process on one shared Engine instead (the old mode,
  where the GIL is shared too). As in the issue's measurement, each
  transaction inserts 1 to 3 children on the hot parent or, every third
  transaction of a worker, deletes one child that worker inserted and
  committed earlier (``session.get`` then ``session.delete``; none yet: it
  inserts). A failed transaction (any ``DBAPIError``: deadlock, lock wait
  timeout, serialization failure, "database is locked") is rolled back and
  counted, and the worker goes on. Workers start together and report their
  counts to the parent; a worker that crashes or goes silent fails the cell
  (never a hang). Reported: committed transactions per second, failed ones,
  and the ratio of committed/s to ``none`` (higher is better, unlike the
  others). MariaDB/MySQL connections get ``innodb_lock_wait_timeout = 5``;
  SQLite connections a busy timeout of 30 s (its writers serialize on the
  database lock: the numbers say what one writer at a time costs, still
  meaningful).

  ``hot`` is not in the default workload list: with every contender and
  ``--repeat 3`` it adds about three minutes of fixed-duration runs to a
  default run that takes well under one. ``--workload hot`` runs it.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, insert, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from . import schema
from .schema import Models


@dataclass(frozen=True)
class Sizes:
    children: int
    parents: int
    #: ``hot``: workers, measured seconds, and whether the workers are
    #: threads of this process (else forked processes)
    workers: int = 8
    seconds: float = 5.0
    threads: bool = False

    @property
    def warmup(self) -> float:
        return min(1.0, self.seconds / 5)

    @property
    def txn(self) -> int:
        return max(1, self.children // 10)

    @property
    def delete(self) -> int:
        return self.children // 2

    @property
    def move_from(self) -> int:
        """Parents ``1..move_from`` give their children to ``p + move_from``."""
        return self.parents // 2

    @property
    def move(self) -> int:
        return sum(1 for i in range(self.children) if i % self.parents < self.move_from)


#: The timed part; ``hot``'s returns its :class:`HotResult`, the others None.
Timed = Callable[[], Any]


class Workload:
    name = ""
    #: Part of the default workload list.
    default = True

    def rows(self, sizes: Sizes) -> int | None:
        raise NotImplementedError

    def engine_options(self, backend: str, sizes: Sizes) -> dict[str, Any]:
        """Extra ``create_engine`` arguments for this workload."""
        return {}

    def configure(self, engine: Engine, backend: str) -> None:
        """Set up the new engine (connect listeners) before anything runs."""

    def describe(self, sizes: Sizes) -> str:
        raise NotImplementedError

    def transactions(self, sizes: Sizes) -> int:
        """Transactions the timed part commits (round trips are reported per transaction)."""
        return 1

    def prepare(self, engine: Engine, models: Models, sizes: Sizes,
                install: Callable[[Connection], None],
                trips: Callable[[], int] | None = None) -> tuple[Timed, Callable[[], None]]:
        """Build the data, call ``install`` (triggers), return ``(timed, cleanup)``.

        ``trips`` reads the latency proxy's round-trip count (None: no proxy);
        only ``hot`` uses it, to count its measured window alone.
        """
        with engine.begin() as connection:
            connection.execute(
                insert(models.Parent.__table__),  # type: ignore[attr-defined]
                [{"id": p + 1} for p in range(sizes.parents)],
            )
            self.seed(connection, models, sizes)
            install(connection)
        return self.timed(engine, models, sizes)

    def seed(self, connection: Connection, models: Models, sizes: Sizes) -> None:
        """Rows that exist before the timed part (beyond the parents)."""

    def timed(self, engine: Engine, models: Models, sizes: Sizes) -> tuple[Timed, Callable[[], None]]:
        raise NotImplementedError


def _seed_children(connection: Connection, models: Models, sizes: Sizes) -> None:
    connection.execute(
        insert(models.Child.__table__),  # type: ignore[attr-defined]
        [{"id": i + 1, "parent_id": i % sizes.parents + 1} for i in range(sizes.children)],
    )
    schema.recount(connection)


class Batch(Workload):
    name = "batch"

    def rows(self, sizes: Sizes) -> int:
        return sizes.children

    def describe(self, sizes: Sizes) -> str:
        return f"one session adds {sizes.children:,} children over {sizes.parents:,} parents, commits"

    def timed(self, engine: Engine, models: Models, sizes: Sizes) -> tuple[Timed, Callable[[], None]]:
        Child = models.Child
        children = [Child(parent_id=i % sizes.parents + 1) for i in range(sizes.children)]
        session = Session(engine)

        def run() -> None:
            session.add_all(children)
            session.commit()

        return run, session.close


class Transactions(Workload):
    name = "txn"

    def rows(self, sizes: Sizes) -> int:
        return sizes.txn

    def transactions(self, sizes: Sizes) -> int:
        return sizes.txn

    def describe(self, sizes: Sizes) -> str:
        return f"{sizes.txn:,} transactions of one child each, round-robin over the parents"

    def timed(self, engine: Engine, models: Models, sizes: Sizes) -> tuple[Timed, Callable[[], None]]:
        Child = models.Child
        parents = sizes.parents

        def run() -> None:
            for i in range(sizes.txn):
                with Session(engine) as session:
                    session.add(Child(parent_id=i % parents + 1))
                    session.commit()

        return run, lambda: None


class Delete(Workload):
    name = "delete"

    def rows(self, sizes: Sizes) -> int:
        return sizes.delete

    def describe(self, sizes: Sizes) -> str:
        return f"one flush deletes {sizes.delete:,} of {sizes.children:,} children"

    seed = staticmethod(_seed_children)

    def timed(self, engine: Engine, models: Models, sizes: Sizes) -> tuple[Timed, Callable[[], None]]:
        Child = models.Child
        session = Session(engine)
        victims = session.scalars(
            select(Child).where(Child.id <= sizes.delete).order_by(Child.id)
        ).all()

        def run() -> None:
            for child in victims:
                session.delete(child)
            session.commit()

        return run, session.close


class Move(Workload):
    name = "move"

    def rows(self, sizes: Sizes) -> int:
        return sizes.move

    def describe(self, sizes: Sizes) -> str:
        return (
            f"one flush moves the {sizes.move:,} children of parents 1-{sizes.move_from} "
            f"to parents {sizes.move_from + 1}-{2 * sizes.move_from}"
        )

    seed = staticmethod(_seed_children)

    def timed(self, engine: Engine, models: Models, sizes: Sizes) -> tuple[Timed, Callable[[], None]]:
        Child = models.Child
        shift = sizes.move_from
        session = Session(engine)
        movers = session.scalars(
            select(Child).where(Child.parent_id <= shift).order_by(Child.id)
        ).all()

        def run() -> None:
            for child in movers:
                child.parent_id = child.parent_id + shift
            session.commit()

        return run, session.close


class Noop(Workload):
    name = "noop"

    def rows(self, sizes: Sizes) -> int:
        return sizes.children

    def describe(self, sizes: Sizes) -> str:
        return f"one flush inserts {sizes.children:,} rows into a table with no counter"

    def timed(self, engine: Engine, models: Models, sizes: Sizes) -> tuple[Timed, Callable[[], None]]:
        Item = models.Item
        items = [Item(value=i) for i in range(sizes.children)]
        session = Session(engine)

        def run() -> None:
            session.add_all(items)
            session.commit()

        return run, session.close


@dataclass
class HotResult:
    """One ``hot`` run: transactions finished inside the measured window."""

    seconds: float
    committed: int = 0
    failed: int = 0
    #: failure kinds (exception class and first line) -> count
    errors: Counter[str] = field(default_factory=Counter)
    #: round trips through the latency proxy inside the window (None: no proxy)
    round_trips: int | None = None

    def add(self, committed: int, failed: int, errors: Counter[str]) -> None:
        """One worker's share."""
        self.committed += committed
        self.failed += failed
        self.errors.update(errors)

    @property
    def tx_per_s(self) -> float:
        return self.committed / self.seconds if self.seconds else 0.0


HOT_PARENT = 1
HOT_SEED = 100
#: an inserting transaction adds 1 to INSERTS children; every DELETE_EVERY-th
#: transaction of a worker deletes one child it committed earlier instead
INSERTS = 3
DELETE_EVERY = 3
#: seconds a worker may take to connect, and the window may overrun, before
#: the cell is an error rather than a hang
_HOT_GRACE = 60.0


def _failure_kind(exc: DBAPIError) -> str:
    orig = exc.orig if exc.orig is not None else exc
    text_ = str(orig).strip()
    first = text_.splitlines()[0] if text_ else ""
    return f"{type(orig).__name__}: {first[:80]}" if first else type(orig).__name__


def _hot_loop(engine: Engine, Child: Any, sizes: Sizes, ready: Callable[[], None],
              go: Callable[[], bool]) -> tuple[int, int, Counter[str]]:
    """One worker: ``(committed, failed, failure kinds)`` inside the measured window.

    ``ready()`` is called once the worker holds a connection, ``go()`` waits
    for the start of every worker (False: the run was called off). The window
    opens a warm-up after the start, the same moment for every worker.
    """
    committed = failed = 0
    errors: Counter[str] = Counter()
    mine: deque[int] = deque()  # children this worker inserted and committed
    n = inserts = 0
    with Session(engine) as session:
        session.connection()  # check a connection out before the start
        session.rollback()
        ready()
        if not go():
            return committed, failed, errors
        start = time.perf_counter() + sizes.warmup
        end = start + sizes.seconds
        while True:
            n += 1
            victim = mine.popleft() if n % DELETE_EVERY == 0 and mine else None
            added: list[Any] = []
            try:
                if victim is not None:
                    child = session.get(Child, victim)
                    if child is not None:
                        session.delete(child)
                else:
                    inserts += 1
                    added = [Child(parent_id=HOT_PARENT) for _ in range(1 + inserts % INSERTS)]
                    session.add_all(added)
                    session.flush()  # the commit would: read the keys now, not reload them after it
                ids = [child.id for child in added]
                session.commit()
                ok, kind = True, ""
                mine.extend(ids)
            except DBAPIError as exc:
                session.rollback()
                ok, kind = False, _failure_kind(exc)
                if victim is not None:
                    mine.appendleft(victim)  # rolled back: still there, still this worker's
            now = time.perf_counter()
            if now >= end:
                break
            if now >= start:
                if ok:
                    committed += 1
                else:
                    failed += 1
                    errors[kind] += 1
    return committed, failed, errors


def _window_trips(sizes: Sizes, started: float, trips: Callable[[], int] | None) -> int | None:
    """Round trips through the proxy inside the measured window (the caller's clock)."""
    if trips is None:
        return None
    time.sleep(max(0.0, started + sizes.warmup - time.perf_counter()))
    before = trips()
    time.sleep(max(0.0, started + sizes.warmup + sizes.seconds - time.perf_counter()))
    return trips() - before


def _run_threads(engine: Engine, Child: Any, sizes: Sizes, trips: Callable[[], int] | None) -> HotResult:
    """The old mode: ``sizes.workers`` threads of one process share one Engine."""
    result = HotResult(seconds=sizes.seconds)
    crashed: list[BaseException] = []
    outcomes: queue.Queue[tuple[int, int, Counter[str]]] = queue.Queue()
    barrier = threading.Barrier(sizes.workers + 1)

    def go() -> bool:
        try:
            barrier.wait(_HOT_GRACE)
            return True
        except threading.BrokenBarrierError:
            return False

    def worker() -> None:
        try:
            outcomes.put(_hot_loop(engine, Child, sizes, lambda: None, go))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            crashed.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, name=f"hot-{i}", daemon=True) for i in range(sizes.workers)]
    for thread in threads:
        thread.start()
    if go():
        result.round_trips = _window_trips(sizes, time.perf_counter(), trips)
    deadline = time.perf_counter() + sizes.warmup + sizes.seconds + _HOT_GRACE
    for thread in threads:
        thread.join(max(0.0, deadline - time.perf_counter()))
    if crashed:
        raise crashed[0]
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError(f"hot: a worker thread did not finish within {_HOT_GRACE:g} s of the window")
    while not outcomes.empty():
        result.add(*outcomes.get())
    return result


def _process_worker(engine: Engine, Child: Any, sizes: Sizes, number: int, events: Any, go: Any) -> None:
    """A forked worker: its own pool, then the loop; everything it has to say goes on ``events``."""
    try:
        engine.dispose(close=False)  # the parent's connections are the parent's: leave them be
        outcome = _hot_loop(engine, Child, sizes, lambda: events.put(("ready", number, None)),
                            lambda: bool(go.wait(_HOT_GRACE)))
        events.put(("done", number, outcome))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the cell
        text_ = str(exc).strip()
        first = text_.splitlines()[0] if text_ else ""
        events.put(("crashed", number, f"{type(exc).__name__}: {first}" if first else type(exc).__name__))


def _run_processes(engine: Engine, Child: Any, sizes: Sizes, trips: Callable[[], int] | None) -> HotResult:
    """The deployment shape: ``sizes.workers`` forked processes, each with its own pool.

    Fork, not spawn: the models exist only in this process (declared by the
    contender) and a forked child has them. A worker that dies, or says
    nothing in time, fails the run: a crash is an error, never a hang.
    """
    context = multiprocessing.get_context("fork")
    events = context.Queue()
    go = context.Event()
    engine.dispose()  # no pooled connection to inherit into the children
    processes = [
        context.Process(target=_process_worker, args=(engine, Child, sizes, i, events, go),
                        name=f"hot-{i}", daemon=True)
        for i in range(sizes.workers)
    ]
    result = HotResult(seconds=sizes.seconds)
    try:
        for process in processes:
            process.start()
        _collect(events, processes, "ready", time.perf_counter() + _HOT_GRACE)
        go.set()
        result.round_trips = _window_trips(sizes, time.perf_counter(), trips)
        deadline = time.perf_counter() + sizes.warmup + sizes.seconds + _HOT_GRACE
        for outcome in _collect(events, processes, "done", deadline):
            result.add(*outcome)
        for process in processes:
            process.join(max(1.0, deadline - time.perf_counter()))
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
        events.close()
    return result


def _collect(events: Any, processes: list[Any], kind: str, deadline: float) -> list[Any]:
    """Wait for one ``kind`` message from every worker; raise on a crash or at the deadline."""
    waiting = set(range(len(processes)))
    found: list[Any] = []
    while waiting:
        try:
            what, number, payload = events.get(timeout=0.2)
        except queue.Empty:
            dead = [i for i in waiting if processes[i].exitcode is not None]
            if dead:
                raise RuntimeError(f"hot: worker {dead[0]} exited with code {processes[dead[0]].exitcode}") from None
            if time.perf_counter() > deadline:
                raise RuntimeError(f"hot: {len(waiting)} worker(s) silent past the deadline ({kind})") from None
            continue
        if what == "crashed":
            raise RuntimeError(f"hot: worker {number} crashed: {payload}")
        if what == kind:
            waiting.discard(number)
            found.append(payload)
    return found


class Hot(Workload):
    name = "hot"
    default = False

    def rows(self, sizes: Sizes) -> int | None:
        return None  # not fixed: what the workers manage to commit

    def describe(self, sizes: Sizes) -> str:
        unit = "threads of one process" if sizes.threads else "processes"
        return (
            f"{sizes.workers} {unit} commit small transactions on 1 parent for "
            f"{sizes.seconds:g} s after {sizes.warmup:g} s warm-up: each inserts 1-{INSERTS} children, "
            f"or (every {DELETE_EVERY}rd) deletes one the worker committed earlier; "
            "committed/s, higher is better"
        )

    def engine_options(self, backend: str, sizes: Sizes) -> dict[str, Any]:
        options: dict[str, Any] = {"pool_size": sizes.workers, "max_overflow": 4}
        if backend == "sqlite":
            options["connect_args"] = {"timeout": 30}
        return options

    def configure(self, engine: Engine, backend: str) -> None:
        if backend in ("mysql", "mariadb"):
            @event.listens_for(engine, "connect")
            def lock_wait(dbapi_connection: Any, record: Any) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute("SET SESSION innodb_lock_wait_timeout = 5")
                cursor.close()

    def seed(self, connection: Connection, models: Models, sizes: Sizes) -> None:
        connection.execute(
            insert(models.Child.__table__),  # type: ignore[attr-defined]
            [{"parent_id": HOT_PARENT} for _ in range(HOT_SEED)],
        )
        schema.recount(connection)

    def prepare(self, engine: Engine, models: Models, sizes: Sizes,
                install: Callable[[Connection], None],
                trips: Callable[[], int] | None = None) -> tuple[Timed, Callable[[], None]]:
        with engine.begin() as connection:
            connection.execute(
                insert(models.Parent.__table__),  # type: ignore[attr-defined]
                [{"id": HOT_PARENT}],
            )
            self.seed(connection, models, sizes)
            install(connection)
        drive = _run_threads if sizes.threads else _run_processes
        return (lambda: drive(engine, models.Child, sizes, trips)), lambda: None


WORKLOADS: dict[str, Workload] = {
    w.name: w for w in (Batch(), Transactions(), Delete(), Move(), Noop(), Hot())
}
DEFAULT_WORKLOADS = [name for name, w in WORKLOADS.items() if w.default]


def describe_all(sizes: Sizes) -> dict[str, Any]:
    return {name: {"rows": w.rows(sizes), "description": w.describe(sizes)} for name, w in WORKLOADS.items()}
