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

from ..writer import ParentTable
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
        self.write(flush.connection_for)  # (each parent on its own bind's connection)

    def write_locking(self, connection: Connection, mapper: Any, keys: list[tuple[Any, ...]],
                      attrs: tuple[str, ...]) -> dict[tuple[Any, ...], dict[str, Any]] | None:
        # A leaf row whose middle row's own counter this row changes too (a
        # comment counted by Post.comment_count and User.comment_received_count):
        # the UPDATE of the post returns its user_id, one round trip instead of
        # a locking read and then the UPDATE (where the database has UPDATE ...
        # RETURNING, and the row is one parent of a simple key).
        if len(keys) != 1 or not connection.dialect.update_returning:
            return None
        (key,) = keys
        for parent in ParentTable.of_mapper(mapper):
            deltas = self.pending.get(parent)
            if not deltas or parent.string_keys or parent.decorated_keys:
                continue
            deltas = parent.canonical(deltas)
            vector = deltas.get(key)
            columns = [mapper.get_property(a).columns[0] for a in attrs]
            if (len(deltas) != 1 or vector is None or not any(vector) or not self.flush.inserted_yet(parent, key)
                    or any(c.table is not parent.table or c in parent.pk_cols for c in columns)):
                continue
            del self.pending[parent]
            slots = tuple(i for i, d in enumerate(vector) if d)
            results, found = parent.apply_one_returning(connection, slots, key, vector, tuple(columns))
            if results and self.flush.holds_any(parent, deltas):
                self.flush.results.append((parent, results))
            return {} if found is None else {key: dict(zip(attrs, found))}
        return None

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
