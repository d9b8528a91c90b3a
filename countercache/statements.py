"""The UPDATE statements that add deltas to parent rows, one form per dialect (private).

:meth:`countercache.writer.ParentTable.apply` picks the form (its module
docstring says why each, with the measurements); this module builds them:
``UPDATE ... WHERE pk = :k`` for one parent, ``CASE`` for a few, the
``unnest`` arrays on PostgreSQL, ``json_each`` on SQLite, ordered ``CASE``
chunks on MariaDB/MySQL. Statements are built once per form and cached on
the parent table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, column, text
from sqlalchemy.engine import Connection

from . import _execute
from ._compat import bind_processor
from ._psycopg import send_together

if TYPE_CHECKING:
    from sqlalchemy import Column, Table

    from .declaration import CounterCache

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


class StatementForms:
    """The statement forms of one parent table (the base of :class:`~countercache.writer.ParentTable`)."""

    table: Table
    pk_cols: tuple[Column[Any], ...]
    counters: list[CounterCache]
    #: (dialect, form, slots) -> the statement built for it
    _statements: dict[tuple[Any, ...], Any]

    def _q(self, connection: Connection, name: str) -> str:
        return connection.dialect.identifier_preparer.quote(name)

    def _table_name(self, connection: Connection) -> str:
        """The table's name as SQL, in the schema the connection's
        ``schema_translate_map`` puts it (statements here are ``text()``,
        which SQLAlchemy does not translate)."""
        schema = _execute.translated(connection, self.table.schema)
        preparer = connection.dialect.identifier_preparer
        if schema is None:
            return preparer.quote(self.table.name)
        return f"{preparer.quote_schema(schema)}.{preparer.quote(self.table.name)}"

    def _place(self, connection: Connection) -> tuple[str, str | None]:
        """What a cached statement depends on besides its form: the dialect and the schema."""
        return connection.dialect.name, _execute.translated(connection, self.table.schema)

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

    def _key_processors(self, connection: Connection) -> list[Any]:
        """Per key column, its type's bind processor (None where values pass as they are)."""
        return [bind_processor(c.type, connection.dialect) for c in self.pk_cols]

    def _type(self, slot: int) -> Any:
        return self.counters[slot].column.type  # type: ignore[union-attr]

    def _typed(self, sql: str, binds: dict[str, Any], returning: tuple[int, ...] | None,
               extra: tuple[Column[Any], ...] = ()) -> Any:
        """``text(sql)`` with typed parameters (a Decimal delta on SQLite) and,
        for ``RETURNING``, typed result columns."""
        stmt = text(sql).bindparams(*(bindparam(name, type_=type_) for name, type_ in binds.items()))
        if returning is None:
            return stmt
        cols = [column(c.name, c.type) for c in self.pk_cols]
        cols += [column(self.counters[i].column.name, self._type(i)) for i in returning]  # type: ignore[union-attr]
        cols += [column(c.name, c.type) for c in extra]
        return stmt.columns(*cols)

    def _cached(self, connection: Connection, kind: str, slots: tuple[int, ...], build: Any) -> Any:
        key = (self._place(connection), kind, slots)
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
        place = self._place(connection)
        form = self._statements.get((place, returning, slots))
        if form is None:
            form = self._statements[(place, returning, slots)] = self._one_form(connection, slots, returning)
        result = self._run_one(connection, form, key, vector)
        if returning:
            return self._results(result.fetchall(), slots)
        return self._no_results([key]) if values else []

    def apply_one_returning(self, connection: Connection, slots: tuple[int, ...], key: Key, vector: list[int],
                            extra: tuple[Column[Any], ...]) -> tuple[Results, tuple[Any, ...] | None]:
        """``UPDATE ... WHERE pk = :k0 RETURNING pk, counters, extra``
        (dialects with ``UPDATE ... RETURNING``): the new values, and the row's
        ``extra`` columns as the UPDATE left them (None: no such row). One
        statement locks the row for writing and reads it."""
        place = self._place(connection)
        form = self._statements.get((place, "returning", slots, extra))
        if form is None:
            form = self._statements[(place, "returning", slots, extra)] = self._one_form(
                connection, slots, True, extra)
        rows = self._run_one(connection, form, key, vector).fetchall()
        if not rows:
            return [], None
        n = len(self.pk_cols) + len(slots)
        return self._results([row[:n] for row in rows], slots), tuple(rows[0][n:])

    @staticmethod
    def _run_one(connection: Connection, form: Any, key: Key, vector: list[int]) -> Any:
        """Execute a one-parent form: ``(statement, key parameter names, (delta parameter name, slot))``."""
        stmt, key_names, delta_names = form
        params = dict(zip(key_names, key))
        for name, i in delta_names:
            params[name] = vector[i]
        return _execute.execute(connection, stmt, params)

    def _one_form(self, connection: Connection, slots: tuple[int, ...],
                  returning: bool, extra: tuple[Column[Any], ...] = ()) -> tuple[Any, list[str], list[tuple[str, int]]]:
        sql = (
            f"UPDATE {self._table_name(connection)} SET "
            + self._set_list(connection, slots, lambda i: f":d{i}")
            + " WHERE "
            + " AND ".join(f"{self._q(connection, c.name)} = :k{j}" for j, c in enumerate(self.pk_cols))
        )
        if returning:
            sql += " RETURNING " + ", ".join(
                [self._returning_list(connection, slots)] + [self._q(connection, c.name) for c in extra])
        binds = {f"k{j}": c.type for j, c in enumerate(self.pk_cols)}
        binds.update({f"d{i}": self._type(i) for i in slots})
        stmt = self._typed(sql, binds, slots if returning else None, extra)
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
        result = _execute.execute(connection, stmt, params)
        return self._results(result.fetchall(), slots) if values else []

    def _apply_postgresql(
        self, connection: Connection, slots: tuple[int, ...], keys: list[Key], deltas: Deltas,
        values: bool = True,
    ) -> Results:
        dialect = connection.dialect
        t = self._table_name(connection)
        pk = [self._q(connection, c.name) for c in self.pk_cols]
        keys_unnest = "unnest(" + ", ".join(
            f"CAST(:k{j} AS {c.type.compile(dialect)}[])" for j, c in enumerate(self.pk_cols)
        ) + ")"

        def build_lock() -> Any:
            # (aliased: FOR ... OF takes an unqualified name, and the table may be in a schema)
            return text(
                f"SELECT 1 FROM {t} AS countercache_p JOIN {keys_unnest} AS "
                f"countercache_v({', '.join(f'k{j}' for j in range(len(pk)))}) ON "
                + " AND ".join(f"countercache_p.{c} = countercache_v.k{j}" for j, c in enumerate(pk))
                + " ORDER BY " + ", ".join(f"countercache_p.{c}" for c in pk)
                + " FOR NO KEY UPDATE OF countercache_p"
            )

        def build_update() -> Any:
            arrays = [f"CAST(:k{j} AS {c.type.compile(dialect)}[])" for j, c in enumerate(self.pk_cols)]
            arrays += [
                f"CAST(:d{i} AS {self.counters[i].column.type.compile(dialect)}[])"  # type: ignore[union-attr]
                for i in slots
            ]
            v_cols = [f"k{j}" for j in range(len(pk))] + [f"d{i}" for i in slots]
            return self._typed(
                f"UPDATE {t} AS countercache_p SET "
                + self._set_list(connection, slots, lambda i: f"countercache_v.d{i}", prefix="countercache_p.")
                + f" FROM unnest({', '.join(arrays)}) AS countercache_v({', '.join(v_cols)}) WHERE "
                + " AND ".join(f"countercache_p.{c} = countercache_v.k{j}" for j, c in enumerate(pk))
                + (" RETURNING " + self._returning_list(connection, slots, prefix="countercache_p.")
                   if values else ""),
                {}, slots if values else None,
            )

        lock = self._cached(connection, "pg-lock", (), build_lock)
        update = self._cached(connection, "pg" if values else "pg-quiet", slots, build_update)
        # the arrays are untyped parameters: each key goes through its column's
        # type first (a TypeDecorator storing a UUID as bytes, say)
        params: dict[str, Any] = {f"k{j}": [p(k[j]) for k in keys] if p else [k[j] for k in keys]
                                  for j, p in enumerate(self._key_processors(connection))}
        if not values:  # (no parent in memory, or no answers: sent with the COMMIT)
            # nothing read: the lock and the UPDATE go together, in one round trip (psycopg)
            send_together(connection, [(lock, params), (update, {
                **params, **{f"d{i}": _uniform([deltas[k][i] for k in keys]) for i in slots}})])
            return []
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
                + self._set_list(connection, slots, lambda i: f"countercache_v.d{i}", prefix=f"{t}.")
                + f" FROM (SELECT {', '.join(cols)} FROM json_each(:rows)) AS countercache_v WHERE "
                + " AND ".join(f"{t}.{c} = countercache_v.k{j}" for j, c in enumerate(pk))
                + " RETURNING "
                + self._returning_list(connection, slots)
            )
            return self._typed(sql, {}, slots)  # (keys loaded through their type: a Uuid's hex text)

        stmt = self._cached(connection, "sqlite", slots, build)
        processors = self._key_processors(connection)
        rows = []
        for k in keys:
            row = [p(v) if p else v for p, v in zip(processors, k, strict=False)]
            if any(isinstance(v, (bytes, bytearray, memoryview)) for v in row):
                # JSON has no bytes (a UUID stored as BINARY(16)): one typed UPDATE per parent
                return self._apply_each(connection, slots, keys, deltas)
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
            key_binds = [bindparam(f"k{m}_{j}", type_=c.type) for m in range(len(chunk))
                         for j, c in enumerate(self.pk_cols)]
            connection.execute(text(sql).bindparams(*key_binds), params)
        return self._no_results(keys)

    def _apply_each(
        self, connection: Connection, slots: tuple[int, ...], keys: list[Key], deltas: Deltas
    ) -> Results:
        """Any other dialect: one single-row UPDATE per parent, in key order."""
        results: Results = []
        for k in keys:
            results.extend(self._apply_one(connection, slots, k, deltas[k], True))
        return results
