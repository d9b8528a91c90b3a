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
* ``hot``: contention, not cost. ``--workers`` threads (default 8), each with
  its own Session on one shared Engine, commit small transactions against a
  single parent (seeded with 100 children) for ``--seconds`` (default 5) after
  a warm-up of a fifth of that (at most 1 s). As in ``ANCHORS.md``'s
  contention test, each transaction makes 1 to 4 changes: every third change
  of a worker picks the oldest child of that parent with ``SELECT ... FOR
  UPDATE SKIP LOCKED`` (PostgreSQL, MariaDB/MySQL; plain ``SELECT`` on
  SQLite), which autoflushes the adds before it, and deletes it; the others
  add a child. Many transactions therefore flush several times. A failed
  transaction (any ``DBAPIError``: deadlock, lock wait timeout, serialization
  failure, "database is locked") is rolled back and counted, and the worker
  goes on. Reported: committed transactions per second, failed ones, and the
  ratio of committed/s to ``none`` (higher is better, unlike the others).
  MariaDB/MySQL connections get ``innodb_lock_wait_timeout = 5``; SQLite
  connections a busy timeout of 30 s (its writers serialize on the database
  lock: the numbers say what one writer at a time costs, still meaningful).

  ``hot`` is not in the default workload list: with every contender and
  ``--repeat 3`` it adds about three minutes of fixed-duration runs to a
  default run that takes well under one. ``--workload hot`` runs it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
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
    #: ``hot``: worker threads and measured seconds
    workers: int = 8
    seconds: float = 5.0

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

    def prepare(self, engine: Engine, models: Models, sizes: Sizes,
                install: Callable[[Connection], None]) -> tuple[Timed, Callable[[], None]]:
        """Build the data, call ``install`` (triggers), return ``(timed, cleanup)``."""
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

    @property
    def tx_per_s(self) -> float:
        return self.committed / self.seconds if self.seconds else 0.0


HOT_PARENT = 1
HOT_SEED = 100
#: a transaction makes 1 to CHANGES changes; every DELETE_EVERY-th change of a
#: worker is a delete, the others add a child (the ANCHORS' contention workload)
CHANGES = 4
DELETE_EVERY = 3


def _failure_kind(exc: DBAPIError) -> str:
    orig = exc.orig if exc.orig is not None else exc
    text_ = str(orig).strip()
    first = text_.splitlines()[0] if text_ else ""
    return f"{type(orig).__name__}: {first[:80]}" if first else type(orig).__name__


class Hot(Workload):
    name = "hot"
    default = False

    def rows(self, sizes: Sizes) -> int | None:
        return None  # not fixed: what the workers manage to commit

    def describe(self, sizes: Sizes) -> str:
        return (
            f"{sizes.workers} workers commit transactions of 1-{CHANGES} changes on 1 parent for "
            f"{sizes.seconds:g} s after {sizes.warmup:g} s warm-up; every {DELETE_EVERY}rd change "
            "deletes a child (FOR UPDATE SKIP LOCKED, autoflushing), the others add one; "
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
                install: Callable[[Connection], None]) -> tuple[Timed, Callable[[], None]]:
        with engine.begin() as connection:
            connection.execute(
                insert(models.Parent.__table__),  # type: ignore[attr-defined]
                [{"id": HOT_PARENT}],
            )
            self.seed(connection, models, sizes)
            install(connection)
        return self.timed(engine, models, sizes)

    def timed(self, engine: Engine, models: Models, sizes: Sizes) -> tuple[Timed, Callable[[], None]]:
        Child = models.Child
        older = (
            select(Child)
            .where(Child.parent_id == HOT_PARENT)
            .order_by(Child.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )

        def run() -> HotResult:
            result = HotResult(seconds=sizes.seconds)
            lock = threading.Lock()
            crashed: list[BaseException] = []
            window: list[float] = []

            def open_window() -> None:  # once every worker holds a connection
                now = time.perf_counter()
                window[:] = [now + sizes.warmup, now + sizes.warmup + sizes.seconds]

            ready = threading.Barrier(sizes.workers, action=open_window)

            def worker() -> None:
                committed = failed = 0
                errors: Counter[str] = Counter()
                n = made = 0
                try:
                    with Session(engine) as session:
                        session.connection()  # check a connection out before the start
                        session.rollback()
                        ready.wait()
                        start, end = window
                        while not crashed:
                            n += 1
                            try:
                                # 1-4 changes; every DELETE_EVERY-th change deletes the
                                # oldest unlocked child (its SELECT autoflushes the adds)
                                for _ in range(1 + n % CHANGES):
                                    made += 1
                                    if made % DELETE_EVERY:
                                        session.add(Child(parent_id=HOT_PARENT))
                                        continue
                                    victim = session.scalars(older).first()
                                    if victim is not None:
                                        session.delete(victim)
                                session.commit()
                                ok, kind = True, ""
                            except DBAPIError as exc:
                                session.rollback()
                                ok, kind = False, _failure_kind(exc)
                            now = time.perf_counter()
                            if now >= end:
                                break
                            if now >= start:
                                if ok:
                                    committed += 1
                                else:
                                    failed += 1
                                    errors[kind] += 1
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    crashed.append(exc)
                    ready.abort()
                with lock:
                    result.committed += committed
                    result.failed += failed
                    result.errors.update(errors)

            threads = [threading.Thread(target=worker, name=f"hot-{i}") for i in range(sizes.workers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if crashed:
                raise crashed[0]
            return result

        return run, lambda: None


WORKLOADS: dict[str, Workload] = {
    w.name: w for w in (Batch(), Transactions(), Delete(), Move(), Noop(), Hot())
}
DEFAULT_WORKLOADS = [name for name, w in WORKLOADS.items() if w.default]


def describe_all(sizes: Sizes) -> dict[str, Any]:
    return {name: {"rows": w.rows(sizes), "description": w.describe(sizes)} for name, w in WORKLOADS.items()}
