"""Autogenerate drops every stale counter trigger (outside tester's cases):

* the counted table of a ``trigger`` / ``sharded_trigger`` counter renamed: Alembic's
  ``drop_table`` takes the old triggers on the old table along, but not those on the
  parent table (``_pin``/``_pup``, ``sharded_trigger``'s ``_pdl``/``_psi``/``_psu``),
  which read the old table: every INSERT into the parent failed after the upgrade;
* a counter whose tables are in another schema (``include_schemas=True``) switched
  to an ORM strategy: its triggers were looked up in the default schema only, and
  stayed (they and the ORM both counted).

Each migration is generated, run, and reversed; the counters are compared with an
independent ``SELECT count(*)`` after raw SQL writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from test_alembic_triggers import Env, body

import countercache
from countercache import _registry, counter_cache, triggers

SCHEMA = "cc_other"


@pytest.fixture
def env(tmp_path: Path, engine: sa.Engine) -> Env:
    return Env(tmp_path / "migrations", engine)


def models(child: str = "questions", strategy: str = "trigger", schema: str | None = None) -> tuple[type, Any]:
    """``User.question_count`` over the rows of ``child`` (``schema``: both tables in it)."""
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        __table_args__ = {"schema": schema}
        id: Mapped[int] = mapped_column(primary_key=True)
        questions: Mapped[list[Question]] = relationship()
        question_count: Mapped[int] = counter_cache("questions", strategy=strategy,
                                                    **({"shards": 4} if strategy == "sharded_trigger" else {}))

    class Question(Base):
        __tablename__ = child
        __table_args__ = {"schema": schema}
        id: Mapped[int] = mapped_column(primary_key=True)
        # (no index: MariaDB's would be dropped before its table, which its foreign key refuses)
        user_id: Mapped[int | None] = mapped_column(sa.ForeignKey(f"{schema}.users.id" if schema else "users.id"))

    sa.orm.configure_mappers()
    return User, Base.metadata


def installed(engine: sa.Engine, schema: str | None = None) -> set[str]:
    """The base names of every countercache trigger in ``schema`` (on any table)."""
    with engine.connect() as conn:
        return {base for _, base in triggers.installed_tables(conn, (schema,))}


def base(User: type) -> str:
    return triggers.trigger_name(_registry.lookup(User.question_count))


def writes(engine: sa.Engine, child: str, user: int, schema: str | None = None) -> None:
    """A new parent (its INSERT fires the parent table's triggers) and raw child writes."""
    prefix = f"{schema}." if schema else ""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO {prefix}users (id) VALUES ({user})")
    with engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO {prefix}{child} (id, user_id) VALUES "
                             f"({user}1, {user}), ({user}2, {user}), ({user}3, 1), ({user}4, NULL)")
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE {prefix}{child} SET user_id = {user} WHERE id = {user}3")
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM {prefix}{child} WHERE id = {user}1")


def exact(engine: sa.Engine, User: type, child: str, schema: str | None = None) -> dict[int, int]:
    """Every stored count (its pending shard deltas folded) equals its recount; returns them."""
    if sa.inspect(engine).has_table("countercache_shards"):
        countercache.fold(engine, User.question_count)
    prefix = f"{schema}." if schema else ""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            f"SELECT u.id, u.question_count, (SELECT count(*) FROM {prefix}{child} q WHERE q.user_id = u.id) "
            f"FROM {prefix}users u ORDER BY u.id").all()
    assert [(i, s) for i, s, _ in rows] == [(i, r) for i, _, r in rows]
    return {i: s for i, s, _ in rows}


def nothing_left(env: Env, rev_id: str) -> None:
    """``alembic check``: autogenerate finds nothing more to do with triggers."""
    assert "counter_trigger" not in body(env.revision(rev_id))
    next(p for p in (env.root / "versions").iterdir() if p.name.startswith(rev_id)).unlink()


# -- the counted table renamed -----------------------------------------------------------


@pytest.mark.parametrize("strategy", ["trigger", "sharded_trigger"])
def test_renamed_counted_table_drops_the_old_triggers_on_the_parent(env: Env, engine: sa.Engine,
                                                                     strategy: str) -> None:
    Old, env.metadata = models("questions", strategy)
    env.revision("0001")
    env.upgrade()
    writes(engine, "questions", 1)
    assert exact(engine, Old, "questions") == {1: 2}
    old = base(Old)
    assert installed(engine) == {old}

    User, env.metadata = models("posts", strategy)
    source = env.revision("0002")
    up, down = body(source), body(source, "downgrade")
    sharded = ", strategy='sharded_trigger', shards=4" if strategy == "sharded_trigger" else ""
    drop = f"op.drop_counter_trigger('users', 'question_count', 'questions', 'user_id', parent_key='id'{sharded})"
    create = f"op.create_counter_trigger('users', 'question_count', 'posts', 'user_id', parent_key='id'{sharded})"
    assert up.index(drop) < up.index("op.drop_table('questions')") < up.index(create)
    restore = drop.replace("drop_", "create_")[:-1] + ", backfill=True)"
    assert down.index("op.create_table('questions'") < down.index(restore)
    env.upgrade()
    assert installed(engine) == {base(User)} != {old}
    writes(engine, "posts", 2)  # (the old triggers on users read questions: the INSERT failed)
    assert exact(engine, User, "posts") == {1: 0, 2: 2}
    nothing_left(env, "0003")

    env.downgrade("0001")
    assert installed(engine) == {old}
    writes(engine, "questions", 3)
    assert exact(engine, Old, "questions") == {1: 0, 2: 0, 3: 2}


def test_triggers_left_on_the_parent_by_an_earlier_migration_are_dropped_by_name(env: Env, engine: sa.Engine) -> None:
    """A database upgraded before the fix: the counted table gone, its triggers on the parent left."""
    Old, env.metadata = models("questions")
    env.revision("0001")
    env.upgrade()
    old = base(Old)
    env.write("0002", "0001", "op.drop_table('questions')")
    env.upgrade()
    assert installed(engine) == {old}  # (on users only)

    User, env.metadata = models("posts")
    source = env.revision("0003")
    up = body(source)
    assert up.index(f"op.drop_counter_trigger(child_table='users', name='{old}')") < up.index(
        "op.create_counter_trigger('users', 'question_count', 'posts'")
    assert "stay dropped" in body(source, "downgrade")  # (their counted table is gone: not created again)
    env.upgrade()
    assert installed(engine) == {base(User)}
    writes(engine, "posts", 1)
    writes(engine, "posts", 2)
    assert exact(engine, User, "posts") == {1: 2, 2: 2}
    nothing_left(env, "0004")


# -- another schema ----------------------------------------------------------------------


@pytest.fixture
def other_schema(engine: sa.Engine) -> Any:
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        conn.exec_driver_sql(f"CREATE SCHEMA {SCHEMA}")
    yield SCHEMA
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


@pytest.mark.postgresql_only
@pytest.mark.parametrize("change", ["bulk", "renamed"])
def test_triggers_in_another_schema(env: Env, engine: sa.Engine, other_schema: str, change: str) -> None:
    env.configure = {"include_schemas": True,
                     "include_name": lambda name, kind, _: kind != "schema" or name in (None, other_schema)}
    Old, env.metadata = models(schema=other_schema)
    env.revision("0001")
    env.upgrade()
    writes(engine, "questions", 1, other_schema)
    old = base(Old)
    assert installed(engine, other_schema) == {old} and installed(engine) == set()

    child = "posts" if change == "renamed" else "questions"
    User, env.metadata = models(child, "bulk" if change == "bulk" else "trigger", other_schema)
    source = env.revision("0002")
    up, down = body(source), body(source, "downgrade")
    drop = (f"op.drop_counter_trigger('users', 'question_count', 'questions', 'user_id', parent_key='id', "
            f"schema='{other_schema}')")
    assert drop in up
    assert drop.replace("drop_", "create_")[:-1] + ", backfill=True)" in down
    env.upgrade()
    if change == "bulk":
        assert installed(engine, other_schema) == set()
        with Session(engine) as session:  # counted once: by the ORM, no trigger left
            session.add(User.questions.property.mapper.class_(id=50, user_id=1))
            session.commit()
        assert exact(engine, User, child, other_schema) == {1: 3}
    else:
        assert installed(engine, other_schema) == {base(User)}
        writes(engine, child, 2, other_schema)
        assert exact(engine, User, child, other_schema) == {1: 0, 2: 2}
    nothing_left(env, "0003")

    env.downgrade("0001")
    assert installed(engine, other_schema) == {old}
    writes(engine, "questions", 3, other_schema)
    assert exact(engine, Old, "questions", other_schema)[3] == 2
