"""Keeping parents in memory right (private).

After the UPDATE, every parent instance in the session's identity map gets
the new value with ``set_committed_value`` (from ``UPDATE ... RETURNING``),
or has the counter expired where the backend cannot return it (MariaDB).
Neither marks the parent dirty, so the counter never shows in
``session.dirty`` and a ``version_id_col`` is not bumped.

Direct assignment to a counter attribute is refused: the column is the
library's. ``session.merge()`` copies loaded state and is let through,
keeping the value the target session already holds. SQLModel's constructor
and ``model_validate()`` assign every field of a new table-model instance,
a counter's default included: that default value (and only it: the value a
new row is inserted with anyway) is let through from them.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, select, tuple_
from sqlalchemy.orm import Session, object_session
from sqlalchemy.orm.attributes import instance_state, set_committed_value

from ._compat import NEVER_SET as _NEVER_SET
from ._compat import NO_VALUE as _NO_VALUE
from ._compat import calling_frame
from .children import _child_for
from .errors import AssignmentError, CounterCacheError

if TYPE_CHECKING:
    from .declaration import CounterCache
    from .writer import ParentTable, Results

_guarded: list[tuple[Any, Any]] = []

#: session -> (parent, counter key) that merge() set over an unloaded counter;
#: weakly on both sides: nothing of a closed or dropped session is kept
_merged: weakref.WeakKeyDictionary[Session, list[tuple[weakref.ref[Any], str]]] = weakref.WeakKeyDictionary()


def undo_merged(session: Session) -> None:
    """Before a flush: expire counters merge() set over unloaded values (never written)."""
    for ref, key in _merged.pop(session, ()):
        obj = ref()
        if obj is None:
            continue
        state = instance_state(obj)
        if state.session_id == session.hash_key and key in state.committed_state:
            session.expire(obj, [key])


def apply(session: Session, parent: ParentTable, results: Results) -> None:
    """Show ``results`` of one UPDATE on the parents in ``session``'s identity map."""
    identity_map = session.identity_map
    key_from_pk = parent.mapper.identity_key_from_primary_key
    unknown: dict[tuple[Any, ...], Any] = {}
    for pk, values in results:
        obj = identity_map.get(key_from_pk(pk))
        if obj is None:
            continue
        if values is None:
            unknown[pk] = obj
        else:
            for key, value in values.items():
                set_committed_value(obj, key, value)
    if unknown:  # (no UPDATE ... RETURNING: MariaDB/MySQL)
        _read_back(session, parent, unknown)


def _read_back(session: Session, parent: ParentTable, objects: dict[tuple[Any, ...], Any]) -> None:
    """Counters the UPDATE could not return: expired, read on next access; or,
    with ``expire_on_commit=False`` (the objects are used after the commit,
    often detached: no later load), read back now, under the UPDATE's lock."""
    counter_keys = [str(c.key) for c in parent.counters]
    if session.expire_on_commit:
        for obj in objects.values():
            session.expire(obj, counter_keys)
        return
    pk_cols = list(parent.pk_cols)
    columns = [c.column for c in parent.counters]
    connection = session.connection(bind_arguments={"mapper": parent.mapper})
    keys = list(objects)
    for start in range(0, len(keys), 500):
        chunk = keys[start:start + 500]
        where = pk_cols[0].in_([k[0] for k in chunk]) if len(pk_cols) == 1 else tuple_(*pk_cols).in_(chunk)
        for row in connection.execute(select(*pk_cols, *columns).where(where)).all():
            obj = objects.get(tuple(row[:len(pk_cols)]))
            if obj is not None:
                for key, value in zip(counter_keys, row[len(pk_cols):]):
                    set_committed_value(obj, key, value)


def read_back(session: Session, parent: ParentTable, keys: list[tuple[Any, ...]]) -> None:
    """Read the counters of these parents from the database now, where ``session`` holds them."""
    identity_map = session.identity_map
    key_from_pk = parent.mapper.identity_key_from_primary_key
    objects = {pk: obj for pk in keys if (obj := identity_map.get(key_from_pk(pk))) is not None}
    if objects:
        _read_back(session, parent, objects)


#: session -> (parent table, keys) whose counters a savepoint's rollback expired in a
#: session that keeps objects at its commit (``expire_on_commit=False``): read back at the commit
_unread: weakref.WeakKeyDictionary[Session, list[tuple[ParentTable, list[tuple[Any, ...]]]]] = \
    weakref.WeakKeyDictionary()


def read_back_at_commit(session: Session, parent: ParentTable, keys: list[tuple[Any, ...]]) -> None:
    """These parents' counters were expired by a savepoint's rollback in a session that keeps
    objects at its commit: they are read back at the commit (used after it, detached, they
    could not load; async, not outside the event loop), unless read before."""
    _unread.setdefault(session, []).append((parent, keys))


def read_back_unread(session: Session) -> None:
    """At the commit (``before_commit``, where a statement may run): read back what a
    savepoint's rollback expired (:func:`read_back_at_commit`). Not at the rollback
    itself: inside ``with session.begin_nested():`` nothing may run until it ends."""
    unread = _unread.pop(session, None)
    for parent, keys in unread or ():
        read_back(session, parent, keys)


def loaded_values(session: Session, parent: ParentTable, keys: list[tuple[Any, ...]]) -> dict[Any, Any]:
    """``{key: (object, {counter attribute: value})}`` of these parents' counters loaded in ``session``."""
    identity_map = session.identity_map
    key_from_pk = parent.mapper.identity_key_from_primary_key
    counter_keys = [str(c.key) for c in parent.counters]
    found = {}
    for pk in keys:
        obj = identity_map.get(key_from_pk(pk))
        if obj is not None:
            loaded = instance_state(obj).dict
            values = {key: loaded[key] for key in counter_keys if key in loaded}
            if values:
                found[pk] = (weakref.ref(obj), values)  # (the object: another may take its key later)
    return found


#: savepoint (nested SessionTransaction) -> the number of the first query run inside it
_begun: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
#: session -> what a savepoint's rollback takes back once SQLAlchemy has restored its objects
_taking_back: weakref.WeakKeyDictionary[Session, tuple[Any, Any, int | None]] = weakref.WeakKeyDictionary()


def _savepoint_begun(session: Session, transaction: Any) -> None:
    if transaction.nested:
        from sqlalchemy.orm import loading

        _begun[transaction] = loading._new_runid()  # (an object a query loads inside it has a later runid)


def take_back(session: Session, refreshed: list[tuple[ParentTable, list[tuple[Any, ...]], dict[Any, Any]]],
              savepoint: Any) -> None:
    """``savepoint`` rolled back: the counters it set in memory (``refreshed``, in order, with
    the values shown before each) show again what they showed before it, with no load (an
    ``AsyncSession`` could not lazy-load them), once SQLAlchemy has put back the objects it
    deleted (``after_soft_rollback``). Counters not loaded when first set, or of objects a
    query loaded inside it (what they showed may be its own), are expired (and, where the
    commit keeps objects, read back at the commit)."""
    _taking_back[session] = (refreshed, weakref.ref(savepoint), _begun.get(savepoint))


def _after_soft_rollback(session: Session, previous_transaction: Any) -> None:
    refreshed, savepoint, since = _taking_back.pop(session, ((), None, None))
    transaction = previous_transaction
    while transaction is not None and transaction is not (savepoint and savepoint()):
        transaction = transaction.parent
    if transaction is None:  # (not this rollback's: one that raised before it ended)
        return
    before: dict[tuple[ParentTable, Any], tuple[Any, dict[str, Any]] | None] = {}
    for parent, keys, values in refreshed:
        for pk in keys:
            before.setdefault((parent, pk), values.get(pk))  # (the earliest: before the savepoint)
    unknown: dict[ParentTable, list[tuple[Any, ...]]] = {}
    for (parent, pk), recorded in before.items():
        obj = session.identity_map.get(parent.mapper.identity_key_from_primary_key(pk))
        if obj is None:
            continue
        runid = instance_state(obj).runid
        values = recorded[1] if recorded is not None and recorded[0]() is obj else None  # (else another object's)
        if since is None or (runid is not None and runid >= since):
            values = None  # (loaded inside the savepoint)
        missing = [str(c.key) for c in parent.counters if values is None or str(c.key) not in values]
        for key, value in (values or {}).items():
            set_committed_value(obj, key, value)
        if missing:
            session.expire(obj, missing)
            unknown.setdefault(parent, []).append(pk)
    if not session.expire_on_commit:  # (used after the commit, detached: read back)
        for parent, keys in unknown.items():
            read_back_at_commit(session, parent, keys)


SESSION_HOOKS = (("after_transaction_create", _savepoint_begun), ("after_soft_rollback", _after_soft_rollback))


def expire(session: Session, parent: ParentTable, keys: list[tuple[Any, ...]]) -> None:
    """Expire the counters of these parents, where ``session`` holds them."""
    identity_map = session.identity_map
    key_from_pk = parent.mapper.identity_key_from_primary_key
    counter_keys = [str(c.key) for c in parent.counters]
    for pk in keys:
        obj = identity_map.get(key_from_pk(pk))
        if obj is not None:
            session.expire(obj, counter_keys)


def _is_merge() -> bool:
    """Does this ``set`` come from ``Session.merge()``?"""
    return calling_frame("merge", 2, 4, "sqlalchemy.orm") is not None


#: SQLModel's functions that assign each field of a new table-model instance,
#: defaults included (``sqlmodel._compat``: ``Model(...)``, ``Model.model_validate(...)``).
_SQLMODEL_CONSTRUCTORS = ("sqlmodel_table_construct", "sqlmodel_validate")


def _default_of(counter: CounterCache) -> Any:
    default = counter.column.default  # type: ignore[union-attr]
    return default.arg if default is not None and default.is_scalar else 0


def _constructing_default(target: Any, value: Any, oldvalue: Any, counter: CounterCache) -> bool:
    """Is a new instance's counter given its default, the value its row starts
    with anyway? A dataclass constructor (``MappedAsDataclass``) or SQLModel's
    sets every field's default, and so may the application's own keyword: a
    first value on an object no session holds yet. Any other value, a second
    assignment, and any assignment to a stored row stay refused."""
    state = instance_state(target)
    if state.key is not None or value != _default_of(counter) or type(value) is bool:
        return False
    if state.session_id is None and oldvalue in (_NO_VALUE, _NEVER_SET):
        return True
    return any(calling_frame(name, 2, 8, "sqlmodel") is not None for name in _SQLMODEL_CONSTRUCTORS)


def guard_assignment(counter: CounterCache) -> None:
    attribute = getattr(counter.cls, counter.key)  # type: ignore[arg-type]

    def refuse(target: Any, value: Any, oldvalue: Any, initiator: Any) -> Any:
        if _constructing_default(target, value, oldvalue, counter):
            return value
        if _is_merge():
            # merge() copies what another session loaded: keep ours when we
            # have it, so a stale copy never overwrites a fresher counter;
            # when ours is not loaded, the copied value is dropped again
            # before the next flush (expired), so it is never written.
            if oldvalue is _NO_VALUE or oldvalue is _NEVER_SET:
                session = object_session(target)
                if session is not None:
                    _merged.setdefault(session, []).append((weakref.ref(target), counter.key))  # type: ignore[arg-type]
                return value
            return oldvalue
        raise AssignmentError(
            f"{counter.name} is maintained by countercache and cannot be assigned "
            f"(tried to set it to {value!r}); use countercache.reconcile() to correct it"
        )

    if not any(a is attribute for a, _ in _guarded):
        event.listen(attribute, "set", refuse, retval=True)
        _guarded.append((attribute, refuse))


def guard_discriminator(child_mapper: Any) -> None:
    """Refuse changing the class of a loaded row of ``child_mapper``'s
    hierarchy by assigning its discriminator (``post.type = "answer"``): the
    flush would update the row as its old class, and the counters of the new
    class would not see it. ``update(Post).values(type=...)`` is counted."""
    base = child_mapper.base_mapper
    column = base.polymorphic_on
    if column is None or column not in base.columns.values():
        return
    prop = base.get_property_by_column(column)
    attribute = getattr(base.class_, prop.key)

    def refuse(target: Any, value: Any, oldvalue: Any, initiator: Any) -> Any:
        state = instance_state(target)
        if state.key is None or oldvalue is _NO_VALUE or oldvalue is _NEVER_SET or value == oldvalue:
            return value  # (a new object gets its class's identity; an unchanged value)
        names = ", ".join(sorted({c.name for m in base.self_and_descendants
                                   for c in getattr(_child_for(m), "counters", ())}))
        raise CounterCacheError(
            f"{names}: {type(target).__name__}.{prop.key} changes from {oldvalue!r} to {value!r}, which moves a "
            "loaded row to another class the flush cannot count; run "
            f"update({base.class_.__name__}).where(...).values({prop.key}=...) instead (it is counted)"
        )

    if not any(a is attribute for a, _ in _guarded):
        # (active_history: an expired discriminator is loaded, to compare with)
        event.listen(attribute, "set", refuse, retval=True, propagate=True, active_history=True)
        _guarded.append((attribute, refuse))


def uninstall() -> None:
    while _guarded:
        attribute, fn = _guarded.pop()
        if event.contains(attribute, "set", fn):
            event.remove(attribute, "set", fn)

