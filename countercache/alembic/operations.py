"""``op.backfill_counter()``: set a counter column from the real counts.

In three parts, as Alembic custom operations usually are: the operations
(:class:`BackfillCounterOp` and its no-op reverse), their implementations,
and how autogenerate renders them into a migration file.

The backfill is one set-based statement per table::

    UPDATE users SET question_count = (
        SELECT count(*) FROM questions
        WHERE questions.user_id = users.id [AND (<where>)]
    )

(``coalesce(sum(<sum>), 0)`` in place of ``count(*)`` for a ``sum``). The
count is computed by the same statement that writes it, so there is no
read-then-write window. On PostgreSQL the statement is preceded by
``LOCK TABLE users IN EXCLUSIVE MODE`` (reads go on; writes to the parent
table wait until the migration commits): a READ COMMITTED UPDATE counts
with the snapshot taken when the statement starts, so a counter increment
committed by another transaction after that moment would otherwise be
overwritten by a count that does not include its child. Taking the lock
first makes every transaction that already moved a counter finish before
the snapshot is taken, and every later one wait and add its delta on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from alembic.autogenerate.render import renderers
from alembic.operations import MigrateOperation, Operations
from sqlalchemy import (
    and_,
    column,
    func,
    inspect,
    literal,
    literal_column,
    select,
    table,
    text,
    update,
)

from ..errors import CounterCacheError
from ..sidetable import TABLE_NAME

if TYPE_CHECKING:
    from alembic.autogenerate.api import AutogenContext

__all__ = ["BackfillCounterOp", "BackfillError", "NoOpBackfillOp", "RestoreCounterOp"]


class BackfillError(CounterCacheError):
    """``op.backfill_counter()`` cannot build its statement (names the table)."""


def _names(value: str | Sequence[str], what: str) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise BackfillError(f"backfill_counter: {what} must be a column name or a sequence of names")
    return names


# -- Operations ------------------------------------------------------------


@Operations.register_operation("backfill_counter")
class BackfillCounterOp(MigrateOperation):
    """Set ``table.column`` to the number (or sum) of its children.

    Registered as ``op.backfill_counter(table, column, child_table, child_fk,
    *, where=None, sum=None, parent_key=None, schema=None)``:

    :param table: the parent table holding the counter.
    :param column: the counter column.
    :param child_table: the table whose rows are counted.
    :param child_fk: the child's foreign-key column (a sequence of names for
        a composite key, in the order of ``parent_key``).
    :param where: SQL text over the child table's columns; only matching
        children count (``"status = 'open'"``).
    :param sum: SQL text over the child table's columns; the counter holds
        ``coalesce(sum(<sum>), 0)`` instead of ``count(*)``.
    :param parent_key: the parent's key column(s) that ``child_fk``
        references. Looked up (single-column primary key) when omitted
        online; required in offline (``--sql``) mode. Autogenerate always
        writes it.
    :param schema: the schema of both tables.
    :param through: a multi-level counter (``counter_cache("questions.answers")``):
        ``(middle_table, middle_key, middle_fk)``; ``child_fk`` then refers to
        ``middle_table.middle_key`` and ``middle_table.middle_fk`` to the
        parent's key, and the count joins the two.
    :param shards: the metadata holds the ``sharded`` strategy's side table:
        delete this counter's pending shard rows before the UPDATE (the count
        replaces them). Autogenerate writes it when the table is there.

    The reverse is :class:`NoOpBackfillOp`: the backfill of an added counter
    has nothing to undo (the column itself is dropped by the reverse of its
    ``add_column``). A migration that changes a counter's ``where=``/``sum=``
    or drops a counter column restores the previous values in its downgrade
    through a :class:`RestoreCounterOp`.
    """

    def __init__(
        self,
        table_name: str,
        column_name: str,
        child_table: str,
        child_fk: str | Sequence[str],
        *,
        where: str | None = None,
        sum: str | None = None,
        parent_key: str | Sequence[str] | None = None,
        schema: str | None = None,
        shards: bool = False,
        through: Sequence[str] | None = None,
    ) -> None:
        self.table_name = table_name
        self.shards = shards
        self.through = tuple(through) if through is not None else None
        self.column_name = column_name
        self.child_table = child_table
        self.child_fk = child_fk
        self.where = where
        self.sum = sum
        self.parent_key = parent_key
        self.schema = schema

    @classmethod
    def backfill_counter(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        child_table: str,
        child_fk: str | Sequence[str],
        *,
        where: str | None = None,
        sum: str | None = None,
        parent_key: str | Sequence[str] | None = None,
        schema: str | None = None,
        shards: bool = False,
        through: Sequence[str] | None = None,
    ) -> Any:
        """Set ``table_name.column_name`` from the real counts, in one UPDATE
        (``shards=True``: first delete the counter's pending rows of the
        ``sharded`` strategy's side table, ``countercache_shards``)."""
        return operations.invoke(
            cls(
                table_name, column_name, child_table, child_fk,
                where=where, sum=sum, parent_key=parent_key, schema=schema, shards=shards,
                through=through,
            )
        )

    #: What the downgrade's ``pass`` says in place of "nothing to undo"
    #: (autogenerate sets it when a :class:`RestoreCounterOp` restores the counter).
    downgrade_note: str | None = None

    def reverse(self) -> NoOpBackfillOp:
        return NoOpBackfillOp(self)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("backfill_counter", self.schema, self.table_name, self.column_name)

    def with_definition(self, *, where: str | None, sum: str | None) -> BackfillCounterOp:
        """The same backfill with another ``where`` / ``sum``."""
        return BackfillCounterOp(
            self.table_name, self.column_name, self.child_table, self.child_fk,
            where=where, sum=sum, parent_key=self.parent_key, schema=self.schema,
            shards=self.shards, through=self.through,
        )

    @property
    def key(self) -> tuple[str | None, str, str]:
        """``(schema, table, column)``: which counter this backfills."""
        return (self.schema, self.table_name, self.column_name)


class NoOpBackfillOp(MigrateOperation):
    """The reverse of a backfill: does nothing, renders as ``pass``.

    A ``pass`` statement (with a comment naming the counter) keeps a
    downgrade that holds nothing else valid Python.
    """

    def __init__(self, backfill: BackfillCounterOp) -> None:
        self.backfill = backfill

    def reverse(self) -> BackfillCounterOp:
        return self.backfill

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ()


class RestoreCounterOp(MigrateOperation):
    """Does nothing in the upgrade (renders as ``pass``); its reverse is ``backfill``.

    Autogenerate puts it first in the upgrade of a migration that changes a
    counter's ``where=``/``sum=`` (``backfill`` then holds the previous ones)
    or drops a counter column (``backfill`` as the last migration that
    backfilled it wrote it): the downgrade, the upgrade reversed, ends with
    ``backfill``, once the schema is back, so that the previous definition's
    values are restored.
    """

    def __init__(self, backfill: BackfillCounterOp, note: str) -> None:
        self.backfill = backfill
        self.note = note

    def reverse(self) -> BackfillCounterOp:
        return self.backfill

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("restore_counter_on_downgrade", *self.backfill.key)

    @property
    def key(self) -> tuple[str | None, str, str]:
        return self.backfill.key


# -- Implementations -------------------------------------------------------


def _statements(operations: Operations, op: BackfillCounterOp) -> list[Any]:
    ctx = operations.migration_context
    qualified = f"{op.schema}.{op.table_name}" if op.schema else op.table_name
    if op.parent_key is None:
        if ctx.as_sql:
            raise BackfillError(
                f"backfill_counter({qualified!r}, {op.column_name!r}): parent_key= is required "
                "in offline (--sql) mode, where the primary key cannot be looked up"
            )
        pk = inspect(operations.get_bind()).get_pk_constraint(op.table_name, schema=op.schema)
        keys: tuple[str, ...] = tuple(pk.get("constrained_columns") or ())
        if len(keys) != 1:
            raise BackfillError(
                f"backfill_counter({qualified!r}, {op.column_name!r}): cannot look up the key "
                f"of table {qualified!r} (primary key {list(keys)}); pass parent_key="
            )
    else:
        keys = _names(op.parent_key, "parent_key")
    fks = _names(op.child_fk, "child_fk")
    if len(fks) != len(keys):
        raise BackfillError(
            f"backfill_counter({qualified!r}, {op.column_name!r}): child_fk {list(fks)} and "
            f"parent_key {list(keys)} differ in length"
        )

    parent = table(op.table_name, column(op.column_name), *map(column, keys), schema=op.schema)
    child: Any = table(op.child_table, *map(column, fks), schema=op.schema)
    if op.child_table == op.table_name:  # a self-referential counter
        child = child.alias("countercache_child")
    total = (
        func.count()
        if op.sum is None
        else func.coalesce(func.sum(literal_column(f"({op.sum})")), literal_column("0"))
    )
    if op.through is not None:
        if len(op.through) != 3 or len(fks) != 1 or len(keys) != 1:
            raise BackfillError(
                f"backfill_counter({qualified!r}, {op.column_name!r}): through= is "
                "(middle_table, middle_key, middle_fk), with one-column keys"
            )
        middle_name, middle_key, middle_fk = op.through
        middle = table(middle_name, column(middle_key), column(middle_fk), schema=op.schema)
        counted = select(total).select_from(
            child.join(middle, child.c[fks[0]] == middle.c[middle_key])
        ).where(middle.c[middle_fk] == parent.c[keys[0]])
    else:
        counted = select(total).select_from(child).where(
            and_(*(child.c[fk] == parent.c[key] for fk, key in zip(fks, keys)))
        )
    if op.where is not None:
        counted = counted.where(text(f"({op.where})"))
    statements: list[Any] = []
    if ctx.dialect.name == "postgresql":
        preparer = ctx.dialect.identifier_preparer
        statements.append(text(f"LOCK TABLE {preparer.format_table(parent)} IN EXCLUSIVE MODE"))
    if op.shards:
        # the pending deltas of a sharded counter: the backfill's count replaces them
        shard_rows = table(TABLE_NAME, column("counter"))  # shard_table() gives it no schema
        statements.append(shard_rows.delete().where(
            shard_rows.c.counter == literal(f"{qualified}.{op.column_name}")))
    statements.append(
        update(parent).values({op.column_name: counted.scalar_subquery()})
    )
    return statements


@Operations.implementation_for(BackfillCounterOp)
def backfill_counter(operations: Operations, op: BackfillCounterOp) -> None:
    """Lock the parent table (PostgreSQL) and run the set-based UPDATE.

    Both go through ``operations.execute``, so offline mode prints them.
    """
    for statement in _statements(operations, op):
        operations.execute(statement)


@Operations.implementation_for(NoOpBackfillOp)
@Operations.implementation_for(RestoreCounterOp)
def noop_backfill(operations: Operations, op: NoOpBackfillOp | RestoreCounterOp) -> None:
    """Nothing to do (a :class:`RestoreCounterOp` acts in the downgrade)."""


# -- Render ----------------------------------------------------------------

#: The import a migration needs so that ``op.backfill_counter`` exists when it runs.
IMPORT = "import countercache.alembic  # noqa: F401 (registers op.backfill_counter and the trigger operations)"


def _repr_names(value: str | Sequence[str]) -> str:
    return repr(value) if isinstance(value, str) else repr(tuple(value))


@renderers.dispatch_for(BackfillCounterOp)
def render_backfill_counter(autogen_context: AutogenContext, op: BackfillCounterOp) -> str:
    if autogen_context.imports is not None:
        autogen_context.imports.add(IMPORT)
    args = [
        repr(op.table_name),
        repr(op.column_name),
        repr(op.child_table),
        _repr_names(op.child_fk),
    ]
    if op.where is not None:
        args.append(f"where={op.where!r}")
    if op.sum is not None:
        args.append(f"sum={op.sum!r}")
    if op.parent_key is not None:
        args.append(f"parent_key={_repr_names(op.parent_key)}")
    if op.schema is not None:
        args.append(f"schema={op.schema!r}")
    if op.through is not None:
        args.append(f"through={op.through!r}")
    if op.shards:
        args.append("shards=True")
    return f"op.backfill_counter({', '.join(args)})"


@renderers.dispatch_for(NoOpBackfillOp)
def render_noop_backfill(autogen_context: AutogenContext, op: NoOpBackfillOp) -> str:
    b = op.backfill
    return f"pass  # backfill of {b.table_name}.{b.column_name}: {b.downgrade_note or 'nothing to undo'}"


@renderers.dispatch_for(RestoreCounterOp)
def render_restore_counter(autogen_context: AutogenContext, op: RestoreCounterOp) -> str:
    return f"pass  # {op.note}"
