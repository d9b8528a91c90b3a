"""The locking pre-read: a flush's rows read and locked before their UPDATE / DELETE (private).

``before_update`` / ``before_delete`` (child mapper): the first call for a
child class in a flush reads, in one ``SELECT ... ORDER BY pk FOR UPDATE``,
the current counted values of every row of that class the flush will delete
or re-parent (see :mod:`countercache.tracking` for the whole flow). Rows a
query of this transaction loaded with a row lock (``load`` / ``refresh``
hooks below) need no read.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Iterator

from . import cascades, row_switch, through
from ._compat import FOR_UPDATE_ARG, NO_VALUE
from .children import _child_for
from .strategies import STRATEGY_CLASSES
from .flush import _GONE, _awaiting, _flushes, _locked, watch
from .locking import _begin_sqlite_write, count_deleted, enforced_foreign_key, lock_rows, read_foreign_keys
from .tracking import _add_removed, _add_row

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Mapper, Session
    from sqlalchemy.orm.state import InstanceState

    from .children import _Child
    from .flush import FlushState


def _before_write(mapper: Mapper[Any], connection: Connection, state: InstanceState[Any]) -> None:
    """``before_update``: the rows' pre-read is due before their UPDATE statement.

    Not now: SQLAlchemy calls every ``before_update`` listener of every row
    of the batch first (an application's own may still set a counted column,
    on this row or a later one), then emits the UPDATEs. The read runs right
    before the first of them (:func:`_before_statement`), when every row
    shows what the flush writes. A flush ordered row by row (a cycle between
    classes) updates one row at a time: each such row is scheduled again (a
    foreign key the flush copied from a row it inserted since the last read).
    """
    fs = _flushes.get(state.session_id)  # type: ignore[arg-type]
    if fs is None:
        return
    if mapper not in fs.ready_update:
        fs.ready_update.add(mapper)  # the batch's other rows: nothing more to do before them...
    elif not fs.uow.cycles or state in fs.old:  # type: ignore[union-attr]
        return  # ...unless the flush runs row by row
    child = fs.child(mapper)
    if child is not None:
        fs.unread.add(child)
        _awaiting[connection] = fs
        watch(fs, connection, _before_statement)


def _before_insert(mapper: Mapper[Any], connection: Connection, state: InstanceState[Any]) -> None:
    """``before_insert`` (MariaDB/MySQL, where the database enforces the key):
    the first row of a class in a flush writes its counters of the flush's new
    rows before their INSERT (``bulk``, ``per_row``; :func:`_count_early`), or
    locks their parents for writing (``deferred``; :func:`_lock_parents`).

    InnoDB's foreign-key check of an INSERT share-locks the parent row; a
    counter's UPDATE after it needs the row exclusively, and two transactions
    adding children to one parent then wait for each other's shared lock: a
    deadlock, in every such pair (``bench/mixed_deadlock.py``: 79 to 113 of
    150 transactions). Holding the exclusive lock first, the check finds it
    held by its own transaction and a second writer waits instead.
    """
    fs = _flushes.get(state.session_id)  # type: ignore[arg-type]
    if fs is None:
        return
    deleted = fs.deleted
    if deleted is None:
        deleted = fs.deleted = row_switch.deleted_rows(fs)
    if deleted:  # (this row may take the place of one: SQLAlchemy's row switch)
        row_switch.switched(fs, deleted, mapper, connection, state)
    if mapper in fs.ready_insert or connection.dialect.name not in ("mysql", "mariadb"):
        return
    fs.ready_insert.add(mapper)
    child = fs.child(mapper)
    if child is None:
        return
    early, lock = _first_writes(fs, connection, child)
    if not early and not lock:
        return
    flags = fs.uow.states  # type: ignore[union-attr]
    every = list(_states_of(fs, child))
    states = [st for st in every if st.key is None and not flags[st][0]]
    if early and any(st.key is not None for st in every):
        # rows of the class also move or go in this flush: their deltas may cancel
        # the new rows' (a net-zero parent gets no UPDATE): lock now, write at the end
        early, lock = [], early + lock
    if early:
        _count_early(fs, connection, child, states, early)
    if lock:
        _lock_parents(fs, lock, [st.dict for st in states])


def _first_writes(fs: FlushState, connection: Connection, child: _Child) -> tuple[list[Any], list[Any]]:
    """The child's counters whose parent row is written in this transaction,
    behind a key the database enforces: those written at the flush, and those
    written at the commit (``deferred``)."""
    early, lock = [], []
    for pair in fs.plan(child)[0]:
        counter, strategy, fk_keys, _ = pair
        if not getattr(strategy, "writes_rows", False) or getattr(counter, "kind", None) is None \
                or counter.parent is None:
            continue  # (the side table's rows, a multi-level middle's leaves: no parent row written here)
        columns = [child.mapper.get_property(k).columns[0] for k in fk_keys]  # type: ignore[attr-defined]
        if not enforced_foreign_key(connection, columns[0].table, columns):
            continue  # no constraint, no shared lock to upgrade: the write's own order stands
        (lock if strategy.held else early).append(pair)
    return early, lock


def _count_early(fs: FlushState, connection: Connection, child: _Child, states: list[InstanceState[Any]],
                 early: list[Any]) -> None:
    """Write the ``early`` counters of the new rows now, before their INSERT
    (the UPDATE takes the parent's exclusive lock: no extra statement). The
    row's values are kept: ``after_insert`` counts only what changed since
    (a listener of the application's that set a counted column later)."""
    # per strategy, a writer of its own: one UPDATE per row for per_row, one in all for bulk
    writers = {strategy.name: STRATEGY_CLASSES[strategy.name](fs) for _, strategy, _, _ in early}
    plan = [(counter, writers[strategy.name], fk_keys, simple) for counter, strategy, fk_keys, simple in early]
    by_row = [w for w in writers.values() if w.per_row]
    # the flush's own plan, split: these counters (corrections only, after the
    # INSERT) and the others (counted after it as usual)
    pairs, per_row = fs.plan(child)
    fs.early_counters[child] = ([p for p in pairs if p in early],
                                ([p for p in pairs if p not in early], per_row))
    if by_row and len(states) > 1:
        # one UPDATE per row, rows in their parents' key order: every writer
        # then locks parents in one order (the rows' own order would not)
        order = sorted(early, key=lambda pair: pair[0].parent.lock_order)
        try:
            states = sorted(states, key=lambda st: [(v is None, v) for _, _, fk_keys, _ in order
                                                    for v in (st.dict.get(k) for k in fk_keys)])
        except TypeError:
            pass  # (keys of mixed types: the rows' order)
    for state in states:
        values = state.dict
        if not values.keys() >= child.key_set:
            continue  # a value left to the database: counted after the INSERT, as usual
        if any(None not in (key := tuple(values.get(k) for k in fk_keys))
               and not fs.inserted_yet(counter.parent, key) for counter, _, fk_keys, _ in early):
            continue  # a parent this flush inserts later: counted after both INSERTs
        snapshot = {k: values[k] for k in child.keys}
        _add_row(plan, None, snapshot)
        fs.early[state] = snapshot
        for writer in by_row:
            writer.write(fs.connection_for)
    for writer in writers.values():
        writer.write(fs.connection_for)


def _lock_parents(fs: FlushState, pairs: list[Any], rows: list[dict[str, Any]]) -> None:
    """Lock for writing (``FOR UPDATE``, key order, tables in lock order) the
    parent rows of ``pairs``' counters that ``rows`` (attribute values of
    child rows) point at."""
    wanted: dict[Any, set[tuple[Any, ...]]] = {}
    for counter, _, fk_keys, _ in pairs:
        for values in rows:
            key = tuple(values.get(k) for k in fk_keys)
            if None not in key:
                wanted.setdefault(counter.parent, set()).add(key)
    for parent in sorted(wanted, key=lambda p: p.lock_order):
        lock_rows(fs.connection_for(parent), parent.table, list(wanted[parent]))


def _before_flush(session: Session, uow: Any, instances: Any) -> None:
    """Session ``before_flush`` (after :mod:`countercache.flush`'s, which starts the flush's state)."""
    fs = _flushes.get(session.hash_key)
    if fs is not None and session.deleted:
        cascades.from_deleted_objects(fs)


def forget_watched() -> None:
    """Forget the pre-reads due (``uninstall()``: flushes under way end without them)."""
    _awaiting.clear()


def _before_statement(connection: Connection, clauseelement: Any, multiparams: Any, params: Any,
                      execution_options: Any) -> None:
    """``before_execute`` on a flush's connection: the pre-read of the rows the
    coming UPDATE writes (see :func:`_before_write`); every other statement passes."""
    if not _awaiting or not getattr(clauseelement, "is_dml", False):
        return
    fs = _awaiting.pop(connection, None)
    if fs is None or _flushes.get(fs.session.hash_key) is not fs:
        return
    unread, fs.unread = fs.unread, set()
    for child in unread:
        _pre_read(fs, connection, child)


def _before_delete(mapper: Mapper[Any], connection: Connection, state: InstanceState[Any]) -> None:
    fs = _flushes.get(state.session_id)  # type: ignore[arg-type]
    if fs is None or mapper in fs.ready_delete:
        return
    fs.ready_delete.add(mapper)  # the class's other rows: nothing to do before them
    child = fs.child(mapper)
    if child is None:
        return
    _pre_read(fs, connection, child, delete_next=_delete_next(mapper))
    if child.views and child not in fs.deletes_counted:
        # the first delete of a middle class: every leaf of the flush is written,
        # no middle row is gone yet; translate, then count what each deleted one keeps
        fs.deletes_counted.add(child)
        fs.translate(middles=mapper)
        flags = fs.uow.states  # type: ignore[union-attr]
        deleting = {st.key[1]: fs.old[st] for st in _states_of(fs, child)
                    if flags[st][0] and not flags[st][1] and st.key is not None and isinstance(fs.old.get(st), dict)}
        through.add_leaf_counts(connection, child, deleting)


def _delete_next(mapper: Mapper[Any]) -> bool:
    """Is the flush's DELETE the next statement on the connection? SQLAlchemy calls
    every ``before_delete`` of the rows first: yes if none but this one is
    registered (an application's may run statements of its own)."""
    return all(fn is _before_delete for m in mapper.base_mapper.self_and_descendants
               for fn in m.dispatch.before_delete)


def _pre_read(fs: FlushState, connection: Connection, child: _Child, delete_next: bool = False) -> None:
    """Read (and lock) the database's foreign keys of rows this flush deletes or moves
    (those of the class not read yet).

    A flush that only deletes rows of this class (no move to read in the same
    key order) counts them here, from the locked rows grouped by their values:
    their ``after_delete`` has nothing left to do. Not for ``per_row``
    (an UPDATE per row, after it) nor a multi-level middle (its leaves).
    """
    keys, key_set = child.keys, child.key_set
    old = fs.old
    wanted: dict[tuple[Any, ...], InstanceState[Any]] = {}
    deleting = moving = False
    # (a middle row's value includes its leaves: always read)
    locked = _locked.get(fs.session) if connection.dialect.name != "sqlite" and not child.views else None
    flags = fs.uow.states  # type: ignore[union-attr]
    for state in _states_of(fs, child):
        isdelete, listonly = flags[state]
        if listonly or state.key is None or state in old:
            continue  # (not in the database, or read already)
        if not isdelete and key_set.isdisjoint(state.committed_state):
            continue  # no counted value changed
        if locked and state in locked:
            known = _committed_values(state, keys)
            if known is not None:  # locked by this transaction when loaded: as in the database
                fs.old[state] = known
                continue
        if isdelete:
            deleting = True
        else:
            moving = True
        wanted[state.key[1]] = state
    if not wanted:
        return
    if connection.dialect.name == "sqlite":
        _begin_sqlite_write(connection)
    if not moving and not child.views and child.groupable():
        pairs, per_row = fs.plan(child)
        # (not for multi-level leaves: a middle row moved later in a flush
        # ordered row by row counts its leaves still in the database, and
        # takes what the flush holds for them as already written)
        if not per_row and not any(isinstance(strategy, through.Sink) for _, strategy, _, _ in pairs):
            def counted(found: list[tuple[dict[str, Any], int]]) -> None:
                for values, n in found:
                    _add_removed(pairs, values, n)

            # (PostgreSQL, psycopg, the DELETE next: the read goes with it, one round trip)
            count_deleted(connection, child, list(wanted), counted, fs.carried if delete_next else None)
            for state in wanted.values():
                fs.old[state] = _GONE  # counted (or deleted by someone else first)
            return
    found = read_foreign_keys(connection, child, list(wanted), lock="update" if deleting else "no key update")
    if child.views:
        # middle rows that move take their leaves along: count them now, locked,
        # before this flush changes any leaf (deleted ones: in _before_delete);
        # leaves this flush already wrote (a flush ordered row by row, for a
        # cycle between the classes) are counted by the flush, after the move
        moving_rows = {k: found[k] for k, st in wanted.items() if k in found and not fs.uow.states[st][0]}  # type: ignore[union-attr]
        through.add_leaf_counts(connection, child, moving_rows, held=fs.held_for)
    for key, state in wanted.items():
        fs.old[state] = found.get(key, _GONE)
    if moving and connection.dialect.name in ("mysql", "mariadb"):
        # the UPDATE's foreign-key check share-locks the new parents: lock them,
        # and the old ones, for writing first (see _before_insert)
        early, lock = _first_writes(fs, connection, child)
        if early or lock:
            rows = [st.dict for st in wanted.values() if not flags[st][0]]
            _lock_parents(fs, early + lock, rows + [v for v in found.values() if v is not _GONE])


def _states_of(fs: FlushState, child: _Child) -> Iterator[InstanceState[Any]]:
    """The flush's states of the child's classes (looked up per class, not per state)."""
    for mapper, states in fs.uow.mappers.items():  # type: ignore[union-attr]
        if fs.child(mapper) is child:
            yield from states


def _committed_values(state: InstanceState[Any], keys: tuple[str, ...]) -> dict[str, Any] | None:
    """The loaded (committed) values of ``keys``, or None when one is not loaded."""
    committed, current = state.committed_state, state.dict
    values = {}
    for k in keys:
        if k in committed:
            value = committed[k]
            if value is NO_VALUE:
                return None
        elif k in current:
            value = current[k]
        else:
            return None
        values[k] = value
    return values


def _loaded(state: InstanceState[Any], context: Any) -> None:
    """``load`` / ``refresh`` of a child: remember it when the query locked its row.

    A row this transaction loaded with ``FOR UPDATE`` (``NO KEY UPDATE``,
    ``SHARE``; not ``KEY SHARE``, which lets others move it) cannot change
    under it, and the values just loaded are the database's: deleting or
    moving it later needs no pre-read (``SELECT ... FOR UPDATE`` then
    ``DELETE`` is how applications pick rows under concurrency).
    """
    if _locks_rows(context):
        child = _child_for(state.mapper)
        if child is not None:
            _mark_locked(context.session, child, state, state.dict)  # a new object: all it holds is this load's


def _refreshed(state: InstanceState[Any], context: Any, attrs: Any) -> None:
    """``refresh``: only the attributes named in ``attrs`` are this load's (None
    also comes with populate_existing and load_only: trust nothing then)."""
    if attrs and _locks_rows(context):
        child = _child_for(state.mapper)
        if child is not None:
            _mark_locked(context.session, child, state, attrs)


def _locks_rows(context: Any) -> bool:
    """Did the query lock the rows it loaded against any change by others? Not
    with FOR KEY SHARE (others may still move a row) or FOR UPDATE OF another table."""
    lock = getattr(getattr(context, "query", None), FOR_UPDATE_ARG, None)
    return (lock is not None and not (lock.read and lock.key_share) and lock.of is None
            and getattr(context, "session", None) is not None)


def _mark_locked(session: Session, child: _Child, state: InstanceState[Any], fresh: Any) -> None:
    if not all(k in fresh for k in child.keys):
        return  # a counted value is older than the lock
    locked = _locked.get(session)
    if locked is None:
        locked = _locked[session] = weakref.WeakSet()
    locked.add(state)
