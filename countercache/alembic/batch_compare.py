"""Autogenerate on SQLite: a counter's triggers around a batch operation that rebuilds one of its tables.

With ``render_as_batch=True`` a table's changes render as ``with
op.batch_alter_table(...)``, which on SQLite copies the table into a new one,
drops it and renames the copy. The rename fails (``error in trigger cc_...:
no such table``, the migration half-applied) while a counter's triggers name
the table being rebuilt: its parent, counted or middle table, or the side
table ``countercache_shards`` of a ``sharded_trigger`` counter.

So for every ``trigger`` / ``sharded_trigger`` counter whose triggers are in the
database and stay, and one of whose tables a batch operation rebuilds (as
:meth:`alembic.ddl.sqlite.SQLiteImpl.requires_recreate_in_batch` decides: anything
but added columns with a plain default and index changes), the upgrade gets
``op.drop_counter_trigger(...)`` before its first such batch and
``op.create_counter_trigger(..., backfill=True)`` after its last (the recount
takes what was written meanwhile); the downgrade, the upgrade reversed, does
the same around its own batches. The triggers that the migration creates or
drops anyway are created last or dropped first, outside the batches.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import Computed, DefaultClause
from sqlalchemy.sql.elements import ClauseElement

from ..sidetable import TABLE_NAME
from .trigger_ops import CreateCounterTriggerOp, DropCounterTriggerOp

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext
    from alembic.operations import ops

__all__ = ["around_batches"]

log = logging.getLogger("countercache.alembic")


def around_batches(autogen_context: AutogenContext, upgrade_ops: ops.UpgradeOps,
                   kept: list[CreateCounterTriggerOp], present: set[Any]) -> None:
    """Put the drop and the create (with its backfill) of each of ``kept`` (counters whose
    triggers are in the database and stay) around the batches that rebuild one of its tables."""
    if autogen_context.dialect is None or autogen_context.dialect.name != "sqlite" or \
            not autogen_context.opts.get("render_as_batch"):
        return
    batches = [op for op in upgrade_ops.ops if _rebuilds(op)]
    for create in kept:
        tables = _tables(create)
        around = [op for op in batches if (op.schema, op.table_name) in tables]
        drop = DropCounterTriggerOp(**create.definition())
        if not around or drop.to_diff_tuple() in present:
            continue
        upgrade_ops.ops.insert(_at(upgrade_ops, around[-1]) + 1,
                               CreateCounterTriggerOp(**create.definition(), backfill=True))
        upgrade_ops.ops.insert(_at(upgrade_ops, around[0]), drop)
        log.info("Detected batch operation on %s: the triggers of counter %s.%s are dropped before it and "
                 "created again (with a recount) after it", ", ".join(sorted({op.table_name for op in around})),
                 create.table_name, create.column_name)


def _at(upgrade_ops: ops.UpgradeOps, op: Any) -> int:
    return next(i for i, found in enumerate(upgrade_ops.ops) if found is op)


def _tables(create: CreateCounterTriggerOp) -> set[tuple[str | None, str | None]]:
    """The tables the counter's triggers name: parent, counted, middle, and the side table."""
    tables = {(create.schema, create.table_name), (create.schema, create.child_table)}
    if create.through is not None:
        tables.add((create.schema, create.through[0]))
    if create.sharded:
        tables.add((None, TABLE_NAME))
    return tables


def _rebuilds(op: Any) -> bool:
    """Is ``op`` a table's changes whose batch copies the table on SQLite?"""
    from alembic.operations import ops

    if not isinstance(op, ops.ModifyTableOps):
        return False
    for change in op.ops:
        if isinstance(change, ops.AddColumnOp):
            default = change.column.server_default
            if (isinstance(default, DefaultClause) and isinstance(default.arg, ClauseElement)) or (
                    isinstance(default, Computed) and default.persisted):
                return True
        elif not isinstance(change, (ops.CreateIndexOp, ops.DropIndexOp)):
            return True
    return False
