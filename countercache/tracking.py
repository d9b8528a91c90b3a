"""Change tracking: what a flush did to counted children, as per-parent deltas.

This is the one place that turns a flush into deltas. A strategy only
decides when and how the deltas reach the database.

How a flush is read:

* ``before_flush`` (session) keeps the flush's ``UOWTransaction`` for the
  mapper hooks below. That is all it does: the children a flush touches are
  only fully known inside the flush (delete-orphan cascades, foreign keys
  copied from parents that get their primary key in the same flush).
* ``after_insert`` (child mapper): +1 (or the row's weight, see below) to
  the parent the row points at. The foreign key is already copied from a
  pending parent by then.
* ``before_update`` / ``before_delete`` (child mapper): the first call for a
  child class in a flush reads, in one ``SELECT ... ORDER BY pk FOR UPDATE``,
  the current foreign key of every row of that class the flush will delete
  or re-parent. The database row, not the in-memory history, says where the
  child was: a concurrent transaction may have moved it, and a row another
  transaction already deleted is not there to decrement (two sessions
  deleting one child count once). Rows whose counted values did not change
  are not read.
* ``after_update`` / ``after_delete``: -1 to the old parent, +1 to the new.
  A flush that deletes rows of a class and moves none has them counted by
  the pre-read itself, grouped by their values (PostgreSQL groups them in
  the server): its ``after_delete`` returns at once.
* ``after_flush``: many-to-many links (``many_to_many.py``), then every
  strategy writes what it holds; ``after_flush_postexec``: parents in memory.

"Counted values" are the foreign key and, for ``where=`` / ``sum=`` counters,
the columns their expression reads (``expressions.py``): a row's weight is 0
or 1 for a condition, the summed value for a sum, and a change of those
columns moves the counter like a re-parent does. ORM bulk statements come in
through :func:`record_rows` (``bulk_dml.py``) and go the same way.

The flush's state and the session hooks are :mod:`countercache.flush`, the
pre-read :mod:`countercache.preread`; :mod:`countercache.installation`
registers every listener.

Work is proportional to what the flush changed; a flush that touches no
counted class runs none of the mapper hooks.
"""


from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import through
from .children import _child_for, _key
from .flush import _GONE, FlushState, _flushes, release_watched
from .suspension import _suspended
from .locking import read_foreign_keys

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Mapper, Session
    from sqlalchemy.orm.state import InstanceState

    from .children import _Child
    from .flush import Plan


def _changed(fs: FlushState, connection: Connection, child: _Child,
             old: dict[str, Any] | None, new: dict[str, Any] | None, plan: Any = None) -> None:
    """Hand one child row's change (old and new foreign keys) to the strategies
    (``plan``: some of the child's counters only).

    This runs once per changed child row: keep it lean.
    """
    pairs, per_row = plan or fs.plan(child)
    _add_row(pairs, old, new)
    if per_row:
        if fs.watching:  # (a statement per row follows: not through a listener done with)
            release_watched(fs)
        if fs.sinks:
            fs.translate()
        for strategy in per_row:
            strategy.row_done(connection)


def _add_row(pairs: list[Plan], old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
    for counter, strategy, fk_keys, simple in pairs:
        if len(fk_keys) == 1:  # the common case, inlined (this runs per row and counter)
            fk = fk_keys[0]
            old_key = None if old is None or (v := old.get(fk)) is None else (v,)
            new_key = None if new is None or (v := new.get(fk)) is None else (v,)
        else:
            old_key = _key(old, fk_keys)
            new_key = _key(new, fk_keys)
        if simple:
            if old_key != new_key:
                if old_key is not None:
                    strategy.add(counter, old_key, -1)
                if new_key is not None:
                    strategy.add(counter, new_key, 1)
            continue
        old_weight = counter.weight(old) if old_key is not None else 0  # type: ignore[arg-type]
        new_weight = counter.weight(new) if new_key is not None else 0  # type: ignore[arg-type]
        if old_key == new_key and old_weight == new_weight:
            continue
        if old_weight:
            strategy.add(counter, old_key, -old_weight)
        if new_weight:
            strategy.add(counter, new_key, new_weight)


def _add_removed(pairs: list[Plan], old: dict[str, Any], n: int) -> None:
    """``n`` deleted rows that all had the values ``old``."""
    for counter, strategy, fk_keys, simple in pairs:
        key = _key(old, fk_keys)
        if key is not None:
            weight = n if simple else n * counter.weight(old)  # type: ignore[attr-defined]
            if weight:
                strategy.add(counter, key, -weight)


# -- mapper hooks -------------------------------------------------------------


def _after_insert(mapper: Mapper[Any], connection: Connection, state: InstanceState[Any]) -> None:
    fs = _flushes.get(state.session_id)  # type: ignore[arg-type]
    if fs is None:
        return
    child = fs.child(mapper)
    if child is not None:
        values = state.dict
        if fs.early and state in fs.early:  # counted before the INSERT (MariaDB): what changed since
            _after_early_insert(fs, connection, child, state)
            return
        single = fs.singles[child] if child in fs.singles else fs.single(child)
        if single is not None:
            counter, strategy, fk, _ = single
            value = values.get(fk, _GONE)
            if value is not _GONE:  # (else left to the database: read below)
                if value is not None:
                    strategy.add(counter, (value,), 1)
                return
        if not values.keys() >= child.key_set:
            # a value the INSERT left to the database (a server default, say):
            # read the row back (only then, and only this row)
            key = state.key[1] if state.key is not None else mapper.primary_key_from_instance(state.obj())
            values = {**read_foreign_keys(connection, child, [tuple(key)], lock=None).get(tuple(key), {}),
                      **{k: v for k, v in values.items() if k in child.keys}}
        _changed(fs, connection, child, None, values)


def _after_early_insert(fs: FlushState, connection: Connection, child: _Child, state: InstanceState[Any]) -> None:
    """A new row whose counters were written before its INSERT
    (:func:`countercache.preread._count_early`): those move by what changed
    since (nothing, unless a listener set a counted column later); the
    child's other counters count the row as usual."""
    counted, values = fs.early.pop(state), state.dict
    early_pairs, rest = fs.early_counters[child]
    if any(values.get(k) != v for k, v in counted.items()):
        _add_row(early_pairs, counted, values)
    if rest[0]:
        _changed(fs, connection, child, None, values, rest)


def _after_update(mapper: Mapper[Any], connection: Connection, state: InstanceState[Any]) -> None:
    fs = _flushes.get(state.session_id)  # type: ignore[arg-type]
    if fs is None:
        return
    old = fs.old.get(state)
    if old is None or old is _GONE:
        return  # no counted value changed (or the row is gone: the ORM raises)
    child = fs.child(mapper)
    if child is not None:
        values = state.dict
        single = fs.singles[child] if child in fs.singles else fs.single(child)
        if single is not None and single[2] in values:  # the general way below, for one key
            counter, strategy, fk, equal = single
            value, committed = values[fk], state.committed_state
            if fk not in committed or equal(value, committed[fk]) is True:
                value = old.get(fk, value)  # not written: the database's value stands
            was = old.get(fk)
            if was != value:
                if was is not None:
                    strategy.add(counter, (was,), -1)
                if value is not None:
                    strategy.add(counter, (value,), 1)
            return
        if values.keys() >= child.key_set:
            # what the UPDATE wrote; a column it did not write (unchanged since
            # loaded, even if assigned again) keeps the database's value, which
            # the pre-read read under lock (the loaded one may be stale)
            committed, computed = state.committed_state, child.computed_keys
            new = {}
            for k, equal in child.equals():
                value = values[k]
                # written: assigned a value unequal to the loaded one (the
                # attribute's history, without building it: this runs per row)
                if k in computed or k in committed and equal(value, committed[k]) is not True:
                    new[k] = value
                else:
                    new[k] = old.get(k, value)
        else:
            # expired by the UPDATE (a SQL expression was assigned, or a server
            # side onupdate): the row, locked by the pre-read, says what it is now
            identity = state.key or mapper.identity_key_from_instance(state.obj())  # (None: a row switch)
            key = tuple(identity[1])
            new = read_foreign_keys(connection, child, [key], lock=None).get(key, old)
        _changed(fs, connection, child, old, through.carry_counts(child, old, new) if child.views else new)


def _after_delete(mapper: Mapper[Any], connection: Connection, state: InstanceState[Any]) -> None:
    fs = _flushes.get(state.session_id)  # type: ignore[arg-type]
    if fs is None:
        return
    old = fs.old.get(state)
    if old is _GONE:
        return  # counted by the pre-read, or deleted by someone else first (their delete counted it)
    child = fs.child(mapper)
    if child is None:
        return
    if old is None:
        committed = state.committed_state
        old = {k: committed.get(k, state.dict.get(k)) for k in child.keys}
    _changed(fs, connection, child, old, None)


def record_rows(session: Session, mapper: Mapper[Any],
                rows: list[tuple[dict[str, Any] | None, dict[str, Any] | None]]) -> None:
    """Count rows changed outside a flush (ORM bulk statements): ``(old, new)``
    foreign-key dicts per row, None for a row inserted or deleted. Written at
    once by ``bulk`` and ``per_row``, kept for the commit by ``deferred``."""
    child = _child_for(mapper)
    if child is None or not rows or _suspended.get(session):
        return
    fs = FlushState(session, None)
    pairs, _ = fs.plan(child)
    for old, new in rows:
        _add_row(pairs, old, new)
    fs.finish()
