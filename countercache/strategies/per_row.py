"""``per_row``: an UPDATE per changed child row, on the flush's connection.

Runs inside the mapper's ``after_insert`` / ``after_update`` /
``after_delete``, so the parent row is updated right after the child row,
like a row trigger would (on MariaDB/MySQL, where the key is enforced, a new
row's UPDATE comes right before its INSERT: :mod:`countercache.preread`). A re-parented child updates both parents in one
statement (in key order); a child whose changes cancel out emits nothing.
Costs one round trip per child row: choose it when code reads the counter
inside the flush (in ``after_insert`` of another mapper, say). An ORM bulk
statement (``session.execute(insert(Child), [...])``) is one change: it gets
one UPDATE per parent table, like ``bulk``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base import Strategy

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection


class PerRowStrategy(Strategy):
    name = "per_row"
    per_row = True
    few = True

    def __init__(self, flush: Any) -> None:
        super().__init__(flush)
        #: deltas of parents this flush inserts after the child row (written at its end)
        self.later: dict[Any, Any] = {}

    def row_done(self, connection: Connection) -> None:
        flush = self.flush
        for parent, deltas in self.pending.items():
            for key in [k for k in deltas if not flush.inserted_yet(parent, k)]:
                vector = self.later.setdefault(parent, {}).setdefault(key, parent.new_vector())
                for i, d in enumerate(deltas.pop(key)):
                    vector[i] += d
        self.write(connection=connection)

    def flush_done(self) -> None:
        # Nothing is left after a flush (every row wrote its own) but what waited
        # for its parent's INSERT; an ORM bulk statement has no rows of its own,
        # so it is written as one change.
        for parent, deltas in self.later.items():
            for key, vector in deltas.items():
                for slot, d in enumerate(vector):
                    if d:
                        self.add(parent.counters[slot], key, d)
        self.later = {}
        self.write(self.flush.connection_for)
