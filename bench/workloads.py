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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from . import schema
from .schema import Models


@dataclass(frozen=True)
class Sizes:
    children: int
    parents: int

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


Timed = Callable[[], None]


class Workload:
    name = ""

    def rows(self, sizes: Sizes) -> int:
        raise NotImplementedError

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


WORKLOADS: dict[str, Workload] = {w.name: w for w in (Batch(), Transactions(), Delete(), Move(), Noop())}


def describe_all(sizes: Sizes) -> dict[str, Any]:
    return {name: {"rows": w.rows(sizes), "description": w.describe(sizes)} for name, w in WORKLOADS.items()}
