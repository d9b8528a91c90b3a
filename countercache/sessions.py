"""What the functions that take a session or a bind accept (private).

:func:`~countercache.check`, :func:`~countercache.reconcile`,
:func:`~countercache.fold`, :func:`~countercache.exact` and
:func:`~countercache.suspended` take, besides a
:class:`~sqlalchemy.orm.Session` (or an Engine or a Connection, where the
function says so):

* a :class:`~sqlalchemy.orm.scoped_session` (Flask-SQLAlchemy's
  ``db.session``): its current session, the one the application's code in
  the same scope (request, app context, thread) works in;
* an :class:`~sqlalchemy.ext.asyncio.AsyncSession` or
  :class:`~sqlalchemy.ext.asyncio.async_scoped_session` (an ``AsyncEngine``,
  an ``AsyncConnection``): its synchronous side. The functions that read or
  write are synchronous: they need the greenlet that ``run_sync()`` gives,
  ``await session.run_sync(countercache.check)``; called from plain async
  code they raise a :class:`~countercache.CounterCacheError` saying so
  (:func:`~countercache.suspended`, which does no IO, takes them anywhere).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, scoped_session
from sqlalchemy.util.concurrency import in_greenlet

from .errors import CounterCacheError

__all__ = ["session_of", "bind_of"]

# The asyncio extension is not imported (it needs greenlet, which an
# application without asyncio may lack): its objects are known by the
# synchronous side each one carries.
_SYNC_SIDES = ("sync_session", "sync_connection", "sync_engine")  # (an AsyncConnection has both of the last)


def _current(obj: Any) -> Any:
    """A scoped session's current session (created by its registry if needed):
    ``scoped_session``, and ``async_scoped_session`` (the same shape)."""
    if isinstance(obj, scoped_session) or (
            type(obj).__name__ == "async_scoped_session" and hasattr(obj, "registry")):
        return obj.registry()
    return obj


def _sync_side(obj: Any, what: str, io: bool) -> Any:
    if isinstance(obj, (Session, Engine, Connection)):
        return obj
    side = next((name for name in _SYNC_SIDES if hasattr(obj, name)), None)
    if side is None:
        return obj
    if io and not in_greenlet():
        raise CounterCacheError(
            f"{what}() is synchronous and was given an {type(obj).__name__} outside its greenlet: "
            f"call it as `await {'session' if side == 'sync_session' else 'connection'}"
            f".run_sync(countercache.{what}, ...)`")
    return getattr(obj, side)


def session_of(session: Any, what: str, *, io: bool = True) -> Session:
    """The :class:`~sqlalchemy.orm.Session` ``session`` stands for (see the module docstring)."""
    found = _sync_side(_current(session), what, io)
    if not isinstance(found, Session):
        raise CounterCacheError(
            f"{what}() takes a Session, a scoped_session or an AsyncSession, not {type(session).__name__}")
    return found


def bind_of(bind: Any, what: str) -> Engine | Connection | Session:
    """The Engine, Connection or Session ``bind`` stands for (see the module docstring)."""
    found = _sync_side(_current(bind), what, True)
    if not isinstance(found, (Engine, Connection, Session)):
        raise CounterCacheError(
            f"bind must be an Engine, Connection or Session (or a scoped_session), not {type(bind).__name__}")
    return found
