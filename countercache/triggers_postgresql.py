"""PostgreSQL's counter triggers (private; see :mod:`countercache.triggers`).

Statement-level triggers with transition tables, one per event, calling one
plpgsql function per counter. For a counter over another table the function
is one statement per event: the deltas per parent summed once (a
materialized CTE; a plain count or sum straight from the one transition
table of an INSERT or DELETE), the parents locked in key order by an
uncorrelated condition that runs before the UPDATE takes any row (skipped
when one parent changes), then one ``UPDATE ... FROM``. Measured: an ORM
flush fires them once per row of its executemany, so what one run costs
counts as much as what it costs per row. A self-referential counter (the
counted rows are in the parent's own table, whose UPDATE fires the
function again) first collects the deltas and returns when there are none.
"""

from __future__ import annotations

from typing import Any

from . import triggers_through
from .trigger_sql import (PARENT_FUNCTION_SUFFIX, is_through, _bare_type, _counts, _key_changed, _names, _recount, _Shape,
                          _statement_triggers, _weight, function_name, trigger_names)

__all__ = ["create_statements"]


def create_statements(counter: Any, dialect: Any) -> list[str]:
    """The plpgsql function and its four statement-level triggers, then the
    parent table's: a new row, or a row whose key changes, starts from the
    real count under its key (rows inserted before it under a deferred
    foreign key; rows a key change's ``ON UPDATE`` action or the ORM moves
    to it next, which the child triggers then add)."""
    if is_through(counter):
        return [*triggers_through.postgresql_statements(counter, dialect), *_parent(counter, dialect)]
    return [*_postgresql(counter, dialect), *_parent(counter, dialect)]


def _parent(counter: Any, dialect: Any) -> list[str]:
    shape, parent, child, column = _names(counter, dialect)
    quote = dialect.identifier_preparer.quote
    fn, names = function_name(counter, dialect, PARENT_FUNCTION_SUFFIX), trigger_names(counter, dialect)
    keys = ", ".join(quote(pk.name) for pk in shape.parent_key)
    changed = _key_changed(shape, "IS NOT DISTINCT FROM", dialect)
    function = (
        f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $countercache$\n"
        f"BEGIN\nIF TG_OP = 'INSERT' THEN NEW.{column} := {_recount(shape, 'NEW', dialect, child)};\n"
        f"ELSIF {changed} THEN NEW.{column} := {_recount(shape, 'NEW', dialect, child)};\nEND IF;\n"
        "RETURN NEW;\nEND $countercache$"
    )
    return [function,
            f"CREATE TRIGGER {quote(names['PARENT_INSERT'])} BEFORE INSERT ON {parent} FOR EACH ROW "
            f"EXECUTE FUNCTION {fn}()",
            f"CREATE TRIGGER {quote(names['PARENT_UPDATE'])} BEFORE UPDATE OF {keys} ON {parent} FOR EACH ROW "
            f"EXECUTE FUNCTION {fn}()"]


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
    if not shape.self_referential:
        return _postgresql_one_statement(counter, dialect, shape, parent, child, column, rows, pk)
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
    return [function, *_statement_triggers(names, child, fn, quote)]


def _postgresql_one_statement(counter: Any, dialect: Any, shape: _Shape, parent: str, child: str, column: str,
                              rows: Any, pk: list[str]) -> list[str]:
    """The function of a counter over another table: one statement per event
    (measured: an ORM flush fires the triggers once per row of an executemany,
    so what each run costs counts). The deltas per parent are summed once (a
    materialized CTE); an uncorrelated condition (run once, before the UPDATE
    takes any row) locks their parents in key order first."""
    quote = dialect.identifier_preparer.quote
    fn, names = function_name(counter, dialect), trigger_names(counter, dialect)
    aliases = [f"k{i}" for i in range(len(shape.fk))]
    order = ", ".join(f"l.{quote(col.name)}" for col in shape.parent_key)

    fks = ", ".join(f"r.{quote(fk.name)}" for fk in shape.fk)
    where = " AND ".join([f"r.{quote(fk.name)} IS NOT NULL" for fk in shape.fk]
                         + ([] if shape.condition is None else [_counts(shape, "r", dialect)]))
    total = "count(*)" if shape.value is None else f"sum({_weight(shape, 'r', dialect)})"

    def one_table(transition: str, sign: str) -> str:
        """The deltas of an INSERT's (or a DELETE's) rows, summed straight from its one transition table."""
        return (f"SELECT {fks}, {sign}{total} FROM {transition} AS r WHERE {where} GROUP BY {fks} "
                f"HAVING {total} <> 0")

    def update(*parts: str) -> str:
        if len(parts) == 1:
            deltas = parts[0]
            aliased = f"cc_d({', '.join(aliases)}, d)"
        else:
            deltas = (f"SELECT {', '.join(aliases)}, sum(u.d) AS d FROM ({' UNION ALL '.join(parts)}) "
                      f"AS u({', '.join(aliases)}, d) GROUP BY {', '.join(aliases)} HAVING sum(u.d) <> 0")
            aliased = "cc_d"
        lock = (f"((SELECT count(*) FROM cc_d) < 2 OR (SELECT count(*) FROM (SELECT 1 FROM {parent} AS l "
                f"WHERE ({order}) IN (SELECT {', '.join(aliases)} FROM cc_d) ORDER BY {order} "
                "FOR NO KEY UPDATE) AS cc_l) >= 0)")
        match = " AND ".join(f"{p} = cc_d.{a}" for p, a in zip(pk, aliases))
        return (f"WITH {aliased} AS MATERIALIZED ({deltas}) UPDATE {parent} AS p SET {column} = p.{column} + cc_d.d "
                f"FROM cc_d WHERE {match} AND {lock};")

    function = (
        f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $countercache$\n"
        f"#variable_conflict use_column\nBEGIN\n"
        f"IF TG_OP = 'INSERT' THEN {update(one_table('cc_new', ''))}\n"
        f"ELSIF TG_OP = 'DELETE' THEN {update(one_table('cc_old', '-'))}\n"
        f"ELSIF TG_OP = 'UPDATE' THEN {update(rows('cc_new', '+'), rows('cc_old', '-'))}\n"
        f"ELSE PERFORM 1 FROM {parent} AS p WHERE p.{column} <> 0 ORDER BY {', '.join(pk)} "  # (TRUNCATE)
        f"FOR NO KEY UPDATE;\nUPDATE {parent} AS p SET {column} = 0 WHERE p.{column} <> 0;\nEND IF;\n"
        "RETURN NULL;\nEND $countercache$"
    )
    return [function, *_statement_triggers(names, child, fn, quote)]


