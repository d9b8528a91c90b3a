"""Property-based: random sequences of add, delete, move, flush, commit, rollback
and savepoints, checked against a plain Python model of the expected counts
(hypothesis; SQLite and PostgreSQL). After every commit and every rollback the
stored counters, the in-memory parents and ``SELECT count(*)`` must all equal
the model.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from conftest import sqlite_real_transactions
import countercache
from models import qa

pytestmark = pytest.mark.sqlite_postgresql_only

PARENTS = 3
parent_index = st.one_of(st.none(), st.integers(0, PARENTS - 1))


def test_random_sequences_match_model(engine, backend, strategy):
    if backend == "sqlite":
        # savepoints need real transactions on pysqlite (released savepoints
        # would otherwise commit): SQLAlchemy's documented recipe
        engine.dispose()
        sqlite_real_transactions(engine)
    m = qa(strategy)
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all(m.User(name=f"p{i}") for i in range(PARENTS))
        s.commit()
        ids = sorted(s.scalars(text("SELECT id FROM users")).all())

    class Model(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            with engine.begin() as conn:  # each example starts from empty parents
                conn.execute(text("DELETE FROM questions"))
                conn.execute(text("UPDATE users SET question_count = 0"))
                if strategy == "sharded":
                    conn.execute(text("DELETE FROM countercache_shards"))
            self.s = Session(engine, expire_on_commit=False)
            self.users = [self.s.get(m.User, i) for i in ids]
            # The model: child id -> parent index, as the transaction sees it;
            # what was committed; a copy per open savepoint.
            self.live: dict[int, int | None] = {}
            self.committed: dict[int, int | None] = {}
            self.savepoints: list[dict[int, int | None]] = []
            self.objects: dict[int, object] = {}
            self.next_id = 1

        def teardown(self):
            self.s.close()

        def child(self, data):
            qid = data.draw(st.sampled_from(sorted(self.live)))
            return qid, self.objects[qid]

        def reload(self):
            """After a rollback: the surviving children, as this session now holds them."""
            self.objects = {qid: self.s.get(m.Question, qid) for qid in self.live}

        @rule(parent=parent_index)
        def add(self, parent):
            qid, self.next_id = self.next_id, self.next_id + 1
            q = m.Question(id=qid, user_id=None if parent is None else ids[parent])
            self.s.add(q)
            self.objects[qid] = q
            self.live[qid] = parent

        @precondition(lambda self: self.live)
        @rule(data=st.data())
        def delete(self, data):
            qid, q = self.child(data)
            if inspect(q).pending:
                self.s.flush()  # a pending child is deleted like any other
            self.s.delete(q)
            del self.live[qid], self.objects[qid]

        @precondition(lambda self: self.live)
        @rule(data=st.data(), parent=parent_index, through_relationship=st.booleans())
        def move(self, data, parent, through_relationship):
            qid, q = self.child(data)
            if through_relationship:
                # SQLAlchemy ignores "= None" on a many-to-one it never
                # loaded: load it (fresh) first, as an application would have
                self.s.flush()
                self.s.expire(q, ["user"])
                q.user  # noqa: B018
                q.user = None if parent is None else self.users[parent]
            else:
                if inspect(q).attrs.user.history.has_changes():
                    # an unflushed q.user = ... would win over the key at flush
                    self.s.flush()
                q.user_id = None if parent is None else ids[parent]
            self.live[qid] = parent

        @rule()
        def flush(self):
            self.s.flush()

        @precondition(lambda self: strategy == "sharded" and (backend != "sqlite" or not self.s.in_transaction()))
        @rule()
        def fold(self):
            countercache.fold(engine)  # another connection, while this session works

        @rule()
        def commit(self):
            self.s.commit()
            self.savepoints.clear()
            self.committed = dict(self.live)
            self.check()

        @rule()
        def rollback(self):
            self.s.rollback()
            self.savepoints.clear()
            self.live = dict(self.committed)
            self.reload()
            self.check()

        @precondition(lambda self: len(self.savepoints) < 2)
        @rule()
        def begin_savepoint(self):
            self.s.begin_nested()
            self.savepoints.append(dict(self.live))

        @precondition(lambda self: self.savepoints)
        @rule()
        def rollback_savepoint(self):
            self.s.get_nested_transaction().rollback()
            self.live = self.savepoints.pop()
            self.reload()

        @precondition(lambda self: self.savepoints)
        @rule()
        def release_savepoint(self):
            self.s.get_nested_transaction().commit()
            self.savepoints.pop()

        def check(self):
            expected = [sum(1 for p in self.committed.values() if p == i) for i in range(PARENTS)]
            with engine.connect() as conn:
                rows = conn.execute(text(
                    "SELECT u.question_count, (SELECT count(*) FROM questions q WHERE q.user_id = u.id) "
                    "FROM users u ORDER BY u.id"
                )).all()
            assert [r[1] for r in rows] == expected, "the model itself is off (a test bug)"
            if strategy == "sharded":
                pending = {i: 0 for i in ids}
                with engine.connect() as conn:
                    for key, delta in conn.execute(text("SELECT parent_key, delta FROM countercache_shards")):
                        pending[int(key)] += delta
                stored = [r[0] + pending[i] for r, i in zip(rows, ids)]
                assert stored == expected, f"column + shards {stored} != {expected}"
                exact = [countercache.exact(self.s, u, "question_count") for u in self.users]
                assert exact == expected, f"exact() {exact} != {expected}"
                return
            assert [r[0] for r in rows] == expected, f"stored counters {[r[0] for r in rows]} != {expected}"
            assert [u.question_count for u in self.users] == expected, "in-memory parents are stale"

        @invariant()
        def never_dirty_from_counters(self):
            for user in self.users:
                assert "question_count" not in inspect(user).committed_state

    run_state_machine_as_test(
        Model,
        settings=settings(
            max_examples=40 if backend == "sqlite" else 15,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            database=None,
        ),
    )
