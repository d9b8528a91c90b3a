"""Rows the database deletes by ``ON DELETE CASCADE`` with a row the ORM deletes (private).

``passive_deletes=True`` leaves a parent's children to the database: the
flush (or an ORM bulk ``DELETE``) deletes the parent row and the foreign
keys' ``ON DELETE CASCADE`` deletes its children, their children, and the
association rows of many-to-many links. No ORM event reports those rows.
Before the parent goes, they are read here, locked, and counted out of
their counters: one ``SELECT ... FOR UPDATE`` per cascading relationship
and level (at most :data:`MAX_DEPTH` levels).

A cascade is followed where every column of the child's foreign key says
``ondelete="CASCADE"`` in the metadata and refers to the parent's primary
key, and only where the database runs it (:func:`countercache.locking.actions_run`:
not on SQLite without ``PRAGMA foreign_keys=ON``). Rows the flush deletes
itself (objects given to ``session.delete()``) are counted by the flush, not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, inspect, or_, select, tuple_

from . import many_to_many
from .children import _child_for
from .kinds import MultiLevel
from .locking import actions_run, child_primary_key, for_update, read_foreign_keys
from .tracking import _add_row

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper

    from .flush import FlushState

__all__ = ["from_deleted_objects", "from_rows", "reaches_counted"]

#: Levels of cascades followed below a deleted row.
MAX_DEPTH = 8
#: Keys per IN list.
CHUNK = 500


def _cascading(mapper: Mapper[Any]) -> list[Any]:
    """``mapper``'s one-to-many relationships whose rows the database deletes with its rows
    (found once per mapper and set of relationships: asked at every flush that deletes)."""
    relationships = mapper.relationships  # (a new object when the mapper gains a relationship)
    known = mapper.__dict__.get(_CACHE)  # (kept on the mapper: a cache elsewhere holding its
    if known is not None and known[0] is relationships:  # relationships would keep it alive)
        return known[1]  # type: ignore[no-any-return]
    found = []
    pk = set(mapper.primary_key)
    for rel in relationships:
        if not rel.passive_deletes or rel.secondary is not None or rel.direction.name != "ONETOMANY":
            continue
        pairs = rel.local_remote_pairs
        if {local for local, _ in pairs} != pk:
            continue
        if all(any(fk.ondelete and fk.ondelete.upper() == "CASCADE" and fk.column is local
                   for fk in remote.foreign_keys) for local, remote in pairs):
            found.append(rel)
    mapper.__dict__[_CACHE] = (relationships, found)
    return found


#: the mapper's attribute holding (its relationships when asked, those the database's cascade follows)
_CACHE = "_countercache_cascading"


def reaches_counted(mapper: Mapper[Any], depth: int = 0) -> bool:
    """Does deleting ``mapper``'s rows make the database delete counted rows (or links)?"""
    if many_to_many.cascaded_links(mapper):
        return True
    for rel in _cascading(mapper):
        child = _child_for(rel.mapper)
        if child is not None or (depth < MAX_DEPTH and reaches_counted(rel.mapper, depth + 1)):
            return True
    return False


def _criteria(rel: Any, mapper: Mapper[Any], keys: list[tuple[Any, ...]]) -> list[Any]:
    """WHERE clauses picking ``rel``'s rows of the parent rows ``keys``, in chunks."""
    remote = {local: remote for local, remote in rel.local_remote_pairs}
    columns = [remote[col] for col in mapper.primary_key]
    found = []
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start:start + CHUNK]
        if len(columns) == 1:
            found.append(columns[0].in_([k[0] for k in chunk]))
        else:
            found.append(or_(*(and_(*(c == v for c, v in zip(columns, k))) for k in chunk))
                         if len(chunk) < 10 else tuple_(*columns).in_(chunk))
    return found


def from_rows(fs: FlushState, mapper: Mapper[Any], keys: list[tuple[Any, ...]], *, skip: Any = frozenset(),
              loaded: Any = None, links: bool = True, depth: int = 0) -> None:
    """Count out what the database deletes with ``mapper``'s rows ``keys``:
    counted children (their other counters), recursively, and many-to-many
    links (unless ``links`` is false: the flush counts a deleted object's own).
    ``skip``: identity keys of rows the flush deletes itself; ``loaded``: the
    deleted object's loaded attributes (a loaded collection is the ORM's)."""
    session = fs.session
    if links and keys:
        many_to_many.count_cascaded_links(fs, mapper, keys)
    for rel in _cascading(mapper):
        if loaded is not None and rel.key in loaded:
            continue
        target = rel.mapper
        connection = session.connection(bind_arguments={"mapper": target})
        child = _child_for(target)
        below: list[tuple[Any, ...]] = []
        running = actions_run(connection)  # (no cascade runs: nothing read, nothing counted)
        for criterion in _criteria(rel, mapper, keys):
            criterion = and_(criterion, running)
            if child is not None and not child.views and child_primary_key(child) == list(target.primary_key):
                found = read_foreign_keys(connection, child, where=criterion, lock="update")
                plan = fs.plan(child)[0]
                if depth == 0:  # the deleted rows' own delete weighs their leaves (multi-level middles)
                    plan = [p for p in plan if not _weighed(p[0], mapper)]
                for key, old in found.items():
                    if target.identity_key_from_primary_key(list(key)) not in skip:
                        _add_row(plan, old, None)
                below.extend(found)
            else:
                stmt = select(*target.primary_key).where(criterion)
                stmt = for_update(stmt, connection)
                below.extend(tuple(row) for row in connection.execute(stmt).all())
        if below and depth < MAX_DEPTH:
            from_rows(fs, target, below, skip=skip, depth=depth + 1)


def _weighed(counter: Any, origin: Mapper[Any]) -> bool:
    """Is ``counter`` multi-level over ``origin``'s rows as its middle rows? Their
    delete then counts the leaves still in the database, these included."""
    kind = counter.kind
    return isinstance(kind, MultiLevel) and (origin.isa(kind.middle_mapper) or kind.middle_mapper.isa(origin))


def from_deleted_objects(fs: FlushState) -> None:
    """``before_flush``: what the database deletes with the objects given to
    ``session.delete()`` (their own many-to-many links are the flush's:
    :func:`countercache.many_to_many.read_cascaded`)."""
    states = [inspect(o) for o in fs.session.deleted]
    cascading = [st for st in states if st.key is not None and _cascading(st.mapper)]
    if not cascading:
        return
    skip = {st.key for st in states}
    switched = many_to_many.replaced(fs.session)
    for state in cascading:
        if state.key not in switched:
            from_rows(fs, state.mapper, [tuple(state.key[1])], skip=skip, loaded=state.dict, links=False)
