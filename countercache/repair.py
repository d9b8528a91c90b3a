"""Finding and repairing drift: :func:`check` and :func:`reconcile`.

Counters drift when rows change behind the ORM's back: raw SQL, Core
statements on a connection, a database-level ``ON DELETE CASCADE`` from some
other table, or work done inside :func:`countercache.suspended`. ::

    drifts = countercache.check(engine, User.question_count, batch_size=1000)
    fixed = countercache.reconcile(engine, User.question_count)

With no counter named, both cover the counters of the bind's database (whose
tables exist there), optionally only those of ``metadata=``. Both walk the
parent table in primary-key batches (memory stays bounded by
``batch_size``) and return :class:`Drift` records. ``reconcile()`` writes the
true value with one set-based statement per batch that computes and writes in
the same statement (``UPDATE parent SET n = (SELECT count(*) ...) WHERE ...
AND n <> (SELECT count(*) ...)``), touching only the rows that differ; before
it, the batch's parent rows are locked in key order, so that a concurrent
writer's increment is either already visible to the recount or waits for it.

Given an Engine, ``reconcile()`` commits each batch itself; given a
Connection or Session it works in the caller's transaction and the caller
commits (on MariaDB/MySQL, whose REPEATABLE READ snapshot dates from the
transaction's first read, prefer an Engine for a live system).

A counter whose metadata holds the ``sharded`` strategy's side table is
compared as column plus pending shard deltas, and repaired by writing
``count - pending`` into the column, both read in the one statement, so a
writer's delta committed meanwhile is counted exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Float, Integer, MetaData, Numeric, TypeDecorator, and_, bindparam, func, inspect, select, tuple_
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, scoped_session

from . import commit, memory, transactions
from .errors import CounterCacheError
from .scope import counters_for
from .sessions import bind_of
from ._execute import translated
from .sidetable import TABLE_NAME, counter_name, key_text, pending_expression, table_for
from .values import single_precision

if TYPE_CHECKING:
    from .declaration import CounterCache

__all__ = ["Drift", "check", "reconcile"]

#: Relative difference below which a floating-point sum equals its recount:
#: single precision (about 7 digits), double precision (about 16). A running
#: sum rounds at every increment, the recount once: the two differ in the last
#: digits the column keeps, and more so the more increments it has seen.
SINGLE_TOLERANCE = 1e-5
DOUBLE_TOLERANCE = 1e-9

#: ``progress(counter, parents_done)``: called after each batch.
Progress = Callable[["CounterCache", int], None]


@dataclass(frozen=True)
class Drift:
    """One parent whose stored counter differs from the real count.

    ``counter`` is the counter attribute (``User.question_count``), ``pk`` the
    parent's primary key (a tuple for a composite key), ``stored`` the value
    in the column (plus its pending shard deltas, for a ``sharded`` counter),
    ``actual`` the value counted from the children.
    """

    counter: Any
    pk: Any
    stored: int
    actual: int

    @property
    def name(self) -> str:
        """The counter's name, ``"User.question_count"``."""
        return f"{self.counter.class_.__name__}.{self.counter.key}"

    def __repr__(self) -> str:
        return f"Drift({self.name}, pk={self.pk!r}, stored={self.stored!r}, actual={self.actual!r})"


def check(bind: Engine | Connection | Session | scoped_session[Any], *counters: Any, batch_size: int = 1000,
          progress: Progress | None = None, metadata: MetaData | Iterable[MetaData] | None = None) -> list[Drift]:
    """Every parent whose counter differs from its real count.

    :param bind: an :class:`~sqlalchemy.engine.Engine`,
        :class:`~sqlalchemy.engine.Connection` or
        :class:`~sqlalchemy.orm.Session` (a Session reads in its own
        transaction, so it sees what it flushed), or a
        :class:`~sqlalchemy.orm.scoped_session` (Flask-SQLAlchemy's
        ``db.session``: its current session). Inside
        ``await session.run_sync(countercache.check)``, an
        ``AsyncSession`` too.
    :param counters: counter attributes (``User.question_count``) or their
        names (``"User.question_count"``). When none is given: every
        registered counter of the bind's database, those whose parent table
        and the tables its recount reads exist there (for a Session, in
        the database its parent mapper's bind reaches,
        ``session.get_bind(mapper=...)``); an application with two
        declarative bases on two databases checks each with its own bind.
        A counter named whose tables are not there raises
        :class:`~countercache.CounterCacheError`, as does a bind whose
        database holds none of the registered counters.
    :param batch_size: parents read per statement, in primary-key order;
        memory stays bounded by it.
    :param progress: ``progress(counter, parents_done)``, called after each
        batch (the command line draws its progress bar with it).
    :param metadata: a :class:`~sqlalchemy.MetaData`, or several: only the
        counters whose parent table belongs to it (a counter named that
        does not raises).

    Returns a list of :class:`Drift`, in counter and then key order; empty
    when every counter is right. Reads only: nothing is locked or written.
    """
    return _walk(bind_of(bind, "check"), counters, batch_size, progress, metadata, repair=False)


def reconcile(bind: Engine | Connection | Session | scoped_session[Any], *counters: Any, batch_size: int = 1000,
              progress: Progress | None = None,
              metadata: MetaData | Iterable[MetaData] | None = None) -> list[Drift]:
    """Correct every drifted counter; return what was fixed (as :func:`check` saw it).

    Takes the same arguments as :func:`check`. Each batch of parents is
    locked in key order, then written with one statement that recounts and
    writes together, touching only the rows that differ, so a concurrent
    writer's increment is never lost. Given an Engine, every batch commits by
    itself; given a Connection or a Session, the work is part of the
    caller's transaction and the caller commits (a Session's parents in
    memory are expired). Running it again on an unchanged database
    returns ``[]``.
    """
    return _walk(bind_of(bind, "reconcile"), counters, batch_size, progress, metadata, repair=True)


def differs(stored: Any, actual: Any, type_: Any, dialect: Any, summed: Any = None) -> Any:
    """SQL that is true where a counter's stored value and its recount differ
    in what the column can hold: exactly for integers and exact decimals;
    rounded to the column's scale for a ``Numeric`` that SQLite keeps as a
    binary float; for floating point, by more than :data:`SINGLE_TOLERANCE`
    or :data:`DOUBLE_TOLERANCE` of their size (MariaDB/MySQL ``FLOAT`` and
    PostgreSQL ``REAL`` are single precision)."""
    if isinstance(type_, TypeDecorator):
        type_ = type_.impl_instance
    if isinstance(type_, Integer) or not isinstance(type_, (Numeric, Float)):
        return stored != actual
    floating = isinstance(type_, Float) or dialect.name == "sqlite"
    if not floating:
        return stored != actual  # an exact decimal column
    scale = getattr(type_, "scale", None)
    if not isinstance(type_, Float) and scale is not None:  # Numeric(p, s) on SQLite
        return func.round(stored, scale) != func.round(actual, scale)
    single = any(t is not None and single_precision(t, dialect) for t in (type_, summed))
    tolerance = SINGLE_TOLERANCE if single else DOUBLE_TOLERANCE
    return func.abs(stored - actual) > tolerance * (func.abs(stored) + func.abs(actual))


class _Sql:
    """The statements of one counter."""

    def __init__(self, counter: CounterCache) -> None:
        assert counter.parent is not None and counter.kind is not None
        self.counter = counter
        self.table = counter.parent.table
        self.pk = list(counter.parent.pk_cols)
        self.column = self.table.c[counter.column.key]  # type: ignore[union-attr]
        # the very expressions the flush evaluates in Python (kinds.py, expressions.py)
        self.actual = counter.kind.real_count(self.pk).correlate(self.table).scalar_subquery()
        self.key = self.pk[0] if len(self.pk) == 1 else tuple_(*self.pk)
        # a sharded counter's stored value is its column plus the pending shard
        # deltas, read in the same statement as the count (one snapshot)
        pending = pending_expression(counter) if len(self.pk) == 1 else None
        self.stored = self.column if pending is None else self.column + pending
        self.target = self.actual if pending is None else self.actual - pending
        # a counter no longer sharded: rows it left in the side table go with the repair (a
        # switch back would add them again); the column alone is its value
        side = table_for(counter) if pending is None and len(self.pk) == 1 else None
        self.leftover = None if side is None else side.delete().where(
            side.c.counter == counter_name(counter),
            side.c.parent_key.in_(select(key_text(self.pk[0])).where(self.in_range(bindparam("lo"), bindparam("hi")))))
        self._side_present: bool | None = None

    def clear_leftover(self, conn: Connection, lo: Any, hi: Any) -> None:
        """Delete the rows a formerly sharded counter left for the parents ``lo``..``hi``."""
        if self.leftover is None:
            return
        if self._side_present is None:
            self._side_present = inspect(conn).has_table(TABLE_NAME, schema=translated(conn, None))
        if self._side_present:
            conn.execute(self.leftover, {"lo": lo, "hi": hi})

    def key_value(self, row: Any) -> Any:
        return row[0] if len(self.pk) == 1 else tuple(row[: len(self.pk)])

    def batch_keys(self, conn: Connection, after: Any, size: int) -> list[Any]:
        stmt = select(*self.pk).order_by(*self.pk).limit(size)
        if after is not None:
            stmt = stmt.where(self.key > (after if len(self.pk) == 1 else tuple_(*after)))
        return [self.key_value(r) for r in conn.execute(stmt).all()]

    def in_range(self, lo: Any, hi: Any) -> Any:
        if len(self.pk) == 1:
            return self.key.between(lo, hi)
        return and_(self.key >= tuple_(*lo), self.key <= tuple_(*hi))

    def differs(self, conn: Connection) -> Any:
        """``stored <> actual`` at the column's precision (see :func:`differs`)."""
        kind = self.counter.kind
        summed = getattr(getattr(kind, "leaf", kind), "sum", None)  # (a REAL summed into a double column)
        return differs(self.stored, self.actual, self.column.type, conn.dialect,
                       summed.type if summed is not None else None)

    def drifts(self, conn: Connection, lo: Any, hi: Any) -> list[Drift]:
        actual = self.actual.label("actual")
        stmt = (
            select(*self.pk, self.stored, actual)
            .where(self.in_range(lo, hi), self.differs(conn))
            .order_by(*self.pk)
        )
        attribute = getattr(self.counter.cls, self.counter.key)  # type: ignore[arg-type]
        n = len(self.pk)
        return [Drift(attribute, self.key_value(r), r[n], r[n + 1]) for r in conn.execute(stmt).all()]



def _write_held(session: Session) -> None:
    """Given a Session: flush, and write now what ``deferred`` / ``sharded``
    counters hold for the commit, so that the comparison sees this
    transaction's children and their counts alike."""
    session.flush()
    if transactions.holds_any(session):
        if session.in_nested_transaction():
            raise CounterCacheError(
                "check()/reconcile() inside a savepoint while deferred or sharded counters hold "
                "deltas for the commit: run it outside the savepoint, or with an Engine"
            )
        commit.write_deferred(session)


@contextmanager
def _connection(bind: Any, counter: CounterCache, per_batch: bool) -> Iterator[Callable[[], Any]]:
    """Yields a factory of context managers giving the connection for one batch."""
    if isinstance(bind, Session):
        conn = bind.connection(bind_arguments={"mapper": counter.mapper})
        yield lambda: _same(conn)
    elif isinstance(bind, Connection):
        yield lambda: _same(bind)
    elif isinstance(bind, Engine):
        if per_batch:
            yield bind.begin
        else:
            with bind.connect() as conn:
                yield lambda: _same(conn)
    else:
        raise CounterCacheError(
            f"bind must be an Engine, Connection or Session (or a scoped_session), not {type(bind).__name__}")


@contextmanager
def _same(conn: Connection) -> Iterator[Connection]:
    yield conn


def _walk(bind: Any, counters: tuple[Any, ...], batch_size: int, progress: Progress | None, metadata: Any,
          *, repair: bool) -> list[Drift]:
    if batch_size < 1:
        raise CounterCacheError(f"batch_size must be at least 1, not {batch_size}")
    if isinstance(bind, Session):
        _write_held(bind)
    found: list[Drift] = []
    for counter in counters_for(bind, counters, metadata):
        sql = _Sql(counter)
        done = 0
        after = None
        with _connection(bind, counter, per_batch=repair) as batch:
            while True:
                with batch() as conn:
                    keys = sql.batch_keys(conn, after, batch_size)
                    if not keys:
                        break
                    lo, hi = keys[0], keys[-1]
                    if repair:
                        drifts = _repair_batch(sql, conn, lo, hi)
                    else:
                        drifts = sql.drifts(conn, lo, hi)
                found.extend(drifts)
                if repair and drifts and isinstance(bind, Session):
                    assert counter.parent is not None
                    drifted = [d.pk if isinstance(d.pk, tuple) else (d.pk,) for d in drifts]
                    transactions.remember_refreshed(bind, counter.parent, drifted)  # (a savepoint's rollback: shown before)
                    memory.expire(bind, counter.parent, drifted)
                done += len(keys)
                after = hi
                if progress is not None:
                    progress(counter, done)
    return found


def _repair_batch(sql: _Sql, conn: Connection, lo: Any, hi: Any) -> list[Drift]:
    # lock, then report what differs, then write the true values in one statement
    if conn.dialect.name != "sqlite":
        conn.execute(select(*sql.pk).where(sql.in_range(lo, hi)).order_by(*sql.pk)
                     .with_for_update(key_share=conn.dialect.name == "postgresql"))
    drifts = sql.drifts(conn, lo, hi)
    if drifts:
        conn.execute(
            sql.table.update()
            .where(sql.in_range(lo, hi), sql.differs(conn))
            .values({sql.column: sql.target})
        )
    sql.clear_leftover(conn, lo, hi)
    return drifts
