"""countercache's own small statements, executed with less per-statement work (private).

A counter write is a ``text()`` UPDATE built once per form (``statements``),
run once or twice per flush or commit. Through ``Connection.execute`` each
run costs more CPU than the database takes to answer it on a small
transaction: the compiled-cache lookup, an execution context, a cursor
result. :func:`execute` takes a shorter way where nothing can tell the
difference, and ``Connection.execute`` everywhere else:

* no engine, connection or dialect event listener (``before_cursor_execute``,
  ``handle_error``, ``do_execute``...), no SQL logging (``echo``), no
  ``schema_translate_map``: these see or change every statement, so they get
  SQLAlchemy's own path;
* a synchronous driver, inside a transaction SQLAlchemy already began;
* a ``text()`` statement (with ``.columns()`` or not), a ``SELECT`` built once (the
  pre-read's, :mod:`countercache.locking`), or an ``INSERT`` (the shard rows' upsert) with no
  Python-side default, run with one set of parameters;
* every parameter an ``int`` or a ``str`` (``bool`` excluded) whose bind
  parameter has no type processor: what the driver receives is then what
  SQLAlchemy would have sent;
* a ``RETURNING`` whose result columns are plain integers (no result
  processor).

The statement is compiled once per dialect (kept with the statement), sent on
a cursor of the connection's own DBAPI connection (or recorded, while
:func:`countercache._psycopg.recording` is open), and a driver error is
raised as ``Connection.execute`` raises it: SQLAlchemy's ``DBAPIError``
subclass, with the connection invalidated on a disconnect.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy import Integer
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import Select, TextualSelect

#: per dialect (gone with it): ``(id(statement), parameter names) -> (statement, SQL, parameter order or None, usable)``
_compiled: weakref.WeakKeyDictionary[Any, dict[tuple[int, Any], tuple[Any, str, tuple[str, ...] | None, bool]]] = \
    weakref.WeakKeyDictionary()

_PLAIN = (int, str)


def execute(connection: Any, stmt: Any, params: dict[str, Any]) -> Any:
    """``connection.execute(stmt, params)``, the short way where it is the same
    (see the module): a result with ``fetchall()``, ``all()`` and ``rowcount``."""
    if not _plain_connection(connection) or type(params) is not dict:
        return connection.execute(stmt, params)
    for value in params.values():
        if type(value) not in _PLAIN:
            return connection.execute(stmt, params)
    dialect = connection.dialect
    if isinstance(stmt, (TextClause, TextualSelect, Select)):  # (text(), with typed result columns or not;
        names = None  # a SELECT built once: the pre-read's)
    elif isinstance(stmt, Insert):  # (compiled for the columns given, as SQLAlchemy does)
        names = tuple(params)
    else:
        return connection.execute(stmt, params)
    _, sql, order, usable = _entry(dialect, stmt, names)
    if not usable:
        return connection.execute(stmt, params)
    dbapi_connection = connection.connection.dbapi_connection
    parameters: Any = params if order is None else tuple(params[name] for name in order)
    recorded = getattr(dbapi_connection, "_countercache_recorded", None)
    if recorded is not None:  # (psycopg, sent later with the COMMIT)
        literals = _literals(params) if order is None else None
        if literals is not None:
            recorded.append(sql % literals)
        else:
            recorded.append(_recorder(dbapi_connection).mogrify(sql, parameters))
        return _Rows([], -1)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql, parameters)
        rows = cursor.fetchall() if cursor.description is not None else []
        rowcount = cursor.rowcount
    except dialect.loaded_dbapi.Error as error:
        connection._handle_dbapi_exception(error, sql, parameters, cursor, None)
        raise  # (not reached: the call above raises)
    finally:
        cursor.close()
    return _Rows(rows, rowcount)


def carry(connection: Any, stmt: Any, params: dict[str, Any], done: Any) -> bool:
    """``done(rows)`` of the SELECT ``stmt``, sent with the connection's next statement
    (psycopg's pipeline mode: one round trip for both; see :func:`countercache._psycopg.carry`)
    where the short way applies (see the module); False: nothing done, execute it."""
    if not _plain_connection(connection) or not isinstance(stmt, (TextClause, TextualSelect, Select)) \
            or type(params) is not dict or any(type(value) not in _PLAIN for value in params.values()):
        return False
    from . import _psycopg

    if not _psycopg.can_pipeline(connection):
        return False
    _, sql, order, usable = _entry(connection.dialect, stmt, None)
    if not usable or order is not None:
        return False
    return _psycopg.carry(connection.connection.dbapi_connection, sql, params, done)


def _entry(dialect: Any, stmt: Any, names: tuple[str, ...] | None) -> tuple[Any, str, tuple[str, ...] | None, bool]:
    forms = _compiled.get(dialect)
    if forms is None:
        forms = _compiled[dialect] = {}
    entry = forms.get((id(stmt), names))
    if entry is None:
        entry = forms[(id(stmt), names)] = _compile(stmt, dialect, names)
    return entry


def _literals(params: dict[str, Any]) -> dict[str, str] | None:
    """The parameters as SQL literals where writing them needs no quoting rule of the
    driver's: an integer's digits; a text of printable ASCII without a quote or a
    backslash, between quotes (the same under either ``standard_conforming_strings``).
    None where another value needs psycopg's ``mogrify``."""
    literals = {}
    for name, value in params.items():
        if type(value) is int:
            literals[name] = str(value) if value >= 0 else f"({value})"
        elif value.isascii() and value.isprintable() and "'" not in value and "\\" not in value:
            literals[name] = f"'{value}'"
        else:
            return None
    return literals


def schema_translation(bind: Any) -> dict[Any, Any]:
    """The ``schema_translate_map`` in effect on a Connection or an Engine (empty if none)."""
    options = bind.get_execution_options() if hasattr(bind, "get_execution_options") else {}
    return options.get("schema_translate_map") or {}


def translated(bind: Any, schema: str | None) -> str | None:
    """The schema a table declared in ``schema`` is in on ``bind``."""
    return schema_translation(bind).get(schema, schema)  # type: ignore[no-any-return]


def _plain_connection(connection: Any) -> bool:
    """Would ``Connection.execute`` do nothing here beyond compiling, sending and
    wrapping (no listener, no logging, no schema translation, a transaction
    begun, a synchronous driver)?"""
    return not (
        connection._has_events or connection.engine._has_events or connection.dialect._has_events
        or connection._echo or connection.dialect.is_async
        or schema_translation(connection)
        or not connection.in_transaction()
        or connection.connection.dbapi_connection is None
    )


def _compile(stmt: Any, dialect: Any,
             names: tuple[str, ...] | None) -> tuple[Any, str, tuple[str, ...] | None, bool]:
    compiled = stmt.compile(dialect=dialect) if names is None else stmt.compile(dialect=dialect, column_keys=list(names))
    processors = getattr(compiled, "_bind_processors", None)
    result_columns = getattr(compiled, "_result_columns", None)
    usable = (
        processors is not None and not processors and result_columns is not None
        # (an INSERT: no Python-side default to compute, no value that is not a parameter given)
        and (names is None or (not compiled.insert_prefetch and not compiled.returning
                               and set(compiled.bind_names.values()) == set(names)))
        and all(isinstance(column[3], Integer) and column[3].__class__.__module__.startswith("sqlalchemy.")
                and column[3]._cached_result_processor(dialect, None) is None for column in result_columns)
        and (not compiled.positional or compiled.positiontup is not None)
        and not getattr(compiled, "escaped_bind_names", None)
        and not getattr(compiled, "post_compile_params", None)  # (an expanding IN: rendered per execution)
        and not getattr(compiled, "literal_execute_params", None)
    )
    order = tuple(compiled.positiontup) if compiled.positional and compiled.positiontup is not None else None
    return stmt, compiled.string, order, usable  # (the statement kept alive: its id stays its own)


def _recorder(dbapi_connection: Any) -> Any:
    """A psycopg ``ClientCursor`` of the connection, for its ``mogrify`` (the
    connection's encoding and quoting), made once per connection."""
    cursor = getattr(dbapi_connection, "_countercache_mogrifier", None)
    if cursor is None:
        from psycopg import ClientCursor

        cursor = dbapi_connection._countercache_mogrifier = ClientCursor(dbapi_connection)
    return cursor


class _Rows:
    """The part of a ``CursorResult`` countercache reads."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchall(self) -> list[Any]:
        return self._rows

    all = fetchall

    def __iter__(self) -> Any:
        return iter(self._rows)
