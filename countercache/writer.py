"""Writing counter deltas to a parent table (private).

Every strategy ends here: it hands :meth:`ParentTable.apply` a mapping
``{parent primary key: [delta per counter slot]}`` and gets back the new
values where the backend can return them. The statement increments in SQL
(``SET n = n + :delta``), never writes a value read into Python, locks the
parent rows in primary-key order, and emits nothing for a net-zero change.

The statement form is chosen per dialect by measurement
(``bench/statement_forms.py``: median microseconds to apply deltas to 1, 100
and 10,000 parents, 2 cores, PostgreSQL 15, MariaDB 10.11, SQLite 3.40):

* **PostgreSQL**: ``SELECT 1 FROM parent JOIN unnest(:keys) ... ORDER BY pk
  FOR NO KEY UPDATE`` and then ``UPDATE parent SET n = n + v.d FROM
  unnest(:keys, :deltas) AS v ... RETURNING``. The SELECT takes the row locks
  in key order before the UPDATE touches a row (a plain ``UPDATE ... FROM``
  locks in join order and deadlocks under concurrent flushes). The lock
  must be its own statement: folded into the UPDATE as a locking sub-select
  (measured 969 us at 100 parents against 729 for the pair) the UPDATE's
  snapshot predates the lock waits, and the re-check of rows changed
  meanwhile deadlocked once in 320 transactions of the concurrency test.
  The SQL text is the same for any number of parents (arrays, not a VALUES
  list), so SQLAlchemy's compiled cache and psycopg's prepared statements
  apply; ``RETURNING`` gives the new values in the same round trip, which an
  executemany cannot (psycopg has no executemany RETURNING for UPDATE).
  Measured at 100 / 10,000 parents: 729 / 61,962 us; lock SELECT then
  ``UPDATE ... FROM (VALUES)`` 1,760 / 523,483 (its text changes with the
  count: no cache); executemany 1,395 / 123,177 before the SELECT it would
  need for new values.
* **SQLite**: ``UPDATE ... FROM json_each(:rows) ... RETURNING``: one fixed
  statement, no parameter-count limit; SQLite has no row locks to order.
  280 / 21,744 us at 100 / 10,000 parents, against 986 / 326,029 for
  ``CASE``, 785 / 148,774 for ``FROM (VALUES)`` and 471 / 40,659 for an
  executemany plus the SELECT for new values.
* **MariaDB / MySQL**: single-table ``UPDATE ... SET n = n + CASE ... END
  WHERE pk IN (...) ORDER BY pk``: the only single statement whose lock
  order the server guarantees (a multi-table ``UPDATE ... JOIN`` cannot take
  ``ORDER BY``). There is no ``UPDATE ... RETURNING``, so in-memory parents
  are expired instead. Above :data:`MYSQL_CHUNK` parents the statement is
  split into key-ordered chunks. 1,163 us at 100 parents, against 8,834 for
  an executemany and 1,552 for a lock SELECT followed by an unordered
  ``UPDATE ... JOIN JSON_TABLE``; at 10,000 parents that last form is faster
  (121,069 against 184,365 us): a candidate for very wide flushes. Chunks
  stay under 1,000 keys because MariaDB rewrites an ``IN`` list of 1,000
  values or more into a subquery (``in_predicate_conversion_threshold``),
  which gives up the key-range scan and its lock order.

A single parent (the common small transaction, and every ``per_row``
insert or delete) takes a plain ``UPDATE ... WHERE pk = :pk``.
"""

from __future__ import annotations

import weakref
from functools import cached_property
from typing import TYPE_CHECKING, Any

from sqlalchemy import Enum, String, TypeDecorator, select
from sqlalchemy.engine import Connection

from . import _registry, collation
from .values import canonical_keys, key_converters
from .statements import MYSQL_CHUNK as MYSQL_CHUNK
from .statements import Deltas as Deltas
from .statements import Key as Key
from .statements import Results as Results
from .statements import StatementForms

if TYPE_CHECKING:
    from sqlalchemy import Column, Table
    from sqlalchemy.orm import Mapper

    from .declaration import CounterCache

__all__ = ["ParentTable", "Key", "Deltas", "Results", "FEW", "MYSQL_CHUNK"]

#: Most parents the one-statement ``few`` form takes (per_row: one child row).
FEW = 4


#: mapper -> ParentTable.of_mapper(mapper), until the next counter is added
_of_mapper: weakref.WeakKeyDictionary[Any, list[ParentTable]] = weakref.WeakKeyDictionary()


def _add_vectors(a: list[Any], b: list[Any]) -> list[Any]:
    return [x + y for x, y in zip(a, b)]


def renamed_keys(deltas: Deltas, renamed: dict[Key, Key] | None) -> Deltas:
    """``deltas`` with keys a changed primary key replaced addressed to the new key (summed)."""
    if not renamed or renamed.keys().isdisjoint(deltas):
        return deltas
    found: Deltas = {}
    for key, vector in deltas.items():
        key = renamed.get(key, key)
        have = found.get(key)
        found[key] = vector if have is None else [a + b for a, b in zip(have, vector)]
    return found


def _plain(value: Any) -> Any:
    return bytes(value) if isinstance(value, (bytearray, memoryview)) else value


def lock_order(table: Table) -> tuple[int, str]:
    """The one order in which a flush or a commit locks rows of several tables:
    a child's table before its parents' (the multi-level translation locks a
    middle row, then writes its parent), then by name; keys ascending within
    a table."""
    return (-_depth(table, frozenset()), table.fullname)


def _depth(table: Table, seen: frozenset[Table]) -> int:
    """0 for a table that refers to no other, else one more than the deepest table it refers to."""
    seen = seen | {table}
    referred = set()
    for fk in table.foreign_keys:
        try:
            other = fk.column.table
        except Exception:  # noqa: BLE001 - a table outside the metadata: not ours to order
            continue
        if other not in seen:
            referred.add(other)
    return 1 + max(_depth(t, seen) for t in referred) if referred else 0


class ParentTable(StatementForms):
    """The counters that live on one table, and how to update them."""

    def __init__(self, mapper: Mapper[Any], table: Table) -> None:
        self.mapper = mapper
        self.table = table
        self.pk_cols: tuple[Column[Any], ...] = tuple(table.primary_key.columns)
        self.counters: list[CounterCache] = []
        self._statements: dict[tuple[Any, ...], Any] = {}

    @classmethod
    def for_column(cls, mapper: Mapper[Any], column: Column[Any]) -> ParentTable:
        for counter in _registry.all_counters():
            known = counter.parent
            if known is not None and known.table is column.table and known.mapper is mapper:
                return known
        return cls(mapper, column.table)

    @staticmethod
    def of_mapper(mapper: Mapper[Any]) -> list[ParentTable]:
        """The parent tables whose rows ``mapper``'s instances are (inherited ones
        included); looked up once per mapper (a parent delete asks per row)."""
        found = _of_mapper.get(mapper)
        if found is None:
            found = _of_mapper[mapper] = []
            for counter in _registry.all_counters():
                known = counter.parent
                if known is not None and known not in found and mapper.isa(known.mapper):
                    found.append(known)
        return found

    def add(self, counter: CounterCache) -> None:
        _of_mapper.clear()
        if counter not in self.counters:
            counter.slot = len(self.counters)
            self.counters.append(counter)
            self._statements.clear()

    def new_vector(self) -> list[int]:
        return [0] * len(self.counters)

    def canonical(self, deltas: Deltas, dialect: Any = None) -> Deltas:
        """``deltas`` keyed as the database stores the keys: keys given as another
        type (``"3"`` for an integer key, as a web form sends it) converted, and
        the deltas of keys that are then equal summed. Sorting, grouping, the
        identity map and the UPDATE all see one key per row. A key of a user's
        type (``TypeDecorator``) is processed as ``dialect`` stores and loads it."""
        if dialect is not None and self.decorated_keys:
            return self._one_per_row(dialect, deltas)
        converters = self._converters
        if converters is None:
            return deltas
        return canonical_keys(converters, deltas, _add_vectors)

    # (cached_property: computed once, then a plain attribute read; these are
    # asked on every flush, and the primary key columns never change)
    @cached_property
    def _converters(self) -> tuple[Any, ...] | None:
        return key_converters(self.pk_cols)

    @cached_property
    def decorated_keys(self) -> bool:
        """Has the key a column of a user's type (``TypeDecorator``)? Its values
        are known equal only once processed as the database will store them."""
        return any(isinstance(c.type, TypeDecorator) for c in self.pk_cols)

    @cached_property
    def ordered_as_stored(self) -> bool:
        """Are keys sorted as the database orders what it stores, not as Python orders them?
        A user's type (``TypeDecorator``); an ``Enum`` (Python's enum members do not sort)."""
        return any(isinstance(c.type, (TypeDecorator, Enum)) for c in self.pk_cols)

    def _stored_key(self, connection: Connection) -> Any:
        """A sort key: the key as the database stores it (the order its index locks in;
        a native ENUM's, PostgreSQL's and MariaDB's, is the order of its declaration)."""
        dialect = connection.dialect

        def one(t: Any) -> Any:
            if isinstance(t, TypeDecorator):
                return lambda v: _plain(t.process_bind_param(v, dialect))
            if isinstance(t, Enum):
                to_stored = t._cached_bind_processor(dialect) or (lambda v: v)
                if t.native_enum and dialect.supports_native_enum:
                    order = {name: i for i, name in enumerate(t.enums)}
                    return lambda v: order.get(to_stored(v), len(order))
                return to_stored
            return None

        forms = [one(c.type) for c in self.pk_cols]

        def stored(key: Key) -> Key:
            return tuple(v if f is None or v is None else f(v) for f, v in zip(forms, key))
        return stored

    def _one_per_row(self, dialect: Any, deltas: Deltas) -> Deltas:
        """``deltas`` keyed by each key as the database stores and returns it
        (a UUID given as text, for a UUID stored as bytes, becomes the UUID the
        row loads as), the deltas of keys then equal combined: a statement
        naming one row twice would apply one delta only, and the identity map
        knows the parent by the loaded key."""
        decorated = [c.type if isinstance(c.type, TypeDecorator) else None for c in self.pk_cols]

        def loaded(t: Any, v: Any) -> Any:
            if t is None or v is None:
                return v
            return t.process_result_value(_plain(t.process_bind_param(v, dialect)), dialect)

        merged: Deltas = {}
        for key, vector in deltas.items():
            key = tuple(loaded(t, v) for t, v in zip(decorated, key))
            merged[key] = [x + y for x, y in zip(merged[key], vector)] if key in merged else vector
        return merged

    def same_rows(self, connection: Connection, deltas: Deltas, session: Any = None) -> Deltas:
        """``deltas`` with the string keys that name one row under the key's
        collation combined ('python', 'Python' and 'python ' under MariaDB's
        default collation, or SQLite's ``NOCASE``): a statement naming one row
        twice would add one of their deltas only. The key kept is the one
        ``session`` knows the parent by, so the parent in memory shows it."""
        if not self.string_keys:
            return deltas
        rules = [collation.rule_for(c, connection) if isinstance(c.type, String) else None for c in self.pk_cols]
        if all(r is None or r.exact for r in rules):
            return deltas
        by_row: dict[Key, Key] = {}  # the row's key as the collation sees it -> the key kept
        merged: Deltas = {}
        known = None
        for key, vector in deltas.items():
            row = tuple(v if r is None or not isinstance(v, str) else r.normal(v, connection, self.table, c)
                        for r, v, c in zip(rules, key, self.pk_cols))
            kept = by_row.get(row)
            if kept is None:
                if session is not None:
                    if known is None:
                        known = self._known_keys(session, rules, connection)
                    kept = known.get(row, key)
                else:
                    kept = key
                by_row[row] = kept
                merged[kept] = list(vector)
            else:
                merged[kept] = [x + y for x, y in zip(merged[kept], vector)]
        return merged

    def stored_spellings(self, connection: Connection, deltas: Deltas) -> Deltas:
        """``deltas`` keyed by the spelling the table stores for each string key
        that its collation holds equal to another ('Python' -> 'python'): for
        rows matched as text, not by the collation (the sharded side table's
        ``parent_key``). A key no row has stays as given."""
        if not self.string_keys or len(self.pk_cols) != 1:
            return deltas
        (column,) = self.pk_cols
        rule = collation.rule_for(column, connection)
        if rule.exact:
            return deltas
        given = [k[0] for k in deltas if isinstance(k[0], str)]
        stored = {}
        for start in range(0, len(given), 500):
            for value in connection.execute(select(column).where(column.in_(given[start:start + 500]))).scalars():
                stored[rule.normal(value, connection, self.table, column)] = value
        merged: Deltas = {}
        for key, vector in deltas.items():
            if isinstance(key[0], str):
                key = (stored.get(rule.normal(key[0], connection, self.table, column), key[0]),)
            merged[key] = [x + y for x, y in zip(merged[key], vector)] if key in merged else list(vector)
        return merged

    def _known_keys(self, session: Any, rules: list[Any], connection: Connection) -> dict[Key, Key]:
        """The keys of this table's parents in ``session``, by their row as the collation sees it."""
        found = {}
        for ident in list(session.identity_map.keys()):
            cls, key = ident[0], ident[1]
            mapper = getattr(cls, "__mapper__", None)
            if mapper is not None and mapper.isa(self.mapper):
                row = tuple(v if r is None or not isinstance(v, str) else r.normal(v, connection, self.table, c)
                            for r, v, c in zip(rules, key, self.pk_cols))
                found.setdefault(row, tuple(key))
        return found

    @cached_property
    def string_keys(self) -> bool:
        """Has the key a string column (whose collation may hold unequal strings equal)?"""
        return any(isinstance(c.type, String) for c in self.pk_cols)

    @cached_property
    def lock_order(self) -> tuple[int, str]:
        """Where this table's rows come in the one order every lock of a flush
        or commit is taken in (:func:`lock_order`)."""
        return lock_order(self.table)

    def __repr__(self) -> str:
        return f"<ParentTable {self.table.name}>"

    # -- applying ----------------------------------------------------------

    def apply(self, connection: Connection, deltas: Deltas, *, values: bool = True,
              few: bool = False, session: Any = None, merged: bool = False) -> Results:
        """Add ``deltas`` to the counters; return the new values where known.

        ``values=False``: no parent of these is in memory, so skip
        ``RETURNING``. ``few=True`` (``per_row``: the parents of one child
        row): one ``UPDATE ... CASE ... WHERE pk IN (...)`` instead of the
        lock-then-update pair; the primary-key index scan takes the locks in
        key order, but without the separate lock the order is the plan's.
        """
        if self.string_keys and not merged:  # (merged: the caller ran same_rows already)
            deltas = self.same_rows(connection, deltas, session)
        if len(deltas) == 1:  # the common small transaction, and per_row: no sorting, no set-up
            ((key, vector),) = deltas.items()
            if len(vector) == 1:  # one counter on the table
                return self._apply_one(connection, (0,), key, vector, values) if vector[0] else []
            slots = tuple(i for i, d in enumerate(vector) if d)
            return self._apply_one(connection, slots, key, vector, values) if slots else []
        changed = {k: v for k, v in deltas.items() if any(v)}
        if not changed:
            return []
        if self.decorated_keys:
            changed = self._one_per_row(connection.dialect, changed)
        slots = tuple(i for i in range(len(self.counters)) if any(v[i] for v in changed.values()))
        keys = sorted(changed, key=self._stored_key(connection)) if self.ordered_as_stored else sorted(changed)
        dialect = connection.dialect.name
        if len(keys) == 1:
            return self._apply_one(connection, slots, keys[0], changed[keys[0]], values)
        if few and dialect in ("postgresql", "sqlite") and len(keys) <= FEW:
            return self._apply_case(connection, slots, keys, changed, values)
        if dialect == "postgresql":
            results = self._apply_postgresql(connection, slots, keys, changed, values)
        elif dialect == "sqlite":
            results = self._apply_sqlite(connection, slots, keys, changed)
        elif dialect in ("mysql", "mariadb"):
            results = self._apply_mysql(connection, slots, keys, changed)
        else:
            results = self._apply_each(connection, slots, keys, changed)
        return results if values else []
