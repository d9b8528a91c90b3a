"""One flush as the library sees it: :class:`FlushState` and the session hooks (private).

``before_flush`` keeps a :class:`FlushState` per session for the row hooks
(:mod:`countercache.tracking`, :mod:`countercache.preread`);
``after_flush`` lets every strategy write what it holds, and
``after_flush_postexec`` shows the new values on the parents in memory.
The listeners are registered by :mod:`countercache.installation`.
"""

from __future__ import annotations

import weakref
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.orm import Mapper, Session

from . import _psycopg, collation, database_kept, many_to_many, memory, parent_keys, through, transactions
from ._compat import drop_events_flag, has_own_events, held_connection, listen_on_connection
from .children import _Child, _child_for
from .strategies import STRATEGY_CLASSES
from .suspension import _suspended
from .writer import ParentTable

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm.state import InstanceState
    from sqlalchemy.orm.unitofwork import UOWTransaction

    from .declaration import CounterCache

__all__ = ["FlushState"]

_GONE = object()


#: One counter of a child in a flush: (counter, strategy object, its foreign key
#: attribute keys, whether it is a plain count), looked up once per flush.
Plan = tuple["CounterCache", Any, tuple[str, ...], bool]


class FlushState:
    """What one flush has found so far (kept per session, for one flush)."""

    __slots__ = ("session", "uow", "old", "unread", "watching", "strategies", "results", "plans", "saved", "sinks",
                 "deletes_counted", "children", "ready_update", "ready_delete", "singles", "collations", "ready_insert", "uninserted", "cascaded",
                 "early", "early_counters", "connections", "deleted", "renamed", "canonical", "carried",
                 "__weakref__")

    def __init__(self, session: Session, uow: UOWTransaction | None) -> None:
        self.session = session
        #: the flush's unit of work (weakly: when SQLAlchemy drops it, the
        #: flush is over, however it ended: see _flush_dropped); None for an
        #: ORM bulk statement
        self.uow = None if uow is None else weakref.proxy(uow, partial(_flush_dropped, session.hash_key))
        #: child state -> {fk key: value in the database before the flush}, or _GONE
        #: (gone already, or a deleted row the pre-read counted)
        self.old: dict[InstanceState[Any], Any] = {}
        #: child infos with rows this flush updates that the pre-read has not
        #: seen yet: read right before the next UPDATE statement (preread._before_write)
        self.unread: set[_Child] = set()
        #: connection -> (listener, whether it had listeners before): see watch()
        self.watching: dict[Connection, tuple[Any, bool]] = {}
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
        self.ready_insert: set[Mapper[Any]] = set()
        #: parent table -> keys of its rows this flush inserts and has not inserted yet (see inserted_yet())
        self.uninserted: dict[ParentTable, set[tuple[Any, ...]]] = {}
        #: many-to-many counter -> (parent key, child key) links the database's cascade removes
        self.cascaded: dict[CounterCache, set[tuple[Any, Any]]] = {}
        #: new child state -> its counted values, counted before its INSERT (MariaDB: preread._count_early)
        self.early: dict[InstanceState[Any], dict[str, Any]] = {}
        #: child -> (its plan's pairs counted so, (the other pairs, per-row strategies))
        self.early_counters: dict[_Child, Any] = {}
        #: child -> its one plain count, for the row hooks' short way (see single())
        self.singles: dict[_Child, tuple[CounterCache, Any, str, Any] | None] = {}
        #: column -> (its collation rule, the connection to ask on), for where= (collation.py)
        self.collations: dict[Any, Any] = {}
        #: mapper -> the connection of its bind in this transaction (asked per row by per_row)
        self.connections: dict[Mapper[Any], Connection] = {}
        #: identity key -> state of the counted rows the flush deletes (row_switch.py; None: not asked yet)
        self.deleted: dict[Any, Any] | None = None
        #: parent table -> {old key: new key} of parents whose primary key this flush changed (parents.py)
        self.renamed: dict[ParentTable, dict[tuple[Any, ...], tuple[Any, ...]]] = {}
        #: id of a strategy's pending deltas made canonical -> their length then (parents.py)
        self.canonical: dict[int, int] = {}
        self.carried: list[Connection] = []  # connections with a read waiting for their next statement (locking.py)
        collation.activate(self)  # where= compares strings on this flush's connection

    def child(self, mapper: Mapper[Any]) -> _Child | None:
        found = self.children.get(mapper, _GONE)  # (not try/except: the first ask of every flush misses)
        if found is _GONE:
            found = self.children[mapper] = _child_for(mapper)
        return found

    def inserted_yet(self, parent: ParentTable, key: tuple[Any, ...]) -> bool:
        """Is the parent row ``key`` in the database at this point of the flush?
        False only for a row this flush inserts later (a child given its
        parent's key as a value, inserted first: no constraint enforced, or a
        deferred one)."""
        waiting = self.uninserted.get(parent)
        if waiting is None:
            waiting = self.uninserted[parent] = set()
            if self.uow is not None:
                flags = self.uow.states
                for mapper, states in self.uow.mappers.items():
                    if mapper.isa(parent.mapper):
                        for state in states:
                            if state.key is None and not flags[state][0]:
                                found = tuple(parent.mapper.primary_key_from_instance(state.obj()))
                                if None not in found:
                                    waiting.add(found)
        return key not in waiting

    def holds_any(self, parent: ParentTable, keys: Any) -> bool:
        """Is any of these parents in the session (so the UPDATE should return values)?

        Parents inserted by this flush are not in the identity map yet: a
        flush that saved any row of the parent's class counts as holding.
        """
        saved = self.saved.get(parent)
        if saved is None:
            saved = False
            if self.uow is not None:
                parent_mapper = parent.mapper
                for m, states in self.uow.mappers.items():
                    if states and m.isa(parent_mapper):
                        saved = True
                        break
            self.saved[parent] = saved
        if saved:
            return True
        identity_map = self.session.identity_map
        if not identity_map._dict:  # (its len() is a Python call: this runs on every flush)
            return False
        key_from_pk = parent.mapper.identity_key_from_primary_key
        return any(key_from_pk(tuple(k)) in identity_map for k in keys)

    def connection_for(self, parent: ParentTable) -> Connection:
        """The connection the flush (or the statement) runs on, for this parent's table."""
        return self.connection_for_mapper(parent.mapper)

    def connection_for_mapper(self, mapper: Mapper[Any]) -> Connection:
        """The connection of ``mapper``'s bind (a session with several binds
        writes each parent on its own, not on the child row's)."""
        found = self.connections.get(mapper)
        if found is not None:
            return found
        transaction = getattr(self.uow, "transaction", None)  # (not yet in before_flush)
        if transaction is not None:
            # (what transaction.connection(mapper) does, get_bind asked once:
            # a held connection read without the state checks around it)
            bind = self.session.get_bind(mapper)
            found = held_connection(transaction, bind)
            if found is None:
                found = transaction._connection_for_bind(bind, None)
        else:
            found = self.session.connection(bind_arguments={"mapper": mapper})
        self.connections[mapper] = found
        return found

    def held_for(self, counter: CounterCache, middle_key: tuple[Any, ...]) -> Any:
        """Multi-level leaf deltas not yet translated (this flush's, and those the
        transaction keeps for its commit), for one middle row."""
        return (sum(sink.pending.get(counter, {}).get(middle_key, 0) for sink in self.sinks.values())
                + transactions.held_leaves(self.session, counter, middle_key))

    def translate(self, connection_for: Any = None, *, middles: Mapper[Any] | None = None) -> None:
        """Multi-level leaf deltas, held per middle key, to their parents (see ``through.py``).

        A strategy that writes at commit keeps them, per middle key, for the
        commit (the middle rows are locked then, with the parent rows, in one
        order), unless ``middles`` (a middle class whose rows this flush is
        about to delete) needs them, and those kept so far, translated now.
        """
        connection_for = connection_for or self.connection_for_mapper
        for sink in self.sinks.values():
            if sink.pending:
                if middles is None and sink.strategy.keeps_leaves():
                    sink.canonical()
                    transactions.keep_leaves(self.session, sink.strategy.held, sink.pending)
                    sink.pending = {}
                else:
                    sink.translate(connection_for, self.will_write)
        if middles is not None:
            kept = transactions.take_leaves(
                self.session, lambda c: middles.isa(c.kind.middle_mapper) or c.kind.middle_mapper.isa(middles))
            for name, by_counter in kept.items():
                sink = through.Sink(self.strategy(name))
                sink.pending = by_counter
                sink.translate(connection_for, self.will_write)

    def will_write(self, parent: ParentTable, key: tuple[Any, ...]) -> bool:
        """Will this transaction write a counter of this parent row (so that a
        lock taken on it now must be the lock for writing)?"""
        for strategy in self.strategies.values():
            if strategy.writes_rows:
                vector = strategy.pending.get(parent, {}).get(key)
                if vector is not None and any(vector):
                    return True
        return transactions.will_write(self.session, parent, key)

    def write(self) -> None:
        """Let every strategy write what it holds for now (``after_flush``)."""
        _psycopg.run_carried(self.carried)  # (a read no statement took along: now)
        if self.watching:  # every statement of the flush has run: no read is due any more
            for connection in self.watching:
                _awaiting.pop(connection, None)
            release_watched(self)
        if self.sinks:  # (multi-level leaf deltas only: nothing to translate without)
            self.translate()
        many_to_many.collect(self)
        for strategy in self.strategies.values():
            strategy.flush_done()
        if transactions.holds_shards(self.session) and transactions.writes_now(self.session):
            # the commit's own final flush: shard rows now, after every parent
            # row (the order fold() locks them in), deleted parents' included
            # (so too at every flush where the session's commit is not what
            # commits its rows)
            transactions.write_shards(self.session)

    def show(self) -> None:
        """Show what was written on the parents in memory (``after_flush_postexec``),
        per parent table (``per_row`` has one result per row: the last value wins)."""
        merged: dict[ParentTable, Any] = {}
        for parent, results in self.results:
            merged.setdefault(parent, []).extend(results)
        for parent, results in merged.items():
            transactions.remember_refreshed(self.session, parent, [pk for pk, _ in results])  # (first: values before)
            memory.apply(self.session, parent, results)
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
        if child in self.singles:
            return self.singles[child]
        shape = child.single()  # (the child's layout says, resolved once: no plan() per flush)
        found = None
        if shape is not None:
            counter, name, fk, equal = shape
            strategy = self.strategy(name)
            if not strategy.per_row:
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

#: Connections with a flush whose pre-read is due before its next DML
#: statement (``preread._before_write``).
_awaiting: weakref.WeakKeyDictionary[Connection, FlushState] = weakref.WeakKeyDictionary()


def watch(fs: FlushState, connection: Connection, listener: Any) -> None:
    """``listener`` before the connection's next statements (``before_execute``), until ``release_watched(fs)``."""
    if connection not in fs.watching:
        fs.watching[connection] = (listener, has_own_events(connection))
        if not listen_on_connection(connection, "before_execute", listener):
            del fs.watching[connection]  # (on its engine for good: nothing to release)


def release_watched(fs: FlushState) -> None:
    """Remove the flush's listener from its connections whose pre-read is done.

    Outside the dispatch that runs the listener (removing it there breaks the
    dispatch's iteration), and as soon as possible: a listener on a
    connection makes SQLAlchemy dispatch events for each of its statements
    (``per_row`` runs one per row). Only this flush's own connections: others
    may be in the middle of a dispatch in another thread."""
    for connection in [c for c in fs.watching if c not in _awaiting]:
        listener, had_events = fs.watching.pop(connection)
        if event.contains(connection, "before_execute", listener):
            event.remove(connection, "before_execute", listener)
        if not had_events:
            drop_events_flag(connection)
# -- session hooks ------------------------------------------------------------


def _before_flush(session: Session, uow: UOWTransaction, instances: Any) -> None:
    if memory._merged.data:  # (the weak dictionary's own dict: its len() is a Python call)
        memory.undo_merged(session)
    if (_suspended.data and _suspended.get(session)) or not database_kept.orm_kept():  # (suspension.is_suspended)
        _flushes.pop(session.hash_key, None)
    else:
        through.refuse_middle_rekey(session)
        parent_keys.refuse_loose_rekey(session)
        fs = _flushes[session.hash_key] = FlushState(session, uow)
        many_to_many.read_cascaded(fs)


def _after_flush(session: Session, uow: UOWTransaction) -> None:
    fs = _flushes.get(session.hash_key)
    if fs is not None:
        fs.write()


def _after_flush_postexec(session: Session, uow: UOWTransaction) -> None:
    fs = _flushes.pop(session.hash_key, None)
    if fs is not None and fs.results:  # (no new values to show: a flush whose parents are not in memory)
        fs.show()


def _after_soft_rollback(session: Session, previous_transaction: Any) -> None:
    # A flush that failed never reached after_flush_postexec: forget it.
    fs = _flushes.pop(session.hash_key, None)
    if fs is not None:
        _forget_watched(fs)
    _locked.pop(session, None)


def _forget_watched(fs: FlushState) -> None:
    _psycopg.drop_carried(fs.carried)  # (the flush failed: its reads are not needed)
    if fs.watching:
        for connection in fs.watching:
            _awaiting.pop(connection, None)
        release_watched(fs)


def _flush_dropped(key: int, uow: Any) -> None:
    """SQLAlchemy dropped a flush's unit of work: a flush that ended with no
    ``after_flush_postexec`` nor rollback (nothing left to write after
    ``before_flush``, or a ``before_flush`` listener raised) is forgotten too,
    so that nothing keeps its session and objects (the one under way now may
    be a later flush of the same session: it stays)."""
    fs = _flushes.get(key)
    if fs is not None and fs.uow is uow:
        _flushes.pop(key, None)
        _forget_watched(fs)


def _after_transaction_end(session: Session, transaction: Any) -> None:
    if _locked.data and transaction.parent is None:  # (a plain dict's test: this runs twice per commit)
        _locked.pop(session, None)


def forget_locked(session: Session) -> None:
    """A statement may have changed rows behind the objects (ORM bulk UPDATE/DELETE)."""
    _locked.pop(session, None)


def _after_rollback(session: Session) -> None:
    _locked.pop(session, None)  # a savepoint's rollback releases the row locks taken inside it
