"""``countercache.suspended(session)``: no counting inside the block (private module, public function)."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.orm import Session

from .sessions import session_of

__all__ = ["is_suspended", "suspended"]

#: session -> depth of nested suspended() blocks
_suspended: weakref.WeakKeyDictionary[Session, int] = weakref.WeakKeyDictionary()


def is_suspended(session: Session) -> bool:
    # (the weak dictionary's own dict first: get() is a Python call, and this
    # is asked per flush; nothing is suspended almost always)
    return bool(_suspended.data) and bool(_suspended.get(session))


@contextmanager
def suspended(session: Any) -> Iterator[None]:
    """Turn counter maintenance off for ``session`` inside the block.

    What is flushed inside the block is never counted, even if it is committed
    after the block; run :func:`countercache.reconcile` afterwards. Meant for
    bulk imports. Accepts a :class:`~sqlalchemy.orm.Session`, a
    :class:`~sqlalchemy.orm.scoped_session` (its current session: Flask-SQLAlchemy's
    ``db.session``), an :class:`~sqlalchemy.ext.asyncio.AsyncSession` or an
    :class:`~sqlalchemy.ext.asyncio.async_scoped_session`.
    """
    sync = session_of(session, "suspended", io=False)
    _suspended[sync] = _suspended.get(sync, 0) + 1
    try:
        yield
    finally:
        left = _suspended[sync] - 1
        if left:
            _suspended[sync] = left
        else:
            del _suspended[sync]
