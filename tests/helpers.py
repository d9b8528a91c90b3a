"""Assertions shared by the test modules, exact for every strategy.

A ``sharded`` counter's column lags by the deltas pending in the side table
``countercache_shards`` until :func:`countercache.fold`; these helpers
account for them, and :func:`countercache.fold` is a no-op (no statement)
when no counter is sharded, so suites call them whatever the strategy.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect, text

import countercache

SHARD_TABLE = "countercache_shards"


def pending_deltas(engine, table: str, counter: str) -> dict[str, int]:
    """``{parent key as text: committed delta not yet folded}`` of ``table.counter``."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(SHARD_TABLE):
            return {}
        rows = conn.execute(
            text(f"SELECT parent_key, sum(delta) FROM {SHARD_TABLE} WHERE counter = :c GROUP BY parent_key"),
            {"c": f"{table}.{counter}"},
        ).all()
    return {str(key): int(delta) for key, delta in rows if delta}


def fold(engine) -> int:
    """Fold every sharded counter's pending deltas into its column (0: nothing sharded or pending)."""
    return countercache.fold(engine)


def assert_counts(engine, table: str = "users", counter: str = "question_count",
                  child: str = "questions", fk: str = "user_id") -> dict[int, int]:
    """Every counter equals an independent ``SELECT count(*)``; returns {id: count}.

    ``child``/``fk`` may be an association table and its column (many-to-many).
    With pending shard deltas (``sharded``), the column plus its deltas must
    be exact first; they are then folded and the column alone must be exact.
    """
    query = text(
        f"SELECT p.id, p.{counter}, (SELECT count(*) FROM {child} c WHERE c.{fk} = p.id) "
        f"FROM {table} p ORDER BY p.id"
    )
    pending = pending_deltas(engine, table, counter)
    if pending:
        with engine.connect() as conn:
            rows = conn.execute(query).all()
        wrong = [(pk, stored, pending.get(str(pk), 0), actual) for pk, stored, actual in rows
                 if stored + pending.get(str(pk), 0) != actual]
        assert not wrong, f"{table}.{counter} + pending shard deltas drifted (id, stored, pending, actual): {wrong}"
        fold(engine)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    wrong = [(pk, stored, actual) for pk, stored, actual in rows if stored != actual]
    assert not wrong, f"{table}.{counter} drifted (id, stored, actual): {wrong}"
    return {pk: stored for pk, stored, _ in rows}


def is_sharded(attribute: Any) -> bool:
    """Is the counter ``attribute`` (``User.question_count``) sharded under the configuration now?"""
    return countercache.configured_strategy(attribute) == "sharded"


def exact_value(session, instance: Any, name: str = "question_count") -> Any:
    """The counter as the application sees it: the attribute in memory, or for a
    ``sharded`` counter (whose column lags by design) ``countercache.exact()``."""
    if is_sharded(getattr(type(instance), name)):
        return countercache.exact(session, instance, name)
    return getattr(instance, name)


def orm_kept_only(strategy: str, why: str) -> None:
    """Skip for a counter the database keeps (``trigger``): ``why`` the case is
    the ORM's alone (what ``trigger`` does there instead is tested in
    ``test_trigger_strategy.py`` / ``test_trigger_ddl.py``)."""
    import pytest

    from countercache.config import DATABASE_STRATEGIES

    if strategy in DATABASE_STRATEGIES:
        pytest.skip(f"{strategy}: {why}")


def orm_kept_only_on_mariadb(engine: Any, strategy: str, why: str) -> None:
    """:func:`orm_kept_only` where the database is MariaDB/MySQL (``why``: the
    refusal there; PostgreSQL and SQLite run the case with triggers too)."""
    if engine.dialect.name in ("mysql", "mariadb"):
        orm_kept_only(strategy, why)
