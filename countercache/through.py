"""Multi-level counters: ``counter_cache("questions.answers")`` (private).

``User.answer_count`` counts answers whose question belongs to the user. The
counter is fed from two sides, both through :mod:`countercache.tracking`:

* **Leaf rows** (answers) change like any child, but their foreign key names
  a *middle* row (a question), not the parent. Their deltas are held per
  middle key by a :class:`Sink` and translated to parent keys by reading the
  middle rows' foreign keys (``SELECT ... FOR SHARE``: a concurrent move of
  the question waits until this transaction ends). The translation runs after
  the flush's middle updates (the UPDATEs of questions come before the
  INSERTs of their answers in a flush) and before its middle deletes, so a
  leaf is counted under the parent its middle row has at that moment; for
  ``per_row`` it runs per leaf row.
* **Middle rows** (questions) are children too, through a
  :class:`~countercache.declaration.MiddleView`
  of the counter: a middle row "weighs" its counted leaves. Moving a question
  to another user moves that many answers: the pre-read that locks the moved
  question rows also counts their leaves (before this flush changes any
  leaf). A deleted question weighs the leaves still in the database when it
  is deleted (after this flush deleted or moved its leaves), so leaves a
  database-level cascade removes with it are counted too.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, Iterator

from sqlalchemy import and_, inspect, select

from . import _registry

from .children import _child_for, _key
from .errors import CounterCacheError
from .kinds import MultiLevel
from .locking import chunk_size, read_foreign_keys
from .values import canonical_keys, key_converters
from .writer import ParentTable, lock_order

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from .declaration import CounterCache


def add_leaf_counts(connection: Connection, child: Any, rows: dict[tuple[Any, ...], dict[str, Any]],
                    held: Any = None) -> None:
    """Add to each middle row's values (``rows``: key -> values) its counted
    leaves, less ``held(counter, key)`` (leaf changes this flush already wrote)."""
    for key, counts in leaf_counts(connection, child, list(rows)).items():
        if held is not None:
            for view in child.views:
                counts[view.count_key] -= held(view.counter, key)
        rows[key].update(counts)


def leaf_counts(connection: Connection, child: Any, keys: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """``{middle key: {view.count_key: counted leaves}}`` for the middle rows ``keys``.

    Read after the middle rows are locked, in a statement of its own, with a
    share lock on the leaves, so that it sees every leaf committed before the
    lock (a plain read would use the transaction's snapshot under REPEATABLE
    READ, MariaDB's default).
    """
    found: dict[tuple[Any, ...], dict[str, Any]] = {k: {} for k in keys}
    if not keys:
        return found
    size = chunk_size(connection)
    ordered = sorted(k[0] for k in keys)
    for view in child.views:
        leaf = view.counter.kind.leaf
        (fk,) = leaf.key_columns()
        condition = leaf.condition()
        for start in range(0, len(ordered), size):  # MariaDB: IN lists below its subquery conversion
            criteria = [fk.in_(ordered[start : start + size])]
            if condition is not None:
                criteria.append(condition)
            # a locking read sees the latest committed leaves whatever the isolation
            # level (REPEATABLE READ's snapshot may predate the middle row's lock)
            rows = (select(fk.label("k"), leaf.row_value().label("v"))
                    .where(and_(*criteria)).with_for_update(read=True).subquery())
            value = leaf.aggregate(rows.c.v)
            for middle_key, n in connection.execute(select(rows.c.k, value).group_by(rows.c.k)).all():
                found[(middle_key,)][view.count_key] = n
        for values in found.values():
            values.setdefault(view.count_key, 0)
    return found


def carry_counts(child: Any, old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    """A moved middle row takes its leaves along: ``new`` gets ``old``'s counts."""
    if old is None or new is None:
        return new
    if not child.views:
        return new
    return {**new, **{v.count_key: old.get(v.count_key, 0) for v in child.views}}


class Sink:
    """Stands in for a strategy for the leaf side of multi-level counters:
    holds deltas per middle key until :meth:`translate`."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        #: counter -> {middle key: delta}
        self.pending: dict[CounterCache, dict[tuple[Any, ...], Any]] = {}

    def add(self, counter: CounterCache, key: tuple[Any, ...], delta: Any) -> None:
        by_key = self.pending.setdefault(counter, {})
        by_key[key] = by_key.get(key, 0) + delta

    def canonical(self) -> None:
        """Middle keys as the database stores them (``"3"`` -> ``3``), equal ones summed."""
        for counter, by_key in list(self.pending.items()):
            converters = key_converters(counter.kind.middle_mapper.primary_key)
            if converters is not None:
                self.pending[counter] = canonical_keys(converters, by_key, operator.add)

    def translate(self, connection_for: Any, will_write: Any = None) -> None:
        """Hand the held deltas to the strategy, keyed by parent (middle rows read and locked).

        The middle rows are locked in key order, in the strongest mode this
        transaction needs for any of them: for writing (``NO KEY UPDATE``)
        when ``will_write(parent table, key)`` says a counter of the middle
        class itself is written for one of them (a direct counter on the
        same row: a shared lock now would have to be upgraded then, and two
        writers doing so deadlock), else shared.
        """
        self.canonical()
        pending, self.pending = self.pending, {}
        # one read per middle class, whatever the number of its counters; every
        # middle row whose leaves changed is locked, also where the deltas
        # cancel out (an answer in, another out): a concurrent move counting
        # that question's leaves must not run between the two (it would wait
        # for the deleted one and miss the inserted one, which its snapshot
        # predates)
        wanted: dict[Any, set[tuple[Any, ...]]] = {}
        for counter, by_key in pending.items():
            wanted.setdefault(counter.kind.middle_mapper, set()).update(by_key)
        rows: dict[Any, dict[tuple[Any, ...], dict[str, Any]]] = {}
        for mapper, keys in sorted(wanted.items(), key=lambda item: lock_order(item[0].local_table)):
            if keys:
                written = will_write is not None and any(
                    will_write(parent, key) for parent in ParentTable.of_mapper(mapper) for key in keys)
                connection = connection_for(mapper)
                found = None
                if written:  # the strategy may write them now, reading them in its UPDATE
                    attrs = tuple(dict.fromkeys(a for c in pending if c.kind.middle_mapper is mapper
                                                for a in c.kind.middle_fk_keys))
                    found = self.strategy.write_locking(connection, mapper, sorted(keys), attrs)
                rows[mapper] = found if found is not None else read_foreign_keys(
                    connection, _child_for(mapper), sorted(keys), lock="no key update" if written else "share")
        for counter, by_key in pending.items():
            found = rows.get(counter.kind.middle_mapper, {})
            for key, delta in by_key.items():
                values = found.get(key)
                parent_key = _key(values, counter.kind.middle_fk_keys) if values is not None and delta else None
                if parent_key is not None:
                    self.strategy.add(counter, parent_key, delta)


def refuse_middle_rekey(session: Any) -> None:
    """``before_flush``: a middle row of a multi-level counter given a new
    primary key is refused before anything is written (its leaves' deltas,
    held or read, are keyed by the middle row's key; a database's ``ON UPDATE
    CASCADE`` re-points the leaves unseen)."""
    middles = _middle_mappers()
    if not middles:
        return
    for state, attr in rekeyed(session, middles):
        names = ", ".join(sorted(c.name for c in middles[next(m for m in middles if state.mapper.isa(m))]))
        raise CounterCacheError(
            f"{names}: {state.mapper.class_.__name__}.{attr} changed; the primary key of a middle row "
            "of a multi-level counter cannot change (create the row with its new key and move its "
            "children to it instead)")


def rekeyed(session: Any, mappers: Any) -> Iterator[tuple[Any, str]]:
    """``before_flush``: ``(state, attribute)`` of the session's loaded objects of ``mappers``
    (or their subclasses) whose primary-key attribute changed."""
    for obj in session.dirty:
        state = inspect(obj)
        if state.key is None or not any(state.mapper.isa(m) for m in mappers):
            continue
        for column in state.mapper.primary_key:
            attr = state.mapper.get_property_by_column(column)
            if state.attrs[attr.key].history.has_changes():
                yield state, attr.key
                break


#: (the registered counters and their kinds when computed, middle mapper -> its multi-level counters)
_middles: tuple[Any, dict[Any, list[Any]]] = (None, {})


def _middle_mappers() -> dict[Any, list[Any]]:
    """Middle mapper -> its multi-level counters (computed again when counters change)."""
    global _middles
    counters = _registry.known()  # (before every flush: no mapper check per counter)
    key = [(c, c.kind) for c in counters]
    if _middles[0] != key:
        found: dict[Any, list[Any]] = {}
        for counter in counters:
            if isinstance(counter.kind, MultiLevel):
                found.setdefault(counter.kind.middle_mapper, []).append(counter)
        _middles = (key, found)
    return _middles[1]
