"""Core statements on counted tables run through a session (private).

``session.execute(posts.insert().values(...))`` names a table, not a mapped
class: no ORM hook sees its rows, and refusing it would change what plain
SQLAlchemy does. It is in the docs' "not maintained" list, and warned of
here with a :class:`~countercache.CounterCacheWarning` naming the counters
(an UPDATE only when it sets a column a counter reads), as is a Core INSERT
or UPDATE giving a counter column a value.
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any

from ._compat import statement_values
from ._registry import all_counters
from .errors import CounterCacheWarning
from .kinds import ManyToMany, MultiLevel

if TYPE_CHECKING:
    from sqlalchemy.orm import ORMExecuteState

__all__ = ["warn_core"]


def warn_core(state: ORMExecuteState) -> None:
    """A Core statement on a counted table, run through the session
    (``session.execute(posts.insert())``): its rows cannot be told from it
    before it runs, nor refused without changing what plain SQLAlchemy
    does; a :class:`CounterCacheWarning` names the counters it may leave
    wrong (the docs' "not maintained" list; ``reconcile()`` repairs)."""
    table = getattr(state.statement, "table", None)
    if table is None:
        return
    values = set(statement_values(state.statement)) if state.is_update else set()
    changed = {table.c[k] for k in (getattr(v, "key", v) for v in values) if isinstance(k, str) and k in table.c}
    names = []
    for counter in all_counters():
        kind = counter.kind
        if kind is None:
            continue
        if isinstance(kind, ManyToMany):
            counted = set(kind.secondary.c)
        else:  # the columns that decide it: foreign keys, where= / sum= columns, a middle's key
            child = counter.child_mapper
            counted = {child.get_property(k).columns[0] for k in counter.value_keys}
            if isinstance(kind, MultiLevel):
                counted |= set(kind.key_columns())
        if any(c.table is table for c in counted) and (not state.is_update or changed & counted):
            names.append(counter.name)
    _warn_counter_written(state, table)
    if names:
        warnings.warn(
            f"{', '.join(sorted(names))}: a Core {'INSERT' if state.is_insert else 'UPDATE' if state.is_update else 'DELETE'} "
            f"on {table.name} is not counted; run it on the mapped class (an ORM statement is counted), "
            "or repair with countercache.reconcile()",
            CounterCacheWarning, stacklevel=_caller_level(),
        )


def _warn_counter_written(state: ORMExecuteState, table: Any) -> None:
    """A Core INSERT/UPDATE through the session giving a counter column a
    value (``session.execute(users.update().values(question_count=0))``):
    not refused (a Core statement does what plain SQLAlchemy does), warned."""
    if not (state.is_insert or state.is_update):
        return
    params: Any = state.parameters
    given = set(statement_values(state.statement))
    for row in params if isinstance(params, list) else [params] if params else []:
        given.update(row)
    names = {getattr(k, "key", k) for k in given}
    written = sorted(c.name for c in all_counters()
                     if c.column is not None and c.column.table is table and c.column.key in names)
    if written:
        warnings.warn(
            f"{', '.join(written)}: a Core {'INSERT' if state.is_insert else 'UPDATE'} on {table.name} sets the "
            "counter column, which is countercache's; repair with countercache.reconcile()",
            CounterCacheWarning, stacklevel=_caller_level(),
        )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside SQLAlchemy and countercache (the application's)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("sqlalchemy", "countercache")):
        frame, level = frame.f_back, level + 1
    return level
