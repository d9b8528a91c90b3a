"""ORM-enabled bulk statements run through a session (private).

``session.execute(insert(Child), [...])``, ``session.execute(update(Child)
.where(...).values(parent_id=...))`` and ``session.execute(delete(Child)
.where(...))`` do not go through the flush, so the mapper hooks never see
their rows. The ``do_orm_execute`` hook does:

* **INSERT**: the parameters say which parents gain children; counted after
  the statement succeeded.
* **DELETE**, and **UPDATE** of a foreign key a counter uses: the rows the
  statement would touch are first read and locked (``SELECT pk, fk ... WHERE
  <the statement's criteria> ORDER BY pk FOR UPDATE``), then the statement
  runs restricted to those keys (its own criteria still apply, and its
  ``RETURNING``, ``rowcount`` and ``synchronize_session`` work as before).
  Exactly the rows it changed are counted: a row another transaction deleted
  first is not there to lock, and a row inserted meanwhile is left alone, as
  if the statement had run at the moment of the lock.
* An UPDATE that sets no counted foreign key costs nothing extra.

What a statement changed reaches the database like a flush's changes
(``bulk`` and ``per_row`` at once, ``deferred`` at commit), and parents in
the session show the new values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import select, tuple_
from sqlalchemy.sql.elements import BindParameter, ClauseElement

from . import cascades, database_kept, memory, parents, skipping, through, tracking
from ._compat import OnlyInSQL, autoflush, multi_values, single_table_criterion, statement_values
from .children import _child_for, _family
from .flush import FlushState, forget_locked
from .suspension import is_suspended
from .locking import child_primary_key, for_update, read_foreign_keys
from .core_statements import core_statement
from .counter_writes import check_statement, refuse_rekey
from .errors import CounterCacheError
from .bulk_rows import (_attribute_values, _complete, _parameter_rows, _refuse, bound, counted, gone, invoke,
                        refuse_key_change, refuse_unkeyed, where_of)

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper, ORMExecuteState


def _do_orm_execute(state: ORMExecuteState) -> Any:
    if not (state.is_insert or state.is_update or state.is_delete):
        return None
    mapper = state.bind_mapper
    if mapper is None:  # a Core statement on a table: kept or refused there
        return counted(state, lambda: core_statement(state))
    check_statement(state, mapper)  # (a counter column is the library's, suspended or not)
    refuse_rekey(state, mapper.tables, params=False)
    if not is_suspended(state.session):
        skipping.check_statement(state, mapper)  # (rows the database may skip or replace)
        database_kept.check_leftovers(state.session, list(mapper.self_and_descendants), state.statement)
    child = _child_for(mapper)
    family = _family(mapper)
    cascading = state.is_delete and cascades.reaches_counted(mapper)
    if database_kept.counters() and not is_suspended(state.session):
        result = database_kept.before_statement(state, mapper, alone=child is None and not family and not cascading)
        if result is not None:
            return result
    if child is None and not family and not cascading:
        if state.is_insert and not is_suspended(state.session) and parents.waiting(mapper):
            return counted(state, lambda: _insert_parents(state, mapper, invoke(state)))
        return None
    if is_suspended(state.session):
        if not state.is_insert:
            forget_locked(state.session)
        return None
    if state.execution_options.get("autoflush", True):
        # SQLAlchemy autoflushes when the statement runs (invoke_statement below), after the locking read:
        # flush first, so that the read sees the rows the statement will (the second autoflush finds nothing)
        autoflush(state.session)
    if not state.is_insert:
        forget_locked(state.session)  # rows may change behind the loaded objects
    return counted(state, lambda: _count(state, mapper, child, family, cascading))


def _count(state: ORMExecuteState, mapper: Mapper[Any], child: Any, family: Any, cascading: bool) -> Any:
    """Run the statement and count its rows, as its kind and the mapper's children need."""
    if cascading:  # rows the database deletes with the statement's: read, locked and counted first
        if any(k.endswith("_limit") and v is not None for k, v in state.statement.kwargs.items()):
            names = sorted({c.name for rel in cascades._cascading(mapper)
                            if (below := _child_for(rel.mapper)) is not None for c in below.counters})
            raise CounterCacheError(
                f"{', '.join(names) or 'counters of the rows it cascades to'}: a DELETE of {mapper.class_.__name__} "
                "with a LIMIT, whose rows take counted rows along (ON DELETE CASCADE), is not counted (which rows "
                "it deletes is known only after it); delete without the LIMIT, or pick the rows first "
                "(delete(...).where(pk.in_(...)))")
        keys = _cascade_first(state, mapper)
        if child is None and not family:
            return invoke(state, statement=_restricted(state.statement, mapper, None, keys))
    if family:  # rows of subclasses that count differently: each row as its class
        return _by_class(state, mapper, family)
    if state.is_insert:
        return _insert(state, mapper, child)
    if state.is_delete:
        return _delete(state, mapper, child)
    return _update(state, mapper, child)


def _cascade_first(state: ORMExecuteState, mapper: Mapper[Any]) -> list[tuple[Any, ...]]:
    """A DELETE whose rows take others along (``ON DELETE CASCADE``): its rows
    locked in key order, and what goes with them counted out
    (:mod:`countercache.cascades`); the statement then deletes exactly those."""
    pk = list(mapper.local_table.primary_key.columns)
    where = [c for c in (where_of(state), single_table_criterion(mapper)) if c is not None]  # type: ignore[attr-defined]
    connection = state.session.connection(bind_arguments={"mapper": mapper})
    stmt = select(*pk).where(*where).order_by(*pk)
    stmt = for_update(stmt, connection)
    keys = [tuple(row) for row in connection.execute(stmt).all()]
    fs = FlushState(state.session, None)
    cascades.from_rows(fs, mapper, keys)
    fs.finish()
    return keys


def _insert(state: ORMExecuteState, mapper: Mapper[Any], child: Any) -> Any:
    statement = state.statement
    if getattr(statement, "select", None) is not None:
        _refuse(child, "INSERT ... FROM SELECT is not counted")
    rows = _parameter_rows(state, mapper)
    inline = statement_values(statement)
    sources = [bound({**inline, **values}) for values in rows] or ([inline] if inline else [])
    for batch in multi_values(statement):
        sources.extend(values for values in batch if isinstance(values, dict))
    new_rows = [_complete(mapper, child, _attribute_values(mapper, values, child.keys)) for values in sources]
    result = invoke(state)
    tracking.record_rows(state.session, mapper, [(None, row) for row in new_rows])
    return _insert_parents(state, mapper, result)


def _insert_parents(state: ORMExecuteState, mapper: Mapper[Any], result: Any) -> Any:
    """After an INSERT of parent rows: where no foreign key holds their counted rows,
    those already under each new key given are counted (as the flush's new parents are)."""
    found = parents.waiting(mapper)
    if not found:
        return result
    names = tuple(mapper.get_property_by_column(col).key for col in mapper.primary_key)
    inline = statement_values(state.statement)
    connection = state.session.connection(bind_arguments={"mapper": mapper})
    for values in [bound({**inline, **v}) for v in _parameter_rows(state, mapper)] or [bound(inline)]:
        given = _attribute_values(mapper, values, names)
        key = tuple(v.value if isinstance(v, BindParameter) else v for v in (given.get(n) for n in names))
        if all(v is not None and not isinstance(v, ClauseElement) for v in key):
            # (not a key the database gives, or computes: a new one, nothing waits under it)
            for parent, counters in found:
                stored, _ = parents.recount(connection, parent, counters, key)
                parents.forget_counted(state.session, parent, counters, stored)
                # (objects its RETURNING loads carry the INSERT's 0: read back at the commit)
                memory.read_back_at_commit(state.session, parent, [stored])
    return result


def _translate_kept(session: Any, mapper: Mapper[Any], child: Any) -> None:
    """A statement about to move or delete middle rows of multi-level counters:
    the leaf deltas the transaction keeps for its commit (``deferred`` /
    ``sharded``, per middle row) are translated first, under the owners the
    rows have now; the statement's own count of their leaves then moves them
    along (or takes them out) like any other."""
    if child.views:
        fs = FlushState(session, None)
        fs.translate(middles=mapper)
        fs.finish()


def _locked(state: ORMExecuteState, mapper: Mapper[Any], child: Any, *, deleting: bool) -> Any:
    session = state.session
    _translate_kept(session, mapper, child)
    connection = session.connection(bind_arguments={"mapper": mapper})
    where, joined = where_of(state), None
    if mapper.persist_selectable is not mapper.local_table:
        # a joined subclass's statement: what SQLAlchemy refuses to compile (a base table's column
        # in an UPDATE's SET, a base table's criteria on SQLite) fails before anything is read
        state.statement.compile(dialect=connection.dialect)
    if mapper.persist_selectable is not mapper.local_table:
        # it changes rows of its own table (all of them without a WHERE), picked as its own FROM
        # picks them (a criterion over a base table's column is a cross join there, as
        # SQLAlchemy warns); their counted values are read through the subclass's join
        own = list(mapper.local_table.primary_key.columns)
        picked = select(*own).correlate(None) if where is None else select(*own).where(where).correlate(None)
        where, joined = (own[0] if len(own) == 1 else tuple_(*own)).in_(picked), mapper.persist_selectable
    found = read_foreign_keys(
        connection, child, where=where,  # type: ignore[attr-defined]
        lock="update" if deleting else "no key update", source=joined,
    )
    return _with_leaves(connection, child, found)


def _with_leaves(connection: Any, child: Any, found: dict[Any, Any]) -> dict[Any, Any]:
    """Middle rows of multi-level counters (locked now) weigh their counted leaves."""
    if child.views:
        through.add_leaf_counts(connection, child, found)
    return found


def _restricted(statement: Any, mapper: Mapper[Any], child: Any, keys: list[tuple[Any, ...]]) -> Any:
    """The statement, restricted in SQL only to the rows read: objects in the
    session are synchronized by the user's criteria alone (an object whose
    unflushed values match is updated or removed in memory as without
    countercache)."""
    # the key columns of the table the statement changes (a joined subclass's
    # own table: its key has the same values as the table holding the counted
    # columns, which the statement may not name)
    pk = list(mapper.local_table.primary_key.columns) or child_primary_key(child)
    if len(pk) == 1:
        return statement.where(OnlyInSQL(pk[0].in_([k[0] for k in keys])))
    return statement.where(OnlyInSQL(tuple_(*pk).in_(keys)))


def _delete(state: ORMExecuteState, mapper: Mapper[Any], child: Any) -> Any:
    if isinstance(state.parameters, list):  # bulk DELETE by primary key (executemany)
        return _by_primary_key(state, mapper, child, deleting=True)
    _gone_keys(mapper, child)  # (refused, if it is, before anything is read)
    locked = _locked(state, mapper, child, deleting=True)
    result = invoke(state, statement=_restricted(state.statement, mapper, child, list(locked)))
    connection = state.session.connection(bind_arguments={"mapper": mapper})
    tracking.record_rows(state.session, mapper,
                         _deleted(mapper, child, gone(connection, mapper, locked, result).values()))
    return result


def _deleted(mapper: Mapper[Any], child: Any, rows: Any) -> list[tuple[Any, Any]]:
    """``(old, new)`` of rows a DELETE on ``mapper`` removed: gone, unless the
    statement deletes from a joined subclass's own table only (SQLAlchemy's
    ``delete(Review)``) and the counter counts a base class's rows: then the rows
    of the base table stay, and so do its counts over columns that live there."""
    gone = _gone_keys(mapper, child)
    if len(gone) == len(child.keys):
        return [(old, None) for old in rows]
    return [(old, {**old, **{k: None for k in gone}}) for old in rows]


def _gone_keys(mapper: Mapper[Any], child: Any) -> set[str]:
    """The counted values a DELETE on ``mapper`` takes away: those in its own table, and all
    those of counters of its own rows (a row without its subclass table's row is none of
    them). Refused where a counter of a base class's rows, which stay, reads one of those."""
    table = mapper.local_table
    local = {k for k in child.keys if mapper.get_property(k).columns[0].table is table}  # type: ignore[attr-defined]
    own: set[str] = set()
    based: set[str] = set()
    for c in child.counters:
        kind = getattr(c, "kind", None)  # (a multi-level counter's middle rows: by their table, as before)
        if kind is not None:
            (own if kind.child_mapper.isa(mapper) else based).update(getattr(kind, "value_keys", ()) or child.keys)
    if (own & based) - local:
        _refuse(child, f"a DELETE of {mapper.class_.__name__} removes the rows of its own table, which some of "
                       "these count, and leaves its base table's rows, which the others count by the same "
                       "columns; delete the objects through the session")
    return local | own


def _update(state: ORMExecuteState, mapper: Mapper[Any], child: Any) -> Any:
    if isinstance(state.parameters, list):  # bulk UPDATE by primary key (executemany)
        return _by_primary_key(state, mapper, child, deleting=False)
    values = statement_values(state.statement)
    if isinstance(state.parameters, dict):
        values.update(state.parameters)  # update(Child).where(...), {"col": value}
    if not _attribute_values(mapper, values, child.keys):
        return None  # no counted value changes: nothing to do, nothing extra
    refuse_key_change(mapper, ", ".join(c.name for c in child.counters), values)
    locked = _locked(state, mapper, child, deleting=False)
    result = invoke(state, statement=_restricted(state.statement, mapper, child, list(locked)))
    # the new keys may be expressions: read them back (the rows are ours, locked)
    connection = state.session.connection(bind_arguments={"mapper": mapper})
    after = read_foreign_keys(connection, child, list(locked), lock=None)
    tracking.record_rows(state.session, mapper,
                         [(old, through.carry_counts(child, old, after.get(key))) for key, old in locked.items()])
    return result


def _by_primary_key(state: ORMExecuteState, mapper: Mapper[Any], child: Any, *, deleting: bool) -> Any:
    """A bulk UPDATE (or DELETE) by primary key: one parameter set per row.
    The rows are counted from what they were (read and locked first) to what
    they are after the statement (read back): a key given twice ends as its
    last parameter set says, and a row the statement's own WHERE left alone
    (``update(Child).where(...)``, with its parameter list) is no change."""
    params: list[dict[str, Any]] = state.parameters  # type: ignore[assignment]
    if not deleting and not any(_attribute_values(mapper, p, child.keys)
                                for p in [statement_values(state.statement), *params]):
        return None
    pk_keys = [mapper.get_property_by_column(c).key for c in child_primary_key(child)]
    refuse_unkeyed(state, child, pk_keys)
    keys = list(dict.fromkeys(tuple(p.get(k) for k in pk_keys) for p in params))  # (each row once)
    _translate_kept(state.session, mapper, child)
    connection = state.session.connection(bind_arguments={"mapper": mapper})
    # (each row once, under the database's form of its key: "7" given for 7 is the same row)
    locked = _with_leaves(connection, child, read_foreign_keys(
        connection, child, keys, lock="update" if deleting else "no key update", given_forms=False))
    result = invoke(state)
    if deleting:
        rows = _deleted(mapper, child, gone(connection, mapper, locked, result).values())
    else:
        after = read_foreign_keys(connection, child, list(locked), lock=None, given_forms=False)
        rows = [(old, through.carry_counts(child, old, after.get(key))) for key, old in locked.items()]
    tracking.record_rows(state.session, mapper, rows)
    return result


# -- statements on a class whose subclasses count differently -----------------


def _by_class(state: ORMExecuteState, mapper: Mapper[Any], family: list[Mapper[Any]]) -> Any:
    session = state.session
    children = {m: c for m in [mapper, *family] if (c := _child_for(m)) is not None}
    discriminator = mapper.polymorphic_on
    table = mapper.local_table
    names = ", ".join(sorted({c.name for child in children.values() for c in child.counters}))
    columns = {m: {k: m.get_property(k).columns[0] for k in c.keys} for m, c in children.items()}  # type: ignore[attr-defined]
    needed = {col for cols in columns.values() for col in cols.values()}
    if discriminator is None or discriminator not in table.c.values() or not needed <= set(table.c.values()) \
            or any(c.views for c in children.values()):
        raise CounterCacheError(
            f"{names}: a bulk statement on {mapper.class_.__name__} reaches rows of its subclasses "
            f"({', '.join(m.class_.__name__ for m in family)}) that countercache cannot tell apart or read "
            "in its table; run it on each subclass, or inside countercache.suspended(session) "
            "and repair with countercache.reconcile()"
        )
    classes = mapper.polymorphic_map

    def route(values: dict[Any, Any] | None) -> dict[Mapper[Any], dict[str, Any]]:
        """``{the counted class this row is: its counted values}`` (empty: not counted)."""
        target = classes.get(values.get(discriminator)) if values is not None else None
        owner = _owner(target, children) if target is not None else None
        if owner is None:
            return {}
        return {owner: {k: values.get(col) for k, col in columns[owner].items()}}  # type: ignore[union-attr]

    if state.is_insert:
        if getattr(state.statement, "select", None) is not None:
            _refuse(next(iter(children.values())), "INSERT ... FROM SELECT is not counted")
        rows = _parameter_rows(state, mapper)
        inline = statement_values(state.statement)
        identity = discriminator.key
        new_rows = []
        for values in [bound({**inline, **v}) for v in rows] or ([inline] if inline else []):
            by_column = {getattr(k, "key", k): v for k, v in values.items()}
            kind = by_column.get(identity, by_column.get(mapper.get_property_by_column(discriminator).key,
                                                          mapper.polymorphic_identity))
            target = classes.get(kind)
            owner = _owner(target, children) if target is not None else None
            if owner is not None:
                child = children[owner]
                new_rows.append((owner, _complete(owner, child, _attribute_values(owner, values, child.keys))))
        result = invoke(state)
        for owner in children:
            tracking.record_rows(session, owner, [(None, row) for m, row in new_rows if m is owner])
        return result
    if isinstance(state.parameters, list):
        _refuse(next(iter(children.values())),
                f"a bulk UPDATE/DELETE by primary key on {mapper.class_.__name__} reaches subclasses that count "
                "differently; run it on each subclass")
    values = statement_values(state.statement)
    if isinstance(state.parameters, dict):
        values.update(state.parameters)
    watched = needed | {discriminator}
    names_of = {col.key for col in watched} | {
        m.get_property_by_column(col).key for m in children for col in watched if col in m.columns.values()}
    if state.is_update and not {getattr(k, "key", k) for k in values} & names_of:
        return None  # no counted value or class changes
    if state.is_update:
        refuse_key_change(mapper, names, values)
    pk = list(table.primary_key.columns)
    read = [*pk, discriminator, *sorted(needed - {discriminator}, key=lambda c: c.name)]
    where = [c for c in (where_of(state), single_table_criterion(mapper)) if c is not None]  # type: ignore[attr-defined]
    connection = session.connection(bind_arguments={"mapper": mapper})
    stmt = select(*read).where(*where).order_by(*pk)
    stmt = stmt.with_for_update(key_share=not state.is_delete) if connection.dialect.name != "sqlite" \
        else for_update(stmt, connection)  # (SQLite: the write lock, before the read)
    before = {tuple(r[:len(pk)]): dict(zip(read, r)) for r in connection.execute(stmt).all()}
    restrict = pk[0].in_([k[0] for k in before]) if len(pk) == 1 else tuple_(*pk).in_(list(before))
    result = invoke(state, statement=state.statement.where(OnlyInSQL(restrict)))
    if state.is_delete:
        before = gone(connection, mapper, before, result)
    after: dict[Any, Any] = {}
    if state.is_update and before:
        after = {tuple(r[:len(pk)]): dict(zip(read, r))
                 for r in connection.execute(select(*read).where(restrict)).all()}
    for owner in children:
        rows = []
        for key, old in before.items():
            was, now = route(old).get(owner), route(after.get(key)).get(owner)
            if was is not None or now is not None:
                rows.append((was, now))
        tracking.record_rows(session, owner, rows)
    return result


def _owner(target: Mapper[Any], children: dict[Mapper[Any], Any]) -> Mapper[Any] | None:
    """The most specific mapper of ``children`` that ``target`` is (its counters include its ancestors')."""
    for m in target.iterate_to_root():
        if m in children:
            return m
    return None

