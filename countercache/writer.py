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

import json
import weakref
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, column, text
from sqlalchemy.engine import Connection

if TYPE_CHECKING:
    from sqlalchemy import Column, Table
    from sqlalchemy.orm import Mapper

    from .declaration import CounterCache

#: Most parents the one-statement ``few`` form takes (per_row: one child row).
FEW = 4

#: Parents per statement on MariaDB/MySQL (below in_predicate_conversion_threshold).
MYSQL_CHUNK = 500

Key = tuple[Any, ...]
Deltas = dict[Key, list[int]]
#: What an apply returns: ``(primary key, {attribute key: new value})`` rows, or
#: ``(primary key, None)`` where the backend cannot say (expire instead).
Results = list[tuple[Key, "dict[str, Any] | None"]]


def _uniform(values: list[Any]) -> list[Any]:
    """One Python type per array (psycopg refuses ``[Decimal, int]``): a sum's
    untouched slots start as the integer 0."""
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        wide = Decimal if Decimal in kinds else float if float in kinds else None
        if wide is not None:
            return [wide(v) for v in values]
    return values


#: mapper -> ParentTable.of_mapper(mapper), until the next counter is added
_of_mapper: weakref.WeakKeyDictionary[Any, list[ParentTable]] = weakref.WeakKeyDictionary()


def _depth(table: Table, seen: set[Table]) -> int:
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


class ParentTable:
    """The counters that live on one table, and how to update them."""

    def __init__(self, mapper: Mapper[Any], table: Table) -> None:
        self.mapper = mapper
        self.table = table
        self.pk_cols: tuple[Column[Any], ...] = tuple(table.primary_key.columns)
        self.counters: list[CounterCache] = []
        self._statements: dict[tuple[Any, ...], Any] = {}

    @classmethod
    def for_column(cls, mapper: Mapper[Any], column: Column[Any]) -> ParentTable:
        from . import _registry

        for counter in _registry.all_counters():
            known = counter.parent
            if known is not None and known.table is column.table and known.mapper is mapper:
                return known
        return cls(mapper, column.table)

    @staticmethod
    def of_mapper(mapper: Mapper[Any]) -> list[ParentTable]:
        """The parent tables whose rows ``mapper``'s instances are (inherited ones
        included); looked up once per mapper (a parent delete asks per row)."""
        from . import _registry

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

    @property
    def lock_order(self) -> tuple[int, str]:
        """Where this table's rows come in the one order every lock of a flush
        or commit is taken in: a child's table before its parents' (the
        multi-level translation locks a middle row, then writes its parent),
        then by name; keys ascending within a table."""
        found = self.__dict__.get("_lock_order")
        if found is None:
            found = self.__dict__["_lock_order"] = (-_depth(self.table, set()), self.table.fullname)
        return found

    def __repr__(self) -> str:
        return f"<ParentTable {self.table.name}>"

    # -- applying ----------------------------------------------------------

    def apply(self, connection: Connection, deltas: Deltas, *, values: bool = True,
              few: bool = False) -> Results:
        """Add ``deltas`` to the counters; return the new values where known.

        ``values=False``: no parent of these is in memory, so skip
        ``RETURNING``. ``few=True`` (``per_row``: the parents of one child
        row): one ``UPDATE ... CASE ... WHERE pk IN (...)`` instead of the
        lock-then-update pair; the primary-key index scan takes the locks in
        key order, but without the separate lock the order is the plan's.
        """
        if len(deltas) == 1:  # the common small transaction, and per_row: no sorting, no set-up
            ((key, vector),) = deltas.items()
            if len(vector) == 1:  # one counter on the table
                return self._apply_one(connection, (0,), key, vector, values) if vector[0] else []
            slots = tuple(i for i, d in enumerate(vector) if d)
            return self._apply_one(connection, slots, key, vector, values) if slots else []
        changed = {k: v for k, v in deltas.items() if any(v)}
        if not changed:
            return []
        slots = tuple(i for i in range(len(self.counters)) if any(v[i] for v in changed.values()))
        keys = sorted(changed)
        dialect = connection.dialect.name
        if len(keys) == 1:
            return self._apply_one(connection, slots, keys[0], changed[keys[0]], values)
        if few and dialect in ("postgresql", "sqlite") and len(keys) <= FEW:
            return self._apply_case(connection, slots, keys, changed, values)
        if dialect == "postgresql":
            results = self._apply_postgresql(connection, slots, keys, changed)
        elif dialect == "sqlite":
            results = self._apply_sqlite(connection, slots, keys, changed)
        elif dialect in ("mysql", "mariadb"):
            results = self._apply_mysql(connection, slots, keys, changed)
        else:
            results = self._apply_each(connection, slots, keys, changed)
        return results if values else []

    def _q(self, connection: Connection, name: str) -> str:
        return connection.dialect.identifier_preparer.quote(name)

    def _table_name(self, connection: Connection) -> str:
        return connection.dialect.identifier_preparer.format_table(self.table)

    def _results(self, rows: Sequence[Any], slots: tuple[int, ...]) -> Results:
        n = len(self.pk_cols)
        attr_keys = [self.counters[i].key for i in slots]
        return [(tuple(row[:n]), dict(zip(attr_keys, row[n:], strict=False))) for row in rows]  # type: ignore[arg-type]

    def _no_results(self, keys: list[Key]) -> Results:
        return [(k, None) for k in keys]

    def _key_sql(self, connection: Connection) -> str:
        """The primary key as SQL: ``id``, or ``(a, b)`` for a composite key."""
        pk = [self._q(connection, c.name) for c in self.pk_cols]
        return pk[0] if len(pk) == 1 else "(" + ", ".join(pk) + ")"

    def _key_ref(self, m: int) -> str:
        """Placeholders of the ``m``-th key: ``:k0_0``, or ``(:k0_0, :k0_1)``."""
        refs = [f":k{m}_{j}" for j in range(len(self.pk_cols))]
        return refs[0] if len(refs) == 1 else "(" + ", ".join(refs) + ")"

    def _type(self, slot: int) -> Any:
        return self.counters[slot].column.type  # type: ignore[union-attr]

    def _typed(self, sql: str, binds: dict[str, Any], returning: tuple[int, ...] | None) -> Any:
        """``text(sql)`` with typed parameters (a Decimal delta on SQLite) and,
        for ``RETURNING``, typed result columns."""
        stmt = text(sql).bindparams(*(bindparam(name, type_=type_) for name, type_ in binds.items()))
        if returning is None:
            return stmt
        cols = [column(c.name, c.type) for c in self.pk_cols]
        cols += [column(self.counters[i].column.name, self._type(i)) for i in returning]  # type: ignore[union-attr]
        return stmt.columns(*cols)

    def _cached(self, connection: Connection, kind: str, slots: tuple[int, ...], build: Any) -> Any:
        key = (connection.dialect.name, kind, slots)
        stmt = self._statements.get(key)
        if stmt is None:
            stmt = self._statements[key] = build()
        return stmt

    def _set_list(self, connection: Connection, slots: tuple[int, ...], rhs: Any, prefix: str = "") -> str:
        return ", ".join(
            f"{self._q(connection, self.counters[i].column.name)} = "  # type: ignore[union-attr]
            f"{prefix}{self._q(connection, self.counters[i].column.name)} + {rhs(i)}"  # type: ignore[union-attr]
            for i in slots
        )

    def _returning_list(self, connection: Connection, slots: tuple[int, ...], prefix: str = "") -> str:
        cols = [c.name for c in self.pk_cols] + [self.counters[i].column.name for i in slots]  # type: ignore[union-attr]
        return ", ".join(prefix + self._q(connection, c) for c in cols)

    def _apply_one(self, connection: Connection, slots: tuple[int, ...], key: Key, vector: list[int],
                   values: bool) -> Results:
        """``UPDATE ... WHERE pk = :k0``: per_row runs this per child row, so the
        statement and its parameter names are looked up once per form."""
        dialect = connection.dialect
        returning = values and bool(dialect.update_returning)
        # (statement, key parameter names, (delta parameter name, slot))
        form = self._statements.get((dialect.name, returning, slots))
        if form is None:
            form = self._statements[(dialect.name, returning, slots)] = self._one_form(connection, slots, returning)
        stmt, key_names, delta_names = form
        params = dict(zip(key_names, key))
        for name, i in delta_names:
            params[name] = vector[i]
        result = connection.execute(stmt, params)
        if returning:
            return self._results(result.fetchall(), slots)
        return self._no_results([key]) if values else []

    def _one_form(self, connection: Connection, slots: tuple[int, ...],
                  returning: bool) -> tuple[Any, list[str], list[tuple[str, int]]]:
        sql = (
            f"UPDATE {self._table_name(connection)} SET "
            + self._set_list(connection, slots, lambda i: f":d{i}")
            + " WHERE "
            + " AND ".join(f"{self._q(connection, c.name)} = :k{j}" for j, c in enumerate(self.pk_cols))
        )
        if returning:
            sql += " RETURNING " + self._returning_list(connection, slots)
        binds = {f"k{j}": c.type for j, c in enumerate(self.pk_cols)}
        binds.update({f"d{i}": self._type(i) for i in slots})
        stmt = self._typed(sql, binds, slots if returning else None)
        return stmt, [f"k{j}" for j in range(len(self.pk_cols))], [(f"d{i}", i) for i in slots]

    def _apply_case(self, connection: Connection, slots: tuple[int, ...], keys: list[Key],
                    deltas: Deltas, values: bool) -> Results:
        n = len(keys)

        def build() -> Any:
            key_sql, ref = self._key_sql(connection), self._key_ref
            sql = (
                f"UPDATE {self._table_name(connection)} SET "
                + self._set_list(
                    connection, slots,
                    lambda i: "CASE " + " ".join(f"WHEN {key_sql} = {ref(m)} THEN :d{m}_{i}" for m in range(n))
                    + " ELSE 0 END",
                )
                + f" WHERE {key_sql} IN ({', '.join(ref(m) for m in range(n))})"
            )
            if values:
                sql += " RETURNING " + self._returning_list(connection, slots)
            binds = {f"k{m}_{j}": c.type for m in range(n) for j, c in enumerate(self.pk_cols)}
            binds.update({f"d{m}_{i}": self._type(i) for m in range(n) for i in slots})
            return self._typed(sql, binds, slots if values else None)

        stmt = self._cached(connection, f"case{n}{'+' if values else ''}", slots, build)
        params: dict[str, Any] = {}
        for m, k in enumerate(keys):
            for j, v in enumerate(k):
                params[f"k{m}_{j}"] = v
            for i in slots:
                params[f"d{m}_{i}"] = deltas[k][i]
        result = connection.execute(stmt, params)
        return self._results(result.fetchall(), slots) if values else []

    def _apply_postgresql(
        self, connection: Connection, slots: tuple[int, ...], keys: list[Key], deltas: Deltas
    ) -> Results:
        dialect = connection.dialect
        t = self._table_name(connection)
        pk = [self._q(connection, c.name) for c in self.pk_cols]
        keys_unnest = "unnest(" + ", ".join(
            f"CAST(:k{j} AS {c.type.compile(dialect)}[])" for j, c in enumerate(self.pk_cols)
        ) + ")"

        def build_lock() -> Any:
            return text(
                f"SELECT 1 FROM {t} JOIN {keys_unnest} AS v({', '.join(f'k{j}' for j in range(len(pk)))}) ON "
                + " AND ".join(f"{t}.{c} = v.k{j}" for j, c in enumerate(pk))
                + " ORDER BY " + ", ".join(f"{t}.{c}" for c in pk)
                + f" FOR NO KEY UPDATE OF {t}"
            )

        def build_update() -> Any:
            arrays = [f"CAST(:k{j} AS {c.type.compile(dialect)}[])" for j, c in enumerate(self.pk_cols)]
            arrays += [
                f"CAST(:d{i} AS {self.counters[i].column.type.compile(dialect)}[])"  # type: ignore[union-attr]
                for i in slots
            ]
            v_cols = [f"k{j}" for j in range(len(pk))] + [f"d{i}" for i in slots]
            return text(
                f"UPDATE {t} AS p SET "
                + self._set_list(connection, slots, lambda i: f"v.d{i}", prefix="p.")
                + f" FROM unnest({', '.join(arrays)}) AS v({', '.join(v_cols)}) WHERE "
                + " AND ".join(f"p.{c} = v.k{j}" for j, c in enumerate(pk))
                + " RETURNING "
                + self._returning_list(connection, slots, prefix="p.")
            )

        lock = self._cached(connection, "pg-lock", (), build_lock)
        update = self._cached(connection, "pg", slots, build_update)
        params: dict[str, Any] = {f"k{j}": [k[j] for k in keys] for j in range(len(self.pk_cols))}
        connection.execute(lock, params)
        params.update({f"d{i}": _uniform([deltas[k][i] for k in keys]) for i in slots})
        return self._results(connection.execute(update, params).fetchall(), slots)

    def _apply_sqlite(
        self, connection: Connection, slots: tuple[int, ...], keys: list[Key], deltas: Deltas
    ) -> Results:
        n = len(self.pk_cols)

        def build() -> Any:
            t = self._table_name(connection)
            pk = [self._q(connection, c.name) for c in self.pk_cols]
            cols = [f"json_extract(value, '$[{j}]') AS k{j}" for j in range(n)]
            cols += [f"json_extract(value, '$[{n + m}]') AS d{i}" for m, i in enumerate(slots)]
            sql = (
                f"UPDATE {t} SET "
                + self._set_list(connection, slots, lambda i: f"v.d{i}", prefix=f"{t}.")
                + f" FROM (SELECT {', '.join(cols)} FROM json_each(:rows)) AS v WHERE "
                + " AND ".join(f"{t}.{c} = v.k{j}" for j, c in enumerate(pk))
                + " RETURNING "
                + self._returning_list(connection, slots)
            )
            return text(sql)

        stmt = self._cached(connection, "sqlite", slots, build)
        processors = [c.type._cached_bind_processor(connection.dialect) for c in self.pk_cols]
        rows = []
        for k in keys:
            row = [p(v) if p else v for p, v in zip(processors, k, strict=False)]
            row.extend(deltas[k][i] for i in slots)
            rows.append(row)
        # default=str: Decimal sums travel as text, which SQLite's arithmetic reads as a number
        return self._results(connection.execute(stmt, {"rows": json.dumps(rows, default=str)}).fetchall(), slots)

    def _apply_mysql(
        self, connection: Connection, slots: tuple[int, ...], keys: list[Key], deltas: Deltas
    ) -> Results:
        t = self._table_name(connection)
        pk = [self._q(connection, c.name) for c in self.pk_cols]
        key_sql = self._key_sql(connection)
        for start in range(0, len(keys), MYSQL_CHUNK):
            chunk = keys[start : start + MYSQL_CHUNK]
            params: dict[str, Any] = {
                f"k{m}_{j}": v for m, k in enumerate(chunk) for j, v in enumerate(k)
            }
            key_refs = [self._key_ref(m) for m in range(len(chunk))]
            sets = []
            for i in slots:
                col = self._q(connection, self.counters[i].column.name)  # type: ignore[union-attr]
                whens = []
                for m, k in enumerate(chunk):
                    if deltas[k][i]:
                        params[f"d{m}_{i}"] = deltas[k][i]
                        whens.append(f"WHEN {key_sql} = {key_refs[m]} THEN :d{m}_{i}")
                if whens:  # a counter no parent of this chunk moves stays out of its SET
                    sets.append(f"{col} = {col} + CASE {' '.join(whens)} ELSE 0 END")
            sql = (
                f"UPDATE {t} SET {', '.join(sets)} WHERE {key_sql} IN ({', '.join(key_refs)}) "
                f"ORDER BY {', '.join(pk)}"
            )
            connection.execute(text(sql), params)
        return self._no_results(keys)

    def _apply_each(
        self, connection: Connection, slots: tuple[int, ...], keys: list[Key], deltas: Deltas
    ) -> Results:
        """Any other dialect: one single-row UPDATE per parent, in key order."""
        results: Results = []
        for k in keys:
            results.extend(self._apply_one(connection, slots, k, deltas[k], True))
        return results
