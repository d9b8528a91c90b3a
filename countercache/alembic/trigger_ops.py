"""``op.create_counter_trigger()`` / ``op.drop_counter_trigger()``: a ``trigger``
counter's triggers in a migration.

Both take the counter's definition as :func:`op.backfill_counter
<countercache.alembic.operations.BackfillCounterOp>` does, as plain values
(names, and ``where=`` / ``sum=`` as SQL text over the child table's columns,
as ``CounterCache.where_sql`` records them), so that a migration does not
depend on the models as they are later::

    op.create_counter_trigger('users', 'open_count', 'questions', 'user_id',
                              where="questions.state = 'open'", parent_key='id')

At upgrade time the tables are reflected with the migration's connection,
the triggers generated for its database (:mod:`countercache.triggers`, the
same DDL as ``create_all()`` makes from the declaration, with the same
refusals) and run. Each is the other's ``reverse()``. The trigger names carry
a hash of the definition (:func:`countercache.triggers.base_name`): a
definition changed while staying ``trigger`` is a drop of the previous
triggers and a create of the new ones.

``strategy="sharded_trigger", shards=N`` (both ops; ``"trigger"`` by default)
stands for a ``sharded_trigger`` counter: its triggers write the side table
``countercache_shards``, which must exist, and are named after the shard
count too (as ``create_all()`` names them). Its backfill (``backfill=True``)
also deletes the counter's shard rows (``op.backfill_counter(...,
shards=True)``: the recount holds what they were pending, e.g. the rows of a
previous ``sharded`` strategy). Dropping them by definition then recounts the
column the same way: the pending deltas would be folded by nothing else.

``op.drop_counter_trigger(child_table=..., name=...)`` drops by the recorded
base name (what autogenerate writes for triggers whose counter is no longer
declared and whose definition no migration recorded): its reverse cannot
create them again and renders as a ``pass`` saying so.

Offline (``--sql``) the statements are printed; the tables are not
reflected then (``parent_key=`` is required, the key and counter columns
are taken as integers, and the refusals that depend on foreign key actions
are not checked).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from alembic.autogenerate.render import renderers
from alembic.operations import MigrateOperation, Operations
from sqlalchemy import Column, ForeignKeyConstraint, Integer, MetaData, Table, inspect
from sqlalchemy.exc import NoSuchTableError

from .. import triggers
from .._execute import schema_translation
from ..errors import ConfigurationError, CounterCacheError
from ..sidetable import TABLE_NAME, check_shards, shard_table
from ..strategies.trigger import forget_verified
from ..trigger_sql import through_variant
from ..trigger_text import TextCounter
from .operations import IMPORT, BackfillCounterOp

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext

__all__ = ["CreateCounterTriggerOp", "DropCounterTriggerOp", "KeepDroppedTriggerOp", "STRATEGIES"]

#: The strategies whose triggers a migration creates and drops (``strategy=``).
STRATEGIES = ("trigger", "sharded_trigger")



def _names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


class _TriggerOp(MigrateOperation):
    def __init__(self, table_name: str | None = None, column_name: str | None = None,
                 child_table: str | None = None, child_fk: str | Sequence[str] | None = None, *,
                 where: str | None = None, sum: str | None = None, parent_key: str | Sequence[str] | None = None,
                 schema: str | None = None, name: str | None = None, strategy: str = "trigger",
                 shards: int | None = None, through: Sequence[str] | None = None) -> None:
        self.table_name, self.column_name, self.child_table, self.child_fk = table_name, column_name, child_table, child_fk
        self.through = None if through is None else tuple(through)
        if self.through is not None and (len(self.through) != 3 or len(_names(child_fk)) > 1
                                         or len(_names(parent_key)) > 1):
            raise CounterCacheError(f"{self.what}: through= is (middle_table, middle_key, middle_fk), with "
                                    "one-column keys")
        if self.through is not None and strategy == "sharded_trigger":
            raise CounterCacheError(f"{self.what}: a multi-level counter (through=) takes no strategy "
                                    "'sharded_trigger'")
        self.where, self.sum, self.parent_key, self.schema, self.name = where, sum, parent_key, schema, name
        if strategy not in STRATEGIES:
            raise CounterCacheError(f"{self.what}: strategy= is one of {', '.join(map(repr, STRATEGIES))}, "
                                    f"not {strategy!r}")
        if strategy == "sharded_trigger":
            check_shards(shards, f"{self.what} (sharded_trigger)")
        elif shards is not None:
            raise CounterCacheError(f"{self.what}: shards= goes with strategy='sharded_trigger'")
        self.strategy, self.shards = strategy, shards

    @property
    def what(self) -> str:
        return f"{self.table_name}.{self.column_name}" if self.table_name else f"triggers {self.name}"

    def definition(self) -> dict[str, Any]:
        return dict(table_name=self.table_name, column_name=self.column_name, child_table=self.child_table,
                    child_fk=self.child_fk, where=self.where, sum=self.sum, parent_key=self.parent_key,
                    schema=self.schema, strategy=self.strategy, shards=self.shards, through=self.through)

    @property
    def sharded(self) -> bool:
        return self.strategy == "sharded_trigger"

    def backfill_op(self) -> BackfillCounterOp:
        """The recount of the column (``sharded_trigger``: deleting the counter's shard rows first)."""
        return BackfillCounterOp(self.table_name or "", self.column_name or "", self.child_table or "",
                                 self.child_fk or "", where=self.where, sum=self.sum, parent_key=self.parent_key,
                                 schema=self.schema, shards=self.sharded, through=self.through)

    def base(self) -> str:
        """The triggers' base name (from the definition, unless recorded)."""
        if self.name is not None:
            return self.name
        keys = _names(self.parent_key)
        if not keys:
            raise CounterCacheError(f"{self.what}: parent_key= is needed to name its triggers")
        if self.through is not None:  # (named after the middle table, as a declared multi-level counter)
            middle, middle_key, middle_fk = self.through
            return triggers.base_name(self.schema, self.table_name or "", self.column_name or "", middle,
                                      (middle_fk,), keys, self.where, self.sum,
                                      through_variant(self.child_table or "", _names(self.child_fk), (middle_key,)))
        return triggers.base_name(self.schema, self.table_name or "", self.column_name or "", self.child_table or "",
                                  _names(self.child_fk), keys, self.where, self.sum,
                                  f"sharded_trigger:{self.shards}" if self.sharded else None)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        try:
            return (type(self).__name__, self.schema, self.child_table, self.base())
        except CounterCacheError:  # no parent_key: named once the key is looked up
            return (type(self).__name__, *self.definition().values())


@Operations.register_operation("create_counter_trigger")
class CreateCounterTriggerOp(_TriggerOp):
    """Create the triggers keeping ``table.column`` = the rows of ``child_table``
    (``child_fk`` referring to ``parent_key``) matching ``where``, counted or
    summed (``sum``). Arguments as :meth:`op.backfill_counter`'s."""

    def __init__(self, table_name: str, column_name: str, child_table: str, child_fk: str | Sequence[str], *,
                 where: str | None = None, sum: str | None = None, parent_key: str | Sequence[str] | None = None,
                 schema: str | None = None, backfill: bool = False, strategy: str = "trigger",
                 shards: int | None = None, through: Sequence[str] | None = None) -> None:
        super().__init__(table_name, column_name, child_table, child_fk, where=where, sum=sum,
                         parent_key=parent_key, schema=schema, strategy=strategy, shards=shards, through=through)
        #: recount the column once the triggers exist (the reverse of a drop: the
        #: counter was kept otherwise meanwhile, by an ORM strategy or sharded)
        self.backfill = backfill

    @classmethod
    def create_counter_trigger(cls, operations: Operations, table_name: str, column_name: str, child_table: str,
                               child_fk: str | Sequence[str], *, where: str | None = None, sum: str | None = None,
                               parent_key: str | Sequence[str] | None = None, schema: str | None = None,
                               backfill: bool = False, strategy: str = "trigger", shards: int | None = None,
                               through: Sequence[str] | None = None) -> Any:
        """Create the triggers of a ``trigger`` counter, or of a ``sharded_trigger`` one
        (``strategy="sharded_trigger", shards=N``; see :mod:`countercache.alembic.trigger_ops`);
        ``backfill=True``: then recount the column, as ``op.backfill_counter`` with the same arguments
        (``sharded_trigger``: and ``shards=True``, deleting the counter's shard rows); ``through=``:
        a multi-level counter, as ``op.backfill_counter``'s."""
        return operations.invoke(cls(table_name, column_name, child_table, child_fk, where=where, sum=sum,
                                     parent_key=parent_key, schema=schema, backfill=backfill, strategy=strategy,
                                     shards=shards, through=through))

    def reverse(self) -> DropCounterTriggerOp:
        return DropCounterTriggerOp(**self.definition())


@Operations.register_operation("drop_counter_trigger")
class DropCounterTriggerOp(_TriggerOp):
    """Drop a counter's triggers: by its definition (as :class:`CreateCounterTriggerOp`'s,
    whose reverse this is), or by the recorded base ``name`` on ``child_table``."""

    @classmethod
    def drop_counter_trigger(cls, operations: Operations, table_name: str | None = None,
                             column_name: str | None = None, child_table: str | None = None,
                             child_fk: str | Sequence[str] | None = None, *, where: str | None = None,
                             sum: str | None = None, parent_key: str | Sequence[str] | None = None,
                             schema: str | None = None, name: str | None = None, strategy: str = "trigger",
                             shards: int | None = None, through: Sequence[str] | None = None) -> Any:
        """Drop the triggers of a counter (see :mod:`countercache.alembic.trigger_ops`;
        ``sharded_trigger`` by its definition: then recount the column, deleting its shard rows)."""
        return operations.invoke(cls(table_name, column_name, child_table, child_fk, where=where, sum=sum,
                                     parent_key=parent_key, schema=schema, name=name, strategy=strategy,
                                     shards=shards, through=through))

    def reverse(self) -> CreateCounterTriggerOp | KeepDroppedTriggerOp:
        if self.name is not None or None in (self.table_name, self.column_name, self.child_table, self.child_fk):
            return KeepDroppedTriggerOp(self)
        return CreateCounterTriggerOp(**self.definition(), backfill=True)  # type: ignore[arg-type]


class KeepDroppedTriggerOp(MigrateOperation):
    """The reverse of a drop by name: nothing (the definition is unknown); renders as ``pass``."""

    def __init__(self, drop: DropCounterTriggerOp) -> None:
        self.drop = drop

    def reverse(self) -> DropCounterTriggerOp:
        return self.drop

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ()


# -- Implementations -------------------------------------------------------


def _tables(operations: Operations, op: _TriggerOp) -> tuple[Table, Table, Table | None]:
    """(parent, child, the middle table of ``through=`` or None): reflected online;
    offline, built from the names (integer columns)."""
    md = MetaData()
    fks, keys = _names(op.child_fk), _names(op.parent_key)
    if operations.migration_context.as_sql:
        if not keys:
            raise CounterCacheError(f"create_counter_trigger({op.what}): parent_key= is required offline (--sql)")
        own = op.child_table == op.table_name  # self-referential: one table
        parent = Table(op.table_name, md, *(Column(n, Integer) for n in dict.fromkeys(
            (op.column_name, *keys, *(fks if own else ())))), schema=op.schema)
        referred, refs = parent, keys
        middle = None
        if op.through is not None:
            middle_name, middle_key, middle_fk = op.through
            middle = Table(middle_name, md, Column(middle_key, Integer), Column(middle_fk, Integer), schema=op.schema)
            middle.append_constraint(ForeignKeyConstraint([middle_fk], [f"{parent.fullname}.{keys[0]}"]))
            referred, refs = middle, (middle_key,)
        child = parent if own else Table(op.child_table, md, *(Column(n, Integer) for n in fks), schema=op.schema)
        child.append_constraint(ForeignKeyConstraint(list(fks), [f"{referred.fullname}.{k}" for k in refs]))
        return parent, child, middle
    bind = operations.get_bind()

    def reflected(name: str | None) -> Table:
        known = md.tables.get(f"{op.schema}.{name}" if op.schema else name or "")
        return known if known is not None else Table(name, md, schema=op.schema, autoload_with=bind)

    parent = reflected(op.table_name)
    return parent, reflected(op.child_table), None if op.through is None else reflected(op.through[0])


def _counter(operations: Operations, op: _TriggerOp) -> TextCounter:
    parent, child, middle = _tables(operations, op)
    keys = _names(op.parent_key)
    if not keys:
        keys = tuple(inspect(operations.get_bind()).get_pk_constraint(op.table_name, schema=op.schema)
                     .get("constrained_columns") or ())
    fks = _names(op.child_fk)
    if not fks or (len(fks) != len(keys) and op.through is None):
        raise CounterCacheError(f"create_counter_trigger({op.what}): child_fk {list(fks)} and parent_key "
                                f"{list(keys)} differ in length")
    dialect = operations.migration_context.dialect
    if op.sharded:  # the side table its triggers write (created by an earlier operation, or reflected)
        if operations.migration_context.as_sql:
            shard_table(parent.metadata)
        else:
            try:
                Table(TABLE_NAME, parent.metadata, autoload_with=operations.get_bind())
            except NoSuchTableError:
                raise CounterCacheError(f"create_counter_trigger({op.what}): strategy 'sharded_trigger' needs the "
                                        f"side table {TABLE_NAME}; create it first") from None
    return TextCounter(parent, op.column_name or "", child, fks, keys, op.where, op.sum,
                       backslashes=dialect.name in ("mysql", "mariadb"), add_missing=operations.migration_context.as_sql,
                       strategy=op.strategy, shards=op.shards,
                       through=None if middle is None or op.through is None else (middle, *op.through[1:]))


def _run(operations: Operations, statements: list[str]) -> None:
    ctx = operations.migration_context
    if ctx.as_sql:
        for statement in statements:
            ctx.impl.static_output(statement + ctx.impl.command_terminator)
        return
    bind = operations.get_bind()
    moved = {k: v for k, v in schema_translation(bind).items() if k != v}
    if moved:
        raise CounterCacheError(
            f"the migration's connection has a schema_translate_map ({moved}), which counter triggers do "
            "not support yet (their DDL names the tables as declared); run this migration without it")
    triggers.execute(bind, statements)
    forget_verified()


@Operations.implementation_for(CreateCounterTriggerOp)
def create_counter_trigger(operations: Operations, op: CreateCounterTriggerOp) -> None:
    """Reflect the tables, generate the triggers for the connection's database, run them."""
    try:
        counter = _counter(operations, op)
        dialect = operations.migration_context.dialect
        # (dropped first if there: a migration that failed after them on a database
        # whose DDL is not transactional, MariaDB, can run again)
        statements = triggers.drop_statements(counter, dialect) + triggers.create_statements(counter, dialect)
    except ConfigurationError as exc:
        raise CounterCacheError(f"create_counter_trigger: {exc}") from exc
    _run(operations, statements)
    if op.backfill:
        operations.invoke(op.backfill_op())


@Operations.implementation_for(DropCounterTriggerOp)
def drop_counter_trigger(operations: Operations, op: DropCounterTriggerOp) -> None:
    """Drop the triggers (and PostgreSQL's function) if they exist."""
    if op.child_table is None:
        raise CounterCacheError(f"drop_counter_trigger({op.what}): child_table= is required")
    if op.name is None and not op.parent_key and not operations.migration_context.as_sql:
        pk = inspect(operations.get_bind()).get_pk_constraint(op.table_name or "", schema=op.schema)
        op = DropCounterTriggerOp(**{**op.definition(), "parent_key": tuple(pk.get("constrained_columns") or ())})
    statements = triggers.drop_named_statements(op.base(), op.child_table, op.schema,
                                                operations.migration_context.dialect, parent=op.table_name)
    _run(operations, statements)
    if op.sharded and op.name is None:
        # its pending deltas, which no trigger adds to now: the column takes its recount, and the
        # counter's shard rows go (the lock of the recount holds the parents meanwhile)
        operations.invoke(op.backfill_op())


@Operations.implementation_for(KeepDroppedTriggerOp)
def keep_dropped_trigger(operations: Operations, op: KeepDroppedTriggerOp) -> None:
    """Nothing: the dropped triggers' definition is unknown."""


# -- Render ----------------------------------------------------------------


def _render(autogen_context: AutogenContext, name: str, op: _TriggerOp) -> str:
    if autogen_context.imports is not None:
        autogen_context.imports.add(IMPORT)
    args = [repr(getattr(op, a)) if a != "child_fk" else
            (repr(op.child_fk) if isinstance(op.child_fk, str) else repr(tuple(op.child_fk or ())))
            for a in ("table_name", "column_name", "child_table", "child_fk")]
    if op.name is not None and op.table_name is None:
        args = [f"child_table={op.child_table!r}"]
    for key in ("where", "sum", "parent_key", "schema", "name", "through"):
        value = getattr(op, key)
        if value is not None:
            args.append(f"{key}={value if isinstance(value, str) else tuple(value)!r}")
    if op.sharded:
        args.append(f"strategy='sharded_trigger', shards={op.shards!r}")
    if getattr(op, "backfill", False):
        args.append("backfill=True")
    return f"op.{name}({', '.join(args)})"


@renderers.dispatch_for(CreateCounterTriggerOp)
def render_create_counter_trigger(autogen_context: AutogenContext, op: CreateCounterTriggerOp) -> str:
    return _render(autogen_context, "create_counter_trigger", op)


@renderers.dispatch_for(DropCounterTriggerOp)
def render_drop_counter_trigger(autogen_context: AutogenContext, op: DropCounterTriggerOp) -> str:
    return _render(autogen_context, "drop_counter_trigger", op)


@renderers.dispatch_for(KeepDroppedTriggerOp)
def render_keep_dropped_trigger(autogen_context: AutogenContext, op: KeepDroppedTriggerOp) -> str:
    return (f"pass  # {op.drop.what} on {op.drop.child_table} stay dropped: their counter's definition is "
            "unknown here; recreate them with op.create_counter_trigger(...) if needed")
