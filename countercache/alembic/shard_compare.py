"""Autogenerate: no pending shard delta is lost when a migration changes who keeps them.

A ``sharded`` counter's column lags by the deltas pending in the side table
``countercache_shards`` until :func:`countercache.fold` moves them. A
migration that ends a counter's use of the table must give the column its
real value, or those deltas are lost with the rows:

* the upgrade drops the side table (no counter of the models is sharded
  any more): every counter whose column stays is backfilled (recounted) in
  the same migration; which of them were sharded before, the models no
  longer say, and a recount is right for every one. Its downgrade creates
  the table again, empty: the recounted columns need no pending delta;
* the upgrade creates the side table (counters become sharded): its
  downgrade, which drops it, backfills the counters that are sharded now;
* the side table stays: a counter that is not sharded now and has rows in
  it (the database is asked while autogenerating) is backfilled with
  ``shards=True``, which deletes its rows first.

A backfill recounts from the children in one set-based ``UPDATE`` (see
:class:`~.operations.BackfillCounterOp`), online and offline alike.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import inspect, text

from ..sidetable import TABLE_NAME, counter_name

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext
    from alembic.operations import ops
    from sqlalchemy import Column

    from ..declaration import CounterCache

log = logging.getLogger("countercache.alembic")

#: The strategies whose counters keep pending deltas in the side table.
SHARDED = ("sharded", "sharded_trigger")


def compare_side_table(autogen_context: AutogenContext, upgrade_ops: ops.UpgradeOps,
                       counters: list[tuple[Column[Any], CounterCache]],
                       backfill_for: Callable[[Column[Any], CounterCache], Any]) -> None:
    from alembic.operations import ops

    from .operations import BackfillCounterOp, RestoreCounterOp

    every = list(_walk(upgrade_ops))
    side = [op for op in every if isinstance(op, (ops.CreateTableOp, ops.DropTableOp))
            and op.table_name == TABLE_NAME]
    present = {op.key for op in every if isinstance(op, BackfillCounterOp)}
    added = {(op.schema, op.table_name, op.column.name) for op in every if isinstance(op, ops.AddColumnOp)}
    created = {(op.schema, op.table_name) for op in every if isinstance(op, ops.CreateTableOp)}
    columns: dict[tuple[str | None, str], set[str]] = {}

    def kept(col: Column[Any]) -> bool:
        """A counter column in the database before this migration, which it keeps."""
        key = (col.table.schema, col.table.name, col.name)
        if key in present or key in added or key[:2] in created:
            return False
        if key[:2] not in columns:
            insp = inspect(autogen_context.connection)
            columns[key[:2]] = ({c["name"] for c in insp.get_columns(key[1], schema=key[0])}
                                if insp.has_table(key[1], schema=key[0]) else set())
        return col.name in columns[key[:2]]

    if any(isinstance(op, ops.DropTableOp) for op in side):
        for col, definition in counters:
            if kept(col):
                upgrade_ops.ops.append(backfill_for(col, definition))
                log.info("Detected counter %s: backfill (%s is dropped with its pending deltas)",
                         definition.name, TABLE_NAME)
    elif side:  # created: the downgrade drops it
        for col, definition in counters:
            if definition.strategy() in SHARDED and kept(col):
                backfill = backfill_for(col, definition)
                backfill.shards = False  # (the downgrade has dropped the table by then)
                # (first in the upgrade, a pass there: last in the downgrade)
                upgrade_ops.ops.insert(0, RestoreCounterOp(backfill, f"downgrade: {col.table.name}.{col.name} "
                                                           f"recounted ({TABLE_NAME}, its pending deltas, is dropped)"))
    else:
        pending = _pending_counters(autogen_context)
        for col, definition in counters:
            if definition.strategy() not in SHARDED and counter_name(definition) in pending and kept(col):
                backfill = backfill_for(col, definition)
                backfill.shards = True
                upgrade_ops.ops.append(backfill)
                log.info("Detected counter %s: not sharded any more, with deltas pending in %s: backfill",
                         definition.name, TABLE_NAME)


def _walk(container: Any) -> Any:
    from alembic.operations import ops

    for op in container.ops:
        yield op
        if isinstance(op, ops.OpContainer):
            yield from _walk(op)


def _pending_counters(autogen_context: AutogenContext) -> set[str]:
    """The counters with rows in the database's side table (none offline, or without the table)."""
    connection = autogen_context.connection
    if connection is None or not inspect(connection).has_table(TABLE_NAME):
        return set()
    return {row[0] for row in connection.execute(text(f"SELECT DISTINCT counter FROM {TABLE_NAME}"))}
