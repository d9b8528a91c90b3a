"""Autogenerate on SQLite with ``render_as_batch``: a counter's triggers around a batch copy.

A batch operation that rebuilds a table a ``trigger`` counter's triggers name
(its parent or counted table) failed half-applied (outside tester: ``error in
trigger cc_..._pin: no such table: main.questions``): the generated migration
now drops the triggers before the batch and creates them again, with a
recount, after it. Its downgrade, decided apart (a batch that copies nothing
one way can copy the other: an added nullable column's ``drop_column``), does
the same around its own batches that copy, and only then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from test_alembic_stale_triggers import base, exact, installed, nothing_left, writes
from test_alembic_triggers import Env, body

from countercache import counter_cache
from countercache.alembic.autogenerate import compare_counters

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
    up = body(source)
    assert "batch_op.add_column(" in up and "counter_trigger" not in up  # (its downgrade copies: below)
    env.upgrade()
    writes(engine, "questions", 1)
    assert exact(engine, User, "questions") == {1: 2}


def wrap(strategy: str = "trigger") -> tuple[str, str]:
    """The drop and the create around a batch that copies a table of ``User.question_count``."""
    sharded = ", strategy='sharded_trigger', shards=4" if strategy == "sharded_trigger" else ""
    drop = f"op.drop_counter_trigger('users', 'question_count', 'questions', 'user_id', parent_key='id'{sharded})"
    return drop, drop.replace("drop_", "create_")[:-1] + ", backfill=True)"


def wrapped(part: str, batch: str) -> bool:
    """Is ``batch`` (its first line) between one drop and one create of the counter's triggers?"""
    drop, create = wrap()
    return part.count(drop) == part.count(create) == 1 and \
        part.index(drop) < part.index(batch) < part.index(create)


def test_downgrade_of_an_added_plain_column(env: Env, engine: sa.Engine) -> None:
    """The upgrade adds a nullable column (no copy), its downgrade drops it: a copy of users,
    refused while the counter's triggers name users unless they are dropped around it."""
    User, env.metadata = models("trigger")
    env.revision("0001")
    env.upgrade()
    User, env.metadata = models("trigger", extra=True)
    source = env.revision("0002")
    up, down = body(source), body(source, "downgrade")
    assert "batch_op.add_column(" in up and "counter_trigger" not in up
    assert "batch_op.drop_column('nickname')" in down and wrapped(down, "op.batch_alter_table('users'")
    env.upgrade()
    writes(engine, "questions", 1)
    assert exact(engine, User, "questions") == {1: 2}
    env.downgrade("0001")  # batch_op.drop_column('nickname'): SQLite copies users
    assert installed(engine) == {base(User)}
    writes(engine, "questions", 2)
    assert exact(engine, User, "questions") == {1: 2, 2: 2}


def test_upgrade_that_copies_whose_downgrade_does_not(env: Env, engine: sa.Engine) -> None:
    """The mirror case: the upgrade drops a nullable column (a copy of users), its downgrade adds
    it again (ALTER TABLE, no copy) and keeps the triggers as they are."""
    User, env.metadata = models("trigger", extra=True)
    env.revision("0001")
    env.upgrade()
    writes(engine, "questions", 1)
    User, env.metadata = models("trigger")
    source = env.revision("0002")
    up, down = body(source), body(source, "downgrade")
    assert "batch_op.drop_column('nickname')" in up and wrapped(up, "op.batch_alter_table('users'")
    assert "batch_op.add_column(" in down and "counter_trigger" not in down
    env.upgrade()
    assert installed(engine) == {base(User)}
    writes(engine, "questions", 2)
    assert exact(engine, User, "questions") == {1: 2, 2: 2}
    nothing_left(env, "0003")
    env.downgrade("0001")
    assert installed(engine) == {base(User)}
    writes(engine, "questions", 3)
    assert exact(engine, User, "questions") == {1: 2, 2: 2, 3: 2}


@pytest.mark.parametrize("change", ["added", "dropped", "both"])
def test_autogenerate_twice_wraps_once(env: Env, engine: sa.Engine, change: str) -> None:
    """The comparator run a second time over the same operations (as Alembic runs the
    downgrade from them: reversed after) adds no second drop or create, in either direction."""
    before, after = {"added": ({}, {"extra": True}), "dropped": ({"extra": True}, {}),
                     "both": ({"extra": True, "legacy": True}, {"legacy": False})}[change]
    User, env.metadata = models("trigger", **before)
    env.revision("0001")
    env.upgrade()
    User, env.metadata = models("trigger", **after)

    def again(context: Any, revision: Any, directives: list[Any]) -> None:
        script = directives[0]
        compare_counters(AutogenContext(context, env.metadata), script.upgrade_ops_list[-1])
        script.upgrade_ops_list[-1].reverse_into(script.downgrade_ops_list[-1])

    env.configure["process_revision_directives"] = again
    source = env.revision("0002")
    del env.configure["process_revision_directives"]
    up, down = body(source), body(source, "downgrade")
    drop, create = wrap()
    assert (up.count(drop), up.count(create)) == ((0, 0) if change == "added" else (1, 1))
    assert (down.count(drop), down.count(create)) == ((0, 0) if change == "dropped" else (1, 1))
    env.upgrade()
    writes(engine, "questions", 1)
    env.downgrade("0001")
    assert installed(engine) == {base(User)}
    writes(engine, "questions", 2)
    assert exact(engine, User, "questions") == {1: 2, 2: 2}
