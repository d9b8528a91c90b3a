"""``per_row``: an UPDATE per changed child row, on the flush's connection.

Runs inside the mapper's ``after_insert`` / ``after_update`` /
``after_delete``, so the parent row is updated right after the child row,
like a row trigger would. A re-parented child updates both parents in one
statement (in key order); a child whose changes cancel out emits nothing.
Costs one round trip per child row: choose it when code reads the counter
inside the flush (in ``after_insert`` of another mapper, say). An ORM bulk
statement (``session.execute(insert(Child), [...])``) is one change: it gets
one UPDATE per parent table, like ``bulk``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._base import Strategy

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection


class PerRowStrategy(Strategy):
    name = "per_row"
    per_row = True
    few = True

    def row_done(self, connection: Connection) -> None:
        self.write(connection=connection)

    def flush_done(self) -> None:
        # Nothing is left after a flush (every row wrote its own); an ORM bulk
        # statement has no rows of its own, so it is written as one change.
        self.write(self.flush.connection_for)
