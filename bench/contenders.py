"""The contenders: every way a user has of keeping ``parent.child_count``.

Each runs in the same process, on the same database, against the same
workloads. A contender declares the schema (:meth:`Contender.models`), may
install things in the database once the set-up data is in
(:meth:`Contender.install`), and undoes its process-wide state in
:meth:`Contender.teardown`. The database-kept strategies' triggers, which
``create_all()`` creates with the tables, are dropped right after it
(:meth:`Contender.after_create`) and created again in ``install``, as the
hand-written triggers are: every contender's timed part starts from tables
the seed's rows left alike.

* ``none``: the counter column exists but nobody keeps it: the floor.
* one contender per countercache strategy (``countercache.config.STRATEGIES``);
  ``sharded`` is folded (``countercache.fold``) after the timed part, before
  the drift check. ``sharded4`` and ``sharded64`` (4 and 64 shards instead of
  16) run only when named, for the ``hot`` workload.
* ``listener``: hand-written mapper ``after_insert`` / ``after_delete`` /
  ``after_update`` listeners issuing one ``UPDATE ... SET n = n + 1`` per row,
  what a user writes without a library (and what ``per_row`` is held to).
* ``flush_listener``: a hand-written Session ``after_flush`` listener summing
  the deltas per parent and issuing one ``UPDATE ... SET n = n + :d`` per
  parent (one execute, or one executemany for several): the same statements
  as ``bulk``, what ``bulk`` and ``deferred`` are held to on small
  transactions.
* ``pg_row_trigger``: a plpgsql ``FOR EACH ROW`` trigger (PostgreSQL only).
* ``pg_sharded_trigger``: the database-side twin of ``sharded``: a row
  trigger upserting +1/-1 into one of 16 shard rows per parent chosen by the
  backend's pid, folded into the parent after the timed part (PostgreSQL
  only; the anchor for ``hot``).
* ``pg_statement_trigger``: ``FOR EACH STATEMENT`` triggers with transition
  tables, aggregating per parent (PostgreSQL only).
* ``aggregated``: SQLAlchemy-Utils' ``aggregated`` (a recount by correlated
  subquery of every parent of every child in the session, after each flush).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import get_history

from . import schema
from .schema import CHILDREN, COUNTER, PARENTS, Models


class Contender:
    name = ""
    #: Whether the counter is meant to be right (checked after every run).
    keeps_count = True
    description = ""

    def skip_reason(self, dialect: str) -> str | None:
        """Why this contender does not apply to ``dialect`` (None: it does)."""
        return None

    def unavailable_reason(self) -> str | None:
        """Why this contender cannot run at all here (a missing package...)."""
        return None

    def models(self) -> Models:
        return schema.build()

    def after_create(self, connection: Connection) -> None:
        """The tables are created, before any set-up data."""

    def install(self, connection: Connection) -> None:
        """Set-up data is in: create database objects (triggers)."""

    def before_check(self, engine: Any) -> None:
        """The timed part is over: bring the counters up to date (``sharded``: fold)."""

    def uninstall(self, connection: Connection) -> None:
        """Drop what :meth:`install` created beyond the tables."""

    def teardown(self) -> None:
        """Forget process-wide state (listeners, registries)."""


class NoCounter(Contender):
    name = "none"
    keeps_count = False
    description = "no counter kept (the floor)"


class CounterCacheStrategy(Contender):
    def __init__(self, strategy: str, shards: int | None = None) -> None:
        self.strategy = strategy
        self.shards = shards
        self.name = strategy if shards is None else f"{strategy}{shards}"
        self.description = f"countercache, strategy={strategy!r}" + (f", shards={shards}" if shards else "")

    def models(self) -> Models:
        from countercache import counter_cache

        strategy, shards = self.strategy, self.shards
        models = schema.build(lambda child: counter_cache("children", strategy=strategy, shards=shards))
        sa.orm.configure_mappers()
        return models

    def _database_kept(self) -> list[Any]:
        """The counters the database keeps (``trigger``, ``sharded_trigger``)."""
        from countercache import _registry
        from countercache.config import DATABASE_STRATEGIES

        return [c for c in _registry.all_counters() if c.strategy() in DATABASE_STRATEGIES]

    def after_create(self, connection: Connection) -> None:
        # create_all() made the triggers: dropped until install(), as the hand-written
        # ones are created after the seed (whose rows would otherwise fire them, leaving
        # 10,000 dead parent row versions that the timed part of `delete` and `move`
        # wades through, and shard rows that would count the seed twice)
        from countercache import triggers

        for counter in self._database_kept():
            triggers.execute(connection, triggers.drop_statements(counter, connection.dialect))

    def install(self, connection: Connection) -> None:
        from countercache import triggers

        for counter in self._database_kept():
            triggers.execute(connection, triggers.create_statements(counter, connection.dialect))

    def before_check(self, engine: Any) -> None:
        if self.strategy in ("sharded", "sharded_trigger"):  # (the column lags by the shard rows)
            import countercache

            countercache.fold(engine)

    def teardown(self) -> None:
        import countercache

        countercache._reset_for_tests()


_INCREMENT = text(f"UPDATE {PARENTS} SET {COUNTER} = {COUNTER} + 1 WHERE id = :id")
_DECREMENT = text(f"UPDATE {PARENTS} SET {COUNTER} = {COUNTER} - 1 WHERE id = :id")


def _listener_after_insert(mapper: Any, connection: Connection, target: Any) -> None:
    if target.parent_id is not None:
        connection.execute(_INCREMENT, {"id": target.parent_id})


def _listener_after_delete(mapper: Any, connection: Connection, target: Any) -> None:
    if target.parent_id is not None:
        connection.execute(_DECREMENT, {"id": target.parent_id})


def _listener_after_update(mapper: Any, connection: Connection, target: Any) -> None:
    history = get_history(target, "parent_id")
    if not history.has_changes():
        return
    for old in history.deleted:
        if old is not None:
            connection.execute(_DECREMENT, {"id": old})
    for new in history.added:
        if new is not None:
            connection.execute(_INCREMENT, {"id": new})


class Listener(Contender):
    name = "listener"
    description = "hand-written after_insert/after_delete/after_update UPDATE per row"

    def models(self) -> Models:
        models = schema.build()
        for name, fn in (
            ("after_insert", _listener_after_insert),
            ("after_delete", _listener_after_delete),
            ("after_update", _listener_after_update),
        ):
            event.listen(models.Child, name, fn)
        sa.orm.configure_mappers()
        return models


_ADD = text(f"UPDATE {PARENTS} SET {COUNTER} = {COUNTER} + :d WHERE id = :id")


class FlushListener(Contender):
    """What a user writes instead of ``bulk``: one ``after_flush`` listener.

    It runs on every flush of every Session, so it is listened to on the
    Session class only while this contender runs (models() to teardown()).
    The parents are updated in key order, as ``bulk`` does, so that two
    writers cannot deadlock on each other's parents.
    """

    name = "flush_listener"
    description = "hand-written Session after_flush listener: one UPDATE ... + :d per parent"

    def __init__(self) -> None:
        self._hook: Any = None

    def models(self) -> Models:
        models = schema.build()
        Child = models.Child

        def after_flush(session: Session, flush_context: Any) -> None:
            deltas: defaultdict[Any, int] = defaultdict(int)
            for obj in session.new:
                if isinstance(obj, Child) and obj.parent_id is not None:
                    deltas[obj.parent_id] += 1
            for obj in session.deleted:
                if isinstance(obj, Child):
                    history = get_history(obj, "parent_id")
                    old = (history.deleted or history.unchanged or [None])[0]  # the row's value
                    if old is not None:
                        deltas[old] -= 1
            for obj in session.dirty:
                if isinstance(obj, Child):
                    history = get_history(obj, "parent_id")
                    if history.has_changes():
                        for old in history.deleted:
                            if old is not None:
                                deltas[old] -= 1
                        for new in history.added:
                            if new is not None:
                                deltas[new] += 1
            rows = [{"d": d, "id": key} for key, d in sorted(deltas.items()) if d]
            if rows:
                session.connection().execute(_ADD, rows[0] if len(rows) == 1 else rows)

        self._hook = after_flush
        event.listen(Session, "after_flush", after_flush)
        sa.orm.configure_mappers()
        return models

    def teardown(self) -> None:
        if self._hook is not None and event.contains(Session, "after_flush", self._hook):
            event.remove(Session, "after_flush", self._hook)
        self._hook = None


class _PostgresTrigger(Contender):
    functions: tuple[str, ...] = ()

    def skip_reason(self, dialect: str) -> str | None:
        return None if dialect == "postgresql" else "skipped: PostgreSQL only"

    def ddl(self) -> list[str]:
        raise NotImplementedError

    def install(self, connection: Connection) -> None:
        for statement in self.ddl():
            connection.exec_driver_sql(statement)

    def uninstall(self, connection: Connection) -> None:
        for fn in self.functions:
            connection.exec_driver_sql(f"DROP FUNCTION IF EXISTS {fn}() CASCADE")


class PgRowTrigger(_PostgresTrigger):
    name = "pg_row_trigger"
    description = "PostgreSQL plpgsql FOR EACH ROW trigger"
    functions = ("ccbench_row_counter",)

    def ddl(self) -> list[str]:
        return [
            f"""CREATE OR REPLACE FUNCTION ccbench_row_counter() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    UPDATE {PARENTS} SET {COUNTER} = {COUNTER} + 1 WHERE id = NEW.parent_id;
  ELSIF TG_OP = 'DELETE' THEN
    UPDATE {PARENTS} SET {COUNTER} = {COUNTER} - 1 WHERE id = OLD.parent_id;
  ELSIF NEW.parent_id IS DISTINCT FROM OLD.parent_id THEN
    UPDATE {PARENTS} SET {COUNTER} = {COUNTER} - 1 WHERE id = OLD.parent_id;
    UPDATE {PARENTS} SET {COUNTER} = {COUNTER} + 1 WHERE id = NEW.parent_id;
  END IF;
  RETURN NULL;
END $$""",
            f"""CREATE TRIGGER ccbench_row_counter
AFTER INSERT OR DELETE OR UPDATE OF parent_id ON {CHILDREN}
FOR EACH ROW EXECUTE FUNCTION ccbench_row_counter()""",
        ]


SHARDS = "ccbench_shards"


class PgShardedTrigger(_PostgresTrigger):
    """``sharded`` done by the database: a row trigger adds +1/-1 to one of 16
    shard rows of the parent, chosen by the backend's pid, so that concurrent
    writers (one backend each) rarely wait on the same row. The shards are
    folded into ``child_count`` before the drift check, untimed, as
    ``sharded``'s are by ``countercache.fold``."""

    name = "pg_sharded_trigger"
    description = "PostgreSQL row trigger upserting into 16 shard rows per parent (pg_backend_pid() % 16, written mod() for the driver)"
    functions = ("ccbench_sharded_counter",)

    def ddl(self) -> list[str]:
        def bump(row: str, delta: int) -> str:
            return (
                f"INSERT INTO {SHARDS} (parent_id, shard, delta) "
                f"VALUES ({row}.parent_id, mod(pg_backend_pid(), 16), {delta}) "
                f"ON CONFLICT (parent_id, shard) DO UPDATE SET delta = {SHARDS}.delta + excluded.delta;"
            )

        return [
            f"CREATE TABLE {SHARDS} (parent_id integer NOT NULL, shard integer NOT NULL, "
            "delta bigint NOT NULL, PRIMARY KEY (parent_id, shard))",
            f"""CREATE OR REPLACE FUNCTION ccbench_sharded_counter() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP IN ('DELETE', 'UPDATE') AND OLD.parent_id IS NOT NULL
     AND (TG_OP = 'DELETE' OR NEW.parent_id IS DISTINCT FROM OLD.parent_id) THEN
    {bump("OLD", -1)}
  END IF;
  IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.parent_id IS NOT NULL
     AND (TG_OP = 'INSERT' OR NEW.parent_id IS DISTINCT FROM OLD.parent_id) THEN
    {bump("NEW", 1)}
  END IF;
  RETURN NULL;
END $$""",
            f"""CREATE TRIGGER ccbench_sharded_counter
AFTER INSERT OR DELETE OR UPDATE OF parent_id ON {CHILDREN}
FOR EACH ROW EXECUTE FUNCTION ccbench_sharded_counter()""",
        ]

    def before_check(self, engine: Any) -> None:
        with engine.begin() as connection:
            connection.exec_driver_sql(
                f"WITH folded AS (DELETE FROM {SHARDS} RETURNING parent_id, delta) "
                f"UPDATE {PARENTS} AS p SET {COUNTER} = p.{COUNTER} + d.n "
                "FROM (SELECT parent_id, sum(delta) AS n FROM folded GROUP BY parent_id) AS d "
                "WHERE p.id = d.parent_id"
            )

    def uninstall(self, connection: Connection) -> None:
        super().uninstall(connection)
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {SHARDS}")


class PgStatementTrigger(_PostgresTrigger):
    name = "pg_statement_trigger"
    description = "PostgreSQL FOR EACH STATEMENT triggers over transition tables"
    functions = ("ccbench_stmt_insert", "ccbench_stmt_delete", "ccbench_stmt_update")

    def ddl(self) -> list[str]:
        def function(name: str, deltas: str) -> str:
            return f"""CREATE OR REPLACE FUNCTION {name}() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  UPDATE {PARENTS} AS p SET {COUNTER} = p.{COUNTER} + d.n
  FROM ({deltas}) AS d
  WHERE p.id = d.parent_id;
  RETURN NULL;
END $$"""

        return [
            function(
                "ccbench_stmt_insert",
                "SELECT parent_id, count(*) AS n FROM new_rows "
                "WHERE parent_id IS NOT NULL GROUP BY parent_id",
            ),
            function(
                "ccbench_stmt_delete",
                "SELECT parent_id, -count(*) AS n FROM old_rows "
                "WHERE parent_id IS NOT NULL GROUP BY parent_id",
            ),
            function(
                "ccbench_stmt_update",
                "SELECT parent_id, sum(n) AS n FROM ("
                "SELECT parent_id, 1 AS n FROM new_rows "
                "UNION ALL SELECT parent_id, -1 AS n FROM old_rows) AS u "
                "WHERE parent_id IS NOT NULL GROUP BY parent_id HAVING sum(n) <> 0",
            ),
            (
                f"CREATE TRIGGER ccbench_stmt_insert AFTER INSERT ON {CHILDREN} "
                "REFERENCING NEW TABLE AS new_rows "
                "FOR EACH STATEMENT EXECUTE FUNCTION ccbench_stmt_insert()"
            ),
            (
                f"CREATE TRIGGER ccbench_stmt_delete AFTER DELETE ON {CHILDREN} "
                "REFERENCING OLD TABLE AS old_rows "
                "FOR EACH STATEMENT EXECUTE FUNCTION ccbench_stmt_delete()"
            ),
            (
                f"CREATE TRIGGER ccbench_stmt_update AFTER UPDATE ON {CHILDREN} "
                "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
                "FOR EACH STATEMENT EXECUTE FUNCTION ccbench_stmt_update()"
            ),
        ]


class Aggregated(Contender):
    """SQLAlchemy-Utils ``aggregated``.

    Importing ``sqlalchemy_utils.aggregates`` registers global listeners
    (``Mapper.after_configured``, ``Session.after_flush``) whose ``after_flush``
    walks every object of every session: they are removed at once and
    attached only while this contender runs, so that they cost the others
    nothing. Its registries are global too (``aggregated_attrs`` and the
    manager's), and grow on every ``configure_mappers()``: they are emptied
    after each run.
    """

    name = "aggregated"
    description = "SQLAlchemy-Utils aggregated (recount by correlated subquery after each flush)"

    def __init__(self) -> None:
        self._reason: str | None = None
        self._module: Any = None
        try:
            from sqlalchemy_utils import aggregates  # type: ignore[import-untyped]
        except ImportError as exc:
            self._reason = (
                f"unavailable: sqlalchemy-utils is not installed ({exc}); "
                "pip install -e '.[bench]'"
            )
            return
        except Exception as exc:  # noqa: BLE001 - an import that breaks on this SQLAlchemy
            self._reason = f"unavailable: importing sqlalchemy_utils failed: {_first_line(exc)}"
            return
        self._module = aggregates
        self._listen(False)

    def _hooks(self) -> list[tuple[Any, str, Any]]:
        manager = self._module.manager
        return [
            (sa.orm.Mapper, "after_configured", manager.update_generator_registry),
            (Session, "after_flush", manager.construct_aggregate_queries),
        ]

    def _listen(self, on: bool) -> None:
        for target, name, fn in self._hooks():
            if on and not event.contains(target, name, fn):
                event.listen(target, name, fn)
            elif not on and event.contains(target, name, fn):
                event.remove(target, name, fn)

    def unavailable_reason(self) -> str | None:
        return self._reason

    def models(self) -> Models:
        aggregates = self._module
        aggregates.aggregated_attrs.clear()
        aggregates.manager.reset()
        self._listen(True)

        def column(child: Any) -> Any:
            @aggregates.aggregated("children", sa.Column(sa.Integer, default=0))
            def child_count(self: Any) -> Any:
                return sa.func.count(child().id)

            return child_count

        models = schema.build(column)
        sa.orm.configure_mappers()
        registered = sum(len(v) for v in aggregates.manager.generator_registry.values())
        if registered != 1:
            raise RuntimeError(
                f"aggregated registered {registered} aggregate(s) for one declaration"
            )
        return models

    def teardown(self) -> None:
        if self._module is not None:
            self._listen(False)
            self._module.aggregated_attrs.clear()
            self._module.manager.reset()


def _first_line(exc: BaseException) -> str:
    text_ = str(exc).strip()
    return f"{type(exc).__name__}: {text_.splitlines()[0]}" if text_ else type(exc).__name__


def all_contenders() -> list[Contender]:
    """Every contender, in report order; strategies from ``STRATEGIES`` (and
    the database-kept ones, ``DATABASE_STRATEGIES``, run when named)."""
    from countercache.config import DATABASE_STRATEGIES, STRATEGIES

    return [
        NoCounter(),
        *(CounterCacheStrategy(s) for s in STRATEGIES),
        *(CounterCacheStrategy(s) for s in DATABASE_STRATEGIES),
        *(CounterCacheStrategy("sharded", n) for n in EXTRA_SHARDS),
        Listener(),
        FlushListener(),
        PgRowTrigger(),
        PgStatementTrigger(),
        PgShardedTrigger(),
        Aggregated(),
    ]


#: ``sharded`` with other shard counts than the default 16 (run when named).
EXTRA_SHARDS = (4, 64)


def contender_names() -> list[str]:
    """The contenders run by default, in report order."""
    from countercache.config import STRATEGIES

    return ["none", *STRATEGIES, "listener", "flush_listener", "pg_row_trigger", "pg_statement_trigger",
            "pg_sharded_trigger", "aggregated"]


def every_contender_name() -> list[str]:
    """Every contender ``--contender`` accepts."""
    from countercache.config import DATABASE_STRATEGIES

    return [*contender_names(), *(f"sharded{n}" for n in EXTRA_SHARDS), *DATABASE_STRATEGIES]
