"""``deferred``: one UPDATE per parent table per transaction, right before COMMIT.

Every flush of the transaction adds its deltas to the transaction's running
sum (savepoints keep their own, handed up when released and dropped when
rolled back). At the outermost commit, after the final flush, the sums are
written in one UPDATE per parent table, parents in primary-key order, and
the parents in memory get their new values. Parent rows are therefore locked
only for the moment of the commit: concurrent transactions touching the same
parents cannot deadlock on counters, and a hot parent's lock is held for the
shortest time. Until the commit, the counters (in the database and in
memory) do not include the transaction's own changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import memory, transactions
from ..writer import renamed_keys
from ._base import Strategy

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


class DeferredStrategy(Strategy):
    name = "deferred"
    #: The transaction entry's attribute holding this strategy's deltas.
    held = "deferred"

    def keeps_leaves(self) -> bool:
        # until the commit, where the middle rows are locked together with the
        # parent rows, in one order (locked now, they would stay locked in the
        # order of this transaction's flushes, and two transactions flushing
        # in different orders deadlock)
        return not transactions.writes_now(self.flush.session)

    def flush_done(self) -> None:
        session = self.flush.session
        if transactions.writes_now(session):
            # The commit's own final flush (or one made by another
            # before_commit hook): the commit is now, write at once; so too
            # where the session's commit is not what commits its rows.
            self.write(self.flush.connection_for)
            return
        self.hold()

    @classmethod
    def write_held(cls, session: Session, connection_for: Any = None, values: bool = True) -> None:
        """At the commit: the transaction's held deltas to the parent rows, tables in
        lock order, and the parents in memory (``values=False``: expired instead,
        the new values are not asked for; see :mod:`countercache.riding`)."""
        merged = transactions.held_deltas(session, cls.held)  # type: ignore[arg-type]
        for parent in sorted(merged, key=lambda p: p.lock_order):
            connection = (connection_for(parent) if connection_for is not None
                          else session.connection(bind_arguments={"mapper": parent.mapper}))
            deltas = merged[parent]
            if not values:
                parent.apply(connection, deltas, values=False, session=session)
                if session.identity_map:
                    memory.expire(session, parent, list(deltas))
                continue
            # (new values asked for only where a parent is in memory, as bulk does)
            results = parent.apply(connection, deltas, values=_in_memory(session, parent, deltas), session=session)
            if results:
                memory.apply(session, parent, results)

    def hold(self) -> None:
        """Add what this flush found to the transaction's running sum, for the commit."""
        renamed = self.flush.renamed
        transactions.hold(self.flush.session, self.held,  # type: ignore[arg-type]
                          {parent: renamed_keys(parent.canonical(deltas), renamed.get(parent))
                           for parent, deltas in self.pending.items()})
        self.pending = {}


def _in_memory(session: Session, parent: Any, keys: Any) -> bool:
    """Is any of these parents in the session? (Any parent of the class where a key
    is not found: a key given in another form than its type loads, a text UUID
    for a UUID column, finds no identity, and RETURNING brings the loaded form.)"""
    identity_map = session.identity_map
    if not identity_map:
        return False
    key_from_pk = parent.mapper.identity_key_from_primary_key
    if any(key_from_pk(tuple(k)) in identity_map for k in keys):
        return True
    cls = parent.mapper.class_
    return any(isinstance(obj, cls) for obj in identity_map.values())
