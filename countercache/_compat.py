"""Every use of SQLAlchemy's and Alembic's private API, in one place (private).

Checked against SQLAlchemy 2.1.9 (the version installed for the tests) and
2.0.29 (the floor in ``setup.cfg``), and Alembic 1.20.1, 1.19.0, 1.18.0 and
1.13.0 (the floor; the plugin registry exists from 1.18): ``python3
tests/run.py --matrix all`` runs them (README, "Tests"). When SQLAlchemy
changes one of these, this module is the one to mend; each entry says what
it is for.

Read directly where used, for speed (a per-row path must not pay a call), listed here:

* ``InstanceState.committed_state``: the loaded values of changed attributes
  (the row hooks in :mod:`countercache.tracking`, :mod:`countercache.preread`,
  :mod:`countercache.memory`); :data:`NO_VALUE` marks one never loaded.
* ``AttributeImpl.is_equal``: the attribute's own equality test, what its
  history compares with (:meth:`countercache.children._Child.equals`).
* ``UOWTransaction.states`` / ``.mappers`` / ``.cycles`` /
  ``.get_attribute_history()``: the flush's states with their
  ``(isdelete, listonly)`` flags, per mapper, whether it runs row by row, and
  the histories it acted on (:mod:`countercache.flush`,
  :mod:`countercache.preread`, :mod:`countercache.many_to_many`). A deleted
  object whose row a new object takes over (a row switch) keeps
  ``isdelete`` with ``listonly`` set (``UOWTransaction.remove_state_actions``):
  :func:`countercache.many_to_many.collect` reads that.
* ``SessionTransaction._connections`` and ``Connection._is_autocommit_isolation()``:
  whether the session's own commit is what makes its flushes durable
  (:func:`commits_elsewhere`).
* ``Connection._dbapi_connection``: the DBAPI connection under a
  connection without reconnecting it (:func:`dbapi_connection_of`); psycopg's
  own private API is in :mod:`countercache._psycopg`.
* ``InstanceState.runid`` and ``orm.loading._new_runid()``: the query that loaded an object
  last, and the number the next one gets (:func:`countercache.memory.take_back`).
* ``ClauseElement._traverse_internals`` on the side table's own construct
  (:mod:`countercache.sidetable`), with :data:`InternalTraversal`, so that
  SQLAlchemy's statement cache tells two of them apart.
"""

from __future__ import annotations

import sys
from types import FrameType, ModuleType
from typing import Any

from sqlalchemy import Boolean, event
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm.base import NEVER_SET as NEVER_SET
from sqlalchemy.orm.base import NO_VALUE as NO_VALUE
from sqlalchemy.orm.base import PASSIVE_NO_INITIALIZE as PASSIVE_NO_INITIALIZE
from sqlalchemy.orm.evaluator import _EvaluatorCompiler as EvaluatorCompiler
from sqlalchemy.sql import coercions, roles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal as InternalTraversal

__all__ = [
    "NEVER_SET", "NO_VALUE", "PASSIVE_NO_INITIALIZE", "EvaluatorCompiler", "InternalTraversal",
    "FOR_UPDATE_ARG", "calling_frame", "statement_values", "multi_values", "has_post_values_clause",
    "bind_processor", "driver_in_transaction", "alembic_plugins", "column_annotation", "property_of_column",
    "expect_expression", "dispatcher_registry", "autoflush", "OnlyInSQL", "has_own_events",
    "drop_events_flag", "enum_db_value", "statement_prefixes", "single_table_criterion",
    "upsert_set_keys", "insert_select_names", "legacy_bulk_call", "make_plugin_entry_point",
    "dbapi_connection_of", "held_connection", "raise_dbapi_error", "replace_transaction",
]

#: ``Query._for_update_arg`` / ``Select._for_update_arg``: the ``with_for_update()``
#: of the query that loaded a row (``read``, ``key_share``, ``of``), read by the
#: ``load`` hook (:func:`countercache.preread._locks_rows`).
FOR_UPDATE_ARG = "_for_update_arg"


def calling_frame(name: str, depth: int, limit: int, module: str | None = None) -> FrameType | None:
    """The first of ``limit`` frames, from ``depth`` levels above the caller
    up, running a function called ``name`` (of a module whose name starts with
    ``module``, if given); None when there is none.

    SQLAlchemy's events do not say what fired them in three cases: whether a
    ``before_commit`` is the outermost commit (``SessionTransaction._prepare_impl``,
    :mod:`countercache.transactions`), whether an attribute ``set`` comes
    from ``Session.merge()`` (:mod:`countercache.memory`), and whether a
    subtransaction is a legacy bulk method's (:func:`legacy_bulk_call`).
    """
    frame: FrameType | None = sys._getframe(depth + 1)
    for _ in range(limit):
        if frame is None:
            return None
        if frame.f_code.co_name == name and (
                module is None or frame.f_globals.get("__name__", "").startswith(module)):
            return frame
        frame = frame.f_back
    return None


def legacy_bulk_call(depth: int) -> dict[str, Any] | None:
    """In ``after_transaction_create`` (``depth`` frames above the caller: the
    event's dispatch): the arguments of the legacy bulk method whose
    subtransaction this is, else None.

    ``Session.bulk_insert_mappings()`` / ``bulk_update_mappings()`` /
    ``bulk_save_objects()`` call ``Session._bulk_save_mappings(mapper,
    mappings, *, isupdate, isstates, ...)`` (once per group of objects of one
    class for ``bulk_save_objects``), which opens a subtransaction before its
    first statement: the only event they fire. Returned: that frame's
    arguments, plus ``method`` (the public method's name) and, for
    ``bulk_save_objects``, its ``objects`` and ``obj_states`` (the states it
    groups; a generator unless ``preserve_order=False``).
    """
    frame = calling_frame("_bulk_save_mappings", depth + 1, 8, "sqlalchemy.orm")
    if frame is None:
        return None
    call = dict(frame.f_locals)
    caller = frame.f_back
    call["method"] = caller.f_code.co_name if caller is not None else "_bulk_save_mappings"
    if call["method"] == "bulk_save_objects":
        call["objects"] = caller.f_locals.get("objects")  # type: ignore[union-attr]
        call["obj_states"] = caller.f_locals.get("obj_states")  # type: ignore[union-attr]
    return call


def column_annotation(clause: Any, name: str) -> Any:
    """An annotation of an ORM-annotated column (``parentmapper``: the mapper it came from)."""
    return clause._annotations.get(name)


def property_of_column(mapper: Any, column: Any) -> Any:
    """The mapper's property of an (annotated) column (``_columntoproperty``)."""
    return mapper._columntoproperty[column]


def expect_expression(value: Any) -> Any:
    """Coerce ``value`` to a SQL expression as SQLAlchemy's own constructs do
    (``sqlalchemy.sql.coercions.expect(roles.ExpressionElementRole, ...)``)."""
    return coercions.expect(roles.ExpressionElementRole, value)


def dispatcher_registry(dispatcher: Any) -> Any:
    """Alembic ``Dispatcher._registry``: what ``dispatch_for`` registered (to remove it again)."""
    return dispatcher._registry


def statement_values(statement: Any) -> dict[Any, Any]:
    """``insert().values()`` / ``update().values()`` (``_values``, and
    ``_ordered_values`` of ``ordered_values()`` on SQLAlchemy 2.0)."""
    values = dict(getattr(statement, "_values", None) or {})
    values.update(dict(getattr(statement, "_ordered_values", None) or ()))
    return values


def multi_values(statement: Any) -> Any:
    """The row lists of ``insert().values([...])`` (``_multi_values``)."""
    return getattr(statement, "_multi_values", None) or ()


def has_post_values_clause(statement: Any) -> bool:
    """Is the INSERT an upsert (``on_conflict_do_*`` / ``on_duplicate_key_update``)?"""
    return getattr(statement, "_post_values_clause", None) is not None


def upsert_set_keys(statement: Any) -> list[Any]:
    """The keys an upsert's ``SET`` gives values for (``on_conflict_do_update(set_=...)``:
    ``update_values_to_set``; ``on_duplicate_key_update()``: ``update``; a dict or pairs)."""
    clause = getattr(statement, "_post_values_clause", None)
    sets = getattr(clause, "update_values_to_set", None) or getattr(clause, "update", None) or ()
    if isinstance(sets, dict):
        return list(sets)
    return [pair[0] for pair in sets]


def insert_select_names(statement: Any) -> list[Any]:
    """The columns ``insert().from_select(names, ...)`` fills (``_select_names``)."""
    return list(getattr(statement, "_select_names", None) or ())


def bind_processor(type_: Any, dialect: Any) -> Any:
    """The type's bind processor for ``dialect``, cached by SQLAlchemy (``_cached_bind_processor``)."""
    return type_._cached_bind_processor(dialect)


def driver_in_transaction(dbapi_connection: Any) -> Any:
    """``in_transaction`` of a sqlite3 connection or, through SQLAlchemy's
    aiosqlite adapter (its ``_connection``), of the aiosqlite one; True when
    neither says."""
    in_transaction = getattr(dbapi_connection, "in_transaction", None)
    if in_transaction is None:  # SQLAlchemy's aiosqlite adapter: ask the aiosqlite connection
        in_transaction = getattr(getattr(dbapi_connection, "_connection", None), "in_transaction", True)
    return in_transaction


def alembic_plugins() -> tuple[Any, Any] | None:
    """Alembic's ``(Plugin, registered plugins by name)`` (1.18+: ``_all_plugins``), else None."""
    try:
        from alembic.runtime.plugins import Plugin, _all_plugins  # optional dependency
    except ImportError:  # pragma: no cover - Alembic < 1.18
        return None
    return Plugin, _all_plugins


class _PluginModule(ModuleType):
    """A module that is also an iterable of itself (see :func:`make_plugin_entry_point`)."""

    def __iter__(self) -> Any:
        return iter((self,))


def make_plugin_entry_point(module_name: str) -> None:
    """Make the module ``module_name`` (an ``alembic.plugins`` entry point)
    loadable by every Alembic that loads plugins.

    Alembic's plugin loader (``alembic.runtime.plugins._setup``, run when
    ``alembic`` is imported) calls ``setup(Plugin(name))`` of what the entry
    point loads: 1.20.1+ takes a module (a collection of modules is still
    accepted, with a deprecation warning), 1.18.0 to 1.20.0 iterate over it
    (``for mod in entrypoint.load()``: a plain module raises ``TypeError:
    'module' object is not iterable`` and every alembic command fails);
    before 1.18 the group is not read. The module's class becomes a
    ``ModuleType`` subclass whose iteration yields the module itself, which
    both loaders take as one plugin module. Checked against 1.18.0, 1.18.5,
    1.19.0, 1.19.2, 1.20.0 and 1.20.1.
    """
    sys.modules[module_name].__class__ = _PluginModule


def autoflush(session: Any) -> None:
    """``Session._autoflush()``: flush now if the session autoflushes (what an
    ORM statement does when it runs: ``BulkUDCompileState.orm_pre_session_exec``)."""
    session._autoflush()


class OnlyInSQL(ColumnElement[bool]):
    """A criterion the database applies and SQLAlchemy's in-Python evaluator
    (``synchronize_session="evaluate"``) takes as true: the evaluator
    (``_EvaluatorCompiler.process``) dispatches on ``__visit_name__``, the SQL
    compiler on the ``@compiles`` hook below. ``self_group`` returns itself:
    ``where()`` would wrap a Boolean element as ``IS true``, which the
    evaluator cannot read."""

    __visit_name__ = "true"
    inherit_cache = True
    _traverse_internals = [("clause", InternalTraversal.dp_clauseelement)]
    type = Boolean()

    def __init__(self, clause: Any) -> None:
        self.clause = clause

    def self_group(self, against: Any = None) -> Any:
        return self


@compiles(OnlyInSQL)
def _render_only_in_sql(element: OnlyInSQL, compiler: Any, **kw: Any) -> str:
    return compiler.process(element.clause, **kw)


#: The connection events (``ConnectionEvents``) a listener can be registered for.
_CONNECTION_EVENTS = ("before_execute", "after_execute", "before_cursor_execute", "after_cursor_execute",
                      "begin", "commit", "rollback", "savepoint", "rollback_savepoint", "release_savepoint",
                      "begin_twophase", "prepare_twophase", "commit_twophase", "rollback_twophase",
                      "set_connection_execution_options", "engine_connect", "engine_disposed",
                      "set_engine_execution_options")


def has_own_events(connection: Any) -> bool:
    """``Connection._has_events``: does SQLAlchemy dispatch events for this
    connection's statements (set once a listener is added to it)?"""
    return bool(connection._has_events)


def drop_events_flag(connection: Any) -> None:
    """After its last listener is removed, let the connection's statements
    skip event dispatch again (``_has_events`` stays set otherwise), unless
    some listener is still there."""
    dispatch = connection.dispatch
    # (the connection's own listeners: its dispatch is joined with its
    # engine's, whose listeners SQLAlchemy finds through the engine's own flag)
    if not any(getattr(getattr(dispatch, name, None), "local", getattr(dispatch, name, None))
               for name in _CONNECTION_EVENTS):
        connection._has_events = False


def enum_db_value(type_: Any, value: Any) -> Any:
    """What an ``Enum`` column stores for ``value`` (a member, or one of the
    strings it accepts): ``Enum._db_value_for_elem``; None stays None, and a
    value it does not know stays as it is (the database compares it as given)."""
    if value is None:
        return None
    try:
        return type_._db_value_for_elem(value)
    except LookupError:
        return value


def statement_prefixes(statement: Any, dialect_name: str) -> list[str]:
    """The text of the ``prefix_with()`` prefixes the dialect ``dialect_name``
    renders (``_prefixes``: (clause, dialect) pairs; the compiler's
    ``_generate_prefixes`` keeps a prefix for no dialect, ``"*"``, or its own name)."""
    return [str(prefix) for prefix, dialect in getattr(statement, "_prefixes", None) or ()
            if dialect in (None, "*") or dialect == dialect_name]


def single_table_criterion(mapper: Any) -> Any:
    """The discriminator condition that picks a single-table-inheritance
    subclass's rows from its table (``Mapper._single_table_criterion``; None
    for any other mapper)."""
    return getattr(mapper, "_single_table_criterion", None)


def commits_elsewhere(session: Any) -> bool:
    """Is what ``session`` flushes made durable by something other than its own
    commit? A ``Connection`` given to the session (``Session(bind=connection)``,
    ``binds={...: connection}``) is committed or rolled back by its owner,
    whenever it likes; a connection in ``AUTOCOMMIT`` commits each statement
    by itself. ``SessionTransaction._connections`` holds ``(connection,
    transaction, should_commit, autoclose)`` per connection, ``autoclose``
    False for a connection the session was given; ``Connection.
    _is_autocommit_isolation()`` reads the isolation level without a query.
    """
    transaction = session.get_transaction()
    if transaction is None:
        return False
    for conn, _, _, autoclose in transaction._connections.values():
        if not autoclose or conn._is_autocommit_isolation():
            return True
    return False



def dbapi_connection_of(connection: Any) -> Any:
    """The DBAPI connection under a ``Connection`` (``Connection._dbapi_connection``,
    the pool's proxy), or None: without ``Connection.connection``, which
    reconnects an invalidated connection (not wanted in ``handle_error``)."""
    fairy = getattr(connection, "_dbapi_connection", None) if connection is not None else None
    return getattr(fairy, "dbapi_connection", None) if fairy is not None else None


def held_connection(transaction: Any, bind: Any) -> Any:
    """The connection ``transaction.connection(mapper)`` returns for ``bind``
    (``session.get_bind(mapper)``) where the transaction holds one already,
    read from ``SessionTransaction._connections`` without the state checks
    around it (a flush's transaction is active): a flush's subtransaction
    asks its parent, up to the savepoint or root that keeps it. None where
    none does (the transaction then provisions it)."""
    while True:
        held = transaction._connections.get(bind)
        if held is not None:
            return held[0]
        if transaction.nested or transaction._parent is None:
            return None
        transaction = transaction._parent


def raise_dbapi_error(connection: Any, error: BaseException, statement: str, params: Any) -> Any:
    """Raise a driver's error met outside an execute (a pipeline's closing
    sync) as an execute would: ``Connection._handle_dbapi_exception`` wraps
    it in SQLAlchemy's ``DBAPIError`` subclass, tells ``handle_error``
    listeners, and invalidates the connection on a disconnect."""
    connection._handle_dbapi_exception(error, statement, params, None, None)


def replace_transaction(transaction: Any, connection: Any, make: Any) -> None:
    """In ``SessionTransaction._connections`` (one entry ``(connection,
    transaction, should_commit, autoclose)``, under the connection and under
    its engine), put ``make(connection's transaction)`` in the transaction's
    place: the session's commit then calls its ``commit()``."""
    connections = transaction._connections
    for key, entry in list(connections.items()):
        if entry[0] is connection:
            connections[key] = replaced = (entry[0], make(entry[1]), *entry[2:])
            for other, same in list(connections.items()):
                if same is entry:
                    connections[other] = replaced
            return


#: base engines given a listener by :func:`listen_on_connection`: (engine, name, fn)
_engine_listeners: list[tuple[Any, str, Any]] = []


def listen_on_connection(connection: Any, name: str, fn: Any) -> bool:
    """``event.listen(connection, name, fn)``; True if listened there. Older SQLAlchemy 2.0
    refuses it on a connection of an ``engine.execution_options()`` engine ("No such
    event"): ``fn`` is then listened to on the base engine, for good (it must pass
    over the other connections' statements), and False is returned."""
    try:
        event.listen(connection, name, fn)
        return True
    except InvalidRequestError:
        engine = connection.engine
        while hasattr(engine, "_proxied"):
            engine = engine._proxied
        if not event.contains(engine, name, fn):
            event.listen(engine, name, fn)
            _engine_listeners.append((engine, name, fn))
        return False


def forget_engine_listeners() -> None:
    """Remove what :func:`listen_on_connection` listened to on base engines (``uninstall()``)."""
    while _engine_listeners:
        engine, name, fn = _engine_listeners.pop()
        if event.contains(engine, name, fn):
            event.remove(engine, name, fn)
