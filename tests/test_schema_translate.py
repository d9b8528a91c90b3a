"""Multi-tenant schemas with ``schema_translate_map``: each tenant's counters are
kept in its own schema's tables, never written into the untranslated ones
(before, the ORM strategies' UPDATE named the table as declared and counted
the tenant's rows in the default schema's parents); the trigger strategies,
whose DDL names the tables as declared, refuse with a clear error.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import ForeignKey
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import CounterCacheError, counter_cache

ORM_STRATEGIES = ("bulk", "per_row", "deferred", "sharded")

pytestmark = pytest.mark.parametrize("backend", ["postgresql", "mariadb"], indirect=True)


def declare(strategy: str, schema: str | None = None) -> Any:
    class Base(DeclarativeBase):
        pass

    if strategy.startswith("sharded"):
        countercache.shard_table(Base.metadata)

    class Post(Base):
        __tablename__ = "tr_posts"
        __table_args__ = {"schema": schema}
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        likes: Mapped[int] = counter_cache("post_likes", strategy=strategy)
        post_likes: Mapped[list[Like]] = relationship()

    class Like(Base):
        __tablename__ = "tr_likes"
        __table_args__ = {"schema": schema}
        id: Mapped[int] = mapped_column(primary_key=True)
        post_id: Mapped[int] = mapped_column(ForeignKey(Post.id))

    sa.orm.configure_mappers()
    return Base, Post, Like


@pytest.fixture
def tenant(backend: str, engine: sa.Engine) -> Iterator[str]:
    """A second schema (on MariaDB a database), dropped after the test."""
    with engine.connect() as connection:
        default = connection.execute(sa.text(
            "SELECT current_schema()" if backend == "postgresql" else "SELECT DATABASE()")).scalar_one()
    name = f"{default}_tenant"
    drop = f"DROP SCHEMA IF EXISTS {name} CASCADE" if backend == "postgresql" else f"DROP DATABASE IF EXISTS {name}"
    with engine.begin() as connection:
        connection.exec_driver_sql(drop)
        connection.exec_driver_sql(f"CREATE SCHEMA {name}" if backend == "postgresql" else f"CREATE DATABASE {name}")
    yield name
    with engine.begin() as connection:
        connection.exec_driver_sql(drop)


def state(engine: sa.Engine, schema: str | None) -> tuple[int, int]:
    """(the counter of post 1, shard rows included; the real count) in ``schema``."""
    prefix = f"{schema}." if schema else ""
    with engine.connect() as connection:
        column = connection.exec_driver_sql(f"SELECT likes FROM {prefix}tr_posts WHERE id = 1").scalar_one()
        shards = 0
        if sa.inspect(connection).has_table("countercache_shards", schema=schema):
            shards = connection.exec_driver_sql(
                f"SELECT coalesce(sum(delta), 0) FROM {prefix}countercache_shards").scalar_one()
        real = connection.exec_driver_sql(f"SELECT count(*) FROM {prefix}tr_likes WHERE post_id = 1").scalar_one()
    return int(column) + int(shards), int(real)


@pytest.mark.parametrize("strategy", ORM_STRATEGIES)
def test_each_tenant_counts_in_its_own_schema(engine, tenant, strategy):
    Base, Post, Like = declare(strategy)
    tenants = {schema: engine.execution_options(schema_translate_map={None: schema}) for schema in (None, tenant)}
    for each in tenants.values():
        Base.metadata.create_all(each)
        with Session(each) as session:
            session.add(Post(id=1))
            session.commit()
    with Session(tenants[tenant]) as session:
        session.add_all([Like(id=1, post_id=1), Like(id=2, post_id=1), Like(id=3, post_id=1)])
        session.commit()
    with Session(tenants[tenant]) as session:
        session.delete(session.get(Like, 2))
        session.commit()
    with Session(tenants[None]) as session:
        session.add(Like(id=1, post_id=1))
        session.commit()
    assert state(engine, tenant) == (2, 2)
    assert state(engine, None) == (1, 1)


@pytest.mark.parametrize("strategy", ["trigger", "sharded_trigger"])
def test_trigger_strategies_refuse_a_translated_schema(engine, tenant, strategy):
    Base, Post, Like = declare(strategy)
    translated = engine.execution_options(schema_translate_map={None: tenant})
    with pytest.raises(CounterCacheError, match=r"Post\.likes: the connection's schema_translate_map moves .*tr_posts"):
        Base.metadata.create_all(translated)
    with engine.connect() as connection:  # (refused before any table was made)
        assert not sa.inspect(connection).has_table("tr_posts", schema=tenant)
    # tables made by other means: the first flush refuses, and writes nothing
    Base.metadata.create_all(engine)
    Base.metadata.create_all(engine.execution_options(schema_translate_map={"unrelated": "other"}))  # (no table moved)
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            connection.exec_driver_sql(f"CREATE TABLE {tenant}.{table.name} AS SELECT * FROM {table.name}")
        connection.exec_driver_sql(f"INSERT INTO {tenant}.tr_posts (id, likes) VALUES (1, 0)")
    with Session(translated) as session:
        session.add(Like(id=1, post_id=1))
        with pytest.raises(CounterCacheError, match="schema_translate_map"):
            session.commit()
    with engine.connect() as connection:
        assert connection.exec_driver_sql(f"SELECT count(*) FROM {tenant}.tr_likes").scalar_one() == 0


def test_sharded_refuses_a_map_that_leaves_its_side_table_shared(engine, tenant):
    """Outside tester: tables declared in a schema, the map moving only that schema:
    the side table stayed in the default schema, shared by every tenant under one
    counter name, and one tenant's fold() took another's deltas."""
    with engine.connect() as connection:
        default = connection.execute(sa.text(
            "SELECT current_schema()" if engine.dialect.name == "postgresql" else "SELECT DATABASE()")).scalar_one()
    Base, Post, Like = declare("sharded", schema=default)
    Base.metadata.create_all(engine)
    # (the same keys in every map: SQLAlchemy's compiled cache asks for that)
    moved = engine.execution_options(schema_translate_map={default: tenant, None: None})
    Base.metadata.create_all(moved)
    with Session(moved) as session:
        session.add(Post(id=1))
        session.commit()
        session.add(Like(post_id=1))
        with pytest.raises(CounterCacheError, match=r"Post\.likes: the connection's schema_translate_map moves tr_posts"):
            session.commit()
    with pytest.raises(CounterCacheError, match="schema_translate_map"):
        countercache.fold(moved, Post.likes)
    both = engine.execution_options(schema_translate_map={default: tenant, None: tenant})
    countercache.shard_table(Base.metadata).create(both)
    with Session(both) as session:  # (the side table moved too: each tenant has its own)
        session.add(Like(post_id=1))
        session.commit()
    assert countercache.fold(both, Post.likes) == 1
    assert state(engine, tenant) == (1, 1)
