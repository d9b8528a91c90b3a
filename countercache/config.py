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

if TYPE_CHECKING:
    from .declaration import CounterCache

__all__ = ["configure", "configure_from_file", "configured_strategy", "STRATEGIES"]

#: The strategies this version implements, in the order the docs present them.
STRATEGIES: tuple[str, ...] = ("bulk", "per_row", "deferred")

DEFAULT_STRATEGY = "bulk"
SECTION = "countercache"


class _Config:
    __slots__ = ("default_strategy", "overrides", "generation")

    def __init__(self) -> None:
        self.default_strategy: str | None = None
        self.overrides: dict[str, str] = {}
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


def configure(
    default_strategy: str | None = None,
    overrides: Mapping[str, str] | None = None,
) -> None:
    """Replace the whole configuration.

    :param default_strategy: the strategy of counters that name none
        themselves (``"bulk"`` when not given).
    :param overrides: ``{"Class.attribute": strategy}``; wins over
        everything, the model's own ``strategy=`` included.

    Calling it with no arguments restores the defaults. It may come before or
    after the models' mappers are configured and takes effect for the next
    flush. An unknown strategy raises :class:`~countercache.CounterCacheError`
    at once; an override naming no counter raises as soon as its class is
    known (now, if the class is already declared; otherwise when its mapper
    is configured). Nothing changes when it raises.
    """
    if default_strategy is not None:
        check_strategy(default_strategy, "default_strategy")
    checked: dict[str, str] = {}
    for key, value in (overrides or {}).items():
        if not isinstance(key, str) or key.count(".") != 1:
            raise ConfigurationError(
                f"override {key!r}: expected 'Class.attribute', for example "
                "'User.question_count'"
            )
        checked[key] = check_strategy(value, f"override {key}")
    for key in checked:
        _check_override_names_counter(key)
    if checked:
        from .declaration import _install

        _install()  # so that classes declared later are checked against the overrides
    _config.default_strategy = default_strategy
    _config.overrides = checked
    _config.generation += 1


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
    configure(default_strategy=default, overrides=items)


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
    _config.overrides = {}
    _config.generation += 1
