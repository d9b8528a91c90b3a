"""The strategies: when and how a flush's deltas reach the database.

Change tracking (:mod:`countercache.tracking`, :mod:`countercache.flush`) calls a strategy with
``add(counter, parent_key, delta)`` for every change of a child row, then
``row_done(connection)`` after each row and ``flush_done()`` in
``after_flush``. The SQL itself is :meth:`countercache.writer.ParentTable.apply`.
"""

from __future__ import annotations

from .bulk import BulkStrategy
from .deferred import DeferredStrategy
from .per_row import PerRowStrategy
from .sharded import ShardedStrategy
from .trigger import ShardedTriggerStrategy, TriggerStrategy

STRATEGY_CLASSES = {
    "bulk": BulkStrategy,
    "per_row": PerRowStrategy,
    "deferred": DeferredStrategy,
    "sharded": ShardedStrategy,
    "trigger": TriggerStrategy,
    "sharded_trigger": ShardedTriggerStrategy,
}

__all__ = ["STRATEGY_CLASSES", "BulkStrategy", "PerRowStrategy", "DeferredStrategy", "ShardedStrategy", "TriggerStrategy",
           "ShardedTriggerStrategy"]
