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
but added columns with a plain default and index changes), the migration gets
``op.drop_counter_trigger(...)`` before its first such batch and
``op.create_counter_trigger(..., backfill=True)`` after its last (the recount
takes what was written meanwhile). The triggers that the migration creates or
drops anyway are created last or dropped first, outside the batches.

The upgrade and the downgrade are decided apart: Alembic writes the
downgrade as the upgrade's operations reversed, and a batch that copies
nothing one way can copy the other (an added nullable column is an ``ALTER
TABLE``, its downgrade's ``drop_column`` a copy; a dropped one the reverse). So
each direction gets the drop and the create around its own batches that copy,
and only then: around the batches of both directions, a plain drop and
create, each the other's reverse; in one direction only, a drop and a
create whose reverse is nothing (:class:`_OnlyDrop`, :class:`_OnlyCreate`),
or, for the downgrade alone, an operation that writes nothing in the upgrade
and reverses into them (:class:`_Reversed`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from alembic.autogenerate.render import renderers
from alembic.operations import MigrateOperation, Operations, ops
from sqlalchemy import Computed, DefaultClause
from sqlalchemy.sql.elements import ClauseElement

from ..sidetable import TABLE_NAME
from .trigger_ops import CreateCounterTriggerOp, DropCounterTriggerOp

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext

__all__ = ["around_batches"]

log = logging.getLogger("countercache.alembic")


def around_batches(autogen_context: AutogenContext, upgrade_ops: ops.UpgradeOps,
                   kept: list[CreateCounterTriggerOp], present: set[Any]) -> None:
    """Put the drop and the create (with its backfill) of each of ``kept`` (counters whose
    triggers are in the database and stay) around the batches that rebuild one of its tables,
    in the upgrade and in the downgrade, each where its own batches do."""
    if autogen_context.dialect is None or autogen_context.dialect.name != "sqlite" or \
            not autogen_context.opts.get("render_as_batch"):
        return
    batches = [op for op in upgrade_ops.ops if isinstance(op, ops.ModifyTableOps)]
    up = [op for op in batches if _rebuilds(op)]
    down = [op for op in batches if _rebuilds(_reverse(op))]
    # (a downgrade-only wrap already there: an autogenerate that ran twice over these operations)
    present = present | {op.op.to_diff_tuple() for op in upgrade_ops.ops if isinstance(op, _Reversed)}
    for create in kept:
        tables = _tables(create)
        ups = [op for op in up if (op.schema, op.table_name) in tables]
        downs = [op for op in down if (op.schema, op.table_name) in tables]
        definition = create.definition()
        if not (ups or downs) or DropCounterTriggerOp(**definition).to_diff_tuple() in present or \
                create.to_diff_tuple() in present:
            continue
        around = [op for op in upgrade_ops.ops if any(op is found for found in (*ups, *downs))]
        if ups and downs:  # (each the other's reverse: the downgrade drops before its batches too)
            before: MigrateOperation = DropCounterTriggerOp(**definition)
            after: MigrateOperation = CreateCounterTriggerOp(**definition, backfill=True)
        elif ups:
            before, after = _OnlyDrop(**definition), _OnlyCreate(**definition, backfill=True)
        else:  # (the downgrade, reversed: its drop comes from the last, its create from the first)
            before, after = _Reversed(_OnlyCreate(**definition, backfill=True)), _Reversed(_OnlyDrop(**definition))
        upgrade_ops.ops.insert(_at(upgrade_ops, around[-1]) + 1, after)
        upgrade_ops.ops.insert(_at(upgrade_ops, around[0]), before)
        for direction, found in (("upgrade", ups), ("downgrade", downs)):
            if found:
                log.info("Detected batch operation on %s in the %s: the triggers of counter %s.%s are dropped "
                         "before it and created again (with a recount) after it",
                         ", ".join(sorted({op.table_name for op in found})), direction,
                         create.table_name, create.column_name)


class _OnlyDrop(DropCounterTriggerOp):
    """A drop before batches that copy in this direction only: its reverse is nothing."""

    def reverse(self) -> _Reversed:  # type: ignore[override]
        return _Reversed(self)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (DropCounterTriggerOp.__name__, *super().to_diff_tuple()[1:])


class _OnlyCreate(CreateCounterTriggerOp):
    """A create after batches that copy in this direction only: its reverse is nothing."""

    def reverse(self) -> _Reversed:  # type: ignore[override]
        return _Reversed(self)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return (CreateCounterTriggerOp.__name__, *super().to_diff_tuple()[1:])


class _Reversed(MigrateOperation):
    """Nothing in this direction (it renders no line); ``op`` in the other, as its reverse."""

    def __init__(self, op: _OnlyDrop | _OnlyCreate) -> None:
        self.op = op

    def reverse(self) -> _OnlyDrop | _OnlyCreate:
        return self.op

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ()


@Operations.implementation_for(_Reversed)
def _nothing(operations: Operations, op: _Reversed) -> None:
    """Nothing: the drop or create is the other direction's."""


@renderers.dispatch_for(_Reversed)
def _render_nothing(autogen_context: AutogenContext, op: _Reversed) -> list[str]:
    return []


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


def _reverse(op: ops.ModifyTableOps) -> Any:
    """The downgrade's batch of ``op``, as Alembic writes it (``None``: not reversible)."""
    try:
        return op.reverse()
    except (NotImplementedError, ValueError):  # (Alembic's own reverse then fails the same way)
        return None


def _rebuilds(op: Any) -> bool:
    """Is ``op`` a table's changes whose batch copies the table on SQLite?"""
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
