"""Installation: every listener countercache registers, and their removal.

The one place that attaches the library to SQLAlchemy:

* ``Mapper`` class hooks (``after_mapper_constructed``, ``mapper_configured``,
  ``after_configured``): counters are bound to their class, resolved, and
  started (:func:`_start`: parent table, assignment guard, row listeners);
* ``Session`` hooks: the flush (:mod:`countercache.flush`), transactions and
  savepoints (:mod:`countercache.transactions`), ORM bulk statements
  (``do_orm_execute``, :mod:`countercache.bulk_dml`), the legacy bulk
  methods (``after_transaction_create``, :mod:`countercache.legacy_bulk`),
  SQLite tables that skip or replace rows (``before_flush``, first:
  :mod:`countercache.skipping`);
* per child mapper, the row hooks (:mod:`countercache.tracking`,
  :mod:`countercache.preread`), attached to the highest mapper of a
  hierarchy that needs them; per parent mapper, the parent-deleted hook.

Every registration is idempotent (``event.contains`` first) and
:func:`uninstall` removes all of them. :func:`counter_cache` installs on
first use.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy import Integer, event
from sqlalchemy.orm import Mapper, MappedColumn, Session, mapped_column

from . import (_compat, _registry, commit, config, database_kept, legacy_bulk, many_to_many, memory, preread, skipping,
               transactions, trigger_events)
from .bulk_dml import _do_orm_execute
from .children import _child_cache, _children, add_counter
from .declaration import CounterCache, MiddleView
from .errors import ConfigurationError
from .kinds import ManyToMany, MultiLevel
from .values import check_counter_column
from .flush import (_after_flush, _after_flush_postexec, _after_rollback, _after_soft_rollback,
                    _after_transaction_end, _before_flush, _locked)
from .parents import parent_deleted, parent_inserted, parent_inserting, parent_updated
from .preread import _before_delete, _before_insert, _before_write, _loaded, _refreshed
from .shard_writes import forget_pools
from .sidetable import check_shardable, check_shards, shard_table
from .strategies import STRATEGY_CLASSES
from .tracking import _after_delete, _after_insert, _after_update
from .writer import ParentTable

__all__ = ["counter_cache", "uninstall"]


def counter_cache(
    relationship: str,
    *,
    strategy: str | None = None,
    where: Any = None,
    sum: Any = None,  # noqa: A002 - the contract's name
    shards: int | None = None,
    **column_kwargs: Any,
) -> MappedColumn[Any]:
    """Declare a counter of the children on ``relationship``.

    :param relationship: the name of a one-to-many relationship on the same
        class; the child class may be declared later in the module.
    :param strategy: ``"bulk"`` (one aggregated UPDATE per flush, the
        default), ``"per_row"`` (an UPDATE per changed child row) or
        ``"deferred"`` (one UPDATE per transaction, right before COMMIT) or
        ``"sharded"`` (at commit, an upsert into one of ``shards`` rows of
        the side table ``countercache_shards``, folded into the column by
        :func:`countercache.fold`: for hot parents).
        The configuration may override it (:func:`countercache.configure`).
    :param shards: the number of shard rows per parent of a ``sharded``
        counter (default 16, or the configuration's ``default_shards``).
    :param where: a SQL boolean expression over the child's columns, or a
        zero-argument callable returning one (late binding): only children
        matching it count, e.g. ``where=lambda: Question.status == "open"``.
    :param sum: a child column name, or an expression (or callable) over the
        child's columns: the counter holds ``SUM(...)`` instead of
        ``COUNT(*)`` (NULL adds 0). Give ``type_=Numeric(...)`` for decimals.
    :param column_kwargs: passed to :func:`~sqlalchemy.orm.mapped_column`
        (``name=``, ``type_=BigInteger``, ``index=True``, ``comment=``...).
        ``type_`` must be a number type and the column is never NULL: another
        type, or ``nullable=True``, raises :class:`~countercache.ConfigurationError` here.

    Returns the column: Integer, ``nullable=False``, ``default=0``,
    ``server_default="0"``. The column is the library's: assigning to it
    raises :class:`~countercache.CounterCacheError`.
    """
    if not isinstance(relationship, str) or not relationship:
        raise ConfigurationError(
            f"counter_cache({relationship!r}): the relationship must be given by name, as a string"
        )
    if shards is not None:
        check_shards(shards, f"counter_cache({relationship!r})")
    definition = CounterCache(relationship, strategy, where, sum, shards)
    info = dict(column_kwargs.pop("info", None) or {})
    info["countercache"] = definition
    column_kwargs.setdefault("nullable", False)
    column_kwargs.setdefault("default", 0)
    column_kwargs.setdefault("server_default", "0")
    type_ = column_kwargs.pop("type_", Integer)
    check_counter_column(relationship, type_, column_kwargs)
    _install()
    return mapped_column(type_, info=info, **column_kwargs)


# -- mapper-level hooks (global, installed once, removable) -----------------


def _after_mapper_constructed(mapper: Mapper[Any], class_: type) -> None:
    _registry._declared_classes.add(class_.__name__)
    _bind_counters(mapper, class_)


def _bind_counters(mapper: Mapper[Any], class_: type) -> None:
    """The mapper's counter columns become its counters (also one assigned to
    the class after its body, ``User.n = counter_cache(...)``, which
    SQLAlchemy maps when the mappers are configured)."""
    found = False
    for column in mapper.columns:
        definition = column.info.get("countercache")
        if not isinstance(definition, CounterCache):
            continue
        if definition.cls is not None and (definition.column is not column or not _registry.live(definition)):
            # a copy of the column for another class (a mixin's or an
            # __abstract__ base's column, copied into each mapped class), or
            # a table mapped again after clear_mappers(): the counter is that
            # class's own
            definition = column.info["countercache"] = definition.copy()
        if definition.cls is None:
            definition._bind(mapper, column)
            trigger_events.watch(column.table.metadata)
            database_kept.forget()  # (not resolved yet: the ORM's until it is)
            if definition.declared_strategy is not None \
                    and STRATEGY_CLASSES[definition.declared_strategy].uses_shard_table:
                shard_table(column.table.metadata)
            found = True
    if found or class_.__name__ in {k.split(".")[0] for k in config._config.overrides}:
        config.check_overrides_for(class_.__name__)


def _mapper_configured(mapper: Mapper[Any], class_: type) -> None:
    _refuse_unmapped_fields(class_)
    _bind_counters(mapper, class_)
    for column in mapper.columns:
        definition = column.info.get("countercache")
        if isinstance(definition, CounterCache) and definition.mapper is mapper and definition.parent is None:
            if "." in definition.relationship:
                continue  # multi-level: the middle class's relationships may not be ready yet
            _resolve_and_start(definition, mapper)


def _resolve_and_start(counter: CounterCache, mapper: Mapper[Any]) -> None:
    try:
        counter._resolve(mapper)
        _start(counter)
    except Exception as error:
        _registry.fail(counter, error)
        raise


def _refuse_unmapped_fields(class_: type) -> None:
    """A pydantic model (SQLModel) given ``counter_cache(...)`` as a field's
    default or ``sa_column``: SQLModel maps a column of its own (or none) and the
    counter is never maintained; refused, pointing to the way that works."""
    for name, field in (getattr(class_, "model_fields", None) or {}).items():
        for value in (getattr(field, "sa_column", None), getattr(field, "default", None)):
            if isinstance(value, MappedColumn) and isinstance(value.column.info.get("countercache"), CounterCache):
                raise ConfigurationError(
                    f"{class_.__name__}.{name}: counter_cache({value.column.info['countercache'].relationship!r}) "
                    "as a SQLModel field is not mapped by SQLModel; declare it with "
                    f"countercache.sqlmodel.counter_field({value.column.info['countercache'].relationship!r})")


def _after_configured() -> None:
    """Every mapper is configured: resolve the multi-level counters, then check
    what needs every relationship configured."""
    for counter in _registry.all_counters():
        if counter.parent is None and counter.mapper is not None and "." in counter.relationship \
                and counter.mapper.configured:
            _resolve_and_start(counter, counter.mapper)
    for counter in _registry.all_counters():
        if counter.kind is not None and not counter.__dict__.get("_checked"):
            counter.check_post_update()
            counter.check_association_class()
            counter._checked = True
    config.warn_unknown_overrides()


_HOOKS = (
    (Mapper, "after_mapper_constructed", _after_mapper_constructed),
    (Mapper, "mapper_configured", _mapper_configured),
    (Mapper, "after_configured", _after_configured),
)


def _start(counter: CounterCache) -> None:
    """A counter just resolved: check it can run, give it its parent table, and start it."""
    if STRATEGY_CLASSES[counter.strategy()].uses_shard_table:
        check_shardable(counter, counter.name, need_table=True, strategy=counter.strategy())
    assert counter.mapper is not None and counter.column is not None
    counter.parent = ParentTable.for_column(counter.mapper, counter.column)
    counter.parent.add(counter)
    database_kept.forget()
    _track(counter)


def _track(counter: CounterCache) -> None:
    """The listeners that maintain a resolved counter (again, after :func:`uninstall`)."""
    memory.guard_assignment(counter)
    if isinstance(counter.kind, ManyToMany):
        many_to_many.track(counter)
        _install_session_hooks()
    else:
        track_child(counter.child_mapper, counter)  # type: ignore[arg-type]
    track_parent(counter.mapper)  # type: ignore[arg-type]


_uninstalled = False


def _install() -> None:
    global _uninstalled
    for target, name, fn in _HOOKS:
        if not event.contains(target, name, fn):
            event.listen(target, name, fn)
    _install_session_hooks()
    if _uninstalled:
        # back after uninstall(): the counters declared before it resume too
        _uninstalled = False
        for counter in _registry.all_counters():
            if counter.column is not None:
                trigger_events.watch(counter.column.table.metadata)
            if counter.parent is None:
                continue
            _track(counter)


def uninstall() -> None:
    """Remove every listener countercache registered.

    Counters stop being maintained (in every session) until the next
    :func:`counter_cache` declaration (or :func:`countercache.configure` with
    overrides) installs them again, every counter declared so far included.
    Meant for tests and for applications that hand maintenance to something
    else; ``reconcile()`` repairs what happened meanwhile.

    With :func:`sqlalchemy.orm.clear_mappers` (before or after this, or
    alone), the counters of the unmapped classes are forgotten; models
    declared afterwards (a table mapped again included) get their own.
    """
    global _uninstalled
    for target, name, fn in _HOOKS:
        if event.contains(target, name, fn):
            event.remove(target, name, fn)
    _uninstall_session_hooks()
    memory.uninstall()
    trigger_events.uninstall()
    _uninstalled = True


# -- session hooks (global) ----------------------------------------------------


_SESSION_HOOKS = (
    ("before_flush", _registry.refuse_failed),
    ("before_flush", _before_flush),
    ("before_flush", preread._before_flush),  # (after the one above: the flush's state exists)
    ("after_flush", _after_flush),
    ("after_flush", database_kept.after_flush),
    ("after_flush_postexec", _after_flush_postexec),
    ("after_flush_postexec", database_kept.after_flush_postexec),
    ("after_soft_rollback", _after_soft_rollback),
    ("after_transaction_end", _after_transaction_end),
    ("after_rollback", _after_rollback),
)


def _install_session_hooks() -> None:
    for name, fn in (skipping.SESSION_HOOKS + _SESSION_HOOKS + transactions.SESSION_HOOKS + commit.SESSION_HOOKS
                     + legacy_bulk.SESSION_HOOKS + memory.SESSION_HOOKS):
        if not event.contains(Session, name, fn):
            event.listen(Session, name, fn)
    if not event.contains(Session, "do_orm_execute", _do_orm_execute):
        event.listen(Session, "do_orm_execute", _do_orm_execute)


def _uninstall_session_hooks() -> None:
    """Every session and row hook, and what the flush remembers of counted classes."""
    for name, fn in (skipping.SESSION_HOOKS + _SESSION_HOOKS + transactions.SESSION_HOOKS + commit.SESSION_HOOKS
                     + legacy_bulk.SESSION_HOOKS + memory.SESSION_HOOKS):
        if event.contains(Session, name, fn):
            event.remove(Session, name, fn)
    if event.contains(Session, "do_orm_execute", _do_orm_execute):
        event.remove(Session, "do_orm_execute", _do_orm_execute)
    for mapper in list(_hooked):
        _unhook(mapper)
    forget_pools()
    for mapper in list(_parents_hooked):
        for name, fn in _PARENT_HOOKS:
            if event.contains(mapper, name, fn):
                event.remove(mapper, name, fn)
    _parents_hooked.clear()
    preread.forget_watched()
    _compat.forget_engine_listeners()
    _children.clear()
    _child_cache.clear()
    _locked.clear()
    many_to_many.clear()


# -- row hooks (per counted mapper) ---------------------------------------------


#: Mapper events (not instance events) take ``retval=True``: SQLAlchemy then
#: calls the hook itself instead of a wrapper that only returns EXT_CONTINUE
#: (the dispatch ignores what a listener returns). These run per row.
_UNWRAPPED = {name: {"retval": True} for name in
              ("before_insert", "after_insert", "before_update", "before_delete", "after_update", "after_delete")}

_MAPPER_HOOKS = (
    ("load", _loaded),
    ("refresh", _refreshed),
    ("before_insert", _before_insert),
    ("after_insert", _after_insert),
    ("before_update", _before_write),
    ("before_delete", _before_delete),
    ("after_update", _after_update),
    ("after_delete", _after_delete),
)


def track_child(child_mapper: Mapper[Any], counter: Any) -> None:
    """Start feeding ``counter`` from ``child_mapper``'s rows (and, for a
    multi-level counter, from its middle rows)."""
    add_counter(child_mapper, counter)
    _hook(child_mapper)
    memory.guard_discriminator(child_mapper)
    if isinstance(getattr(counter, "kind", None), MultiLevel):  # (a MiddleView has no kind)
        view = counter.__dict__.get("_middle_view")
        if view is None:
            view = counter._middle_view = MiddleView(counter)
        track_child(counter.kind.middle_mapper, view)


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


def _unhook(mapper: Mapper[Any]) -> None:
    for name, fn in _MAPPER_HOOKS:
        if event.contains(mapper, name, fn):
            event.remove(mapper, name, fn)
    _hooked.discard(mapper)


#: Parent mappers carrying the parent-deleted hook (propagated to subclasses).
_parents_hooked: weakref.WeakSet[Mapper[Any]] = weakref.WeakSet()


#: A counter's parent mappers: a new row starts at 0 (parent_inserting), a
#: deleted one takes its shard rows along (parent_deleted).
_PARENT_HOOKS = (("before_insert", parent_inserting), ("after_insert", parent_inserted), ("after_delete", parent_deleted),
                 ("after_update", parent_updated))


def track_parent(mapper: Mapper[Any]) -> None:
    """Watch inserts and deletes of a counter's parents."""
    if any(m in _parents_hooked for m in mapper.iterate_to_root()):
        return
    for sub in list(mapper.self_and_descendants):
        if sub in _parents_hooked:
            for name, fn in _PARENT_HOOKS:
                if event.contains(sub, name, fn):
                    event.remove(sub, name, fn)
            _parents_hooked.discard(sub)
    for name, fn in _PARENT_HOOKS:
        event.listen(mapper, name, fn, raw=True, propagate=True, retval=True)
    _parents_hooked.add(mapper)
