"""Multi-level counters kept by triggers (private; see :mod:`countercache.triggers`).

``User.answer_count = counter_cache("questions.answers", strategy="trigger")``
counts the answers (leaves) of the user's questions (middle rows). Two
tables feed it, each through triggers of its own:

* **Leaves.** An answer adds its weight (1, or its ``sum=`` value, when its
  ``where=`` holds) to the user its question belongs to *now*: the trigger
  reads the question row with a share lock, so that a concurrent move of the
  question (an UPDATE of its ``user_id``) waits for this transaction, or this
  one reads the question as moved. An answer whose question does not exist
  (deleted before it, or not yet inserted) counts nowhere.
* **Middle rows.** A question carries the weight of its answers: inserting
  it adds what is already there under its key (answers written first under a
  deferred or no foreign key), moving it to another user moves that weight,
  and deleting it takes the weight of the answers still there *before* the
  row goes (a ``BEFORE DELETE`` row trigger): so whether the answers are
  deleted first (the ORM's order), by an ``ON DELETE CASCADE`` afterwards
  (whose answer triggers then find no question and count nothing), or
  orphaned, each is counted out exactly once.

PostgreSQL: the leaf triggers are statement-level (transition tables): the
deltas summed per question, the questions share-locked in key order, then
each user's delta added by one ``UPDATE`` by key, in key order. The middle
table's INSERT and UPDATE triggers are statement-level too (an UPDATE weighs
only the rows whose key or parent changed); its DELETE trigger is per row (a
statement deleting questions of several users locks them in row order, as
MariaDB's row triggers always do). SQLite and MariaDB/MySQL: row triggers,
the answer's question read with ``LOCK IN SHARE MODE`` on MariaDB/MySQL,
whose locking reads see the latest committed rows whatever the isolation.

Not kept under PostgreSQL's REPEATABLE READ: a question moved by a
transaction whose snapshot predates answers another one just committed to it
carries its weight as of that snapshot (READ COMMITTED, the default, and
SERIALIZABLE, which fails one of them, are exact).
"""

from __future__ import annotations

from typing import Any

from .trigger_sql import (MIDDLE_FUNCTION_SUFFIX, _counts, _names, _Shape, _statement_triggers, _targets, _weight,
                          function_name, row_triggers, table_sql, trigger_names)

__all__ = ["leaf_targets", "weight", "middle_statements", "postgresql_statements"]


def _keys(columns: list[Any], quote: Any, prefix: str = "") -> str:
    """``a`` or ``(a, b)``: the columns as one value (a row value when several)."""
    listed = ", ".join(f"{prefix}{quote(c.name)}" for c in columns)
    return listed if len(columns) == 1 else f"({listed})"


def _lock(dialect: Any) -> str:
    return " LOCK IN SHARE MODE" if dialect.name in ("mysql", "mariadb") else ""


def _middle_columns(shape: _Shape) -> list[Any]:
    """The middle table's columns whose change moves its weight: its parent's key, its own."""
    assert shape.through is not None
    return [*shape.columns, *(c for c in shape.through.key if all(c.name != s.name for s in shape.columns))]


def leaf_targets(shape: _Shape, row: str, dialect: Any) -> str:
    """SQL over the parent table's unqualified columns: the parent row is the one
    the middle row of the leaf ``row`` belongs to, and ``row`` counts."""
    leaf, quote = shape.through, dialect.identifier_preparer.quote
    assert leaf is not None
    match = " AND ".join(f"cc_m.{quote(key.name)} = {row}.{quote(fk.name)}" for key, fk in zip(leaf.key, leaf.fk))
    middle = (f"(SELECT {', '.join('cc_m.' + quote(fk.name) for fk in shape.fk)} FROM {table_sql(shape.child, dialect)}"
              f" AS cc_m WHERE {match}{_lock(dialect)})")
    return f"({_counts(leaf, row, dialect)} AND {_keys(shape.parent_key, quote)} = {middle})"


def weight(shape: _Shape, row: str, dialect: Any) -> str:
    """SQL: what the middle row ``row`` carries (its counted leaves, read with a
    share lock on MariaDB/MySQL: the latest committed ones)."""
    leaf, quote = shape.through, dialect.identifier_preparer.quote
    assert leaf is not None
    match = " AND ".join(f"cc_l.{quote(fk.name)} = {row}.{quote(key.name)}" for key, fk in zip(leaf.key, leaf.fk))
    condition = "" if leaf.condition is None else f" AND {_counts(leaf, 'cc_l', dialect)}"
    total = "count(*)" if leaf.value is None else f"coalesce(sum({_weight(leaf, 'cc_l', dialect)}), 0)"
    return (f"(SELECT {total} FROM {table_sql(leaf.child, dialect)} AS cc_l WHERE {match}{condition}"
            f"{_lock(dialect)})")


def middle_statements(counter: Any, dialect: Any, names: dict[str, str]) -> list[str]:
    """SQLite and MariaDB/MySQL: the middle table's row triggers (``names`` quoted)."""
    shape, parent, middle, column = _names(counter, dialect)
    leaf = shape.through
    assert leaf is not None
    new, old = weight(shape, "NEW", dialect), weight(shape, "OLD", dialect)
    add = (f"UPDATE {parent} SET {column} = {column} + {new} WHERE {_targets(shape, 'NEW', dialect)} "
           f"AND {new} <> 0")
    subtract = (f"UPDATE {parent} SET {column} = {column} - {old} WHERE {_targets(shape, 'OLD', dialect)} "
                f"AND {old} <> 0")
    both = (f"UPDATE {parent} SET {column} = {column}"
            f" + CASE WHEN {_targets(shape, 'NEW', dialect)} THEN {new} ELSE 0 END"
            f" - CASE WHEN {_targets(shape, 'OLD', dialect)} THEN {old} ELSE 0 END"
            f" WHERE ({_targets(shape, 'NEW', dialect)} OR {_targets(shape, 'OLD', dialect)})"
            f" AND ({new} <> 0 OR {old} <> 0)")
    return row_triggers((names["MIDDLE_INSERT"], names["MIDDLE_DELETE"], names["MIDDLE_UPDATE"]), middle, add,
                        subtract, both, _middle_columns(shape), shape.parent_key, dialect, delete="BEFORE")


# -- PostgreSQL -----------------------------------------------------------------------------------


def _apply(shape: _Shape, parent: str, column: str, deltas: str, quote: Any, *before: str) -> str:
    """Add ``deltas`` (a query of ``k0.., d``: per parent key, after the CTEs ``before``)
    to the parents, one ``UPDATE`` by key each, in key order: the parents are locked
    one at a time in key order (as :mod:`countercache.triggers_postgresql` does)."""
    aliases = ", ".join(f"k{i}" for i in range(len(shape.parent_key)))
    match = " AND ".join(f"p.{quote(col.name)} = cc_row.k{i}" for i, col in enumerate(shape.parent_key))
    ctes = f"WITH {', '.join(before)} " if before else ""
    return (f"FOR cc_row IN {ctes}SELECT * FROM ({deltas}) AS cc_d({aliases}, d) ORDER BY {aliases} "
            f"LOOP UPDATE {parent} AS p SET {column} = p.{column} + cc_row.d WHERE {match}; END LOOP;")


def postgresql_statements(counter: Any, dialect: Any) -> list[str]:
    """The leaf table's function and statement-level triggers, then the middle table's."""
    shape, parent, middle, column = _names(counter, dialect)
    quote = dialect.identifier_preparer.quote
    leaf = shape.through
    assert leaf is not None
    names = trigger_names(counter, dialect)
    fn, mfn = function_name(counter, dialect), function_name(counter, dialect, MIDDLE_FUNCTION_SUFFIX)
    js = [f"j{i}" for i in range(len(leaf.fk))]
    ks = [f"k{i}" for i in range(len(shape.parent_key))]

    # the leaves: deltas per middle key, the middle rows share-locked in key order, their parents' deltas
    lfks = ", ".join(f"r.{quote(fk.name)}" for fk in leaf.fk)
    where = " AND ".join([f"r.{quote(fk.name)} IS NOT NULL" for fk in leaf.fk]
                         + ([] if leaf.condition is None else [_counts(leaf, "r", dialect)]))
    total = "count(*)" if leaf.value is None else f"sum({_weight(leaf, 'r', dialect)})"

    def one_table(transition: str, sign: str) -> str:
        return f"SELECT {lfks}, {sign}{total} FROM {transition} AS r WHERE {where} GROUP BY {lfks}"

    def leaves(*parts: str) -> str:
        if len(parts) == 1:
            by_middle = parts[0]
        else:
            by_middle = (f"SELECT {', '.join(js)}, sum(u.d) FROM ({' UNION ALL '.join(parts)}) AS u({', '.join(js)}, d) "
                         f"GROUP BY {', '.join(js)} HAVING sum(u.d) <> 0")
        mkeys = ", ".join(f"m.{quote(k.name)}" for k in leaf.key)
        mfks = ", ".join(f"m.{quote(fk.name)}" for fk in shape.fk)
        middles = (f"cc_m({', '.join(js)}, {', '.join(ks)}) AS MATERIALIZED (SELECT {mkeys}, {mfks} FROM {middle} AS m "
                   f"WHERE ({mkeys}) IN (SELECT {', '.join(js)} FROM cc_j) ORDER BY {mkeys} FOR SHARE OF m)")
        deltas = (f"SELECT {', '.join('cc_m.' + k for k in ks)}, sum(cc_j.d) FROM cc_j JOIN cc_m USING ({', '.join(js)}) "
                  f"WHERE {' AND '.join(f'cc_m.{k} IS NOT NULL' for k in ks)} GROUP BY {', '.join('cc_m.' + k for k in ks)} "
                  "HAVING sum(cc_j.d) <> 0")
        return _apply(shape, parent, column, deltas, quote,
                      f"cc_j({', '.join(js)}, d) AS MATERIALIZED ({by_middle})", middles)

    pk = ", ".join(f"p.{quote(col.name)}" for col in shape.parent_key)
    zero = (f"PERFORM 1 FROM {parent} AS p WHERE p.{column} <> 0 ORDER BY {pk} FOR NO KEY UPDATE;\n"
            f"UPDATE {parent} AS p SET {column} = 0 WHERE p.{column} <> 0;")
    leaf_function = (
        f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $countercache$\n"
        f"#variable_conflict use_column\nDECLARE cc_row record;\nBEGIN\n"
        f"IF TG_OP = 'INSERT' THEN {leaves(one_table('cc_new', ''))}\n"
        f"ELSIF TG_OP = 'DELETE' THEN {leaves(one_table('cc_old', '-'))}\n"
        f"ELSIF TG_OP = 'UPDATE' THEN {leaves(one_table('cc_new', ''), one_table('cc_old', '-'))}\n"
        f"ELSE {zero}\nEND IF;\nRETURN NULL;\nEND $countercache$"
    )

    # the middle rows: each carries its leaves' weight (an UPDATE: only the rows whose key or parent changed)
    mfks = ", ".join(f"n.{quote(fk.name)}" for fk in shape.fk)
    present = " AND ".join(f"n.{quote(fk.name)} IS NOT NULL" for fk in shape.fk)
    same = " AND ".join(f"o.{quote(c.name)} IS NOT DISTINCT FROM n.{quote(c.name)}"
                        for c in [*leaf.key, *shape.fk])

    def carried(transition: str, sign: str, other: str | None = None) -> str:
        rows = f"SELECT {mfks}, {sign}{weight(shape, 'n', dialect)} FROM {transition} AS n WHERE {present}"
        if other is not None:
            pair = ("cc_old AS o", same) if transition == "cc_new" else ("cc_new AS o", same)
            rows += f" AND NOT EXISTS (SELECT 1 FROM {pair[0]} WHERE {pair[1]})"
        return rows

    def moved(*parts: str) -> str:
        deltas = (f"SELECT {', '.join(ks)}, sum(u.d) FROM ({' UNION ALL '.join(parts)}) AS u({', '.join(ks)}, d) "
                  f"GROUP BY {', '.join(ks)} HAVING sum(u.d) <> 0")
        return _apply(shape, parent, column, deltas, quote)

    old_key = " AND ".join(f"p.{quote(pk.name)} = OLD.{quote(fk.name)}" for pk, fk in zip(shape.parent_key, shape.fk))
    middle_function = (
        f"CREATE OR REPLACE FUNCTION {mfn}() RETURNS trigger LANGUAGE plpgsql AS $countercache$\n"
        f"#variable_conflict use_column\nDECLARE cc_row record;\nBEGIN\n"
        # (a row about to be deleted: the weight of the leaves still there)
        f"IF TG_LEVEL = 'ROW' THEN UPDATE {parent} AS p SET {column} = p.{column} - cc_w.d "
        f"FROM (SELECT {weight(shape, 'OLD', dialect)} AS d) AS cc_w WHERE {old_key} AND cc_w.d <> 0; RETURN OLD;\n"
        f"ELSIF TG_OP = 'INSERT' THEN {moved(carried('cc_new', ''))}\n"
        f"ELSE {moved(carried('cc_new', '', 'cc_old'), carried('cc_old', '-', 'cc_new'))}\nEND IF;\n"
        "RETURN NULL;\nEND $countercache$"
    )
    table = table_sql(leaf.child, dialect)
    return [
        leaf_function, *_statement_triggers(names, table, fn, quote),
        middle_function,
        f"CREATE TRIGGER {quote(names['MIDDLE_INSERT'])} AFTER INSERT ON {middle} REFERENCING NEW TABLE AS cc_new "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {mfn}()",
        # (every UPDATE: PostgreSQL takes no column list with transition tables; the rows whose key and
        # parent stayed are paired off before any leaf is read)
        f"CREATE TRIGGER {quote(names['MIDDLE_UPDATE'])} AFTER UPDATE ON {middle} REFERENCING OLD TABLE AS "
        f"cc_old NEW TABLE AS cc_new FOR EACH STATEMENT EXECUTE FUNCTION {mfn}()",
        f"CREATE TRIGGER {quote(names['MIDDLE_DELETE'])} BEFORE DELETE ON {middle} FOR EACH ROW "
        f"EXECUTE FUNCTION {mfn}()",
        f"CREATE TRIGGER {quote(names['MIDDLE_TRUNCATE'])} AFTER TRUNCATE ON {middle} FOR EACH STATEMENT "
        f"EXECUTE FUNCTION {fn}()",
    ]
