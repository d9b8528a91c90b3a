"""Autogenerate: a counter column added by a migration comes with its backfill.

One comparator, run after Alembic's own (it reads the operations they produced):

* for every ``add_column`` of a column whose ``info["countercache"]`` holds a
  :class:`~countercache.CounterCache`, it appends
  ``op.backfill_counter(...)`` with ``parent_key`` written out, so that the
  migration also runs offline (``--sql``);
* for every counter whose column already exists, it compares its ``where_sql`` /
  ``sum_sql`` (SQL text, ``None`` for a plain count) with the ``where=`` and ``sum=`` of
  the last ``op.backfill_counter(table, column, ...)`` in the ``upgrade()`` of the
  revisions from head down (never backfilled: neither); when they differ it appends a
  new backfill, and the downgrade ends with one using the recorded ``where=`` / ``sum=``;
* for every ``drop_column`` of a column that the latest recorded backfill
  filled (a counter removed from the models), the downgrade re-adds the
  column and then backfills it as that call did;
* ``trigger`` counters: their triggers' creates and drops (:mod:`.trigger_compare`); the
  side table's pending deltas, when a migration ends their use (:mod:`.shard_compare`).

Earlier migrations are read by :mod:`.history`; the downgrade's backfills come from a
:class:`~.operations.RestoreCounterOp` first in the upgrade (last in the downgrade). A new
table's plain count gets no backfill; its ``where=``/``sum=`` counters' record their
definitions. The backfills end the upgrade (outside any ``batch_alter_table``).

The comparator is switched on two ways, which may be combined:

* ``context.configure(..., autogenerate_plugins=["alembic.autogenerate.*",
  "countercache"])`` (Alembic 1.18+; the package publishes this module
  under the name ``countercache`` in the ``alembic.plugins`` entry-point
  group). Name Alembic's own comparators too: the list replaces the
  default ``["alembic.autogenerate.*"]``;
* ``import countercache.alembic`` (any Alembic version): :func:`install`
  registers it in Alembic's global comparators. ``"~countercache"`` in
  ``autogenerate_plugins`` switches this one off as well.

Both together still give one backfill per counter: a backfill already in
the upgrade for the same column is not added twice.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData, inspect
from sqlalchemy.sql.elements import ClauseElement

from .._compat import alembic_plugins, dispatcher_registry, make_plugin_entry_point
from ..declaration import CounterCache
from ..errors import CounterCacheError
from ..sidetable import TABLE_NAME
from .history import UNKNOWN, recorded_backfills

if TYPE_CHECKING:
    # Not at run time: Alembic imports this module (its plugin entry point)
    # while Alembic itself is still half-imported; alembic.operations and
    # .operations are imported when the comparator runs.
    from alembic.autogenerate.api import AutogenContext
    from alembic.operations import ops
    from alembic.runtime.plugins import Plugin
    from sqlalchemy import Column

    from .history import Key, RecordedBackfill
    from .operations import BackfillCounterOp

__all__ = ["compare_counters", "install", "setup", "uninstall"]

log = logging.getLogger(__name__)

PLUGIN_NAME = "countercache"


# -- the comparator ---------------------------------------------------------


def compare_counters(autogen_context: AutogenContext, upgrade_ops: ops.UpgradeOps) -> Any:
    """Append the backfills this migration needs to ``upgrade_ops``, and let
    its downgrade restore the counters it changes or removes."""
    metadata = autogen_context.metadata
    if metadata is None:
        return _continue()
    metadatas = [metadata] if isinstance(metadata, MetaData) else list(metadata)
    counters = [
        (col, col.info["countercache"])
        for md in metadatas
        for tbl in md.tables.values()
        for col in tbl.columns
        if isinstance(col.info.get("countercache"), CounterCache)
    ]
    history = _History(autogen_context)
    if counters:
        _added_or_changed(autogen_context, upgrade_ops, counters, history)
    from .shard_compare import compare_side_table  # (these import Alembic's operations: not at plugin load)
    from .trigger_compare import compare_triggers

    def backfill(col: Column[Any], d: CounterCache) -> BackfillCounterOp:
        return _backfill_for(col, d, *_texts(d, autogen_context.dialect))
    compare_triggers(autogen_context, upgrade_ops, counters, backfill)
    compare_side_table(autogen_context, upgrade_ops, counters, backfill)
    _removed(upgrade_ops, {(c.table.schema, c.table.name, c.name) for c, _ in counters}, history)
    return _continue()


class _History:
    """The backfills earlier migrations recorded, read once, when first needed."""

    def __init__(self, autogen_context: AutogenContext) -> None:
        self._context = autogen_context
        self._found: dict[Key, RecordedBackfill] | None = None

    def get(self, key: Key) -> RecordedBackfill | None:
        if self._found is None:
            self._found = recorded_backfills(self._context)
        return self._found.get(key)


def _added_or_changed(
    autogen_context: AutogenContext, upgrade_ops: ops.UpgradeOps,
    counters: list[tuple[Column[Any], CounterCache]], history: _History,
) -> None:
    from alembic.operations import ops

    from .operations import BackfillCounterOp

    # where=/sum= (and their SQL text) are resolved when mappers are configured
    from sqlalchemy.orm import configure_mappers

    configure_mappers()

    present = {op.key for op in _walk(upgrade_ops) if isinstance(op, BackfillCounterOp)}
    added = {
        (op.schema, op.table_name, op.column.name)
        for op in _walk(upgrade_ops)
        if isinstance(op, ops.AddColumnOp)
    }
    created = {
        (op.schema, op.table_name) for op in _walk(upgrade_ops) if isinstance(op, ops.CreateTableOp)
    }
    dialect = autogen_context.dialect
    existing: dict[tuple[str | None, str], set[str]] = {}

    for col, definition in counters:
        key = (col.table.schema, col.table.name, col.name)
        where, sum_ = _texts(definition, dialect) if key not in present else (None, None)
        if key in present or (key[:2] in created and where is None and sum_ is None):
            continue  # (a new table's where=/sum= counter: its backfill records the definition for later)
        before: tuple[Any, Any] | None = None
        if key not in added and key[:2] not in created:
            if key[:2] not in existing:
                existing[key[:2]] = _db_columns(autogen_context, *key[:2])
            if col.name not in existing[key[:2]]:
                continue  # not in the database and not added: filtered out by env.py
            call = history.get(key)
            before = call.definition if call is not None else (None, None)
            if (_norm(before[0]), _norm(before[1])) == (_norm(where), _norm(sum_)):
                continue
        op = _backfill_for(col, definition, where, sum_)
        upgrade_ops.ops.append(op)
        present.add(key)
        log.info("Detected counter %s: backfill %s.%s", definition.name, key[1], key[2])
        if before is not None:  # changed: the downgrade backfills with the previous where=/sum=
            if UNKNOWN in before:
                log.warning("counter %s: its previous where=/sum= is not a literal; the downgrade "
                            "cannot restore its values (run countercache reconcile after it)",
                            definition.name)
                continue
            previous = op.with_definition(where=before[0], sum=before[1])
            what = ", ".join(f"{k}={v!r}" for k, v in zip(("where", "sum"), before) if v is not None)
            _restore_on_downgrade(upgrade_ops, previous, "backfilled again with its previous "
                                  f"definition ({what or 'a plain count'})")
            op.downgrade_note = "the previous definition's values are restored below"


def _removed(upgrade_ops: ops.UpgradeOps, counters: set[Key], history: _History) -> None:
    """A counter column dropped: the downgrade re-adds it, then backfills it as recorded."""
    from alembic.operations import ops

    from .operations import BackfillCounterOp, RestoreCounterOp

    restored = {op.key for op in _walk(upgrade_ops) if isinstance(op, RestoreCounterOp)}
    for op in list(_walk(upgrade_ops)):
        if not isinstance(op, ops.DropColumnOp):
            continue
        key = (op.schema, op.table_name, op.column_name)
        call = history.get(key)
        if call is None or key in counters or key in restored:
            continue  # not a counter backfilled by a migration, or still declared
        if not call.literal:
            log.warning("counter column %s.%s: its last backfill_counter() call has arguments that "
                        "are not literals; the downgrade re-adds it as 0 (run countercache reconcile "
                        "after it)", key[1], key[2])
            continue
        backfill = BackfillCounterOp(*call.args, **call.kwargs)
        _restore_on_downgrade(upgrade_ops, backfill, "re-added, then backfilled as the last "
                              "migration that backfilled it did")
        restored.add(key)


def _restore_on_downgrade(upgrade_ops: ops.UpgradeOps, backfill: BackfillCounterOp, how: str) -> None:
    """Put ``backfill`` at the end of the downgrade, after the schema is back.

    The downgrade is the upgrade's operations reversed, in reverse order: a
    :class:`~.operations.RestoreCounterOp` first in the upgrade (a ``pass``
    there) is last in the downgrade, where it is ``backfill``.
    """
    from .operations import RestoreCounterOp

    upgrade_ops.ops.insert(0, RestoreCounterOp(backfill, f"downgrade: {backfill.table_name}."
                                                          f"{backfill.column_name} {how}"))


def _backfill_for(
    col: Column[Any], definition: CounterCache, where: str | None, sum_: str | None
) -> BackfillCounterOp:
    from .operations import BackfillCounterOp

    mapper = definition.mapper
    if mapper is None:
        raise CounterCacheError(
            f"countercache autogenerate: column {col.table.name}.{col.name} carries a counter "
            "that is not mapped to a class"
        )
    path = definition.relationship.split(".")
    prop = mapper.relationships[path[0]]
    # many-to-many counts the association table's rows that refer to the parent
    pairs = list(prop.synchronize_pairs if prop.secondary is not None else prop.local_remote_pairs)
    child = pairs[0][1].table
    keys = [local.name for local, _ in pairs]
    fks = [remote.name for _, remote in pairs]
    through = None
    if len(path) == 2:  # multi-level: the leaves, joined to the middle rows
        leaf_pairs = list(prop.mapper.relationships[path[1]].local_remote_pairs)
        through = (child.name, leaf_pairs[0][0].name, fks[0])  # type: ignore[attr-defined]
        child = leaf_pairs[0][1].table
        fks = [remote.name for _, remote in leaf_pairs]
    return BackfillCounterOp(
        col.table.name,
        col.name,
        child.name,  # type: ignore[attr-defined]
        fks[0] if len(fks) == 1 else tuple(fks),
        where=where,
        sum=sum_,
        parent_key=keys[0] if len(keys) == 1 else tuple(keys),
        schema=col.table.schema,
        shards=TABLE_NAME in col.table.metadata.tables,
        through=through,
    )


def _texts(definition: CounterCache, dialect: Any) -> tuple[str | None, str | None]:
    """(where, sum) rendered in the migration's dialect (MariaDB quotes names with backticks, escapes backslashes)."""
    return tuple(_sql(_first(getattr(definition, f"{w}_clause", None), getattr(definition, f"{w}_sql", None)),
                      dialect) for w in ("where", "sum"))  # type: ignore[return-value]


def _walk(container: ops.OpContainer) -> Any:
    from alembic.operations import ops

    for op in container.ops:
        yield op
        if isinstance(op, ops.OpContainer):
            yield from _walk(op)


def _db_columns(autogen_context: AutogenContext, schema: str | None, name: str) -> set[str]:
    insp = inspect(autogen_context.connection)
    if not insp.has_table(name, schema=schema):
        return set()
    return {c["name"] for c in insp.get_columns(name, schema=schema)}


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _sql(value: Any, dialect: Any) -> str | None:
    """A counter's where/sum as SQL text (``None`` when it has none)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, ClauseElement):  # as the server reads it (literal_binds doubles % for format paramstyles)
        sql = str(value.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        return sql.replace("%%", "%") if dialect.paramstyle in ("format", "pyformat") else sql
    raise CounterCacheError(f"countercache autogenerate: cannot render {value!r} as SQL text")


def _norm(sql: str | None) -> str | None:
    return None if sql is None else re.sub(r"\s+", " ", sql).strip()


# -- registration -----------------------------------------------------------


def _priority() -> Any:
    from alembic.util import DispatchPriority

    return DispatchPriority.LAST


def _continue() -> Any:
    try:
        from alembic.util import PriorityDispatchResult
    except ImportError:  # Alembic < 1.18
        return None
    return PriorityDispatchResult.CONTINUE


def setup(plugin: Plugin) -> None:
    """Alembic 1.18+ plugin entry point (``alembic.plugins`` group, name
    ``countercache``; this module, which Alembic 1.18.0 to 1.20.0 iterate
    over: see :func:`countercache._compat.make_plugin_entry_point`).

    Alembic calls it while it is itself still being imported, so the package
    was imported without its registrations (see ``countercache/alembic/__init__.py``);
    it is forgotten here so that the next ``import countercache.alembic``
    runs them.

    It runs inside ``import alembic``: an error here would fail every
    alembic command, so one (an Alembic whose plugin API changed) is a
    warning instead, and autogenerate writes no backfills through the plugin.
    """
    package = sys.modules.get(__package__ or "")
    if package is not None and getattr(package, "_deferred", False):
        del sys.modules[package.__name__]
        parent = sys.modules.get(package.__name__.rpartition(".")[0])
        if parent is not None and getattr(parent, "alembic", None) is package:
            delattr(parent, "alembic")
    try:
        plugin.add_autogenerate_comparator(compare_counters, "autogenerate", priority=_priority())
    except Exception as exc:  # noqa: BLE001 - never break alembic
        warnings.warn(
            f"countercache: its Alembic plugin could not register with this Alembic ({exc!r}); "
            "autogenerate writes no counter backfills through it",
            RuntimeWarning, stacklevel=2,
        )


def _global_comparator(autogen_context: AutogenContext, upgrade_ops: ops.UpgradeOps, *rest: Any) -> Any:
    plugins = autogen_context.migration_context.opts.get("autogenerate_plugins") or ()
    if f"~{PLUGIN_NAME}" in plugins:
        return _continue()
    return compare_counters(autogen_context, upgrade_ops)


_installed: list[tuple[Any, tuple[Any, ...]]] = []


def install() -> None:
    """Register the comparator in Alembic's global comparators (idempotent).

    Global: every autogenerate run in this process adds counters' backfills
    (unless its ``autogenerate_plugins`` holds ``"~countercache"``);
    :func:`uninstall` takes it back.
    """
    if _installed:
        return
    from alembic.autogenerate import comparators

    try:
        key: tuple[Any, ...] = ("autogenerate", "default", _priority())
        comparators.dispatch_for("autogenerate", priority=_priority())(_global_comparator)
        entry: Any = (_global_comparator, None)
    except ImportError:  # pragma: no cover - Alembic < 1.18: a list-valued Dispatcher
        # "schema" comparators run in registration order, after Alembic's tables
        comparators.dispatch_for("schema")(_global_comparator)
        key = ("schema", "default")
        entry = _global_comparator
    _installed.append((entry, key))


def uninstall() -> None:
    """Remove what :func:`install` registered."""
    from alembic.autogenerate import comparators

    while _installed:
        entry, key = _installed.pop()
        registered = dispatcher_registry(comparators).get(key)
        if isinstance(registered, list) and entry in registered:
            registered.remove(entry)


def _register_plugin_without_entry_point() -> None:
    """Alembic 1.18+, package not installed (no entry point): register the plugin here."""
    found = alembic_plugins()
    if found is None:  # pragma: no cover - Alembic < 1.18
        return
    Plugin, _all_plugins = found
    from importlib import metadata

    if PLUGIN_NAME in _all_plugins:
        return
    if any(ep.name == PLUGIN_NAME for ep in metadata.entry_points(group="alembic.plugins")):
        return  # Alembic loads it (or is loading it) through the entry point
    Plugin.setup_plugin_from_module(sys.modules[__name__], PLUGIN_NAME)


# what the alembic.plugins entry point loads, on every Alembic 1.18+
make_plugin_entry_point(__name__)
