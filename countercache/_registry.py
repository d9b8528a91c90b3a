"""The process-wide registry of declared counters (private).

Counters are added when their class's mapper is constructed and resolved
when mappers are configured. A counter whose mapper is gone
(``sqlalchemy.orm.clear_mappers()``, ``registry.dispose()``) leaves the
registry the next time it is read. Tests snapshot and restore this state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect

from .errors import CounterCacheError

if TYPE_CHECKING:
    from .declaration import CounterCache

_counters: list[CounterCache] = []
_by_name: dict[str, list[CounterCache]] = {}
#: (counter, the error its resolution raised): SQLAlchemy raises an error of a
#: ``mapper_configured`` listener once, then takes the mapper for configured;
#: the flushes that write the counter's rows raise it again (flush.py)
failed: list[tuple[CounterCache, BaseException]] = []


def add(counter: CounterCache) -> None:
    _counters.append(counter)
    _by_name.setdefault(counter.name, []).append(counter)


def remove(counter: CounterCache) -> None:
    if counter in _counters:
        _counters.remove(counter)
        _by_name[counter.name].remove(counter)
        if not _by_name[counter.name]:
            del _by_name[counter.name]


def live(counter: CounterCache) -> bool:
    """Is the counter's class still mapped by the mapper it was bound to?"""
    return counter.mapper is not None and inspect(counter.cls, raiseerr=False) is counter.mapper


def _prune() -> None:
    """Forget counters whose mapper was disposed (their classes are unmapped)."""
    for counter in [c for c in _counters if not live(c)]:
        remove(counter)


def all_counters() -> list[CounterCache]:
    _prune()
    return list(_counters)


def known() -> list[CounterCache]:
    """The counters as registered, without the check of each class's mapper that
    :func:`all_counters` makes (for what runs at every flush: a disposed
    class's counter is harmless there, no row of it is flushed)."""
    return _counters


def by_name(name: str) -> list[CounterCache]:
    _prune()
    return _by_name.get(name, [])


def class_names() -> set[str]:
    return {c.cls.__name__ for c in all_counters() if c.cls is not None} | _declared_classes


def counter_names(class_name: str) -> list[str]:
    return sorted(str(c.key) for c in all_counters() if c.cls is not None and c.cls.__name__ == class_name)


# Names of every mapped class seen since install, counters or not, so that an
# override naming a class without counters is caught at configure().
_declared_classes: set[str] = set()


def lookup(counter: Any) -> CounterCache:
    """Find the definition behind ``User.question_count`` (or its name)."""
    if isinstance(counter, str):
        found = by_name(counter)
        if len(found) != 1:
            raise CounterCacheError(
                f"{counter}: "
                + ("no such counter" if not found else "several classes declare this counter")
            )
        return found[0]
    try:
        prop = inspect(counter).property
        column = prop.columns[0]
    except Exception:
        raise CounterCacheError(f"{counter!r} is not a counter attribute") from None
    definition = column.info.get("countercache")
    if definition is None or definition.cls is None:
        raise CounterCacheError(f"{counter} is not a counter declared with counter_cache()")
    if not live(definition):
        raise CounterCacheError(f"{definition.name}: its class is no longer mapped (its mapper was disposed)")
    return definition


def snapshot() -> tuple[list[CounterCache], dict[str, list[CounterCache]], set[str]]:
    return list(_counters), {k: list(v) for k, v in _by_name.items()}, set(_declared_classes)


def fail(counter: CounterCache, error: BaseException) -> None:
    """``counter`` could not be resolved: it is not kept, and saying so once is not enough."""
    if all(c is not counter for c, _ in failed):
        failed.append((counter, error))


def refuse_failed(session: Any, *args: Any) -> None:
    """``before_flush``: a flush writing rows of a class whose counter could not be
    resolved raises that error again (SQLAlchemy raised it once, at mapper
    configuration, and then takes the mapper for configured)."""
    if not failed:
        return
    for counter, error in list(failed):
        if not live(counter):
            continue
        classes: set[Any] = {counter.cls}
        mapper = counter.mapper
        for step in counter.relationship.split("."):  # (each class on the path: a multi-level counter's leaves too)
            prop = mapper.relationships.get(step) if mapper is not None else None  # type: ignore[union-attr]
            mapper = prop.mapper if prop is not None else None
            if mapper is not None:
                classes.add(mapper.class_)
        for obj in (*session.new, *session.dirty, *session.deleted):
            if isinstance(obj, tuple(classes)):
                raise failure(counter, error)


def failure(counter: CounterCache, error: BaseException) -> Exception:
    """The error a counter that could not be resolved raises again (flush, check(), create_all())."""
    from .errors import ConfigurationError

    return ConfigurationError(f"{error} (raised when the mappers were configured: "
                              f"{counter.name} is not kept until the model is fixed)")


def failed_in(tables: Any = None) -> tuple[CounterCache, BaseException] | None:
    """A live counter that could not be resolved (and was not since), whose parent table
    is one of ``tables`` (None: any), else None."""
    for counter, error in failed:
        table = getattr(counter.column, "table", None)
        if live(counter) and counter.parent is None and (tables is None or any(table is t for t in tables)):
            return counter, error
    return None


def restore(state: tuple[list[CounterCache], dict[str, list[CounterCache]], set[str]]) -> None:
    _counters[:] = state[0]
    _by_name.clear()
    _by_name.update(state[1])
    _declared_classes.clear()
    _declared_classes.update(state[2])
    failed[:] = [(c, e) for c, e in failed if c in _counters]
