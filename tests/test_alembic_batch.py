"""Autogenerate on SQLite with ``render_as_batch``: a counter's triggers around a batch copy.

A batch operation that rebuilds a table a ``trigger`` counter's triggers name
(its parent or counted table) failed half-applied (outside tester: ``error in
trigger cc_..._pin: no such table: main.questions``): the generated migration
now drops the triggers before the batch and creates them again, with a
recount, after it; its downgrade does the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from test_alembic_stale_triggers import base, exact, installed, nothing_left, writes
from test_alembic_triggers import Env, body

from countercache import counter_cache

pytestmark = pytest.mark.sqlite_only


@pytest.fixture
def env(tmp_path: Path, engine: sa.Engine) -> Env:
    made = Env(tmp_path / "migrations", engine)
    made.configure = {"render_as_batch": True}
    return made


def models(strategy: str, legacy: bool = False, extra: bool = False) -> tuple[type, Any]:
    """``User.question_count``; ``legacy``: a column on each table, ``extra``: one more on users."""
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        questions: Mapped[list[Question]] = relationship()
        question_count: Mapped[int] = counter_cache("questions", strategy=strategy,
                                                    **({"shards": 4} if strategy == "sharded_trigger" else {}))
        if legacy:
            legacy_flag: Mapped[int | None] = mapped_column()
        if extra:
            nickname: Mapped[str | None] = mapped_column(sa.String(20))

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id"))
        if legacy:
            note: Mapped[str | None] = mapped_column(sa.String(20), nullable=False, server_default="")

    sa.orm.configure_mappers()
    return User, Base.metadata


@pytest.mark.parametrize("strategy", ["trigger", "sharded_trigger"])
def test_batch_copies_of_a_counters_tables(env: Env, engine: sa.Engine, strategy: str) -> None:
    User, env.metadata = models(strategy, legacy=True)
    env.revision("0001")
    env.upgrade()
    writes(engine, "questions", 1)
    assert exact(engine, User, "questions") == {1: 2}

    User, env.metadata = models(strategy)
    source = env.revision("0002")
    up, down = body(source), body(source, "downgrade")
    sharded = ", strategy='sharded_trigger', shards=4" if strategy == "sharded_trigger" else ""
    drop = f"op.drop_counter_trigger('users', 'question_count', 'questions', 'user_id', parent_key='id'{sharded})"
    create = drop.replace("drop_", "create_")[:-1] + ", backfill=True)"
    batches = [up.index("op.batch_alter_table('questions'"), up.index("op.batch_alter_table('users'")]
    assert up.count(drop) == up.count(create) == 1
    assert up.index(drop) < min(batches) < max(batches) < up.index(create)
    batches = [down.index("op.batch_alter_table('questions'"), down.index("op.batch_alter_table('users'")]
    assert down.index(drop) < min(batches) < max(batches) < down.index(create)
    env.upgrade()  # (the copies were refused: "error in trigger cc_..._pin: no such table: main.questions")
    assert installed(engine) == {base(User)}
    writes(engine, "questions", 2)
    assert exact(engine, User, "questions") == {1: 2, 2: 2}
    nothing_left(env, "0003")

    env.downgrade("0001")
    assert installed(engine) == {base(User)}
    writes(engine, "questions", 3)
    assert exact(engine, User, "questions") == {1: 2, 2: 2, 3: 2}


def test_a_batch_that_copies_nothing_keeps_the_triggers(env: Env, engine: sa.Engine) -> None:
    User, env.metadata = models("trigger")
    env.revision("0001")
    env.upgrade()
    User, env.metadata = models("trigger", extra=True)  # (a nullable column added: ALTER TABLE, no copy)
    source = env.revision("0002")
    assert "batch_op.add_column(" in body(source) and "counter_trigger" not in source
    env.upgrade()
    writes(engine, "questions", 1)
    assert exact(engine, User, "questions") == {1: 2}
