"""The counted child classes: which counters a child mapper feeds, and what its rows' reads need (private).

One :class:`_Child` per child mapper (inherited counters included, merged
lazily by :func:`_child_for`): the attribute keys whose values decide its
counters, their equality tests, and the per-configuration layout the flush
resolves once. Filled by :mod:`countercache.installation` when counters are
resolved; read by the row hooks, the pre-read and bulk statements.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import Boolean, Date, DateTime, Float, Integer, Numeric, String, Time, Uuid
from sqlalchemy.orm import Mapper

from . import config
from .declaration import MiddleView
from .kinds import MultiLevel

if TYPE_CHECKING:
    from .declaration import CounterCache


#: Value types whose values compare and hash as themselves (GROUP BY and a dict key).
_GROUPABLE_TYPES = (Integer, Numeric, Float, String, Boolean, Date, DateTime, Time, Uuid)


class _Child:
    """The counters fed by one child mapper, and what the pre-read needs."""

    def __init__(self, mapper: Mapper[Any]) -> None:
        self.mapper = mapper
        self.counters: list[CounterCache] = []
        #: Attribute keys whose values decide any of the counters (foreign
        #: keys, and the columns of where= and sum=).
        self.keys: tuple[str, ...] = ()
        self.key_set: frozenset[str] = frozenset()
        #: Of those, the ones an UPDATE may set by itself (onupdate, server_onupdate).
        self.computed_keys: frozenset[str] = frozenset()
        #: Multi-level counters for which this class is the middle (through.py).
        self.views: list[MiddleView] = []
        self._equals: list[tuple[str, Any]] | None = None
        self._layout: tuple[int, list[Any]] | None = None
        self._single: tuple[int, tuple[Any, ...] | None] | None = None
        self._groupable: bool | None = None

    def equals(self) -> list[tuple[str, Any]]:
        """``(key, the attribute's equality test)`` for every key (what its history compares with)."""
        if self._equals is None:
            manager = self.mapper.class_manager
            self._equals = [(k, manager[k].impl.is_equal) for k in self.keys]
        return self._equals

    def groupable(self) -> bool:
        """Can deleted rows be counted grouped by their values (in SQL and in a
        dict)? Not with a JSON, array or custom-typed value, say."""
        if self._groupable is None:
            self._groupable = all(
                isinstance(col.type, _GROUPABLE_TYPES)
                for k in self.keys for col in self.mapper.get_property(k).columns)  # type: ignore[attr-defined]
        return self._groupable

    def layout(self) -> list[tuple[CounterCache, str, tuple[str, ...], bool, bool]]:
        """``(counter, strategy name, foreign key attributes, plain count?, multi-level leaves?)``
        per counter, for the configuration in force (resolved once per change)."""
        generation = config._config.generation
        if self._layout is None or self._layout[0] != generation:
            self._layout = (generation, [
                (c, c.strategy(), c.fk_keys, c.simple, isinstance(getattr(c, "kind", None), MultiLevel))
                for c in self.counters])
        return self._layout[1]

    def single(self) -> tuple[CounterCache, str, str, Any] | None:
        """``(counter, strategy name, foreign key, its equality test)`` when the
        child feeds one plain count through one foreign key, not a multi-level
        side, no value an UPDATE sets by itself (see ``FlushState.single``,
        which asks per flush); resolved once per configuration."""
        generation = config._config.generation
        if self._single is None or self._single[0] != generation:
            layout = self.layout()
            found = None
            if len(layout) == 1 and not self.views and not self.computed_keys:
                counter, name, fk_keys, simple, leaves = layout[0]
                if simple and len(fk_keys) == 1 and not leaves:
                    ((fk, equal),) = self.equals()  # (the one counted key)
                    found = (counter, name, fk, equal)
            self._single = (generation, found)
        return self._single[1]

    def add(self, counter: CounterCache) -> None:
        if counter not in self.counters:
            self.counters.append(counter)
            keys = list(self.keys)
            keys.extend(k for k in counter.value_keys if k not in keys)
            self.keys = tuple(keys)
            self.key_set = frozenset(keys)
            self.computed_keys = frozenset(
                k for k in self.keys
                for col in self.mapper.get_property(k).columns  # type: ignore[attr-defined]
                if col.onupdate is not None or col.server_onupdate is not None)
            if isinstance(counter, MiddleView):
                self.views.append(counter)
            self._equals = None
            self._layout = None
            self._single = None
            self._groupable = None
            self.__dict__.pop("_locking_statements", None)  # (locking.py's, built for the keys before)


#: Child mapper -> its counters (inherited ones included, filled lazily).
_children: weakref.WeakKeyDictionary[Mapper[Any], _Child] = weakref.WeakKeyDictionary()


_child_cache: weakref.WeakKeyDictionary[Mapper[Any], _Child | None] = weakref.WeakKeyDictionary()
#: the configuration generation ``_child_cache`` was filled under
_cached_generation = [-1]


def _child_for(mapper: Mapper[Any]) -> _Child | None:
    """The counters the ORM keeps from ``mapper``'s rows under the configuration
    in force (a counter the database keeps, ``trigger``, is not among them)."""
    if _cached_generation[0] != config._config.generation:
        _child_cache.clear()
        _cached_generation[0] = config._config.generation
    try:
        return _child_cache[mapper]
    except KeyError:
        pass
    merged: _Child | None = None
    for m in mapper.iterate_to_root():
        own = _children.get(m)
        if own is not None:
            for counter in own.counters:
                if counter.strategy() in config.DATABASE_STRATEGIES:
                    continue
                if merged is None:
                    merged = _Child(mapper)
                merged.add(counter)
    _child_cache[mapper] = merged
    return merged


def add_counter(child_mapper: Mapper[Any], counter: Any) -> None:
    """``child_mapper``'s rows feed ``counter`` from now on (its listeners: see installation)."""
    child = _children.get(child_mapper)
    if child is None:
        child = _children[child_mapper] = _Child(child_mapper)
    child.add(counter)
    _child_cache.clear()


def _key(d: dict[str, Any] | None, fk_keys: tuple[str, ...]) -> tuple[Any, ...] | None:
    if d is None:
        return None
    if len(fk_keys) == 1:
        value = d.get(fk_keys[0])
        return None if value is None else (value,)
    key = tuple(d.get(k) for k in fk_keys)
    return None if None in key else key


def _family(mapper: Mapper[Any]) -> list[Mapper[Any]]:
    """The subclasses of ``mapper`` whose rows feed counters its own rows do
    not (``update(Post)`` reaching the rows of ``Question``, which feed
    ``User.question_count``): a statement on ``mapper`` is counted row by row,
    each row as the class its discriminator names."""
    own = _child_for(mapper)
    own_counters = set(own.counters) if own is not None else set()
    found = []
    for sub in mapper.self_and_descendants:
        if sub is not mapper:
            child = _child_for(sub)
            if child is not None and set(child.counters) != own_counters:
                found.append(sub)
    return found
