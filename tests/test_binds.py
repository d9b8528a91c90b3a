"""A session with several binds (issue 16): each counter write goes to its parent's bind.

``Session(binds={User: e1, Question: e2})``: the users live on one database,
the questions on another (here the backend under test and a SQLite file).
Every strategy writes ``User.question_count`` on the users' database, never on
the connection of the flush's child row.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

import countercache

from models import qa
from helpers import orm_kept_only


def test_each_parent_is_written_on_its_own_bind(engine, strategy, tmp_path):
    orm_kept_only(strategy, "a trigger keeps a counter within one database (refused, see test_trigger_strategy)")
    m = qa(strategy)
    other = sa.create_engine(f"sqlite:///{tmp_path / 'questions.db'}")
    try:
        shard_tables = [t for name, t in m.Base.metadata.tables.items() if name == "countercache_shards"]
        m.Base.metadata.create_all(engine, tables=[m.User.__table__, *shard_tables])
        m.Base.metadata.create_all(other, tables=[m.Question.__table__])
        binds = {m.User: engine, m.Question: other}
        with Session(binds=binds) as s:
            s.add_all([m.User(id=1), m.User(id=2)])
            s.commit()
        with Session(binds=binds, expire_on_commit=False) as s:
            u1 = s.get(m.User, 1)
            s.add_all([m.Question(id=1, user_id=1), m.Question(id=2, user_id=1), m.Question(id=3, user_id=2)])
            s.flush()
            s.get(m.Question, 2).user_id = 2
            s.flush()
            s.delete(s.get(m.Question, 1))
            s.commit()
            assert countercache.exact(s, u1, "question_count") == 0
        countercache.fold(engine)
        with engine.connect() as conn:
            stored = dict(conn.execute(text("SELECT id, question_count FROM users")).all())
        with other.connect() as conn:
            real = dict(conn.execute(select(m.Question.user_id, func.count()).group_by(m.Question.user_id)).all())
        assert stored == {1: real.get(1, 0), 2: real.get(2, 0)} == {1: 0, 2: 2}
    finally:
        other.dispose()
