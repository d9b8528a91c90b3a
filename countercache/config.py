"""Choosing a strategy per counter without touching model code.

::

    import countercache
    countercache.configure(default_strategy="bulk",
                           overrides={"User.question_count": "per_row"})
    countercache.configure_from_file("setup.cfg")

Precedence, highest first: an override for that counter; ``strategy=`` given
to :func:`~countercache.counter_cache`; ``default_strategy``; ``"bulk"``.

.. warning:: The configuration is process-global: it applies to every
   session. Each call of :func:`configure` replaces all of it.

This module holds the configuration's state and the list of strategy names;
:func:`~countercache.configure` and :func:`~countercache.configure_from_file`,
which also install the library's listeners, are in
:mod:`countercache.settings`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from . import _registry
from .errors import ConfigurationError, CounterCacheWarning
from .sidetable import DEFAULT_SHARDS, check_shards

if TYPE_CHECKING:
    from .declaration import CounterCache

__all__ = ["configured_strategy", "STRATEGIES", "DATABASE_STRATEGIES", "ALL_STRATEGIES"]

#: The strategies kept by the ORM (the session's flush and commit), in the order the docs present them.
STRATEGIES: tuple[str, ...] = ("bulk", "per_row", "deferred", "sharded")

#: The strategies kept by the database itself (triggers generated from the declaration).
DATABASE_STRATEGIES: tuple[str, ...] = ("trigger", "sharded_trigger")

#: Every strategy this version implements.
ALL_STRATEGIES: tuple[str, ...] = STRATEGIES + DATABASE_STRATEGIES

DEFAULT_STRATEGY = "bulk"


class _Config:
    __slots__ = ("default_strategy", "default_shards", "overrides", "shard_overrides", "generation")

    def __init__(self) -> None:
        self.default_strategy: str | None = None
        self.default_shards: int | None = None
        self.overrides: dict[str, str] = {}
        #: "Class.attr" -> shards, from overrides written "sharded:64"
        self.shard_overrides: dict[str, int] = {}
        # Bumped on every configure(); counters cache their resolved strategy
        # per generation so that the flush path does no dictionary lookups.
        self.generation = 0


_config = _Config()


def check_strategy(name: Any, what: str) -> str:
    """Return ``name`` if it is a known strategy, else raise naming ``what``."""
    if name not in ALL_STRATEGIES:
        raise ConfigurationError(
            f"{what}: unknown strategy {name!r}; valid choices are "
            + ", ".join(repr(s) for s in ALL_STRATEGIES)
        )
    return name


def _split(value: Any, what: str) -> tuple[str, int | None]:
    """``"sharded:64"`` -> ``("sharded", 64)`` (``"sharded_trigger:64"`` alike); any other
    strategy -> ``(name, None)``."""
    if isinstance(value, str) and value.startswith(("sharded:", "sharded_trigger:")):
        name, count = (part.strip() for part in value.split(":", 1))
        if not count.isdigit():
            raise ConfigurationError(f"{what}: expected '{name}:N' with N a number of shards, not {value!r}")
        return name, check_shards(int(count), what)
    return check_strategy(value, what), None


def configured_strategy(counter: Any) -> str:
    """Answer which strategy is in force for ``counter`` now.

    ``counter`` is the attribute (``User.question_count``) or its name
    (``"User.question_count"``). The answer follows the precedence of the
    configuration: an override, else the counter's ``strategy=``, else
    ``default_strategy``, else ``"bulk"``. Raises
    :class:`~countercache.CounterCacheError` when ``counter`` is not a
    counter (or its name is declared by several classes).
    """
    return _registry.lookup(counter).strategy()


def _override(found: dict[str, Any], counter: CounterCache) -> Any:
    """The override for ``counter``: its own class's name, else the nearest base's (an
    abstract base or a mixin that declares the counter for several classes)."""
    if not found:
        return None
    value = found.get(counter.name)
    if value is None and counter.cls is not None:
        for base in counter.cls.__mro__[1:]:
            value = found.get(f"{base.__name__}.{counter.key}")
            if value is not None:
                break
    return value


def resolve(counter: CounterCache) -> str:
    """The strategy in force for ``counter`` under the current configuration."""
    override = _override(_config.overrides, counter)
    if override is not None:
        return override  # type: ignore[no-any-return]
    return counter.declared_strategy or _config.default_strategy or DEFAULT_STRATEGY


def resolve_shards(counter: CounterCache) -> int:
    """How many shards a ``sharded`` counter spreads over now."""
    return (_override(_config.shard_overrides, counter) or counter.declared_shards
            or _config.default_shards or DEFAULT_SHARDS)


def _check_override_names_counter(key: str) -> None:
    class_name, attr = key.split(".")
    if class_name in _registry.class_names():
        if not _registry.by_name(key):
            owner = _inherited_from(class_name, attr)
            if owner is not None:
                raise ConfigurationError(
                    f"override {key}: {class_name} inherits the counter {attr!r} of {owner} (one column, one "
                    f"strategy): name the class that declares it, {owner}.{attr}")
            raise ConfigurationError(
                f"override {key}: class {class_name} has no counter {attr!r}; "
                f"its counters are {', '.join(_registry.counter_names(class_name)) or 'none'}"
            )
        return
    # a base class (abstract, a mixin) of mapped classes with counters: it must declare this one
    inherited = {str(c.key) for c in _registry.all_counters() if c.cls is not None
                 and any(base.__name__ == class_name for base in c.cls.__mro__[1:])}
    if inherited and attr not in inherited:
        raise ConfigurationError(
            f"override {key}: the classes that inherit from {class_name} have no counter {attr!r}; "
            f"theirs are {', '.join(sorted(inherited))}"
        )


def _inherited_from(class_name: str, attr: str) -> str | None:
    """The name of the class whose counter ``attr`` a mapped subclass called ``class_name`` shares."""
    for counter in _registry.all_counters():
        if counter.cls is None or str(counter.key) != attr:
            continue
        below = list(counter.cls.__subclasses__())
        while below:
            sub = below.pop()
            if sub.__name__ == class_name:
                return counter.cls.__name__
            below.extend(sub.__subclasses__())
    return None


def check_overrides_for(class_name: str) -> None:
    """Called when a class's counters become known: validate overrides naming it."""
    for key in _config.overrides:
        if key.split(".")[0] == class_name:
            _check_override_names_counter(key)


def warn_unknown_overrides() -> None:
    """Every mapper known is configured (``after_configured``): warn, once per
    configuration, of an override whose class part names no mapped class and no
    base of a class with counters (a misspelt name would otherwise be ignored
    for good; the class may still be imported later, so a warning, not an error)."""
    if not _config.overrides:
        return
    known = _registry.class_names() | {base.__name__ for c in _registry.all_counters() if c.cls is not None
                                       for base in c.cls.__mro__[1:]}
    for key in _config.overrides:
        class_name = key.split(".")[0]
        if class_name not in known and (_config.generation, key) not in _warned:
            _warned.add((_config.generation, key))
            warnings.warn(CounterCacheWarning(
                f"override {key}: no mapped class is named {class_name!r} (classes with counters: "
                f"{', '.join(sorted(c for c in _registry.class_names() if _registry.counter_names(c))) or 'none'}); "
                "it applies to nothing until such a class is mapped"), stacklevel=2)


#: (configuration generation, override key) already warned of
_warned: set[tuple[int, str]] = set()


def _reset() -> None:
    _config.default_strategy = None
    _config.default_shards = None
    _config.overrides = {}
    _config.shard_overrides = {}
    _config.generation += 1
