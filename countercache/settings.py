"""``configure()`` and ``configure_from_file()``: replacing the configuration.

The configuration's state, its precedence rules and the list of strategy
names are :mod:`countercache.config`; these two public calls validate a new
configuration against the counters already known, install the library's
listeners when an override must be checked against classes declared later,
and then replace the configuration at once.
"""

from __future__ import annotations

from typing import Any

import configparser
import os
from collections.abc import Mapping

from . import _registry, config
from .errors import ConfigurationError
from .installation import _install
from .sidetable import check_shardable, check_shards
from .strategies import STRATEGY_CLASSES

__all__ = ["configure", "configure_from_file"]

SECTION = "countercache"


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
        config.check_strategy(default_strategy, "default_strategy")
    if default_shards is not None:
        check_shards(default_shards, "default_shards")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigurationError(f"overrides must be a mapping {{'Class.attribute': strategy}}, "
                                 f"not {type(overrides).__name__}")
    checked: dict[str, str] = {}
    shard_counts: dict[str, int] = {}
    for key, value in (overrides or {}).items():
        if not isinstance(key, str) or key.count(".") != 1:
            raise ConfigurationError(
                f"override {key!r}: expected 'Class.attribute', for example "
                "'User.question_count'"
            )
        checked[key], count = config._split(value, f"override {key}")
        if count is not None:
            shard_counts[key] = count
    for key in checked:
        config._check_override_names_counter(key)
    _check_sharded(default_strategy, checked)
    leaving = _check_database_kept(default_strategy, checked)
    if checked:
        _install()  # so that classes declared later are checked against the overrides
    config._config.default_strategy = default_strategy
    config._config.default_shards = default_shards
    config._config.overrides = checked
    config._config.shard_overrides = shard_counts
    config._config.generation += 1
    if checked and _registry.all_counters() and all(c.mapper is not None and c.mapper.configured
                                                    for c in _registry.all_counters()):
        config.warn_unknown_overrides()  # (the mappers are configured already: now, not at their configuration)
    if leaving:  # (their triggers must be gone: asked again at their next flush)
        from .strategies.trigger import forget_verified

        forget_verified()


def _check_database_kept(default_strategy: str | None, overrides: dict[str, str]) -> list[Any]:
    """Counters whose ``where=``/``sum=`` only SQL evaluates stay ``trigger``; the
    counters leaving ``trigger`` are returned (their triggers must be gone
    before an ORM strategy counts them too: checked at their next flush)."""
    leaving = []
    for counter in _registry.all_counters():
        if counter.parent is None:
            continue
        strategy = (config._override(overrides, counter) or counter.declared_strategy or default_strategy
                    or config.DEFAULT_STRATEGY)
        if strategy in config.DATABASE_STRATEGIES:
            continue
        if counter.unevaluable is not None:
            raise ConfigurationError(f"{counter.unevaluable} (strategy {strategy!r} would evaluate it)")
        if counter.strategy() in config.DATABASE_STRATEGIES:
            leaving.append(counter)
    return leaving


def _check_sharded(default_strategy: str | None, overrides: dict[str, str]) -> None:
    """Counters already resolved that the new configuration would shard must be able to."""
    for counter in _registry.all_counters():
        if counter.parent is None:
            continue
        override = config._override(overrides, counter)
        strategy = override or counter.declared_strategy or default_strategy
        if strategy is not None and STRATEGY_CLASSES[strategy].uses_shard_table:
            where = f"override {counter.name}" if override else (
                counter.name if counter.declared_strategy else f"default_strategy for {counter.name}")
            check_shardable(counter, where, need_table=True, strategy=strategy)


def configure_from_file(path: str | os.PathLike[str]) -> None:
    """Configure from the ``[countercache]`` section of an ini file.

    ``default_strategy = ...`` sets the default; every other key is an
    override (``User.question_count = per_row``). A missing file or section is
    an error; like :func:`configure`, the file replaces the configuration.
    """
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep "User.question_count" as written
    try:
        if not parser.read(path):
            raise ConfigurationError(f"{os.fspath(path)}: cannot read the file")
    except configparser.Error as exc:  # (no section header, a key given twice...): its first line
        raise ConfigurationError(f"{os.fspath(path)}: {str(exc).splitlines()[0]}") from None
    if not parser.has_section(SECTION):
        raise ConfigurationError(f"{os.fspath(path)}: no [{SECTION}] section")
    items = dict(parser.items(SECTION))
    default = items.pop("default_strategy", None)
    shards = items.pop("default_shards", None)
    if shards is not None and not shards.strip().isdigit():
        raise ConfigurationError(f"{os.fspath(path)}: default_shards must be a number, not {shards!r}")
    configure(default_strategy=default, overrides=items,
              default_shards=int(shards) if shards is not None else None)
