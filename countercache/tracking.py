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

Work is proportional to what the flush changed; a flush that touches no
counted class runs none of the mapper hooks.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from sqlalchemy import (Boolean, Date, DateTime, Integer, Numeric, String, Text, Time, Uuid, any_, bindparam,
                        cast, event, func, select, true, tuple_)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.base import NO_VALUE

from . import config, many_to_many, memory, through, transactions
from .strategies import STRATEGY_CLASSES

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm.state import InstanceState
    from sqlalchemy.orm.unitofwork import UOWTransaction

    from .declaration import CounterCache
    from .writer import ParentTable

__all__ = ["suspended"]

#: Rows per SELECT of the pre-read. On MariaDB/MySQL an IN list of 1,000
#: values or more becomes a subquery join that may scan (and lock) the whole
#: primary key, so chunks stay well below that there.
PRELOCK_CHUNK = 5000
PRELOCK_CHUNK_MYSQL = 500

_GONE = object()


#: Value types whose values compare and hash as themselves (GROUP BY and a dict key).
_GROUPABLE_TYPES = (Integer, Numeric, String, Boolean, Date, DateTime, Time, Uuid)


class _Child:
    """The counters fed by one child mapper, and what the pre-read needs."""

    def __init__(self, mapper: Mapper[Any]) -> None:
        self.mapper = mapper
        self.counters: list[CounterCache] = []
        #: Attribute keys whose values decide any of the counters (foreign
        #: keys, and the columns of where= and sum=).
        self.keys: tuple[str, ...] = ()
        self.key_set: frozenset[str] = frozenset()
        #: Of those, the ones an UPDATE may set by itself (onupdate, server_onupdate).
        self.computed_keys: frozenset[str] = frozenset()
        #: Multi-level counters for which this class is the middle (through.py).
        self.views: list[through.MiddleView] = []
        self._equals: list[tuple[str, Any]] | None = None
        self._layout: tuple[int, list[Any]] | None = None
        self._groupable: bool | None = None

    def equals(self) -> list[tuple[str, Any]]:
        """``(key, the attribute's equality test)`` for every key (what its history compares with)."""
        if self._equals is None:
            manager = self.mapper.class_manager
            self._equals = [(k, manager[k].impl.is_equal) for k in self.keys]
        return self._equals

    def groupable(self) -> bool:
        """Can deleted rows be counted grouped by their values (in SQL and in a
        dict)? Not with a JSON, array or custom-typed value, say."""
        if self._groupable is None:
            self._groupable = all(
                isinstance(col.type, _GROUPABLE_TYPES)
                for k in self.keys for col in self.mapper.get_property(k).columns)  # type: ignore[attr-defined]
        return self._groupable

    def layout(self) -> list[tuple[CounterCache, str, tuple[str, ...], bool, bool]]:
        """``(counter, strategy name, foreign key attributes, plain count?, multi-level leaves?)``
        per counter, for the configuration in force (resolved once per change)."""
        generation = config._config.generation
        if self._layout is None or self._layout[0] != generation:
            self._layout = (generation, [
                (c, c.strategy(), c.fk_keys, c.simple, getattr(c, "middle_mapper", None) is not None)
                for c in self.counters])
        return self._layout[1]

    def add(self, counter: CounterCache) -> None:
        if counter not in self.counters:
            self.counters.append(counter)
            keys = list(self.keys)
            keys.extend(k for k in counter.value_keys if k not in keys)
            self.keys = tuple(keys)
            self.key_set = frozenset(keys)
            self.computed_keys = frozenset(
                k for k in self.keys
                for col in self.mapper.get_property(k).columns  # type: ignore[attr-defined]
                if col.onupdate is not None or col.server_onupdate is not None)
            if isinstance(counter, through.MiddleView):
                self.views.append(counter)
            self._equals = None
            self._layout = None
            self._groupable = None


#: Child mapper -> its counters (inherited ones included, filled lazily).
_children: weakref.WeakKeyDictionary[Mapper[Any], _Child] = weakref.WeakKeyDictionary()
_child_cache: weakref.WeakKeyDictionary[Mapper[Any], _Child | None] = weakref.WeakKeyDictionary()


#: One counter of a child in a flush: (counter, strategy object, its foreign key
#: attribute keys, whether it is a plain count), looked up once per flush.
Plan = tuple["CounterCache", Any, tuple[str, ...], bool]


class FlushState:
    """What one flush has found so far (kept per session, for one flush)."""

    __slots__ = ("session", "uow", "old", "unread", "strategies", "results", "plans", "saved", "sinks",
                 "deletes_counted", "children", "ready_update", "ready_delete", "singles")

    def __init__(self, session: Session, uow: UOWTransaction | None) -> None:
        self.session = session
        #: the flush's unit of work; None for an ORM bulk statement
        self.uow = uow
        #: child state -> {fk key: value in the database before the flush}, or _GONE
        #: (gone already, or a deleted row the pre-read counted)
        self.old: dict[InstanceState[Any], Any] = {}
        #: child infos with rows this flush updates that the pre-read has not
        #: seen yet: read right before the next UPDATE statement (see _before_write)
        self.unread: set[_Child] = set()
        #: strategy name -> strategy instance for this flush (created on first use)
        self.strategies: dict[str, Any] = {}
        #: (parent table, results) to show on in-memory parents after the flush
        self.results: list[tuple[ParentTable, Any]] = []
        #: child -> (counters with their strategy objects, per-row strategies)
        self.plans: dict[_Child, tuple[list[Plan], list[Any]]] = {}
        #: parent table -> whether this flush saves rows of its class (asked once)
        self.saved: dict[ParentTable, bool] = {}
        #: strategy name -> the sink holding multi-level leaf deltas per middle key
        self.sinks: dict[str, through.Sink] = {}
        #: middle children whose deleted rows' leaves were counted in this flush
        self.deletes_counted: set[_Child] = set()
        #: mapper -> _child_for(mapper), for this flush (a plain dict: the row hooks ask per row)
        self.children: dict[Mapper[Any], _Child | None] = {}
        #: mappers whose rows need nothing more before their UPDATE / DELETE in this flush
        self.ready_update: set[Mapper[Any]] = set()
        self.ready_delete: set[Mapper[Any]] = set()
        #: child -> its one plain count, for the row hooks' short way (see single())
        self.singles: dict[_Child, tuple[CounterCache, Any, str, Any] | None] = {}

    def child(self, mapper: Mapper[Any]) -> _Child | None:
        try:
            return self.children[mapper]
        except KeyError:
            found = self.children[mapper] = _child_for(mapper)
            return found

    def holds_any(self, parent: ParentTable, keys: Any) -> bool:
        """Is any of these parents in the session (so the UPDATE should return values)?

        Parents inserted by this flush are not in the identity map yet: a
        flush that saved any row of the parent's class counts as holding.
        """
        saved = self.saved.get(parent)
        if saved is None:
            saved = self.saved[parent] = self.uow is not None and any(
                m.isa(parent.mapper) and states for m, states in self.uow.mappers.items())
        if saved:
            return True
        identity_map = self.session.identity_map
        if not identity_map:
            return False
        key_from_pk = parent.mapper.identity_key_from_primary_key
        return any(key_from_pk(tuple(k)) in identity_map for k in keys)

    def connection_for(self, parent: ParentTable) -> Connection:
        """The connection the flush (or the statement) runs on, for this parent's table."""
        return self.connection_for_mapper(parent.mapper)

    def connection_for_mapper(self, mapper: Mapper[Any]) -> Connection:
        if self.uow is not None:
            return self.uow.transaction.connection(mapper)
        return self.session.connection(bind_arguments={"mapper": mapper})

    def held_for(self, counter: CounterCache, middle_key: tuple[Any, ...]) -> Any:
        """Multi-level leaf deltas not yet translated (this flush's, and those the
        transaction holds for its commit), for one middle row."""
        return (sum(sink.pending.get(counter, {}).get(middle_key, 0) for sink in self.sinks.values())
                + transactions.held_leaves(self.session, counter, middle_key))

    def translate(self, connection_for: Any = None, *, middles: Any = None) -> None:
        """Multi-level leaf deltas, held per middle key, to their parents (see ``through.py``).

        A strategy that writes at commit keeps them, per middle key, for the
        commit (the middle rows are locked then, with its parent rows, in one
        order) unless ``middles`` (a middle class whose rows this flush is
        about to delete) needs them translated now.
        """
        connection_for = connection_for or self.connection_for_mapper
        for sink in self.sinks.values():
            if sink.pending:
                if middles is None and sink.strategy.keeps_leaves():
                    transactions.keep_leaves(self.session, sink.strategy.held, sink.pending)
                    sink.pending = {}
                else:
                    sink.translate(connection_for, self.will_write)
        if middles is not None:
            for name, sink in transactions.take_leaves(self.session, middles, self.strategy):
                sink.translate(connection_for, self.will_write)

    def will_write(self, parent: ParentTable, key: tuple[Any, ...]) -> bool:
        """Will this transaction write a counter of this parent row (so that
        a lock taken on it now must be the lock for writing)?"""
        for strategy in self.strategies.values():
            if strategy.writes_rows:
                vector = strategy.pending.get(parent, {}).get(key)
                if vector is not None and any(vector):
                    return True
        return transactions.will_write(self.session, parent, key)

    def write(self) -> None:
        """Let every strategy write what it holds for now (``after_flush``)."""
        self.translate()
        many_to_many.collect(self)
        for strategy in self.strategies.values():
            strategy.flush_done()
        if transactions.is_committing(self.session):
            # the commit's own final flush: shard rows now, after every parent
            # row (the order fold() locks them in), deleted parents' included
            transactions.write_shards(self.session)

    def show(self) -> None:
        """Show what was written on the parents in memory (``after_flush_postexec``)."""
        for parent, results in self.results:
            memory.apply(self.session, parent, results)
            transactions.remember_refreshed(self.session, parent, [pk for pk, _ in results])
        self.results = []

    def finish(self) -> None:
        """Both at once (an ORM bulk statement, which has no flush around it)."""
        self.write()
        self.show()

    def strategy(self, name: str) -> Any:
        """This flush's instance of the strategy called ``name`` (created on first use)."""
        found = self.strategies.get(name)
        if found is None:
            found = self.strategies[name] = STRATEGY_CLASSES[name](self)
        return found

    def single(self, child: _Child) -> tuple[CounterCache, Any, str, Any] | None:
        """``(counter, strategy, foreign key, its equality test)`` when the child feeds one plain
        count through one foreign key, summed per flush (not ``per_row``, not a
        multi-level side, no value an UPDATE sets by itself): the row hooks then
        add +1 / -1 directly, the common case of a large flush."""
        try:
            return self.singles[child]
        except KeyError:
            pass
        pairs, per_row = self.plan(child)
        found = None
        if len(pairs) == 1 and not per_row and not child.views and not child.computed_keys:
            counter, strategy, fk_keys, simple = pairs[0]
            if simple and len(fk_keys) == 1 and not isinstance(strategy, through.Sink):
                ((fk, equal),) = child.equals()  # (the one counted key)
                found = (counter, strategy, fk, equal)
        self.singles[child] = found
        return found

    def plan(self, child: _Child) -> tuple[list[Plan], list[Any]]:
        """The child's counters paired with this flush's strategy objects (resolved once)."""
        found = self.plans.get(child)
        if found is None:
            pairs = []
            per_row = []
            for counter, name, fk_keys, simple, leaves in child.layout():
                strategy = self.strategy(name)
                if strategy.per_row and strategy not in per_row:
                    per_row.append(strategy)
                if leaves:  # a multi-level counter's leaves
                    sink = self.sinks.get(name)
                    if sink is None:
                        sink = self.sinks[name] = through.Sink(strategy)
                    strategy = sink
                pairs.append((counter, strategy, fk_keys, simple))
            found = self.plans[child] = (pairs, per_row)
        return found


#: Session -> child states whose rows its transaction loaded with a row lock
#: (forgotten when a transaction or savepoint ends by rollback, and at the end
#: of the outermost transaction).
_locked: weakref.WeakKeyDictionary[Session, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()

#: Session.hash_key (= InstanceState.session_id) -> the flush under way.
_flushes: dict[int, FlushState] = {}
_suspended: weakref.WeakKeyDictionary[Session, int] = weakref.WeakKeyDictionary()


def _child_for(mapper: Mapper[Any]) -> _Child | None:
    try:
        return _child_cache[mapper]
    except KeyError:
        pass
    merged: _Child | None = None
    for m in mapper.iterate_to_root():
        own = _children.get(m)
        if own is not None:
            if merged is None:
                merged = _Child(mapper)
            for counter in own.counters:
                merged.add(counter)
    _child_cache[mapper] = merged
    return merged


def track_child(child_mapper: Mapper[Any], counter: Any) -> None:
    """Start feeding ``counter`` from ``child_mapper``'s rows (and, for a
    multi-level counter, from its middle rows)."""
    child = _children.get(child_mapper)
    if child is None:
        child = _children[child_mapper] = _Child(child_mapper)
    child.add(counter)
    _child_cache.clear()
    _hook(child_mapper)
    middle = getattr(counter, "middle_mapper", None)
    if middle is not None:
        view = counter.__dict__.get("_middle_view")
        if view is None:
            view = counter._middle_view = through.MiddleView(counter)
        track_child(middle, view)


#: Mappers carrying the hooks themselves (propagated to their subclasses).
_hooked: weakref.WeakSet[Mapper[Any]] = weakref.WeakSet()


def _hook(mapper: Mapper[Any]) -> None:
    """Exactly one copy of each hook fires for any class of the hierarchy: a
    hook on an ancestor already reaches this mapper, and a hook put here
    replaces the ones its subclasses carried (propagation brings them back)."""
    if any(m in _hooked for m in mapper.iterate_to_root()):
        return
    for sub in list(mapper.self_and_descendants):
        if sub in _hooked:
            _unhook(sub)
    for name, fn in _MAPPER_HOOKS:
        event.listen(mapper, name, fn, raw=True, propagate=True, **_UNWRAPPED.get(name, {}))
    _hooked.add(mapper)


#: Parent mappers carrying the parent-deleted hook (propagated to subclasses).
_parents_hooked: weakref.WeakSet[Mapper[Any]] = weakref.WeakSet()


def track_parent(mapper: Mapper[Any]) -> None:
    """Watch deletes of a counter's parents (a ``sharded`` counter's rows go with them)."""
    from .shards import parent_deleted

    if any(m in _parents_hooked for m in mapper.iterate_to_root()):
        return
    for sub in list(mapper.self_and_descendants):
        if sub in _parents_hooked and event.contains(sub, "after_delete", parent_deleted):
            event.remove(sub, "after_delete", parent_deleted)
            _parents_hooked.discard(sub)
    event.listen(mapper, "after_delete", parent_deleted, raw=True, propagate=True, retval=True)
    _parents_hooked.add(mapper)


def flushing_session(state: InstanceState[Any]) -> Session | None:
    """The session whose counted flush is writing ``state`` (None when suspended or none)."""
    fs = _flushes.get(state.session_id)  # type: ignore[arg-type]
    return fs.session if fs is not None else None


def _unhook(mapper: Mapper[Any]) -> None:
    for name, fn in _MAPPER_HOOKS:
        if event.contains(mapper, name, fn):
            event.remove(mapper, name, fn)
    _hooked.discard(mapper)


def _key(d: dict[str, Any] | None, fk_keys: tuple[str, ...]) -> tuple[Any, ...] | None:
    if d is None:
        return None
    if len(fk_keys) == 1:
        value = d.get(fk_keys[0])
        return None if value is None else (value,)
    key = tuple(d.get(k) for k in fk_keys)
    return None if None in key else key


def _changed(fs: FlushState, connection: Connection, child: _Child,
             old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
    """Hand one child row's change (old and new foreign keys) to the strategies.

    This runs once per changed child row: keep it lean.
    """
    pairs, per_row = fs.plan(child)
    _add_row(pairs, old, new)
    if per_row:
        if fs.sinks:
            fs.translate(lambda mapper: connection)
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
        if connection not in _watched:
            _watched.add(connection)
            event.listen(connection, "before_execute", _before_statement)


#: Connections with a flush whose pre-read is due before its next DML statement.
_awaiting: weakref.WeakKeyDictionary[Connection, FlushState] = weakref.WeakKeyDictionary()
#: Connections carrying the _before_statement listener (it goes with the connection).
_watched: weakref.WeakSet[Connection] = weakref.WeakSet()


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
    _pre_read(fs, connection, child)
    if child.views and child not in fs.deletes_counted:
        # the first delete of a middle class: every leaf of the flush is written,
        # no middle row is gone yet; translate, then count what each deleted one keeps
        fs.deletes_counted.add(child)
        fs.translate(lambda m: connection, middles=mapper)
        flags = fs.uow.states  # type: ignore[union-attr]
        deleting = {st.key[1]: fs.old[st] for st in _states_of(fs, child)
                    if flags[st][0] and not flags[st][1] and st.key is not None and isinstance(fs.old.get(st), dict)}
        through.add_leaf_counts(connection, child, deleting)


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
            key = tuple(state.key[1])  # type: ignore[index]
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
    lock = getattr(getattr(context, "query", None), "_for_update_arg", None)
    return (lock is not None and not (lock.read and lock.key_share) and lock.of is None
            and getattr(context, "session", None) is not None)


def _mark_locked(session: Session, child: _Child, state: InstanceState[Any], fresh: Any) -> None:
    if not all(k in fresh for k in child.keys):
        return  # a counted value is older than the lock
    locked = _locked.get(session)
    if locked is None:
        locked = _locked[session] = weakref.WeakSet()
    locked.add(state)


#: Mapper events (not instance events) take ``retval=True``: SQLAlchemy then
#: calls the hook itself instead of a wrapper that only returns EXT_CONTINUE
#: (the dispatch ignores what a listener returns). These run per row.
_UNWRAPPED = {name: {"retval": True} for name in
              ("after_insert", "before_update", "before_delete", "after_update", "after_delete")}

_MAPPER_HOOKS = (
    ("load", _loaded),
    ("refresh", _refreshed),
    ("after_insert", _after_insert),
    ("before_update", _before_write),
    ("before_delete", _before_delete),
    ("after_update", _after_update),
    ("after_delete", _after_delete),
)


def _pre_read(fs: FlushState, connection: Connection, child: _Child) -> None:
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
            for values, n in count_deleted(connection, child, list(wanted)):
                _add_removed(pairs, values, n)
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


def _begin_sqlite_write(connection: Connection) -> None:
    """Make the pre-read part of the write transaction on SQLite.

    The sqlite3 module (in its default, legacy transaction mode) sends
    ``BEGIN`` only before the first INSERT/UPDATE/DELETE: a pre-read before
    it runs outside any transaction, so another connection could delete or
    move the row between the read and this flush's DELETE (counted twice,
    seen in the ``hot`` bench). ``BEGIN IMMEDIATE`` takes the write lock
    first; the driver sees the open transaction and sends no BEGIN of its
    own. Connections that manage BEGIN themselves are already inside one.
    """
    dbapi = connection.connection.dbapi_connection
    in_transaction = getattr(dbapi, "in_transaction", None)
    if in_transaction is None:  # SQLAlchemy's aiosqlite adapter: ask the aiosqlite connection
        in_transaction = getattr(getattr(dbapi, "_connection", None), "in_transaction", True)
    if in_transaction is False and getattr(dbapi, "isolation_level", None) is not None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def chunk_size(connection: Connection) -> int:
    """Keys per locking read: below MariaDB/MySQL's IN-to-subquery conversion there."""
    return PRELOCK_CHUNK_MYSQL if connection.dialect.name in ("mysql", "mariadb") else PRELOCK_CHUNK


def is_suspended(session: Session) -> bool:
    return bool(_suspended.get(session))


def child_primary_key(child: _Child) -> list[Any]:
    """Primary-key columns of the table holding the child's foreign keys."""
    table = child.mapper.get_property(child.keys[0]).columns[0].table  # type: ignore[attr-defined]
    return list(table.primary_key.columns)


def _criteria(connection: Connection, child: _Child, keys: list[tuple[Any, ...]]) -> Iterator[Any]:
    """WHERE clauses picking the child rows with these primary keys: one on
    PostgreSQL (an array), key-ordered chunks of an IN list elsewhere."""
    pk = child_primary_key(child)
    if len(pk) == 1 and connection.dialect.name == "postgresql":
        # one array parameter: psycopg parses a fixed text, not 5,000 placeholders
        values = [k for (k,) in keys]
        if isinstance(pk[0].type, Integer) and set(map(type, values)) == {int}:
            # integers as one array literal: psycopg picks a type per element of
            # a list (3.6 ms for 5,000 keys, against 0.9 ms for the text)
            yield pk[0] == any_(cast(bindparam("countercache_keys", "{" + ",".join(map(str, values)) + "}",
                                               type_=Text), ARRAY(pk[0].type)))
        else:
            yield pk[0] == any_(bindparam("countercache_keys", values, type_=ARRAY(pk[0].type)))
        return
    pk_expr = pk[0] if len(pk) == 1 else tuple_(*pk)
    ordered = sorted(keys)
    size = chunk_size(connection)
    for start in range(0, len(ordered), size):
        chunk = ordered[start : start + size]
        yield pk_expr.in_([k[0] for k in chunk] if len(pk) == 1 else chunk)


def _locking_select(child: _Child, criteria: Any, lock: str | None, *, with_key: bool = True) -> Any:
    """``SELECT [pk,] counted values WHERE criteria ORDER BY pk`` with its row lock."""
    mapper = child.mapper
    pk = child_primary_key(child)
    value_cols = [mapper.get_property(k).columns[0] for k in child.keys]  # type: ignore[attr-defined]
    stmt = select(*pk, *value_cols) if with_key else select(*value_cols)
    if len({col.table for col in value_cols}) > 1:
        # values in more than one table of a joined-inheritance class: the
        # tables joined as the mapper joins them (not a cross product)
        stmt = stmt.select_from(mapper.persist_selectable)
    stmt = stmt.where(criteria).order_by(*pk)
    if lock == "share":
        stmt = stmt.with_for_update(read=True)
    elif lock is not None:
        stmt = stmt.with_for_update(key_share=lock == "no key update")
    return stmt


def read_foreign_keys(connection: Connection, child: _Child, keys: list[tuple[Any, ...]] | None = None,
                      *, where: Any = None, lock: str | None = "update") -> dict[tuple[Any, ...], dict[str, Any]]:
    """``{child primary key: {attribute: value}}`` (every counted value) of the rows with these keys
    (or matching ``where``), read in key order and, unless ``lock`` is None,
    locked (``"update"`` or ``"no key update"``) until the transaction ends."""
    value_keys = child.keys
    n = len(child_primary_key(child))
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    criteria = [where if where is not None else true()] if keys is None else _criteria(connection, child, keys)
    for criterion in criteria:
        rows = connection.execute(_locking_select(child, criterion, lock)).all()  # one fetchall, not a fetchone per row
        if n == 1 and len(value_keys) == 1:  # one key, one value: the common case, per row
            (k,) = value_keys
            for key, value in rows:
                found[(key,)] = {k: value}
        else:
            for row in rows:
                found[tuple(row[:n])] = dict(zip(value_keys, row[n:]))
    return found


def count_deleted(connection: Connection, child: _Child,
                  keys: list[tuple[Any, ...]]) -> list[tuple[dict[str, Any], int]]:
    """Lock (``FOR UPDATE``, key order) the rows with these keys, which this
    flush deletes: ``[({attribute: value}, number of rows with those values)]``.

    A row found is locked until the transaction ends, so the flush's DELETE
    removes it as read; a row not found is gone already (its delete counted
    it). On PostgreSQL the rows are grouped by the server: a few rows back,
    not one per child.
    """
    value_keys = child.keys
    counts: dict[tuple[Any, ...], int] = {}
    for criterion in _criteria(connection, child, keys):
        stmt = _locking_select(child, criterion, "update", with_key=False)
        if connection.dialect.name == "postgresql":
            locked = stmt.subquery()
            cols = list(locked.c)
            for *values, n in connection.execute(select(*cols, func.count()).group_by(*cols)).all():
                values = tuple(values)
                counts[values] = counts.get(values, 0) + n
        else:
            for values in connection.execute(stmt).all():
                values = tuple(values)
                counts[values] = counts.get(values, 0) + 1
    return [(dict(zip(value_keys, values)), n) for values, n in counts.items()]


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


# -- session hooks ------------------------------------------------------------


def _before_flush(session: Session, uow: UOWTransaction, instances: Any) -> None:
    if memory._merged:
        memory.undo_merged(session)
    if _suspended.get(session):
        _flushes.pop(session.hash_key, None)
    else:
        _flushes[session.hash_key] = FlushState(session, uow)


def _after_flush(session: Session, uow: UOWTransaction) -> None:
    fs = _flushes.get(session.hash_key)
    if fs is not None:
        fs.write()


def _after_flush_postexec(session: Session, uow: UOWTransaction) -> None:
    fs = _flushes.pop(session.hash_key, None)
    if fs is not None:
        fs.show()


def _after_soft_rollback(session: Session, previous_transaction: Any) -> None:
    # A flush that failed never reached after_flush_postexec: forget it.
    _flushes.pop(session.hash_key, None)
    _locked.pop(session, None)


def _after_transaction_end(session: Session, transaction: Any) -> None:
    if transaction.parent is None:
        _locked.pop(session, None)


def forget_locked(session: Session) -> None:
    """A statement may have changed rows behind the objects (ORM bulk UPDATE/DELETE)."""
    _locked.pop(session, None)


def _after_rollback(session: Session) -> None:
    _locked.pop(session, None)  # a savepoint's rollback releases the row locks taken inside it


_SESSION_HOOKS = (
    ("before_flush", _before_flush),
    ("after_flush", _after_flush),
    ("after_flush_postexec", _after_flush_postexec),
    ("after_soft_rollback", _after_soft_rollback),
    ("after_transaction_end", _after_transaction_end),
    ("after_rollback", _after_rollback),
)


def install() -> None:
    from . import bulk_dml

    for name, fn in _SESSION_HOOKS + transactions.SESSION_HOOKS:
        if not event.contains(Session, name, fn):
            event.listen(Session, name, fn)
    bulk_dml.install()


def uninstall() -> None:
    from . import bulk_dml

    for name, fn in _SESSION_HOOKS + transactions.SESSION_HOOKS:
        if event.contains(Session, name, fn):
            event.remove(Session, name, fn)
    bulk_dml.uninstall()
    for mapper in list(_hooked):
        _unhook(mapper)
    from .shards import forget_pools, parent_deleted

    forget_pools()
    for mapper in list(_parents_hooked):
        if event.contains(mapper, "after_delete", parent_deleted):
            event.remove(mapper, "after_delete", parent_deleted)
    _parents_hooked.clear()
    for connection in list(_watched):
        if event.contains(connection, "before_execute", _before_statement):
            event.remove(connection, "before_execute", _before_statement)
    _watched.clear()
    _awaiting.clear()
    _children.clear()
    _child_cache.clear()
    _locked.clear()
    many_to_many.clear()


@contextmanager
def suspended(session: Any) -> Iterator[None]:
    """Turn counter maintenance off for ``session`` inside the block.

    What is flushed inside the block is never counted, even if it is committed
    after the block; run :func:`countercache.reconcile` afterwards. Meant for
    bulk imports. Accepts a :class:`~sqlalchemy.orm.Session` or an
    :class:`~sqlalchemy.ext.asyncio.AsyncSession`.
    """
    sync = getattr(session, "sync_session", session)
    _suspended[sync] = _suspended.get(sync, 0) + 1
    try:
        yield
    finally:
        left = _suspended[sync] - 1
        if left:
            _suspended[sync] = left
        else:
            del _suspended[sync]
