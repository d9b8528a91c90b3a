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
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import _registry
from .errors import ConfigurationError
from .sidetable import DEFAULT_SHARDS, check_shardable, check_shards

if TYPE_CHECKING:
    from .declaration import CounterCache

__all__ = ["configure", "configure_from_file", "configured_strategy", "STRATEGIES"]

#: The strategies this version implements, in the order the docs present them.
STRATEGIES: tuple[str, ...] = ("bulk", "per_row", "deferred", "sharded")

DEFAULT_STRATEGY = "bulk"
SECTION = "countercache"


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
    if name not in STRATEGIES:
        raise ConfigurationError(
            f"{what}: unknown strategy {name!r}; valid choices are "
            + ", ".join(repr(s) for s in STRATEGIES)
        )
    return name


def _split(value: Any, what: str) -> tuple[str, int | None]:
    """``"sharded:64"`` -> ``("sharded", 64)``; any other strategy -> ``(name, None)``."""
    if isinstance(value, str) and value.startswith("sharded:"):
        count = value.split(":", 1)[1].strip()
        if not count.isdigit():
            raise ConfigurationError(f"{what}: expected 'sharded:N' with N a number of shards, not {value!r}")
        return "sharded", check_shards(int(count), what)
    return check_strategy(value, what), None


def configure(
    default_strategy: str | None = None,
    overrides: Mapping[str, str] | None = None,
    *,
    default_shards: int | None = None,
) -> None:
    """Replace the whole configuration.

    :param default_strategy: the strategy of counters that name none
        themselves (``"bulk"`` when not given).
    :param overrides: ``{"Class.attribute": strategy}``; wins over
        everything, the model's own ``strategy=`` included. ``"sharded:64"``
        also sets that counter's number of shards.
    :param default_shards: shards of ``sharded`` counters that set none
        themselves (16 when not given).

    Calling it with no arguments restores the defaults. It may come before or
    after the models' mappers are configured and takes effect for the next
    flush. An unknown strategy raises :class:`~countercache.CounterCacheError`
    at once; an override naming no counter raises as soon as its class is
    known (now, if the class is already declared; otherwise when its mapper
    is configured). Nothing changes when it raises.
    """
    if default_strategy is not None:
        check_strategy(default_strategy, "default_strategy")
    if default_shards is not None:
        check_shards(default_shards, "default_shards")
    checked: dict[str, str] = {}
    shard_counts: dict[str, int] = {}
    for key, value in (overrides or {}).items():
        if not isinstance(key, str) or key.count(".") != 1:
            raise ConfigurationError(
                f"override {key!r}: expected 'Class.attribute', for example "
                "'User.question_count'"
            )
        checked[key], count = _split(value, f"override {key}")
        if count is not None:
            shard_counts[key] = count
    for key in checked:
        _check_override_names_counter(key)
    _check_sharded(default_strategy, checked)
    if checked:
        from .declaration import _install

        _install()  # so that classes declared later are checked against the overrides
    _config.default_strategy = default_strategy
    _config.default_shards = default_shards
    _config.overrides = checked
    _config.shard_overrides = shard_counts
    _config.generation += 1


def _check_sharded(default_strategy: str | None, overrides: dict[str, str]) -> None:
    """Counters already resolved that the new configuration would shard must be able to."""
    for counter in _registry.all_counters():
        if counter.parent is None:
            continue
        strategy = overrides.get(counter.name) or counter.declared_strategy or default_strategy
        if strategy == "sharded":
            where = f"override {counter.name}" if counter.name in overrides else (
                counter.name if counter.declared_strategy else f"default_strategy for {counter.name}")
            check_shardable(counter, where, need_table=True)


def configure_from_file(path: str | os.PathLike[str]) -> None:
    """Configure from the ``[countercache]`` section of an ini file.

    ``default_strategy = ...`` sets the default; every other key is an
    override (``User.question_count = per_row``). A missing file or section is
    an error; like :func:`configure`, the file replaces the configuration.
    """
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep "User.question_count" as written
    if not parser.read(path):
        raise ConfigurationError(f"{os.fspath(path)}: cannot read the file")
    if not parser.has_section(SECTION):
        raise ConfigurationError(f"{os.fspath(path)}: no [{SECTION}] section")
    items = dict(parser.items(SECTION))
    default = items.pop("default_strategy", None)
    shards = items.pop("default_shards", None)
    if shards is not None and not shards.strip().isdigit():
        raise ConfigurationError(f"{os.fspath(path)}: default_shards must be a number, not {shards!r}")
    configure(default_strategy=default, overrides=items,
              default_shards=int(shards) if shards is not None else None)


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


def resolve(counter: CounterCache) -> str:
    """The strategy in force for ``counter`` under the current configuration."""
    override = _config.overrides.get(counter.name)
    if override is not None:
        return override
    return counter.declared_strategy or _config.default_strategy or DEFAULT_STRATEGY


def resolve_shards(counter: CounterCache) -> int:
    """How many shards a ``sharded`` counter spreads over now."""
    return (_config.shard_overrides.get(counter.name) or counter.declared_shards
            or _config.default_shards or DEFAULT_SHARDS)


def _check_override_names_counter(key: str) -> None:
    class_name, attr = key.split(".")
    if class_name in _registry.class_names() and not _registry.by_name(key):
        raise ConfigurationError(
            f"override {key}: class {class_name} has no counter {attr!r}; "
            f"its counters are {', '.join(_registry.counter_names(class_name)) or 'none'}"
        )


def check_overrides_for(class_name: str) -> None:
    """Called when a class's counters become known: validate overrides naming it."""
    for key in _config.overrides:
        if key.split(".")[0] == class_name:
            _check_override_names_counter(key)


def _reset() -> None:
    _config.default_strategy = None
    _config.default_shards = None
    _config.overrides = {}
    _config.shard_overrides = {}
    _config.generation += 1
