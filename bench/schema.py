"""The benchmark schema, declared afresh for every contender run.

``ccbench_parents(id, child_count)``, ``ccbench_children(id, parent_id)``
with an indexed foreign key, and ``ccbench_items(id, value)``: a table no
counter looks at (the ``noop`` workload writes there). The table names are
prefixed so that the bench can share a database with other work.

The counter column is declared by the contender: a plain integer (nobody
keeps it, or a trigger or listener does), ``counter_cache(...)``, or
SQLAlchemy-Utils ``aggregated``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ForeignKey, Integer, func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

PARENTS = "ccbench_parents"
CHILDREN = "ccbench_children"
ITEMS = "ccbench_items"
COUNTER = "child_count"

#: Counter column factories: ``kind -> callable(Child-getter) -> class attribute``.
CounterFactory = Callable[[Callable[[], Any]], Any]


@dataclass
class Models:
    base: type[DeclarativeBase]
    Parent: Any
    Child: Any
    Item: Any

    @property
    def metadata(self) -> Any:
        return self.base.metadata


def plain_counter(child: Callable[[], Any]) -> Any:
    """An ordinary column: the application (or the database) keeps it."""
    return mapped_column(Integer, nullable=False, default=0, server_default="0")


def build(counter: CounterFactory = plain_counter) -> Models:
    """Declare the three tables on a new ``DeclarativeBase``.

    ``counter`` builds the ``child_count`` attribute; it gets a function
    returning the ``Child`` class (declared after ``Parent``).
    """
    classes: dict[str, Any] = {}

    class Base(DeclarativeBase):
        pass

    class Parent(Base):
        __tablename__ = PARENTS
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        children: Mapped[list[Child]] = relationship()
        child_count = counter(lambda: classes["Child"])  # COUNTER

    class Child(Base):
        __tablename__ = CHILDREN
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int] = mapped_column(ForeignKey(f"{PARENTS}.id"), index=True)

    class Item(Base):
        __tablename__ = ITEMS
        id: Mapped[int] = mapped_column(primary_key=True)
        value: Mapped[int] = mapped_column(Integer)

    classes["Child"] = Child
    return Models(Base, Parent, Child, Item)


def recount(connection: Connection) -> None:
    """Set every counter to its real count (set-up only, untimed)."""
    connection.execute(text(
        f"UPDATE {PARENTS} SET {COUNTER} = "
        f"(SELECT count(*) FROM {CHILDREN} c WHERE c.parent_id = {PARENTS}.id)"
    ))


def drift(connection: Connection, models: Models) -> tuple[int, int]:
    """``(parents whose counter is off, sum of absolute errors)``."""
    Parent, Child = models.Parent, models.Child
    real = (
        select(func.count(Child.id)).where(Child.parent_id == Parent.id).scalar_subquery()
    )
    off = total = 0
    for stored, count in connection.execute(select(getattr(Parent, COUNTER), real)):
        error = abs((stored or 0) - count)
        if error:
            off += 1
            total += error
    return off, total
