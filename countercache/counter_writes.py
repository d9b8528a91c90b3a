"""Statements that would write a counter column, refused (private).

A counter column is the library's: assigning the attribute is refused
(:func:`countercache.memory.guard_assignment`, the constructor's keyword
included), and so is every ORM statement that would set it, for an existing
row or a new one, before it runs and whatever its value:
``update(User).values(question_count=...)``, the by-primary-key form
``session.execute(update(User), [{"id": 1, "question_count": 7}])``,
``insert(User).values(question_count=5)`` (also ``from_select()`` naming the
column, and an upsert's ``SET``), and the legacy
``Session.bulk_update_mappings()`` / ``bulk_insert_mappings()``
(:mod:`countercache.legacy_bulk`). A new row starts at 0 (the column's
default) and is counted as its children come; :func:`countercache.reconcile`
corrects a stored value, and :func:`countercache.fold` moves a sharded
counter's deltas in (both write on a connection, not through these
statements).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from ._compat import insert_select_names, multi_values, statement_values, upsert_set_keys
from ._registry import all_counters
from .errors import AssignmentError, CounterCacheError
from .kinds import held_by_foreign_key
from .strategies import STRATEGY_CLASSES

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper, ORMExecuteState

    from .declaration import CounterCache

__all__ = ["check_statement", "counters_in", "written", "refuse", "refuse_rekey"]


def counters_in(mapper: Mapper[Any]) -> dict[str, CounterCache]:
    """The counters whose columns are in ``mapper``'s tables, by attribute and column name."""
    tables = set(mapper.tables)
    names: dict[str, CounterCache] = {}
    for counter in all_counters():
        column = counter.column
        if column is not None and column.table in tables:
            for name in (counter.key, column.key, column.name):
                names.setdefault(name, counter)  # type: ignore[arg-type]
    return names


def written(mapper: Mapper[Any], keys: Iterable[Any]) -> dict[CounterCache, Any]:
    """``{counter: the key naming it}`` for the keys (attribute or column names,
    columns) of values given for ``mapper``'s rows that name a counter column."""
    found: dict[CounterCache, Any] = {}
    names: dict[str, CounterCache] | None = None
    columns: dict[Any, CounterCache] | None = None
    for key in keys:
        if isinstance(key, str):
            if names is None:
                names = counters_in(mapper)
            counter = names.get(key)
        else:
            if columns is None:  # (any table's: a multi-table UPDATE may set another table's column)
                columns = {c.column: c for c in all_counters() if c.column is not None}
            counter = columns.get(key) if getattr(key, "table", None) is not None else None
        if counter is not None:
            found.setdefault(counter, key)
    return found


def refuse(found: dict[CounterCache, Any], how: str) -> None:
    """Raise the refusal of a write of the ``found`` counters by ``how``, if any."""
    if not found:
        return
    names = ", ".join(sorted(c.name for c in found))
    key = next(iter(found.values()))
    key = getattr(key, "key", key)
    raise AssignmentError(
        f"{names} is maintained by countercache: {how} cannot set it (it gives {key} a value); leave it "
        "out (a new row starts at 0 and is counted as its children come), and use countercache.reconcile() "
        "to correct a stored value"
    )


def _statement_keys(state: ORMExecuteState, own: bool) -> set[Any]:
    """Every key an ORM INSERT or UPDATE gives a value for (the parameter
    sets' only when ``own``: they name columns of the statement's own class)."""
    statement = state.statement
    keys: set[Any] = set(statement_values(statement))
    for batch in multi_values(statement):
        for row in batch:
            if isinstance(row, dict):
                keys.update(row)
            else:  # positional: the table's columns in order
                keys.update(list(statement.table.c)[:len(row)])  # type: ignore[attr-defined]
    keys.update(insert_select_names(statement))
    keys.update(upsert_set_keys(statement))
    params: Any = state.parameters
    if own and params:
        keys.update(*params) if isinstance(params, list) else keys.update(params)
    return keys


def check_statement(state: ORMExecuteState, mapper: Mapper[Any]) -> None:
    """Refuse an ORM INSERT or UPDATE on ``mapper`` that sets a counter column."""
    if not (state.is_insert or state.is_update):
        return
    found = written(mapper, _statement_keys(state, own=bool(counters_in(mapper))))
    if found:
        refuse(found, f"an ORM {'insert' if state.is_insert else 'update'}({mapper.class_.__name__})")


def refuse_rekey(state: ORMExecuteState, tables: Iterable[Any], *, params: bool) -> None:
    """An UPDATE statement giving a new primary key to rows of a parent whose
    counters are held for the commit (``deferred``/``sharded``): refused
    before it runs. What the transaction holds for the old keys, and
    ``sharded``'s shard rows, would stay behind (the database's ``ON UPDATE
    CASCADE`` moves the children unseen); assigning the key on the object is
    counted. ``params``: the parameter sets give SET values too (a Core
    statement; in the ORM's by-primary-key form they name the rows)."""
    if not state.is_update:
        return
    given = set(statement_values(state.statement))
    if params:
        rows: Any = state.parameters
        for row in rows if isinstance(rows, list) else [rows] if rows else []:
            given.update(row)
    names = {getattr(k, "key", k) for k in given} | {getattr(k, "name", None) for k in given}
    tables = set(tables)
    for counter in all_counters():
        column = counter.column
        if column is None or column.table not in tables:
            continue
        held = STRATEGY_CLASSES[counter.strategy()].held is not None
        loose = counter.kind is not None and counter.strategy() in ("bulk", "per_row") \
            and not held_by_foreign_key(counter)
        if not held and not loose:
            continue
        pk = [c for c in column.table.primary_key.columns if c.key in names or c.name in names]
        if pk and loose:  # (no foreign key: the rows stay under the old key, others may wait under the new one)
            raise CounterCacheError(
                f"{counter.name}: an UPDATE statement giving {column.table.name}.{pk[0].name} new values, where no "
                "foreign key in the database holds the counted rows, is not counted (they stay under the old key; "
                "others may wait under the new one); run it inside countercache.suspended(session) and "
                "countercache.reconcile(), or declare the foreign key")
        if pk:
            raise CounterCacheError(
                f"{counter.name}: an UPDATE statement giving {column.table.name}.{pk[0].name} new values is not "
                f"counted with the {counter.strategy()} strategy (what the transaction holds for the old keys "
                "would stay behind); change the key on the object (obj.id = ...), which is counted")
