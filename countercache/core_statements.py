"""Core statements on counted tables run through a session (private).

``session.execute(post_tags.insert(), [...])`` names a table, not a mapped
class: no ORM hook sees its rows. Through the session they are either kept
exact or refused before anything runs, never left uncounted:

* an INSERT of plain rows into a many-to-many association table (the bulk way
  to link many rows): counted from its parameters once it succeeded, +1 per
  row for each counter over that table;
* any other INSERT, UPDATE or DELETE that a counter reads (rows of a counted
  child table, an UPDATE setting a column a counter reads, links removed or
  re-pointed, an INSERT ... FROM SELECT, an upsert or a prefix such as
  IGNORE): a :class:`~countercache.CounterCacheError` names the counters and
  the way that is counted (the ORM statement on the mapped class, or the
  relationship's collection), or ``suspended()`` and ``reconcile()``;
* a Core INSERT or UPDATE giving a counter column a value: an
  :class:`~countercache.AssignmentError`, as for the ORM statement.

Inside ``countercache.suspended(session)`` every statement runs as given.
Statements executed on a ``Connection`` are never seen (the docs' "not
maintained" list).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import configure_mappers
from sqlalchemy.sql.elements import BindParameter, ClauseElement

from ._compat import has_post_values_clause, multi_values, statement_prefixes, statement_values
from . import database_kept
from ._registry import all_counters
from .bulk_rows import invoke
from .counter_writes import refuse_rekey
from .errors import AssignmentError, CounterCacheError
from .flush import FlushState
from .kinds import ManyToMany, MultiLevel
from .suspension import is_suspended

if TYPE_CHECKING:
    from sqlalchemy.orm import ORMExecuteState

    from .declaration import CounterCache

__all__ = ["core_statement"]


def core_statement(state: ORMExecuteState) -> Any:
    """``do_orm_execute`` of a Core INSERT/UPDATE/DELETE: the result of the
    statement when it was run here (counted), None to let it run, or raises."""
    table = getattr(state.statement, "table", None)
    if table is None or is_suspended(state.session):
        return None
    _refuse_counter_written(state, table)
    refuse_rekey(state, [table], params=True)
    kind = "INSERT" if state.is_insert else "UPDATE" if state.is_update else "DELETE"
    changed = _changed_columns(state, table) if state.is_update else set()
    links, others = [], []
    if any(counter.kind is None for counter in all_counters()):
        configure_mappers()  # (the first statement of a process may come before any query: resolve its counters)
    for counter in all_counters():
        if counter.kind is None:
            continue
        counted = _counted_columns(counter)
        if not any(c.table is table for c in counted) or (state.is_update and not changed & counted):
            continue
        (links if isinstance(counter.kind, ManyToMany) and counter.kind.secondary is table else others).append(counter)
    if not links and not others:
        if state.is_delete:
            _refuse_cascading(state, table)
        return None
    if others or not state.is_insert:
        how = (f"run it on the mapped class ({_classes(others, table)}: an ORM statement is counted)" if others
               else "change the relationship's collection (counted)")
        _refuse(links + others, f"a Core {kind} on {table.name} run through the session is not counted; {how}")
    database_kept.check_leftovers(state.session, [counter.mapper for counter in links], clause=state.statement)
    rows = _link_rows(state, table, links)
    result = invoke(state)
    fs = FlushState(state.session, None)
    for counter in links:
        strategy = fs.strategy(counter.strategy())
        for row in rows:
            key = tuple(row[c.key] for c in counter.kind.parent_cols)  # type: ignore[attr-defined]
            if None not in key:
                strategy.add(counter, key, 1)
    fs.finish()
    return result


def _counted_columns(counter: CounterCache) -> set[Any]:
    """The columns that decide a counter: foreign keys, where= / sum= columns, a middle's key."""
    kind = counter.kind
    if isinstance(kind, ManyToMany):
        return set(kind.secondary.c)
    child = counter.child_mapper
    counted = {child.get_property(k).columns[0] for k in counter.value_keys}
    if isinstance(kind, MultiLevel):
        counted |= set(kind.key_columns())
    return counted


def _changed_columns(state: ORMExecuteState, table: Any) -> set[Any]:
    names = {getattr(k, "key", k) for k in _given(state)}
    return {table.c[k] for k in names if isinstance(k, str) and k in table.c}


def _given(state: ORMExecuteState) -> set[Any]:
    """The columns the statement gives values (``values()`` and the parameters)."""
    params: Any = state.parameters
    given = set(statement_values(state.statement))
    for row in params if isinstance(params, list) else [params] if params else []:
        given.update(row)
    return given


def _link_rows(state: ORMExecuteState, table: Any, links: list[CounterCache]) -> list[dict[str, Any]]:
    """The rows an INSERT into an association table adds, as ``{column key: value}``;
    refused when they cannot be told from the statement."""
    statement = state.statement
    if getattr(statement, "select", None) is not None:
        _refuse(links, f"INSERT INTO {table.name} ... FROM SELECT inserts rows that cannot be counted")
    dialect = state.session.get_bind(**{"clause": statement, **state.bind_arguments}).dialect.name
    if has_post_values_clause(statement) or statement_prefixes(statement, dialect):
        _refuse(links, f"an INSERT into {table.name} with a prefix or ON CONFLICT / ON DUPLICATE KEY may "
                       "insert fewer rows than it is given")
    inline = {getattr(k, "key", k): v for k, v in statement_values(statement).items()}
    params: Any = state.parameters
    given = params if isinstance(params, list) else [params] if params else []
    rows = [_values({**inline, **{getattr(k, "key", k): v for k, v in row.items()}}) for row in given] or (
        [_values(inline)] if inline else [])
    for batch in multi_values(statement):
        rows.extend(_values({getattr(k, "key", k): v for k, v in values.items()}) for values in batch
                    if isinstance(values, dict))
    if any(not isinstance(values, dict) for batch in multi_values(statement) for values in batch):
        _refuse(links, f"an INSERT into {table.name} with positional multi-row values() cannot be counted; "
                       "give the rows as dictionaries")
    for row in rows:
        for counter in links:
            for column in counter.kind.parent_cols:  # type: ignore[attr-defined]
                if isinstance(row.get(column.key), ClauseElement) or column.key not in row:
                    _refuse(links, f"an INSERT into {table.name} whose {column.key} is not a plain value "
                                   "cannot be counted")
    return rows


def _values(row: dict[str, Any]) -> dict[str, Any]:
    """A row's values as sent: a ``bindparam()`` given by the row's parameters,
    or a literal's bound value (``values(tag_id=1)``); other SQL stays SQL."""
    found = {}
    for key, value in row.items():
        if isinstance(value, BindParameter):
            if value.key in row:
                value = row[value.key]
            elif value.callable is None and not value.required:
                value = value.value
        found[key] = value
    return found


def _refuse_cascading(state: ORMExecuteState, table: Any) -> None:
    """A Core DELETE whose rows the database's ``ON DELETE CASCADE`` follows
    into counted rows or links (any depth up to 8): refused (the ORM
    ``delete()`` of the mapped class reads and counts them first)."""
    counted: dict[Any, list[CounterCache]] = {}
    for counter in all_counters():
        if counter.kind is not None:
            for column in _counted_columns(counter):
                counted.setdefault(column.table, []).append(counter)
    seen, level = {table}, [table]
    for _ in range(8):
        below = [other for other in table.metadata.tables.values() if other not in seen and any(
            fk.ondelete and fk.ondelete.upper() == "CASCADE" and fk.column.table in level for fk in other.foreign_keys)]
        # (a counter of the deleted rows themselves loses its children with its parent row: no drift)
        hit = [c for other in below for c in counted.get(other, ())
               if not (level == [table] and c.parent is not None and c.parent.table is table)]
        if hit:
            _refuse(hit, f"a Core DELETE on {table.name} makes the database delete counted rows (ON DELETE "
                         f"CASCADE into {below[0].name}) unseen; run the ORM delete() of the mapped class (counted)")
        if not below:
            return
        seen.update(below)
        level = below


def _refuse_counter_written(state: ORMExecuteState, table: Any) -> None:
    """A Core INSERT/UPDATE giving a counter column a value: refused like the ORM statement."""
    if not (state.is_insert or state.is_update):
        return
    names = {getattr(k, "key", k) for k in _given(state)}
    written = sorted(c.name for c in all_counters()
                     if c.column is not None and c.column.table is table and c.column.key in names)
    if written:
        raise AssignmentError(
            f"{', '.join(written)} is maintained by countercache: a Core "
            f"{'INSERT' if state.is_insert else 'UPDATE'} on {table.name} cannot set it "
            "(countercache.reconcile() writes the true values)")


def _classes(counters: list[CounterCache], table: Any) -> str:
    """The mapped classes over ``table`` among the counters' children (and middles)."""
    names = []
    for counter in counters:
        mappers = [counter.child_mapper]
        if isinstance(counter.kind, MultiLevel):
            mappers.append(counter.kind.middle_mapper)
        for mapper in mappers:
            if table in mapper.tables and mapper.class_.__name__ not in names:
                names.append(mapper.class_.__name__)
    return ", ".join(names) or "the mapped class"


def _refuse(counters: list[CounterCache], why: str) -> None:
    names = ", ".join(sorted({c.name for c in counters}))
    raise CounterCacheError(
        f"{names}: {why}; or run it inside countercache.suspended(session) and repair with countercache.reconcile()")
