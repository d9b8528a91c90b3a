"""Autogenerate: the triggers of ``trigger`` and ``sharded_trigger`` counters (called by :mod:`.autogenerate`).

* A counter whose strategy is ``trigger`` or ``sharded_trigger`` (its
  ``create_counter_trigger`` then says ``strategy='sharded_trigger',
  shards=N``, and its backfill ``shards=True``) and whose triggers are not in the
  database gets ``op.create_counter_trigger(...)`` followed by
  ``op.backfill_counter(...)`` (an ORM strategy switched to ``trigger`` loses
  no count: the backfill recounts once the triggers count the new rows). A
  counter that autogenerate cannot keep with triggers on the database
  (:func:`countercache.triggers.refusal`) raises
  :class:`~countercache.CounterCacheError` naming it.
* countercache triggers in the database (``cc_`` names) on a table of the
  target metadata (the counted table, or the parent's: a counted table renamed
  or dropped leaves the parent's triggers, which read it), in the schema of
  any table of the metadata that ``include_name`` lets autogenerate compare,
  that no ``trigger`` counter wants under that name (the counter switched to
  another strategy, no longer declared, or its definition changed: the names
  carry a hash of it) get ``op.drop_counter_trigger(...)`` (a changed shard
  count too: the names carry it), with the definition when it is known (the
  counter is still declared, or a migration recorded its
  ``create_counter_trigger``), so that the downgrade creates them again;
  else, or when their counted table is gone already, by name (the downgrade
  cannot recreate them and says so).

Drops come first in the upgrade (after the downgrade's restoring
backfills), creates and their backfills last. The triggers that stay are
dropped and created again around an SQLite batch operation that copies one
of their tables (:mod:`.batch_compare`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect

from .. import triggers
from ..trigger_sql import is_through
from ..errors import CounterCacheError
from .batch_compare import around_batches
from .history import UNKNOWN, recorded_calls
from .operations import BackfillCounterOp, RestoreCounterOp
from .trigger_ops import CreateCounterTriggerOp, DropCounterTriggerOp, _TriggerOp

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext
    from alembic.operations import ops

__all__ = ["compare_triggers"]

_KEYWORDS = {"where": None, "sum": None, "parent_key": None, "schema": None, "strategy": "trigger", "shards": None,
             "through": None}
#: The strategies kept by triggers that a migration creates.
_DATABASE = ("trigger", "sharded_trigger")
#: The suffixes of the triggers on a counter's counted table.
_COUNTED = {*triggers.EVENTS.values(), *triggers.TRUNCATE.values()}


def _one(names: list[str]) -> str | tuple[str, ...]:
    return names[0] if len(names) == 1 else tuple(names)


def create_for(counter: Any, strategy: str | None = None) -> CreateCounterTriggerOp:
    """The ``create_counter_trigger`` of a resolved counter (its names and ``where_sql`` / ``sum_sql``),
    under its strategy (``strategy``: under that one instead; ``trigger`` for an ORM strategy)."""
    fks = list(counter.kind.key_columns())
    table = counter.column.table
    strategy = strategy or (counter.strategy() if counter.strategy() in _DATABASE else "trigger")
    through = None
    if is_through(counter):  # (recorded as op.backfill_counter records it: the leaves, through the middle rows)
        middle, middle_fks = fks[0].table, fks
        fks = list(counter.kind.leaf.key_columns())
        through = (middle.name, _one([c.name for c in counter.kind.middle_key()]), _one([c.name for c in middle_fks]))
        if strategy == "sharded_trigger" or not all(isinstance(n, str) for n in through):
            raise CounterCacheError(f"{counter.name}: a multi-level counter with strategy {strategy!r} "
                                    "or composite keys cannot be recorded in a migration yet; use strategy 'bulk'")
    return CreateCounterTriggerOp(
        table.name, counter.column.name, fks[0].table.name, _one([c.name for c in fks]),
        where=counter.where_sql, sum=counter.sum_sql,
        parent_key=_one([c.name for c in counter.mapper.primary_key]), schema=table.schema,
        strategy=strategy, shards=counter.shards() if strategy == "sharded_trigger" else None, through=through)


def compare_triggers(autogen_context: AutogenContext, upgrade_ops: ops.UpgradeOps, counters: list[Any],
                     backfill_for: Any) -> None:
    """Add the creates, backfills and drops the ``trigger`` counters need (see the module)."""
    connection = autogen_context.connection
    if connection is None:
        return
    from alembic.operations import ops

    dialect = connection.dialect
    present = {op.to_diff_tuple() for op in _walk(upgrade_ops) if isinstance(op, _TriggerOp)}
    created = {(op.schema, op.table_name) for op in _walk(upgrade_ops) if isinstance(op, ops.CreateTableOp)}
    added = {(op.schema, op.table_name, op.column.name) for op in _walk(upgrade_ops) if isinstance(op, ops.AddColumnOp)}
    wanted: dict[str, tuple[Any, Any]] = {}
    declared: dict[str, CreateCounterTriggerOp] = {}
    for col, counter in counters:
        if counter.kind is None or counter.column is None:
            continue
        trigger = counter.strategy() in _DATABASE
        refused = triggers.refusal(counter, dialect) if trigger else None
        if refused is not None:
            raise CounterCacheError(f"countercache autogenerate: {refused}")
        # (the triggers of a previous strategy, ``trigger`` or ``sharded_trigger`` over as many
        # shards, are dropped with their definition: the downgrade creates them again)
        for strategy in _DATABASE:
            try:
                op = create_for(counter, strategy)
            except CounterCacheError:  # (no shard count that sharded_trigger takes)
                continue
            declared[op.base()] = op
        base = triggers.trigger_name(counter)
        try:
            declared[base] = create_for(counter)
        except CounterCacheError as exc:  # (a multi-level counter no migration records: fine unless trigger)
            if trigger:
                raise CounterCacheError(f"countercache autogenerate: {exc}") from None
            continue
        if trigger:
            wanted[base] = (col, counter)
    default = dialect.default_schema_name
    tables = {(None if t.schema == default else t.schema, t.name)
              for md in _metadatas(autogen_context) for t in md.tables.values()}
    # (every schema a table of the metadata is in, as autogenerate's include_name lets it compare)
    schemas = [s for s in dict.fromkeys([None, *sorted({s for s, _ in tables if s is not None})])
               if autogen_context.run_name_filters(s, "schema", {})]
    drops: list[Any] = []
    recorded: dict[str, DropCounterTriggerOp] | None = None
    for (schema, base), found in triggers.installed_tables(connection, schemas).items():
        # (stale: on a table of the metadata, the counted one or the parent's, whose counted table
        # may be gone: renamed, or no longer declared)
        if base in wanted or not any((schema, table) in tables for table in found.values()):
            continue
        if recorded is None:
            recorded = _recorded(autogen_context)
        counted = [table for suffix, table in found.items() if suffix in _COUNTED]
        if not counted:  # (their counted table gone already: the downgrade could not create them there)
            drop = DropCounterTriggerOp(child_table=next(iter(found.values())), name=base, schema=schema)
        elif base in declared:
            drop = DropCounterTriggerOp(**declared[base].definition())
        else:
            drop = recorded.get(base) or DropCounterTriggerOp(child_table=counted[0], name=base, schema=schema)
        if drop.to_diff_tuple() not in present:
            drops.append(drop)
    at = next((i for i, op in enumerate(upgrade_ops.ops) if not isinstance(op, RestoreCounterOp)),
              len(upgrade_ops.ops))
    upgrade_ops.ops[at:at] = drops
    kept: list[CreateCounterTriggerOp] = []
    for base, (col, counter) in wanted.items():
        create = create_for(counter)
        key = (create.schema, create.table_name, create.column_name)
        if create.to_diff_tuple() in present:
            continue
        if triggers.installed(connection, counter):
            kept.append(create)  # (SQLite: dropped and created again around a batch copy of one of its tables)
            continue
        if not (key[:2] in created or key in added or _in_database(connection, key)):
            continue  # (a column neither in the database nor added: filtered out by env.py)
        upgrade_ops.ops.append(create)
        if key[:2] in created:
            continue  # a new table: nothing to backfill
        backfill = next((op for op in upgrade_ops.ops if isinstance(op, BackfillCounterOp) and op.key == key), None)
        if backfill is None:
            backfill = backfill_for(col, counter)
        else:
            upgrade_ops.ops.remove(backfill)  # after the create: it counts what the triggers will not
        upgrade_ops.ops.append(backfill)
    around_batches(autogen_context, upgrade_ops, kept, present)  # (SQLite's batch copies)


def _recorded(autogen_context: AutogenContext) -> dict[str, DropCounterTriggerOp]:
    """``{base name: drop}``: the triggers earlier migrations created, by the name their definition gives."""
    found: dict[str, DropCounterTriggerOp] = {}
    for call in recorded_calls(autogen_context, "create_counter_trigger", _KEYWORDS):
        if not call.literal or UNKNOWN in call.args:
            continue
        try:
            drop = DropCounterTriggerOp(*call.args, **call.kwargs)
            found.setdefault(drop.base(), drop)
        except CounterCacheError:  # no parent_key (or shards=): not named from the migration alone
            continue
    return found


def _in_database(connection: Any, key: tuple[str | None, str, str]) -> bool:
    found = inspect(connection)
    return found.has_table(key[1], schema=key[0]) and any(
        c["name"] == key[2] for c in found.get_columns(key[1], schema=key[0]))


def _metadatas(autogen_context: AutogenContext) -> list[Any]:
    metadata = autogen_context.metadata
    return [] if metadata is None else [metadata] if not isinstance(metadata, (list, tuple)) else list(metadata)


def _walk(container: Any) -> Any:
    for op in container.ops:
        yield op
        if hasattr(op, "ops"):
            yield from _walk(op)
