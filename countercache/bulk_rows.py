"""What an ORM bulk statement gives (private): its rows' values and its criteria.

Read by :mod:`countercache.bulk_dml` before the statement runs, the way
SQLAlchemy will use them: values keyed by attribute name, column name or
column; a ``bindparam()`` in ``values()`` or ``where()`` takes its value from
the parameters; a ``None`` in a bulk INSERT's parameter set is left out (the
column's default applies) unless ``render_nulls``; values the database
computes (a SQL expression, a server default) cannot be counted and are
refused.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import select, tuple_
from sqlalchemy.sql.elements import BindParameter, ClauseElement
from sqlalchemy.sql.visitors import cloned_traverse

from .errors import CounterCacheError

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper, ORMExecuteState

__all__ = ["_attribute_values", "_refuse", "_literal", "_parameter_rows", "_complete", "bound", "where_of",
           "refuse_unkeyed", "invoke", "counted", "refuse_key_change"]

#: Has the statement being counted run yet (:func:`counted`)?
_ran: ContextVar[bool] = ContextVar("countercache_statement_ran", default=False)


def invoke(state: ORMExecuteState, **kw: Any) -> Any:
    """Run the application's statement (``state.invoke_statement(**kw)``), noting that it ran."""
    result = state.invoke_statement(**kw)
    _ran.set(True)
    return result


def counted(state: ORMExecuteState, count: Callable[[], Any]) -> Any:
    """``count()``: run the statement (through :func:`invoke`) and count its rows. Where
    counting fails after the statement ran, the session's transaction is rolled back
    before the error goes on, as SQLAlchemy does for a failed flush: the statement's
    rows are not counted, and a commit would keep them so."""
    token = _ran.set(False)
    try:
        return count()
    except BaseException:
        if _ran.get():
            state.session.rollback()
        raise
    finally:
        _ran.reset(token)


def _attribute_values(mapper: Mapper[Any], values: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """Values of the ``keys`` attributes in a parameter dict or ``.values()``
    mapping (keyed by attribute name, column name or column)."""
    found: dict[str, Any] = {}
    if not values:
        return found
    by_column = {mapper.get_property(k).columns[0].key: k for k in keys}  # type: ignore[attr-defined]
    for name, value in values.items():
        name = getattr(name, "key", name)
        if name in keys:
            found[name] = value
        elif name in by_column:
            found[by_column[name]] = value
    return found


def refuse_key_change(mapper: Mapper[Any], names: str, values: Any) -> None:
    """An UPDATE statement that sets the class's primary key as well as counted columns:
    refused before it runs (its rows are found again by their key after it, to read
    what they became; by then they have another)."""
    keys = tuple(mapper.get_property_by_column(c).key for c in mapper.primary_key)
    if _attribute_values(mapper, values, keys):
        raise CounterCacheError(
            f"{names}: an UPDATE statement that sets {mapper.class_.__name__}'s primary key "
            f"({', '.join(keys)}) and a counted column together cannot be counted; change the key "
            "in a statement of its own, delete and insert the rows, or move them through the session"
        )


def _refuse(child: Any, why: str) -> None:
    names = ", ".join(c.name for c in child.counters)
    raise CounterCacheError(
        f"{names}: {why}; insert through the session (or give the values), or run it inside "
        "countercache.suspended(session) and repair with countercache.reconcile()"
    )


def _literal(child: Any, key: str, value: Any) -> Any:
    if isinstance(value, BindParameter) and value.callable is None:
        return value.value
    if isinstance(value, ClauseElement):
        _refuse(child, f"the bulk INSERT computes {key} in SQL, so the counter cannot know it")
    return value


def _parameter_rows(state: ORMExecuteState, mapper: Mapper[Any]) -> list[dict[str, Any]]:
    """A bulk INSERT's parameter sets as SQLAlchemy sends them: a None is left
    out (the column's default applies) unless ``render_nulls`` is set or the
    column's type takes None as a value (``should_evaluate_none``)."""
    params: Any = state.parameters
    rows = params if isinstance(params, list) else [params] if params else []
    if state.execution_options.get("render_nulls"):
        return rows
    keep = {key for key, prop in mapper.column_attrs.items()
            if prop.columns[0].type.should_evaluate_none}
    return [{k: v for k, v in row.items() if v is not None or k in keep} for row in rows]


def bound(values: dict[Any, Any]) -> dict[Any, Any]:
    """A row's values with each ``bindparam()`` given by the row's own parameters replaced by its value
    (``insert(Child).values(parent_id=bindparam("p"))`` executed with ``[{"p": 1}, ...]``)."""
    return {k: values[v.key] if isinstance(v, BindParameter) and v.key in values else v for k, v in values.items()}


def where_of(state: ORMExecuteState) -> Any:
    """The statement's WHERE with the values a parameter dict gives its
    ``bindparam()``s (``update(Child).where(Child.id == bindparam("cid"))``,
    ``{"cid": 1, ...}``), for the locking read that runs before it."""
    where = state.statement.whereclause  # type: ignore[attr-defined]
    params = state.parameters
    if where is None or not isinstance(params, dict) or not params:
        return where

    def give(bind: BindParameter[Any]) -> None:  # (on a copy: the statement keeps its own)
        if bind.key in params:
            bind.value, bind.required = params[bind.key], False

    return cloned_traverse(where, {}, {"bindparam": give})


def refuse_unkeyed(state: ORMExecuteState, child: Any, pk_keys: list[str]) -> None:
    """A bulk UPDATE/DELETE with a parameter list is counted row by row by
    primary key: refused when its parameter sets do not name the rows so
    (``dml_strategy="core_only"``, criteria over ``bindparam()``s)."""
    params: list[dict[str, Any]] = state.parameters  # type: ignore[assignment]
    if state.execution_options.get("dml_strategy") == "core_only" or \
            any(k not in p for p in params for k in pk_keys):
        _refuse(child, "a bulk UPDATE/DELETE with a parameter list is counted by the primary key each parameter "
                f"set gives ({', '.join(pk_keys)}); this one's rows are chosen otherwise "
                "(dml_strategy='core_only', bindparam() criteria), so countercache cannot tell which rows it "
                "changes; give the keys, or run one statement per set")


def _complete(mapper: Mapper[Any], child: Any, row: dict[str, Any]) -> dict[str, Any]:
    """A bulk INSERT's row with the values it leaves to column defaults; the
    ones only the database knows (server defaults) are refused."""
    row = {k: _literal(child, k, v) for k, v in row.items()}
    for key in child.keys:
        if key in row:
            continue
        column = mapper.get_property(key).columns[0]  # type: ignore[attr-defined]
        default = column.default
        if default is not None and default.is_scalar:
            row[key] = default.arg
        elif default is not None or column.server_default is not None:
            _refuse(child, f"the bulk INSERT leaves {key} to a default the counter cannot see")
        else:
            row[key] = None
    return row


def gone(connection: Any, mapper: Mapper[Any], locked: dict[tuple[Any, ...], Any], result: Any) -> dict[Any, Any]:
    """The rows of ``locked`` (read and locked before) that the DELETE removed: all of
    them where its row count says so; else those no longer in the table it deletes
    from (a ``mysql_limit``, a PostgreSQL ``BEFORE DELETE`` trigger that skipped a row;
    nobody else can have deleted a locked row)."""
    if not locked:
        return locked
    try:
        rowcount = result.rowcount
    except Exception:  # noqa: BLE001 - (a result without one: read what is left)
        rowcount = -1
    if rowcount == len(locked):
        return locked
    pk = list(mapper.local_table.primary_key.columns)
    keys = list(locked)
    left: set[tuple[Any, ...]] = set()
    for start in range(0, len(keys), 500):
        chunk = keys[start:start + 500]
        criterion = pk[0].in_([k[0] for k in chunk]) if len(pk) == 1 else tuple_(*pk).in_(chunk)
        left.update(tuple(row) for row in connection.execute(select(*pk).where(criterion)))
    return {key: row for key, row in locked.items() if key not in left}
