"""Database triggers that keep a counter (private; the DDL of a future ``strategy="trigger"``).

Generated from a resolved :class:`~countercache.declaration.CounterCache`, so
that the database itself keeps ``parent.<counter>`` equal to its recount
(:meth:`countercache.kinds.Kind.real_count`) whatever writes the child rows:
raw SQL, Core statements on a connection, ``INSERT ... SELECT``, and (on
PostgreSQL and SQLite) the deletes of an ``ON DELETE CASCADE``.

* PostgreSQL: three statement-level triggers (``AFTER INSERT / DELETE /
  UPDATE ... REFERENCING ... TABLE ... FOR EACH STATEMENT``) calling one
  plpgsql function. It sums the deltas per parent key over the transition
  tables (new rows add, old rows subtract; zero nets dropped), returns at once
  when none is left (which ends the recursion of a self-referential counter,
  whose own UPDATE fires the table's UPDATE trigger again), locks the parents
  in key order (``FOR NO KEY UPDATE``) and adds in one ``UPDATE``. A fourth
  (``AFTER TRUNCATE``) sets the counters to 0.
* SQLite: row-level ``AFTER INSERT``, ``AFTER DELETE`` and ``AFTER UPDATE OF
  <counted columns> ... WHEN <one changed>`` triggers.
* MariaDB/MySQL: row-level triggers; the UPDATE one only when a counted
  column changed, touching both parents in one ``UPDATE ... ORDER BY <key>``
  (key order). Refused: a self-referential counter (a trigger cannot update
  its own table there), and a child table with a foreign key action that
  changes counted rows (foreign key actions fire no trigger there).

Refused everywhere: multi-level counters, a condition reading another table
(a joined subclass), a counter column outside the parent key's table, and an
``ON UPDATE`` action on the counted key that the triggers would count twice
(CASCADE, on PostgreSQL and SQLite: the count already moved with its parent)
or that leaves the parent's count behind (SET NULL / SET DEFAULT).

Not kept, and not detectable here: MariaDB/MySQL's TRUNCATE (fires no
trigger); SQLite's ``REPLACE`` / ``INSERT OR REPLACE`` unless the connection
sets ``PRAGMA recursive_triggers = ON`` (its deletes fire no trigger
otherwise). MariaDB/MySQL refuses (error 1442, nothing changed) a statement
on the child table that reads the parent table (``INSERT ... SELECT ... FROM
parent``, ``DELETE ... WHERE fk IN (SELECT ... FROM parent)``).

Every function returns plain SQL strings, one statement each, as the server
reads them (a ``%`` in a ``where=`` literal is not doubled): run them in order
with :func:`execute`, which sends each without parameters
(``exec_driver_sql(..., execution_options={"no_parameters": True})``; with
parameters, even empty ones, psycopg and PyMySQL would read ``%`` as a
placeholder).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from sqlalchemy import literal_column, text
from sqlalchemy.sql.elements import BindParameter, ColumnClause
from sqlalchemy.sql.visitors import iterate, replacement_traverse

from .errors import ConfigurationError
from .kinds import MultiLevel

__all__ = ["trigger_name", "trigger_names", "function_name", "refusal", "create_statements", "drop_statements",
           "execute", "installed"]

#: The shortest identifier limit among the databases (PostgreSQL's 63 bytes).
MAX_NAME = 63
#: Per-event suffixes of the trigger names, and the PostgreSQL function's.
EVENTS = {"INSERT": "_ins", "DELETE": "_del", "UPDATE": "_upd"}
#: PostgreSQL's fourth trigger: a TRUNCATE of the child table zeroes the counters.
TRUNCATE = {"TRUNCATE": "_trn"}
FUNCTION_SUFFIX = "_fn"

_DATABASES = {"postgresql": "PostgreSQL", "sqlite": "SQLite", "mysql": "MariaDB/MySQL", "mariadb": "MariaDB/MySQL"}


def trigger_name(counter: Any) -> str:
    """``cc_<parent table>_<counter column>_<hash>``: the base name of the counter's
    triggers (lower case, ``[a-z0-9_]``, at most 55 characters so that every
    per-event suffix stays within 63). The hash of schema, table and column
    keeps two counters apart even when their names read alike once shortened."""
    table = counter.column.table
    qualified = f"{table.schema or ''}.{table.name}.{counter.column.name}"
    digest = hashlib.sha1(qualified.encode("utf-8")).hexdigest()[:8]
    body = re.sub(r"[^a-z0-9_]+", "_", f"{table.name}_{counter.column.name}".lower()).strip("_")
    room = MAX_NAME - max(len(s) for s in (*EVENTS.values(), *TRUNCATE.values(), FUNCTION_SUFFIX)) - len("cc__") - len(digest)
    return f"cc_{body[:room].rstrip('_')}_{digest}"


def trigger_names(counter: Any, dialect: Any = None) -> dict[str, str]:
    """``{"INSERT": name, "DELETE": name, "UPDATE": name}`` (and ``"TRUNCATE"`` on PostgreSQL)."""
    base = trigger_name(counter)
    events = {**EVENTS, **TRUNCATE} if dialect is not None and dialect.name == "postgresql" else EVENTS
    return {event: base + suffix for event, suffix in events.items()}


class _Shape:
    """What a trigger needs of a counter: the child table, its key columns and
    the parent's (in key order), the condition and the value of a row."""

    def __init__(self, counter: Any) -> None:
        kind = counter.kind
        self.counter, self.kind = counter, kind
        self.parent = counter.column.table
        self.parent_key = list(counter.mapper.primary_key)
        self.fk = kind.key_columns()
        self.child = self.fk[0].table
        self.condition = kind.condition()
        self.value = None if _is_one(kind.row_value()) else kind.row_value()  # None: a count
        self.self_referential = self.child is self.parent
        seen: list[Any] = []
        self.foreign: list[Any] = []  # columns of other tables (a joined subclass's condition)
        for expr in (*self.fk, self.condition, self.value):
            for elem in ([] if expr is None else iterate(expr)):
                if isinstance(elem, ColumnClause) and getattr(elem, "table", None) is not None:
                    if elem.table is not self.child:
                        self.foreign.append(elem)
                    elif all(c.name != elem.name for c in seen):
                        seen.append(self.child.c[elem.name])
        #: The child columns whose values decide the counter (foreign key first).
        self.columns = seen


def _is_one(expr: Any) -> bool:
    return isinstance(expr, BindParameter) and expr.value == 1


def _database(dialect: Any) -> str:
    return _DATABASES.get(dialect.name, dialect.name)


def refusal(counter: Any, dialect: Any) -> str | None:
    """None when the trigger strategy can keep ``counter`` on ``dialect``'s database,
    else why not, in one sentence naming the counter and the alternative."""
    name, database, kind = counter.name, _database(dialect), counter.kind
    if kind is None or counter.column is None:
        return f"{name}: it is not resolved yet (configure the mappers first)"
    if dialect.name not in _DATABASES:
        return f"{name}: the trigger strategy does not support {database} yet; use strategy 'bulk'"
    if isinstance(kind, MultiLevel):
        return (f"{name}: a multi-level counter ({counter.relationship!r}) is not supported by the "
                f"trigger strategy yet (on {database}); use strategy 'bulk'")
    shape = _Shape(counter)
    if any(col.table is not shape.parent for col in shape.parent_key):
        return (f"{name}: its column lives in {shape.parent.name}, not in the table of the parent's key "
                f"(joined-table inheritance), which the trigger strategy does not support yet (on {database}); "
                "use strategy 'bulk'")
    if shape.foreign:
        return (f"{name}: which rows count depends on another table ({shape.foreign[0].table}), which the "
                f"trigger strategy does not support yet (on {database}); use strategy 'bulk'")
    own = _own_constraint(shape)
    on_update = (own.onupdate or "").upper() if own is not None else ""
    # (MariaDB/MySQL: a cascade fires no trigger there, the count moves with its parent)
    if on_update in ("SET NULL", "SET DEFAULT") or (on_update == "CASCADE" and dialect.name in ("postgresql", "sqlite")):
        return (f"{name}: its foreign key to {shape.parent.name} has ON UPDATE {on_update}, which changes the "
                "counted rows when their parent's key changes, and the parent keeps its count "
                + ("(the triggers would count them a second time)" if on_update == "CASCADE" else
                   "(which no longer matches them)")
                + f" on {database}; declare it without ON UPDATE, or use strategy 'bulk'")
    if dialect.name in ("mysql", "mariadb"):
        if shape.self_referential:
            return (f"{name}: MariaDB/MySQL triggers cannot update the table that fired them "
                    f"({shape.child.name}: a self-referential counter); use strategy 'bulk'")
        action = _silent_action(shape)
        if action is not None:
            return (f"{name}: {shape.child.name}'s foreign key to {action} changes counted rows by a "
                    "foreign key action, which fires no trigger on MariaDB/MySQL; use strategy 'bulk'")
    return None


def _own_constraint(shape: _Shape) -> Any:
    """The child table's foreign key constraint on the counted key (None: not declared)."""
    for fk in shape.child.foreign_key_constraints:
        if {c.name for c in fk.columns} == {c.name for c in shape.fk} and fk.referred_table is shape.parent:
            return fk
    return None


def _silent_action(shape: _Shape) -> str | None:
    """A foreign key of the child table whose action deletes or changes counted rows
    (other than the counted key's own ON DELETE/ON UPDATE, which go with the parent)."""
    counted = {c.name for c in shape.columns}
    for fk in shape.child.foreign_key_constraints:
        own = fk is _own_constraint(shape)
        deletes = (fk.ondelete or "").upper() == "CASCADE"
        writes = {(fk.ondelete or "").upper(), (fk.onupdate or "").upper()} & {"CASCADE", "SET NULL", "SET DEFAULT"}
        if not own and (deletes or (writes and counted & {c.name for c in fk.columns})):
            return fk.referred_table.name
    return None


def _check(counter: Any, dialect: Any) -> None:
    found = refusal(counter, dialect)
    if found is not None:
        raise ConfigurationError(found)


# -- rendering ----------------------------------------------------------------


def _sql(expr: Any, shape: _Shape, row: str, dialect: Any) -> str:
    """``expr`` with the child table's columns read from ``row`` (``NEW``, ``OLD``,
    an alias), rendered for ``dialect`` with its values inline."""
    quote = dialect.identifier_preparer.quote

    def swap(elem: Any) -> Any:
        if isinstance(elem, ColumnClause) and getattr(elem, "table", None) is shape.child:
            return literal_column(f"{row}.{quote(elem.name)}", type_=elem.type)
        return None

    compiled = str(replacement_traverse(expr, {}, swap).compile(
        dialect=dialect, compile_kwargs={"literal_binds": True}))
    if dialect.paramstyle in ("format", "pyformat"):  # executed without parameters: % is itself
        compiled = compiled.replace("%%", "%")
    return compiled


def _counts(shape: _Shape, row: str, dialect: Any) -> str:
    """SQL: does ``row`` count (its condition; TRUE when every row counts)?"""
    return "1 = 1" if shape.condition is None else f"({_sql(shape.condition, shape, row, dialect)})"


def _weight(shape: _Shape, row: str, dialect: Any) -> str:
    """SQL: what ``row`` adds when it counts (NULL adds 0)."""
    return "1" if shape.value is None else f"coalesce({_sql(shape.value, shape, row, dialect)}, 0)"


def _names(counter: Any, dialect: Any) -> tuple[_Shape, str, str, str]:
    """(shape, parent table, child table, counter column) as the dialect writes them."""
    prep = dialect.identifier_preparer
    shape = _Shape(counter)
    if dialect.name == "sqlite":  # trigger bodies take unqualified table names
        return shape, prep.quote(shape.parent.name), prep.quote(shape.child.name), prep.quote(counter.column.name)
    return shape, prep.format_table(shape.parent), prep.format_table(shape.child), prep.quote(counter.column.name)


def _targets(shape: _Shape, row: str, dialect: Any) -> str:
    """SQL: the parent row (unqualified columns) is the one ``row`` refers to, and ``row`` counts."""
    quote = dialect.identifier_preparer.quote
    keys = " AND ".join(f"{quote(pk.name)} = {row}.{quote(fk.name)}" for pk, fk in zip(shape.parent_key, shape.fk))
    return f"({keys} AND {_counts(shape, row, dialect)})"


def create_statements(counter: Any, dialect: Any) -> list[str]:
    """The statements creating the counter's triggers (and PostgreSQL's function), in order.

    Raises :class:`~countercache.errors.ConfigurationError` (:func:`refusal`'s
    message) where the database cannot keep it."""
    _check(counter, dialect)
    if dialect.name == "postgresql":
        return _postgresql(counter, dialect)
    shape, parent, child, column = _names(counter, dialect)
    quote = dialect.identifier_preparer.quote
    names = {event: quote(name) for event, name in trigger_names(counter).items()}
    add = f"UPDATE {parent} SET {column} = {column} + {_weight(shape, 'NEW', dialect)} " \
          f"WHERE {_targets(shape, 'NEW', dialect)}"
    subtract = f"UPDATE {parent} SET {column} = {column} - {_weight(shape, 'OLD', dialect)} " \
               f"WHERE {_targets(shape, 'OLD', dialect)}"
    both = (f"UPDATE {parent} SET {column} = {column}"
            f" + CASE WHEN {_targets(shape, 'NEW', dialect)} THEN {_weight(shape, 'NEW', dialect)} ELSE 0 END"
            f" - CASE WHEN {_targets(shape, 'OLD', dialect)} THEN {_weight(shape, 'OLD', dialect)} ELSE 0 END"
            f" WHERE {_targets(shape, 'NEW', dialect)} OR {_targets(shape, 'OLD', dialect)}")
    same = "<=>" if dialect.name != "sqlite" else "IS"
    changed = "NOT (" + " AND ".join(f"NEW.{quote(c.name)} {same} OLD.{quote(c.name)}" for c in shape.columns) + ")"
    if dialect.name == "sqlite":
        of = ", ".join(quote(c.name) for c in shape.columns)
        return [
            f"CREATE TRIGGER {names['INSERT']} AFTER INSERT ON {child} FOR EACH ROW BEGIN {add}; END",
            f"CREATE TRIGGER {names['DELETE']} AFTER DELETE ON {child} FOR EACH ROW BEGIN {subtract}; END",
            f"CREATE TRIGGER {names['UPDATE']} AFTER UPDATE OF {of} ON {child} FOR EACH ROW "
            f"WHEN {changed} BEGIN {both}; END",
        ]
    # MariaDB/MySQL: the UPDATE touches the two parents in key order (ORDER BY)
    order = ", ".join(quote(pk.name) for pk in shape.parent_key)
    return [
        f"CREATE TRIGGER {names['INSERT']} AFTER INSERT ON {child} FOR EACH ROW {add}",
        f"CREATE TRIGGER {names['DELETE']} AFTER DELETE ON {child} FOR EACH ROW {subtract}",
        f"CREATE TRIGGER {names['UPDATE']} AFTER UPDATE ON {child} FOR EACH ROW "
        f"BEGIN IF {changed} THEN {both} ORDER BY {order}; END IF; END",
    ]


def function_name(counter: Any, dialect: Any) -> str:
    """PostgreSQL: the trigger function's name, quoted (in the child table's schema)."""
    prep = dialect.identifier_preparer
    schema = counter.kind.key_columns()[0].table.schema
    return (f"{prep.quote_schema(schema)}." if schema else "") + prep.quote(trigger_name(counter) + FUNCTION_SUFFIX)


def _bare_type(type_: Any, dialect: Any) -> str:
    """The type as a plpgsql array variable's element (no COLLATE clause)."""
    if getattr(type_, "collation", None):
        type_ = type_.copy()
        type_.collation = None
    return str(type_.compile(dialect=dialect))


def _postgresql(counter: Any, dialect: Any) -> list[str]:
    """The plpgsql function and its four statement-level triggers."""
    shape, parent, child, column = _names(counter, dialect)
    quote = dialect.identifier_preparer.quote
    fn, names = function_name(counter, dialect), trigger_names(counter, dialect)
    keys = [f"cc_key_{i}" for i in range(len(shape.fk))]
    aliases = ", ".join(f"k{i}" for i in range(len(keys)))
    present = " AND ".join(f"r.{quote(fk.name)} IS NOT NULL" for fk in shape.fk)

    def rows(transition: str, sign: str) -> str:
        fks = ", ".join(f"r.{quote(fk.name)}" for fk in shape.fk)
        return (f"SELECT {fks}, {sign}{_weight(shape, 'r', dialect)} FROM {transition} AS r "
                f"WHERE {present} AND {_counts(shape, 'r', dialect)}")

    def collect(*parts: str) -> str:
        order = ", ".join(f"s.k{i}" for i in range(len(keys)))
        arrays = ", ".join(f"array_agg(s.k{i} ORDER BY {order})" for i in range(len(keys)))
        return (f"SELECT {arrays}, array_agg(s.d ORDER BY {order}) INTO {', '.join(keys)}, cc_deltas "
                f"FROM (SELECT {aliases}, sum(u.d) AS d FROM ({' UNION ALL '.join(parts)}) AS u({aliases}, d) "
                f"GROUP BY {aliases} HAVING sum(u.d) <> 0) AS s;")

    pk = [f"p.{quote(col.name)}" for col in shape.parent_key]
    declare = " ".join(f"{k} {_bare_type(col.type, dialect)}[];" for k, col in zip(keys, shape.parent_key))
    declare += f" cc_deltas {counter.column.type.compile(dialect=dialect)}[];"
    function = (
        f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $countercache$\n"
        f"#variable_conflict use_column\nDECLARE {declare}\nBEGIN\n"
        # every child row is gone: every counter is 0
        f"IF TG_OP = 'TRUNCATE' THEN PERFORM 1 FROM {parent} AS p WHERE p.{column} <> 0 ORDER BY {', '.join(pk)} "
        f"FOR NO KEY UPDATE;\nUPDATE {parent} AS p SET {column} = 0 WHERE p.{column} <> 0; RETURN NULL;\n"
        f"ELSIF TG_OP = 'INSERT' THEN {collect(rows('cc_new', '+'))}\n"
        f"ELSIF TG_OP = 'DELETE' THEN {collect(rows('cc_old', '-'))}\n"
        f"ELSE {collect(rows('cc_new', '+'), rows('cc_old', '-'))}\nEND IF;\n"
        # nothing changed: no UPDATE (which would fire a self-referential table's trigger again)
        f"IF {keys[0]} IS NULL THEN RETURN NULL; END IF;\n"
        f"PERFORM 1 FROM {parent} AS p WHERE ({', '.join(pk)}) IN "
        f"(SELECT * FROM unnest({', '.join(keys)})) ORDER BY {', '.join(pk)} FOR NO KEY UPDATE;\n"
        f"UPDATE {parent} AS p SET {column} = p.{column} + x.d FROM unnest({', '.join(keys)}, cc_deltas) "
        f"AS x({aliases}, d) WHERE " + " AND ".join(f"{p} = x.k{i}" for i, p in enumerate(pk)) + ";\n"
        "RETURN NULL;\nEND $countercache$"
    )
    referencing = {"INSERT": "NEW TABLE AS cc_new", "DELETE": "OLD TABLE AS cc_old",
                   "UPDATE": "OLD TABLE AS cc_old NEW TABLE AS cc_new"}
    return [function, *(f"CREATE TRIGGER {quote(names[event])} AFTER {event} ON {child} REFERENCING "
                        f"{referencing[event]} FOR EACH STATEMENT EXECUTE FUNCTION {fn}()" for event in EVENTS),
            f"CREATE TRIGGER {quote(names['TRUNCATE'])} AFTER TRUNCATE ON {child} FOR EACH STATEMENT "
            f"EXECUTE FUNCTION {fn}()"]


def drop_statements(counter: Any, dialect: Any) -> list[str]:
    """The statements dropping the counter's triggers (and function) if they exist."""
    prep = dialect.identifier_preparer
    names = trigger_names(counter, dialect)
    if dialect.name == "postgresql":
        child = prep.format_table(counter.kind.key_columns()[0].table)
        return [*(f"DROP TRIGGER IF EXISTS {prep.quote(n)} ON {child}" for n in names.values()),
                f"DROP FUNCTION IF EXISTS {function_name(counter, dialect)}() CASCADE"]
    schema = counter.kind.key_columns()[0].table.schema
    prefix = f"{prep.quote_schema(schema)}." if schema and dialect.name != "sqlite" else ""
    return [f"DROP TRIGGER IF EXISTS {prefix}{prep.quote(n)}" for n in names.values()]


def execute(connection: Any, statements: list[str]) -> None:
    """Run ``statements`` (:func:`create_statements`, :func:`drop_statements`) in order on ``connection``."""
    for statement in statements:
        connection.exec_driver_sql(statement, execution_options={"no_parameters": True})


def installed(connection: Any, counter: Any) -> bool:
    """Do all of the counter's triggers exist in ``connection``'s database? (one catalog query)"""
    dialect = connection.dialect
    names = list(trigger_names(counter, dialect).values())
    table = counter.kind.key_columns()[0].table
    params: dict[str, Any] = {f"n{i}": n for i, n in enumerate(names)}
    listed = ", ".join(f":n{i}" for i in range(len(names)))
    if dialect.name == "postgresql":
        params["t"] = dialect.identifier_preparer.format_table(table)
        query = f"SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(:t) AND tgname IN ({listed})"
    elif dialect.name == "sqlite":
        query = f"SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN ({listed})"
    else:
        params["s"] = table.schema
        query = ("SELECT count(*) FROM information_schema.triggers WHERE trigger_schema = "
                 f"coalesce(:s, DATABASE()) AND trigger_name IN ({listed})")
    return connection.execute(text(query), params).scalar_one() == len(names)

