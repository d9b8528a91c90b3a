"""What a counter counts: its kind, resolved when mappers are configured (private).

:class:`~countercache.declaration.CounterCache` is the declaration; when its
relationship is looked up it gets one of these as ``counter.kind``:

* :class:`Count`: the child rows whose foreign key names the parent
  (``counter_cache("questions")``);
* :class:`Filtered`: the same, with ``where=`` (rows that match) and/or
  ``sum=`` (a sum instead of a count);
* :class:`ManyToMany`: the parent's rows in an association table
  (``relationship(secondary=...)``);
* :class:`MultiLevel`: the leaves of the parent's middle rows
  (``counter_cache("questions.answers")``), where ``leaf`` is a
  :class:`Count` or :class:`Filtered` of the leaf rows over the middle's key.

Each kind answers the questions the rest of the library asks, instead of
being tested for None-valued fields: what a child row weighs (the flush),
and the real value in SQL (:meth:`Kind.real_count`, the one definition that
``check()``, ``reconcile()`` and the multi-level translation share; the
migration backfill renders the same shape from the recorded SQL text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import and_, exists, func, literal, select
from sqlalchemy.sql.util import ClauseAdapter, find_tables

from ._compat import single_table_criterion

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper

__all__ = ["Kind", "Count", "Filtered", "ManyToMany", "MultiLevel"]


def rows_of_class(mapper: Mapper[Any], table: Any) -> Any:
    """The condition picking ``mapper``'s rows from ``table`` (None: every row):
    a single-table subclass's discriminator, or, for a joined subclass counted
    by a column of its base's table, that its own table has the row."""
    found = single_table_criterion(mapper)
    if found is None and mapper.inherits is not None and mapper.local_table is not table \
            and mapper.inherit_condition is not None:
        found = exists().where(mapper.inherit_condition)
    return found


class Kind:
    """What a counter counts."""

    #: The mapper whose rows (or links) feed the counter.
    child_mapper: Mapper[Any]

    def key_columns(self) -> list[Any]:
        """The columns that hold the parent's key, in its key's order."""
        raise NotImplementedError

    def source(self) -> Any:
        """The FROM clause of the counted rows (a table, or a join)."""
        return self.key_columns()[0].table

    def row_value(self) -> Any:
        """What one counted row adds, in SQL."""
        return literal(1)

    def condition(self) -> Any:
        """Which rows count, in SQL (None: every row)."""
        return None

    def aggregate(self, values: Any = None) -> Any:
        """The aggregate of the counted rows (``values``: a column of row values)."""
        return func.count()

    def real_count(self, parent_key: list[Any]) -> Any:
        """``SELECT count(*) | coalesce(sum(...), 0) FROM <rows> WHERE <key> = <parent_key> [AND where]``,
        correlated to the parent key columns given."""
        source, keys, condition, value = self.source(), self.key_columns(), self.condition(), self.row_value()
        parents = {col.table for col in parent_key}
        shared = [t for t in find_tables(source) if t in parents]
        if shared:
            # a self-referential counter (replies of a comment): the counted rows
            # are an alias of the parent's table, not the parent row itself
            adapter = ClauseAdapter(shared[0].alias("countercache_rows"))
            source, condition, value = adapter.traverse(source), adapter.traverse(condition), adapter.traverse(value)
            keys = [adapter.traverse(col) for col in keys]
        criteria = [col == pk for col, pk in zip(keys, parent_key)]
        if condition is not None:
            criteria.append(condition)
        return select(self.aggregate(value)).select_from(source).where(and_(*criteria))


@dataclass(eq=False)
class Count(Kind):
    """The child rows whose foreign key (``fk_keys``) names the parent."""

    child_mapper: Mapper[Any]
    #: Child attribute keys of the foreign key, in the parent key's order.
    fk_keys: tuple[str, ...]
    #: Child attribute keys whose values decide this counter (foreign key first).
    value_keys: tuple[str, ...]

    #: A plain count: every row weighs 1.
    simple: ClassVar[bool] = True

    def weight(self, values: dict[str, Any]) -> Any:
        return 1

    def key_columns(self) -> list[Any]:
        return [self.child_mapper.get_property(k).columns[0] for k in self.fk_keys]  # type: ignore[attr-defined]

    def condition(self) -> Any:
        return rows_of_class(self.child_mapper, self.key_columns()[0].table)


@dataclass(eq=False)
class Filtered(Count):
    """``where=`` (rows that match count) and/or ``sum=`` (the sum of a value).

    The very same expressions are evaluated in Python on a row's values
    during a flush (``where_fn``, ``sum_fn``: :mod:`countercache.expressions`)
    and rendered into SQL here.
    """

    where: Any = None
    sum: Any = None
    where_fn: Any = None
    sum_fn: Any = None

    simple: ClassVar[bool] = False

    def weight(self, values: dict[str, Any]) -> Any:
        """What a child row with these values adds (0 when it does not count)."""
        if self.where_fn is not None and not self.where_fn(values):
            return 0
        if self.sum_fn is None:
            return 1
        return self.sum_fn(values) or 0

    def row_value(self) -> Any:
        return self.sum if self.sum is not None else literal(1)

    def condition(self) -> Any:
        rows = Count.condition(self)
        if rows is None or self.where is None:
            return self.where if rows is None else rows
        return and_(rows, self.where)

    def aggregate(self, values: Any = None) -> Any:
        return func.count() if self.sum is None else func.coalesce(func.sum(values), 0)


@dataclass(eq=False)
class ManyToMany(Kind):
    """The parent's rows in the association table ``secondary``."""

    child_mapper: Mapper[Any]
    secondary: Any
    #: The association table's columns referring to the parent's key, in its order.
    parent_cols: tuple[Any, ...]
    #: The relationship on the parent, and its reverse on the child (None: one-sided).
    relationship_key: str
    reverse_key: str | None

    def key_columns(self) -> list[Any]:
        return list(self.parent_cols)


@dataclass(eq=False)
class MultiLevel(Kind):
    """The ``leaf`` rows of the parent's ``middle_mapper`` rows."""

    middle_mapper: Mapper[Any]
    #: Middle attribute keys referring to the parent's key.
    middle_fk_keys: tuple[str, ...]
    #: The leaf rows over the middle's key.
    leaf: Count

    @property
    def child_mapper(self) -> Mapper[Any]:  # type: ignore[override]
        return self.leaf.child_mapper

    def key_columns(self) -> list[Any]:
        return [self.middle_mapper.get_property(k).columns[0] for k in self.middle_fk_keys]  # type: ignore[attr-defined]

    def source(self) -> Any:
        middle_pk = list(self.middle_mapper.primary_key)
        leaf_fk = self.leaf.key_columns()
        return leaf_fk[0].table.join(
            self.key_columns()[0].table, and_(*(fk == pk for fk, pk in zip(leaf_fk, middle_pk))))

    def row_value(self) -> Any:
        return self.leaf.row_value()

    def middle_key(self) -> list[Any]:
        """The middle table's key columns (what the leaves' foreign key refers to)."""
        return list(self.middle_mapper.primary_key)

    def middle_condition(self) -> Any:
        """Which middle rows count (a single-table subclass's discriminator; None: all)."""
        return rows_of_class(self.middle_mapper, self.key_columns()[0].table)

    def condition(self) -> Any:
        middle = self.middle_condition()
        found = [c for c in (self.leaf.condition(), middle) if c is not None]
        return and_(*found) if len(found) > 1 else found[0] if found else None

    def aggregate(self, values: Any = None) -> Any:
        return self.leaf.aggregate(values)


def held_by_foreign_key(counter: Any) -> bool:
    """Do the database's foreign keys keep every counted row's parent (the key columns
    declare one referring to the parent's key)? Else rows may wait under a key no parent
    has yet (no foreign key: an application that checks its keys itself, or deleted and
    re-created a parent under the same key). Asked once per counter definition."""
    found = counter.__dict__.get("_held_by_foreign_key")
    if found is None:
        pk = list(counter.mapper.primary_key)
        try:
            columns = counter.kind.key_columns()
        except (AttributeError, IndexError, TypeError):
            return True
        mapper = counter.mapper

        def names_key(column: Any, parent_col: Any) -> bool:  # (a joined subclass's own key column too)
            if column is parent_col:
                return True
            try:
                return mapper.get_property_by_column(column) is mapper.get_property_by_column(parent_col)
            except Exception:  # noqa: BLE001 - not a column of the parent's tables
                return False

        found = counter.__dict__["_held_by_foreign_key"] = len(columns) == len(pk) and all(
            any(names_key(fk.column, parent_col) for fk in col.foreign_keys) for col, parent_col in zip(columns, pk))
    return found  # type: ignore[no-any-return]


def follows_key_changes(counter: Any) -> bool:
    """Do the counted rows follow their parent's new key? Its foreign key moves them
    (``ON UPDATE CASCADE``) or keeps the key from changing while it has any; else
    SQLAlchemy re-points them (``passive_updates=False`` on the relationship)."""
    if held_by_foreign_key(counter):
        return True
    rel = counter.mapper.relationships.get(counter.relationship.split(".")[0])
    return rel is not None and not rel.passive_updates
