"""``sharded``: a transaction's net deltas go to one of N shard rows, at commit.

Held like ``deferred`` (summed over the transaction's flushes, savepoints
included, dropped on rollback) and written right before COMMIT, but not to
the parent row: to the side table ``countercache_shards``, one upsert that
adds to the row ``(counter, parent, shard)`` of the shard this connection
uses (:mod:`countercache.shards`). Writers on one hot parent therefore wait
for each other only when they share a shard. The parent column lags until
:func:`countercache.fold` moves the shard deltas into it;
:func:`countercache.exact` and :func:`countercache.exact_expression` read
the exact value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import transactions
from .deferred import DeferredStrategy

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class ShardedStrategy(DeferredStrategy):
    name = "sharded"
    held = "sharded"
    uses_shard_table = True
    writes_rows = False  # (the side table's rows, never the parent's)

    @classmethod
    def write_held(cls, session: Session, connection_for: Any = None, values: bool = True) -> None:
        """At the commit: the held deltas to the side table (and deleted parents' rows out)."""
        transactions.write_shards(session, connection_for, queued=not values)

    def flush_done(self) -> None:
        # held until the commit, even in the commit's own final flush: the
        # flush then writes them after every parent row (FlushState.write)
        self.hold()
