"""Autogenerate and the ``sharded`` side table: a migration that ends a
counter's use of ``countercache_shards`` recounts it, so that no pending delta
is lost with the table's rows (an outside tester's case: sharded -> deferred
dropped the table and its pending deltas; a downgrade back from sharded did
the same).

Every check compares the columns with an independent ``SELECT count(*)``."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from test_alembic import COUNTS, Env, drifts, models_v2, schema_v1, seed, upgrade_body

pytestmark = pytest.mark.sqlite_postgresql_only


@pytest.fixture
def env(tmp_path: Path, engine: sa.Engine) -> Env:
    return Env(tmp_path / "migrations", engine)


def has_side_table(engine: sa.Engine) -> bool:
    return sa.inspect(engine).has_table("countercache_shards")


def add_questions(engine: sa.Engine, models: tuple[type, type, sa.MetaData], user: int, n: int) -> None:
    """ORM inserts under the models' strategy (``sharded``: deltas left pending)."""
    User, Question, _ = models
    with Session(engine) as s:
        s.add_all([Question(title=f"new{i}", user_id=user) for i in range(n)])
        s.commit()


def pending(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT coalesce(sum(delta), 0) FROM countercache_shards")).scalar_one()


def test_leaving_sharded_recounts_before_the_table_goes(env: Env, engine: sa.Engine) -> None:
    env.metadata = schema_v1()
    env.revision("0001")
    env.upgrade()
    seed(engine)
    sharded = models_v2("sharded")
    env.metadata = sharded[2]
    env.revision("0002")
    env.upgrade()
    assert drifts(engine) == []
    add_questions(engine, sharded, 1, 3)
    assert pending(engine) == 3 and len(drifts(engine)) == 1  # (the column lags by design)

    deferred = models_v2("deferred")
    env.metadata = deferred[2]
    body = upgrade_body(env.revision("0003"))
    assert "drop_table('countercache_shards')" in body
    assert "op.backfill_counter('users', 'question_count', 'questions', 'user_id', parent_key='id')" in body
    env.upgrade()
    assert not has_side_table(engine)
    assert drifts(engine) == []

    env.downgrade("0002")  # the table comes back empty: the recounted columns need nothing pending
    assert has_side_table(engine) and pending(engine) == 0
    assert drifts(engine) == []


def test_a_downgrade_that_drops_the_table_recounts(env: Env, engine: sa.Engine) -> None:
    env.metadata = schema_v1()
    env.revision("0001")
    env.upgrade()
    seed(engine)
    env.metadata = models_v2("bulk")[2]
    env.revision("0002")
    env.upgrade()
    sharded = models_v2("sharded")
    env.metadata = sharded[2]
    source = env.revision("0003")
    assert "create_table('countercache_shards'" in upgrade_body(source)
    env.upgrade()
    add_questions(engine, sharded, 3, 4)
    assert pending(engine) == 4

    env.downgrade("0002")  # drops the table with its 4 pending deltas: the counter is recounted
    assert not has_side_table(engine)
    assert drifts(engine) == []
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT question_count FROM users WHERE id = 3")).scalar_one() == COUNTS[3] + 4
