"""Writes the database may skip, or that replace other rows (private).

A row the database silently leaves out cannot be counted from the statement
that gave it, and a row a REPLACE deletes to make room is deleted without
any event saying so. Refused before anything runs, naming the counters:

* an ORM INSERT of counted rows that is an upsert (``on_conflict_do_nothing()``
  / ``_do_update()``, ``on_duplicate_key_update()``), or carries a prefix
  with IGNORE or REPLACE (``prefix_with("IGNORE")``, ``"OR IGNORE"``,
  ``"OR REPLACE"``, in any case) that the database in use renders (a
  ``prefix_with("IGNORE", dialect="mysql")`` is no prefix on PostgreSQL);
* an ORM UPDATE with a REPLACE prefix (SQLite's ``UPDATE OR REPLACE``
  deletes the rows in its way). An IGNORE prefix is kept: the rows an
  UPDATE of counted values changed are read back after it
  (:mod:`countercache.bulk_dml`), so a row it skipped is no change;
* an ORM DELETE with an IGNORE prefix (MariaDB's ``DELETE IGNORE`` leaves
  rows whose delete fails, say a foreign key's RESTRICT);
* on SQLite, an INSERT or UPDATE, by a flush or a statement, of a counted
  table declaring ``ON CONFLICT IGNORE`` / ``REPLACE`` (``sqlite_on_conflict``
  on a constraint, ``sqlite_on_conflict_primary_key`` / ``_unique`` /
  ``_not_null`` on a column): the database's constraint itself skips or
  replaces rows. The same model on another database is counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import cascades
from ._compat import has_post_values_clause, statement_prefixes
from ._registry import known
from .children import _child_for, _family
from .counter_writes import counters_in
from .errors import CounterCacheError
from .suspension import is_suspended
from .kinds import ManyToMany

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper, ORMExecuteState, Session

__all__ = ["check_statement", "check_flush", "SESSION_HOOKS"]

_ESCAPE = "run it inside countercache.suspended(session) and repair with countercache.reconcile()"
_TABLE = ("drop the ON CONFLICT clause (it is SQLite's: other databases are counted), or write inside "
          "countercache.suspended(session) and repair with countercache.reconcile()")


def _refuse(names: str, why: str, fix: str = _ESCAPE) -> None:
    raise CounterCacheError(f"{names}: {why}; {fix}")


def _names(counters: Any) -> str:
    return ", ".join(sorted({c.name for c in counters}))


def check_statement(state: ORMExecuteState, mapper: Mapper[Any]) -> None:
    """Refuse an ORM statement on ``mapper`` that may skip or replace counted
    rows without saying which (on a parent's table: a REPLACE, which deletes
    a parent row and inserts it again at 0, its children left)."""
    counted = [c for m in [mapper, *_family(mapper)] if (child := _child_for(m)) is not None
               for c in child.counters]
    kinds: tuple[str, ...] = ("IGNORE", "REPLACE")
    if counted:
        names = _names(counted)
    elif state.is_delete and cascades.reaches_counted(mapper):
        names = f"the counters of the rows {mapper.class_.__name__}'s ON DELETE CASCADE deletes"
    else:
        parents = counters_in(mapper)
        if not parents or state.is_delete:
            return
        names, kinds = _names(parents.values()), ("REPLACE",)
    statement = state.statement
    dialect = state.session.get_bind(mapper=mapper).dialect.name
    prefixes = [p for p in statement_prefixes(statement, dialect) if any(k in p.upper() for k in kinds)]
    if state.is_insert:
        if has_post_values_clause(statement) and "IGNORE" in kinds:
            _refuse(names, "an upsert (ON CONFLICT / ON DUPLICATE KEY) may insert fewer rows than it is given")
        if prefixes:
            _refuse(names, f"INSERT {prefixes[0]} may insert fewer rows than it is given, or replace others")
    elif state.is_update and any("REPLACE" in p.upper() for p in prefixes):
        _refuse(names, f"UPDATE {prefixes[0]} deletes the rows in its way, uncounted")
    elif state.is_delete and prefixes:
        _refuse(names, f"DELETE {prefixes[0]} may leave rows it was given (their errors skipped)")
    if dialect == "sqlite" and not state.is_delete:
        clause = next(filter(None, (_conflict(table, kinds) for table in mapper.tables)), None)
        if clause is not None:
            _refuse(names, f"{clause}, so SQLite may skip or replace rows this "
                    f"{'INSERT' if state.is_insert else 'UPDATE'} writes", _TABLE)


def _conflict(table: Any, kinds: tuple[str, ...] = ("IGNORE", "REPLACE")) -> str | None:
    """``"<table> declares ON CONFLICT <kind>"`` when one of its constraints or
    columns gives SQLite such a conflict resolution, else None."""
    options = [c.dialect_kwargs.get("sqlite_on_conflict") for c in table.constraints]
    options += [col.dialect_kwargs.get(f"sqlite_on_conflict_{what}") for col in table.columns
                for what in ("primary_key", "unique", "not_null")]
    for option in options:
        if option is not None and str(option).upper() in kinds:
            return f"{table.name} declares ON CONFLICT {str(option).upper()}"
    return None


#: (the counters and their parent tables when computed, {table: (counter names, its clause)})
#: of the counted tables declaring a conflict clause
_tables: tuple[Any, dict[Any, tuple[str, str]]] = (None, {})


def _conflict_tables() -> dict[Any, tuple[str, str]]:
    """Counted tables declaring ON CONFLICT IGNORE/REPLACE: the children's
    and association tables (a row skipped or replaced), the parents'
    (REPLACE: a parent row deleted and inserted again at 0, its children left)."""
    global _tables
    counters = known()  # (before every flush: no mapper check per counter)
    key = [(c, c.parent) for c in counters]  # (again once counters are added or resolved)
    if _tables[0] == key:
        return _tables[1]
    found: dict[Any, list[str]] = {}
    clauses: dict[Any, str] = {}
    for counter in counters:
        kind = counter.kind
        if kind is None or counter.parent is None:
            continue
        tables = [(t, ("IGNORE", "REPLACE")) for t in
                  ([kind.secondary] if isinstance(kind, ManyToMany) else list(counter.child_mapper.tables))]
        tables.append((counter.parent.table, ("REPLACE",)))
        for table, kinds in tables:
            clause = _conflict(table, kinds)
            if clause is not None:
                found.setdefault(table, []).append(counter.name)
                clauses[table] = clause
    _tables = (key, {t: (", ".join(sorted(set(n))), clauses[t]) for t, n in found.items()})
    return _tables[1]


def check_flush(session: Session, flush_context: Any = None, instances: Any = None) -> None:
    """``before_flush``: refuse, on SQLite, a flush that inserts or updates
    rows of a counted table declaring ON CONFLICT IGNORE/REPLACE (nothing is
    written yet). Costs nothing where no counted table declares one."""
    tables = _conflict_tables()
    if not tables or is_suspended(session):
        return
    for obj in [*session.new, *session.dirty]:
        mapper = getattr(type(obj), "__mapper__", None)
        if mapper is None:
            continue
        hit = next((t for t in tables if t in mapper.tables or _links(mapper, t)), None)
        if hit is not None and session.get_bind(mapper=mapper).dialect.name == "sqlite":
            names, clause = tables[hit]
            _refuse(names, f"{clause}, so SQLite may skip or replace rows this flush writes "
                    f"({type(obj).__name__})", _TABLE)


def _links(mapper: Mapper[Any], table: Any) -> bool:
    """Does ``mapper`` have a relationship writing links into the association ``table``?"""
    return any(getattr(rel, "secondary", None) is table for rel in mapper.relationships)


#: (event name, listener) on ``Session``, registered by :mod:`countercache.installation`
#: first of the ``before_flush`` hooks (a refused flush leaves no flush state behind).
SESSION_HOOKS = (("before_flush", check_flush),)
