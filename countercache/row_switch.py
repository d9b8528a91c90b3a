"""Row switches: a deleted row and a new object with its primary key, in one flush (private).

``session.delete(q)`` and ``session.add(Question(id=q.id, user_id=other))``
in one flush: SQLAlchemy does not DELETE and INSERT, it UPDATEs the row to
the new object's values (a "row switch"). The new object gets
``before_insert`` and then ``after_update``; the deleted one gets neither
``before_delete`` nor ``after_delete``. Counted as what the row does: a
change from the values in the database (read and locked here, in
``before_insert``) to the values the UPDATE writes (``after_update``, as for
any update: a column the new object does not set keeps the row's value).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import through
from .flush import _GONE
from .locking import _begin_sqlite_write, read_foreign_keys

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Mapper
    from sqlalchemy.orm.state import InstanceState

    from .flush import FlushState

__all__ = ["deleted_rows", "switched"]


def deleted_rows(fs: FlushState) -> dict[Any, Any]:
    """Identity key -> state of the counted rows this flush deletes (asked once per flush)."""
    found: dict[Any, Any] = {}
    for state, (isdelete, listonly) in fs.uow.states.items():  # type: ignore[union-attr]
        if isdelete and not listonly and state.key is not None and fs.child(state.mapper) is not None:
            found[state.key] = state
    return found


def switched(fs: FlushState, deleted: dict[Any, Any], mapper: Mapper[Any], connection: Connection,
             state: InstanceState[Any]) -> None:
    """``before_insert`` of a new row: if it takes the place of a deleted one,
    read (and lock) that row's counted values as the old values of an update."""
    key = mapper.identity_key_from_instance(state.obj())
    if key not in deleted:
        return
    child = fs.child(mapper)
    if child is None:
        return
    pk = tuple(key[1])
    if connection.dialect.name == "sqlite":
        _begin_sqlite_write(connection)
    found = read_foreign_keys(connection, child, [pk], lock="update")
    if child.views:  # a middle row: its leaves stay with it (same key), counted as a move
        through.add_leaf_counts(connection, child, found, held=fs.held_for)
    fs.old[state] = found.get(pk, _GONE)
