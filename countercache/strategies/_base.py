"""What every strategy shares: summing deltas per parent table and key (private)."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from ..writer import renamed_keys

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from ..declaration import CounterCache
    from ..flush import FlushState
    from ..writer import Deltas, ParentTable


class Strategy:
    """Sums deltas per parent table, parent key and counter slot."""

    #: Whether ``row_done`` writes (tracking calls it only for such strategies).
    per_row = False

    #: Whether the counter's deltas go to the side table ``countercache_shards``
    #: (which its metadata must then hold, see :mod:`countercache.sidetable`);
    #: a parent's delete then takes its shard rows along.
    uses_shard_table = False

    #: Whether it writes the parent rows themselves: a row it will write is
    #: locked for writing from the start (``through.Sink.translate``).
    writes_rows = True

    #: The transaction entry's attribute holding this strategy's deltas until
    #: the commit (None: the flush writes them).
    held: str | None = None

    def __init__(self, flush: FlushState) -> None:
        # (weakly: the flush holds its strategies, and a cycle would keep the
        # flush, its session and its states until the garbage collector runs)
        self.flush = flush if flush is None else weakref.proxy(flush)
        self.pending: dict[ParentTable, Deltas] = {}

    def add(self, counter: CounterCache, key: tuple[Any, ...], delta: int) -> None:
        parent = counter.parent
        by_key = self.pending.get(parent)  # type: ignore[arg-type]
        if by_key is None:
            by_key = self.pending[parent] = {}  # type: ignore[index]
        vector = by_key.get(key)
        if vector is None:
            vector = by_key[key] = [0] * len(parent.counters)  # type: ignore[union-attr]  # (new_vector(), inline: per row)
        vector[counter.slot] += delta

    #: Whether the SQL may be the one-statement form for a few parents.
    few = False

    def write(self, connection_for: Any = None, connection: Connection | None = None) -> None:
        """Apply and forget everything pending, parent tables in lock order, on
        ``connection`` or on ``connection_for(parent table)``."""
        pending = self.pending
        if not pending:
            return
        self.pending = {}
        flush = self.flush
        for parent in (pending if len(pending) == 1 else sorted(pending, key=lambda p: p.lock_order)):
            on = connection if connection is not None else connection_for(parent)
            deltas = parent.canonical(pending[parent], on.dialect)
            if flush.renamed:  # (a parent's primary key changed in this flush)
                deltas = renamed_keys(deltas, flush.renamed.get(parent))
            if parent.string_keys:  # (before asking which parents are in memory: by the key they are known by)
                deltas = parent.same_rows(on, deltas, flush.session)
            results = parent.apply(on, deltas, values=flush.holds_any(parent, deltas), few=self.few, merged=True)
            if results:
                flush.results.append((parent, results))

    @classmethod
    def write_held(cls, session: Any, connection_for: Any = None, values: bool = True) -> None:
        """At the outermost commit: write what the transaction holds (strategies with ``held``)."""

    def keeps_leaves(self) -> bool:
        """Are multi-level leaf deltas kept, per middle row, for the commit
        (translated and locked there with the parent rows) rather than now?"""
        return False

    def row_done(self, connection: Connection) -> None:
        """One child row's changes are all added."""

    def write_locking(self, connection: Connection, mapper: Any, keys: list[tuple[Any, ...]],
                      attrs: tuple[str, ...]) -> dict[tuple[Any, ...], dict[str, Any]] | None:
        """Lock and read the middle rows ``keys`` (their ``attrs``) by writing
        their own counters now, in the UPDATE that writes them, rather than by
        a locking read before it: ``{key: {attr: value}}``, or None where this
        strategy does not write them now (the caller then reads them)."""
        return None

    def flush_done(self) -> None:
        """``after_flush``: every row of the flush is written."""
