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

from typing import Any

from .. import shards
from .deferred import DeferredStrategy


class ShardedStrategy(DeferredStrategy):
    name = "sharded"
    held = "sharded"

    def write(self, connection_for: Any) -> None:
        pending, self.pending = self.pending, {}
        if pending:
            shards.write(connection_for, pending)
