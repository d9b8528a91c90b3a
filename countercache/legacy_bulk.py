"""The legacy bulk methods of the Session, refused where they would drift (private).

``Session.bulk_insert_mappings()``, ``bulk_update_mappings()`` and
``bulk_save_objects()`` write rows without any event a counter could be kept
by: no flush, no mapper ``after_insert`` / ``after_update``, no
``do_orm_execute``. The one thing that runs before their first statement is
the session's ``after_transaction_create``, for the subtransaction each call
(each group of objects of one class, for ``bulk_save_objects``) opens; its
arguments are read there (:func:`countercache._compat.legacy_bulk_call`), and
what cannot be counted is refused before anything is written, with a
:class:`~countercache.CounterCacheError` naming the counters and the ORM
statement that does the same and is counted:

* rows of a counted child class inserted (``bulk_insert_mappings``,
  ``bulk_save_objects`` of new objects): ``session.execute(insert(Child), [...])``;
* an update that sets a value a counter reads (a foreign key, a ``where=`` /
  ``sum=`` column, a discriminator): ``session.execute(update(Child), [...])``.
  ``bulk_save_objects(update_changed_only=False)`` writes every loaded value,
  so any loaded counted value is such an update;
* a value for a counter column (:mod:`countercache.counter_writes`), also
  inside :func:`countercache.suspended` (the first two are let through there,
  not counted, for :func:`countercache.reconcile` to repair).

Rows given as a one-pass iterator cannot be read without consuming them: for
a counted class they are refused (pass a list). Mappings and objects of
classes no counter involves cost one frame lookup per call.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm.attributes import instance_state

from . import database_kept, parents
from ._compat import legacy_bulk_call
from .children import _child_for, _family
from .declaration import MiddleView
from .counter_writes import counters_in, refuse, written
from .errors import CounterCacheError
from .flush import _flushes
from .suspension import is_suspended

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper, Session, SessionTransaction

__all__ = ["SESSION_HOOKS"]

#: ``bulk_save_objects`` calls whose objects were all checked (their state generators)
_checked: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_transaction_create(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None or transaction.nested or session.hash_key in _flushes:
        return  # (a flush's subtransaction comes after its before_flush)
    call = legacy_bulk_call(1)
    if call is None:
        return
    try:
        _check(session, call)
    except CounterCacheError:
        transaction.close()  # the call's own subtransaction: the session is as before the call
        raise
    # (rows the database counts: the loaded parents read their counters again after the call)
    database_kept.expire(session, database_kept.fed_by([call["mapper"]]))


def _check(session: Session, call: dict[str, Any]) -> None:
    method = f"Session.{call['method']}()"
    suspended = is_suspended(session)
    groups: dict[tuple[Mapper[Any], bool], set[str]] = {}
    if call["method"] == "bulk_save_objects":
        objects = call["objects"]
        if not isinstance(objects, (list, tuple)):
            return _unread(call["mapper"], call["isupdate"], method, suspended)
        marker = call["obj_states"]
        try:
            if marker in _checked:
                return  # a later group of a call checked whole at its first
            _checked.add(marker)
        except TypeError:  # a list (preserve_order=False): a few groups, each checks again
            pass
        changed_only = call["update_changed_only"]
        if not changed_only:
            method = "Session.bulk_save_objects(update_changed_only=False) (it writes every loaded value)"
        for obj in objects:
            state = instance_state(obj)
            isupdate = state.key is not None
            keys = state.committed_state if isupdate and changed_only else state.dict
            groups.setdefault((state.mapper, isupdate), set()).update(keys)
    else:
        mappings = call["mappings"]
        if not isinstance(mappings, (list, tuple)):
            return _unread(call["mapper"], call["isupdate"], method, suspended)
        groups[(call["mapper"], call["isupdate"])] = set().union(*mappings)
    for (mapper, isupdate), keys in groups.items():
        refuse(written(mapper, keys), method)
        if not suspended:
            _check_rows(mapper, isupdate, keys, method)
    return None


def _counted(mapper: Mapper[Any]) -> tuple[list[Any], set[str]]:
    """The counters ``mapper``'s rows feed (its own, and those of subclasses
    its rows may become), and the attribute keys whose values they read."""
    counters: list[Any] = []
    keys: set[str] = set()
    for m in [mapper, *_family(mapper)]:
        child = _child_for(m)
        if child is not None:
            counters.extend(c for c in child.counters if c not in counters)
            keys.update(child.keys)
            if m is not mapper and mapper.polymorphic_on is not None:
                keys.add(mapper.get_property_by_column(mapper.polymorphic_on).key)
    return counters, keys


def _names(counters: list[Any]) -> str:
    return ", ".join(sorted({c.name for c in counters}))


def _check_rows(mapper: Mapper[Any], isupdate: bool, keys: set[str], method: str) -> None:
    counters, counted = _counted(mapper)
    name = mapper.class_.__name__
    direct = [c for c in counters if not isinstance(c, MiddleView)]  # (a middle row inserted holds no leaves yet)
    if not isupdate and direct:
        raise CounterCacheError(
            f"{_names(direct)}: {method} inserts {name} rows, which countercache cannot count (the legacy "
            f"bulk methods run no ORM event); run session.execute(insert({name}), [...]) instead (it is "
            "counted), or run it inside countercache.suspended(session) and repair with countercache.reconcile()"
        )
    starting = [c for _, found in parents.waiting(mapper) for c in found] if not isupdate else []
    if starting:
        raise CounterCacheError(
            f"{_names(starting)}: {method} inserts {name} rows, whose counters start from the rows already "
            "under their keys (no foreign key holds those rows), which the legacy bulk methods cannot count "
            f"(they run no ORM event); run session.execute(insert({name}), [...]) instead (it is counted), "
            "or run it inside countercache.suspended(session) and repair with countercache.reconcile()"
        )
    setting = sorted(keys & counted)
    if isupdate and setting:
        raise CounterCacheError(
            f"{_names(counters)}: {method} sets {name}.{setting[0]}, which countercache cannot count (the "
            f"legacy bulk methods run no ORM event); run session.execute(update({name}), [...]) instead (it "
            "is counted), or run it inside countercache.suspended(session) and repair with "
            "countercache.reconcile()"
        )


def _unread(mapper: Mapper[Any], isupdate: bool, method: str, suspended: bool) -> None:
    """Rows given as a one-pass iterator: refused for a class a counter involves."""
    if not suspended:
        _check_rows(mapper, isupdate, set(), method)  # (an INSERT of counted rows needs no reading)
        counted = _counted(mapper)[0]
    else:
        counted = []
    involved = counted or counters_in(mapper)
    if involved:
        names = _names(counted) if counted else _names(list(set(counters_in(mapper).values())))
        raise CounterCacheError(
            f"{names}: {method} was given {mapper.class_.__name__} rows as a one-pass iterator, which "
            "countercache must read before they are written (to see whether they set a counted value); "
            "pass a list"
        )


#: (event name, listener) on ``Session``, registered by :mod:`countercache.installation`.
SESSION_HOOKS = (("after_transaction_create", _after_transaction_create),)
