"""Locking reads of child rows: key chunks, the ``SELECT ... ORDER BY pk FOR UPDATE`` (private).

The building blocks the pre-read, bulk statements and multi-level counters
share: which rows (:func:`_criteria`, in key-ordered chunks), the statement
(:func:`_locking_select`), and its two uses, :func:`read_foreign_keys` (the
counted values per row) and :func:`count_deleted` (rows grouped by them).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator

from sqlalchemy import Double, Float, Integer, Numeric, Text, any_, bindparam, cast, func, select, text, true, tuple_, type_coerce
from sqlalchemy.dialects.postgresql import ARRAY

from . import _execute
from ._compat import driver_in_transaction, single_table_criterion
from .values import single_precision

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from .children import _Child

#: Rows per SELECT of the pre-read. On MariaDB/MySQL an IN list of 1,000
#: values or more becomes a subquery join that may scan (and lock) the whole
#: primary key, so chunks stay well below that there.
PRELOCK_CHUNK = 5000
PRELOCK_CHUNK_MYSQL = 500


def _begin_sqlite_write(connection: Connection) -> None:
    """Make the pre-read part of the write transaction on SQLite.

    The sqlite3 module (in its default, legacy transaction mode) sends
    ``BEGIN`` only before the first INSERT/UPDATE/DELETE: a pre-read before
    it runs outside any transaction, so another connection could delete or
    move the row between the read and this flush's DELETE (counted twice,
    seen in the ``hot`` bench). ``BEGIN IMMEDIATE`` takes the write lock
    first; the driver sees the open transaction and sends no BEGIN of its
    own. Connections that manage BEGIN themselves are already inside one.
    """
    dbapi = connection.connection.dbapi_connection
    in_transaction = driver_in_transaction(dbapi)
    if in_transaction is False and getattr(dbapi, "isolation_level", None) is not None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def chunk_size(connection: Connection) -> int:
    """Keys per locking read: below MariaDB/MySQL's IN-to-subquery conversion there."""
    return PRELOCK_CHUNK_MYSQL if connection.dialect.name in ("mysql", "mariadb") else PRELOCK_CHUNK


def child_primary_key(child: _Child) -> list[Any]:
    """Primary-key columns of the table holding the child's foreign keys."""
    found = child.__dict__.get("_primary_key")  # (asked at every flush that deletes or moves)
    if found is None:
        table = child.mapper.get_property(child.keys[0]).columns[0].table  # type: ignore[attr-defined]
        found = child.__dict__["_primary_key"] = list(table.primary_key.columns)
    return list(found)


def _int_array(connection: Connection, child: _Child, keys: list[tuple[Any, ...]] | None) -> str | None:
    """PostgreSQL, one integer primary key, integer keys: the keys as one array
    literal (``{1,2,3}``), the parameter of a statement built once per child
    (:func:`_cached`); else None. (The text, not a list: psycopg picks a type
    per element of a list, 3.6 ms for 5,000 keys against 0.9 ms.)"""
    if keys is None or connection.dialect.name != "postgresql":
        return None
    pk = child_primary_key(child)
    if len(pk) != 1 or not isinstance(pk[0].type, Integer):
        return None
    values = [k for (k,) in keys]
    if any(type(v) is not int for v in values):
        return None
    return "{" + ",".join(map(str, values)) + "}"


def _key_chunks(connection: Connection, child: _Child, keys: list[tuple[Any, ...]] | None) -> list[Any] | None:
    """One-column keys elsewhere than in an array: key-ordered chunks of them, each
    the parameter of an expanding ``IN`` in a statement built once per child; else None."""
    if keys is None or len(child_primary_key(child)) != 1 or connection.dialect.name == "postgresql":
        return None  # (PostgreSQL: one array, built per flush where not integers)
    values = [k for (k,) in keys]
    try:
        ordered = sorted(values)
    except TypeError:  # (given in several forms, "7" and 8 for an integer key: in the database's order)
        key_type, dialect = child_primary_key(child)[0].type, connection.dialect
        ordered = sorted(values, key=lambda v: _canonical(key_type, v, dialect))
    size = chunk_size(connection)
    return [ordered[start : start + size] for start in range(0, len(ordered), size)]


def _by_key_list(child: _Child) -> Any:
    return child_primary_key(child)[0].in_(bindparam("countercache_keys", expanding=True))


def _by_int_array(child: _Child) -> Any:
    pk = child_primary_key(child)
    return pk[0] == any_(cast(bindparam("countercache_keys", type_=Text), ARRAY(pk[0].type)))


def _cached(child: _Child, form: tuple[Any, ...], build: Any) -> Any:
    """A statement built once per child and form (the pre-read runs once per
    flush that deletes or moves: building and keying a new SELECT each time
    cost more than the database takes to answer it)."""
    statements = child.__dict__.setdefault("_locking_statements", {})
    stmt = statements.get(form)
    if stmt is None:
        stmt = statements[form] = build()
    return stmt


def _criteria(connection: Connection, child: _Child, keys: list[tuple[Any, ...]]) -> Iterator[Any]:
    """WHERE clauses picking the child rows with these primary keys where no
    statement built once serves (:func:`_int_array`, :func:`_key_chunks`): one
    array on PostgreSQL, key-ordered chunks of an IN list of composite keys elsewhere."""
    pk = child_primary_key(child)
    if len(pk) == 1 and connection.dialect.name == "postgresql":
        # one array parameter: psycopg parses a fixed text, not 5,000 placeholders
        values = [k for (k,) in keys]
        if len({type(v) for v in values}) > 1:  # ("7" and 8 for an integer key: one array of one type)
            values = [_canonical(pk[0].type, v, connection.dialect) for v in values]
        yield pk[0] == any_(bindparam("countercache_keys", values, type_=ARRAY(pk[0].type)))
        return
    pk_expr = pk[0] if len(pk) == 1 else tuple_(*pk)
    ordered = sorted(keys)
    size = chunk_size(connection)
    for start in range(0, len(ordered), size):
        chunk = ordered[start : start + size]
        yield pk_expr.in_([k[0] for k in chunk] if len(pk) == 1 else chunk)


def _locking_select(child: _Child, criteria: Any, lock: str | None, *, with_key: bool = True,
                    dialect: Any = None, source: Any = None) -> Any:
    """``SELECT [pk,] counted values WHERE criteria ORDER BY pk`` with its row lock
    (``source``: the tables the criteria name, joined: a joined subclass's statement)."""
    mapper = child.mapper
    pk = child_primary_key(child)
    value_cols = [mapper.get_property(k).columns[0] for k in child.keys]  # type: ignore[attr-defined]
    read = value_cols
    name = getattr(dialect, "name", "")
    if name == "sqlite":
        # SQLite keeps a Numeric as the number given (10.004 in a Numeric(12, 2)),
        # which SQLAlchemy's type rounds when reading: read what SQL compares
        read = [type_coerce(c, Float()) if isinstance(c.type, Numeric) and not isinstance(c.type, Float) else c
                for c in value_cols]
    elif name in ("mysql", "mariadb"):
        # MariaDB sends a single-precision FLOAT as text of 6 digits (16777216 as
        # 1.67772e7): read the exact value, as SUM() and comparisons use it
        read = [cast(c, Double()) if isinstance(c.type, Float) and single_precision(c.type, dialect) else c
                for c in value_cols]
    stmt = select(*pk, *read) if with_key else select(*read)
    if source is not None:
        stmt = stmt.select_from(source)
    elif len({col.table for col in value_cols}) > 1:
        # values in more than one table of a joined-inheritance class: the
        # tables joined as the mapper joins them (not a cross product)
        stmt = stmt.select_from(mapper.persist_selectable)
    rows_of_class = single_table_criterion(mapper)  # (single-table inheritance: this class's rows)
    if rows_of_class is not None:
        stmt = stmt.where(rows_of_class)
    stmt = stmt.where(criteria).order_by(*pk)
    if lock == "share":
        stmt = stmt.with_for_update(read=True)
    elif lock is not None:
        stmt = stmt.with_for_update(key_share=lock == "no key update")
    return stmt


def read_foreign_keys(connection: Connection, child: _Child, keys: list[tuple[Any, ...]] | None = None,
                      *, where: Any = None, lock: str | None = "update",
                      given_forms: bool = True, source: Any = None) -> dict[tuple[Any, ...], dict[str, Any]]:
    """``{child primary key: {attribute: value}}`` (every counted value) of the rows with these keys
    (or matching ``where``), read in key order and, unless ``lock`` is None,
    locked (``"update"`` or ``"no key update"``) until the transaction ends.
    ``given_forms``: a row is also found under a key given in another form than the
    database's (``"7"`` for 7); False: each row once, under the database's form."""
    value_keys = child.keys
    n = len(child_primary_key(child))
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    if lock is not None and connection.dialect.name == "sqlite":
        _begin_sqlite_write(connection)  # (no row locks: the write lock, before the read)
    array = _int_array(connection, child, keys)
    if array is not None:
        dialect = connection.dialect
        stmt = _cached(child, ("read", dialect.name, lock), lambda: _locking_select(
            child, _by_int_array(child), lock, dialect=dialect))
        selects = [(stmt, {"countercache_keys": array})]  # (built once: run the short way)
    elif (chunks := _key_chunks(connection, child, keys)) is not None:
        dialect = connection.dialect
        stmt = _cached(child, ("read-in", dialect.name, lock), lambda: _locking_select(
            child, _by_key_list(child), lock, dialect=dialect))
        selects = [(stmt, {"countercache_keys": chunk}) for chunk in chunks]
    else:
        criteria = [where if where is not None else true()] if keys is None else _criteria(connection, child, keys)
        selects = [(_locking_select(child, criterion, lock, dialect=connection.dialect, source=source), {})
                   for criterion in criteria]
    for stmt, params in selects:
        # (one fetchall, not a fetchone per row; a statement built once the short way)
        rows = (_execute.execute(connection, stmt, params) if array is not None else connection.execute(stmt, params)).all()
        if n == 1 and len(value_keys) == 1:  # one key, one value: the common case, per row
            (k,) = value_keys
            for key, value in rows:
                found[(key,)] = {k: value}
        else:
            for row in rows:
                found[tuple(row[:n])] = dict(zip(value_keys, row[n:]))
    if given_forms and keys is not None and found and any(k not in found for k in keys):
        _match_given_keys(connection, child, keys, found)
    return found


def _match_given_keys(connection: Connection, child: _Child, keys: list[tuple[Any, ...]],
                      found: dict[tuple[Any, ...], dict[str, Any]]) -> None:
    """A key the application gave in another form than its type reads back
    (``"7"`` for an integer column, a UUID's text): the row read back under
    the database's form is also filed under the given one, so that the caller
    finds it (the session knows the row by the given form)."""
    pk = child_primary_key(child)
    dialect = connection.dialect

    def canonical(key: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(_canonical(column.type, value, dialect) for column, value in zip(pk, key))

    by_form = {canonical(k): v for k, v in found.items()}
    for key in keys:
        if key not in found:
            row = by_form.get(canonical(key))
            if row is not None:
                found[key] = row


def _canonical(type_: Any, value: Any, dialect: Any) -> Any:
    """``value`` as the database compares it: through the type's bind processor,
    then into the type's Python type where it is not one already."""
    processor = type_._cached_bind_processor(dialect)
    if processor is not None:
        try:
            value = processor(value)
        except Exception:  # noqa: BLE001 - a form the processor does not take: compared as given
            return value
    try:
        python_type = getattr(type_, "impl_instance", type_).python_type
    except NotImplementedError:
        return value
    if value is not None and not isinstance(value, python_type):
        try:
            value = python_type(value)
        except Exception:  # noqa: BLE001 - not convertible: compared as given
            pass
    return value


def count_deleted(connection: Connection, child: _Child, keys: list[tuple[Any, ...]],
                  then: Callable[[list[tuple[dict[str, Any], int]]], None], carried: list[Any] | None = None) -> None:
    """Lock (``FOR UPDATE``, key order) the rows with these keys, which this
    flush deletes, and call ``then([({attribute: value}, number of rows with those values)])``.

    A row found is locked until the transaction ends, so the flush's DELETE
    removes it as read; a row not found is gone already (its delete counted
    it). On PostgreSQL the rows are grouped by the server: a few rows back,
    not one per child. Given ``carried``, the read may wait for the
    connection's next statement (the flush's DELETE) and go with it, in one
    round trip (psycopg's pipeline mode; ``then`` is called right after
    both): the connection is appended to ``carried``.
    """
    value_keys = child.keys
    counts: dict[tuple[Any, ...], int] = {}
    if connection.dialect.name == "sqlite":
        _begin_sqlite_write(connection)
    array = _int_array(connection, child, keys)
    if array is not None:  # (PostgreSQL: grouped by the server)
        def build() -> Any:
            locked = _locking_select(child, _by_int_array(child), "update", with_key=False,
                                     dialect=connection.dialect).subquery()
            cols = list(locked.c)
            return select(*cols, func.count()).group_by(*cols)

        stmt = _cached(child, ("count", "postgresql"), build)
        params = {"countercache_keys": array}

        def grouped(rows: Any) -> None:
            then([(dict(zip(value_keys, values)), n) for *values, n in rows])

        if carried is not None and _execute.carry(connection, stmt, params, grouped):
            carried.append(connection)
        else:
            grouped(_execute.execute(connection, stmt, params).all())
        return
    chunks = _key_chunks(connection, child, keys)
    if chunks is not None:
        dialect = connection.dialect
        stmt = _cached(child, ("count-in", dialect.name), lambda: _locking_select(
            child, _by_key_list(child), "update", with_key=False, dialect=dialect))
        for chunk in chunks:
            for values in connection.execute(stmt, {"countercache_keys": chunk}).all():
                values = tuple(values)
                counts[values] = counts.get(values, 0) + 1
        then([(dict(zip(value_keys, values)), n) for values, n in counts.items()])
        return
    for criterion in _criteria(connection, child, keys):
        stmt = _locking_select(child, criterion, "update", with_key=False, dialect=connection.dialect)
        if connection.dialect.name == "postgresql":
            locked = stmt.subquery()
            cols = list(locked.c)
            for *values, n in connection.execute(select(*cols, func.count()).group_by(*cols)).all():
                values = tuple(values)
                counts[values] = counts.get(values, 0) + n
        else:
            for values in connection.execute(stmt).all():
                values = tuple(values)
                counts[values] = counts.get(values, 0) + 1
    then([(dict(zip(value_keys, values)), n) for values, n in counts.items()])


def lock_rows(connection: Connection, table: Any, keys: list[tuple[Any, ...]]) -> None:
    """``SELECT pk FROM table WHERE pk IN (...) ORDER BY pk FOR UPDATE``, in
    key-ordered chunks (the server orders: keys of any Python type)."""
    pk = list(table.primary_key.columns)
    pk_expr = pk[0] if len(pk) == 1 else tuple_(*pk)
    size = chunk_size(connection)
    for start in range(0, len(keys), size):
        chunk = keys[start : start + size]
        criterion = pk_expr.in_([k[0] for k in chunk] if len(pk) == 1 else chunk)
        connection.execute(select(*pk).where(criterion).order_by(*pk).with_for_update()).all()


#: child table -> {engine: the column-name sets of its enforced foreign keys}
_enforced: weakref.WeakKeyDictionary[Any, weakref.WeakKeyDictionary[Any, set[frozenset[str]]]] = \
    weakref.WeakKeyDictionary()


def enforced_foreign_key(connection: Connection, table: Any, columns: list[Any]) -> bool:
    """Does the database (MariaDB/MySQL) enforce a foreign key on exactly these
    columns of ``table``? Read once per table and engine from
    ``information_schema`` (a constraint the metadata declares may have been
    dropped, or never created)."""
    per_engine = _enforced.get(table)
    if per_engine is None:
        per_engine = _enforced[table] = weakref.WeakKeyDictionary()
    found = per_engine.get(connection.engine)
    if found is None:
        by_name: dict[str, set[str]] = {}
        for name, column in connection.execute(text(
                "SELECT constraint_name, column_name FROM information_schema.key_column_usage "
                "WHERE table_schema = COALESCE(:s, DATABASE()) AND table_name = :t "
                "AND referenced_table_name IS NOT NULL"), {"s": table.schema, "t": table.name}).all():
            by_name.setdefault(name, set()).add(column)
        found = per_engine[connection.engine] = {frozenset(cols) for cols in by_name.values()}
    return frozenset(c.name for c in columns) in found


def actions_run(connection: Connection) -> Any:
    """SQL that is true where the database runs the foreign keys' ``ON DELETE``
    actions on this connection now: not on SQLite without ``PRAGMA foreign_keys=ON``
    (its default), on MariaDB/MySQL under ``foreign_key_checks=0``, or on
    PostgreSQL under ``session_replication_role = replica``. A read of the rows a
    cascade would delete adds it to its WHERE: where no cascade runs, it reads
    (and counts) nothing, as nothing is deleted, at no extra round trip."""
    name = connection.dialect.name
    if name == "sqlite":
        return text("(SELECT foreign_keys FROM pragma_foreign_keys()) = 1")
    if name in ("mysql", "mariadb"):
        return text("@@foreign_key_checks = 1")
    if name == "postgresql":
        return text("current_setting('session_replication_role') <> 'replica'")
    return true()


def for_update(stmt: Any, connection: Connection) -> Any:
    """``stmt ... FOR UPDATE`` where the database has row locks; SQLite: the write lock taken now."""
    if connection.dialect.name == "sqlite":
        _begin_sqlite_write(connection)
        return stmt
    return stmt.with_for_update()
