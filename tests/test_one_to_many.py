"""One-to-many counters: every way a child is added, removed or moved (SPEC §4).

Each case runs for each strategy (the shared ``strategy`` fixture) on each
backend and compares the counters against an independent ``SELECT count(*)``
after commit, and the parents as the application sees them (in memory; for
``sharded``, whose column lags until a fold, through ``countercache.exact``)
against the database.
"""

from __future__ import annotations

import countercache
from sqlalchemy import select
from sqlalchemy.orm import Session

from helpers import assert_counts, exact_value
from models import qa, seed


def setup(engine, strategy, **kw):
    m = qa(strategy, **kw)
    m.Base.metadata.create_all(engine)
    return m


def deferred(m):
    return countercache.configured_strategy(m.User.question_count) == "deferred"


def flushed(s, m):
    """After a flush: parents are right, except with ``deferred`` (right at commit)."""
    if not deferred(m):
        in_memory_matches_database(s, m)


def commit(s, m):
    """Commit, then every loaded parent is right in memory (the sessions keep values on commit)."""
    s.commit()
    in_memory_matches_database(s, m)


def in_memory_matches_database(s, m):
    """Every loaded user's counter equals the real count, without refresh()
    (``sharded``: ``countercache.exact``, which includes what the transaction holds)."""
    for user in list(s.identity_map.values()):
        if isinstance(user, m.User):
            assert exact_value(s, user) == m.real(s, user.id), f"user {user.id} stale in memory"


# -- adding ------------------------------------------------------------------


def test_add_through_relationship(engine, strategy):
    m = setup(engine, strategy)
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        user = s.get(m.User, c)
        s.add_all([m.Question(user=user), m.Question(user=user)])
        s.flush()
        flushed(s, m)
        commit(s, m)
    assert assert_counts(engine) == {a: 3, b: 2, c: 2}


def test_add_through_foreign_key(engine, strategy):
    m = setup(engine, strategy)
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        user = s.get(m.User, b)
        s.add_all([m.Question(user_id=b), m.Question(user_id=a), m.Question(user_id=None)])
        s.flush()
        flushed(s, m)
        commit(s, m)
        assert exact_value(s, user) == 3
    assert assert_counts(engine) == {a: 4, b: 3, c: 0}


def test_add_through_collection(engine, strategy):
    m = setup(engine, strategy)
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        user = s.get(m.User, a)
        user.questions.append(m.Question())
        user.questions.extend([m.Question(), m.Question()])
        commit(s, m)
        assert exact_value(s, user) == 6
    assert assert_counts(engine) == {a: 6, b: 2, c: 0}


def test_pending_parent_gets_key_in_same_flush(engine, strategy):
    m = setup(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        by_collection = m.User(questions=[m.Question(), m.Question()])
        by_relationship = m.User()
        s.add_all([by_collection, by_relationship, m.Question(user=by_relationship)])
        s.flush()
        assert not s.dirty
        commit(s, m)
        assert exact_value(s, by_collection) == 2
        assert exact_value(s, by_relationship) == 1
    assert sorted(assert_counts(engine).values()) == [1, 2]


# -- removing ----------------------------------------------------------------


def test_session_delete(engine, strategy):
    m = setup(engine, strategy)
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        user = s.get(m.User, a)
        s.delete(user.questions[0])
        s.delete(s.scalars(select(m.Question).where(m.Question.user_id == b)).first())
        s.flush()
        flushed(s, m)
        commit(s, m)
    assert assert_counts(engine) == {a: 2, b: 1, c: 0}


def test_delete_orphan_from_collection(engine, strategy):
    m = setup(engine, strategy, cascade="all, delete-orphan")
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        user = s.get(m.User, a)
        user.questions.pop()
        user.questions.remove(user.questions[0])
        commit(s, m)
        assert exact_value(s, user) == 1
    assert assert_counts(engine) == {a: 1, b: 2, c: 0}


def test_delete_orphan_by_setting_parent_none(engine, strategy):
    m = setup(engine, strategy, cascade="all, delete-orphan")
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        question = s.scalars(select(m.Question).where(m.Question.user_id == b)).first()
        question.user = None  # the flush decides this child is an orphan and deletes it
        commit(s, m)
    assert assert_counts(engine) == {a: 3, b: 1, c: 0}


def test_children_deleted_with_parent(engine, strategy):
    m = setup(engine, strategy, cascade="all, delete-orphan")
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        s.delete(s.get(m.User, a))
        commit(s, m)
    assert assert_counts(engine) == {b: 2, c: 0}


def test_parent_deleted_children_set_null(engine, strategy):
    """Without a delete cascade the ORM nulls the children's key: the deleted parent needs nothing."""
    m = setup(engine, strategy)
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        s.delete(s.get(m.User, a))
        commit(s, m)
        assert m.real(s, a) == 0
    assert assert_counts(engine) == {b: 2, c: 0}


# -- moving ------------------------------------------------------------------


def test_reparent_by_foreign_key(engine, strategy):
    m = setup(engine, strategy)
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        users = {u.id: u for u in s.scalars(select(m.User))}
        for q in s.scalars(select(m.Question).where(m.Question.user_id == a)).all()[:2]:
            q.user_id = c
        s.flush()
        flushed(s, m)
        commit(s, m)
        assert (exact_value(s, users[a]), exact_value(s, users[c])) == (1, 2)
    assert assert_counts(engine) == {a: 1, b: 2, c: 2}


def test_reparent_by_relationship(engine, strategy):
    m = setup(engine, strategy)
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        target = s.get(m.User, b)
        for q in s.scalars(select(m.Question).where(m.Question.user_id == a)):
            q.user = target
        commit(s, m)
        assert exact_value(s, target) == 5
    assert assert_counts(engine) == {a: 0, b: 5, c: 0}


def test_reparent_by_collection_append(engine, strategy):
    m = setup(engine, strategy)
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        source, target = s.get(m.User, a), s.get(m.User, c)
        target.questions.append(source.questions[0])
        s.flush()
        flushed(s, m)
        commit(s, m)
    assert assert_counts(engine) == {a: 2, b: 2, c: 1}


def test_reparent_to_pending_parent(engine, strategy):
    m = setup(engine, strategy)
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        new = m.User(name="new")
        s.add(new)
        for q in s.scalars(select(m.Question).where(m.Question.user_id == a)):
            q.user = new
        commit(s, m)
        assert exact_value(s, new) == 3
    counts = assert_counts(engine)
    assert counts[a] == 0 and sorted(counts.values()) == [0, 0, 2, 3]


def test_parent_set_to_none_and_back(engine, strategy):
    m = setup(engine, strategy)
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        q1, q2 = s.scalars(select(m.Question).where(m.Question.user_id == a)).all()[:2]
        q1.user = None
        q2.user_id = None
        commit(s, m)
    assert assert_counts(engine) == {a: 1, b: 2, c: 0}
    with Session(engine, expire_on_commit=False) as s:
        orphans = s.scalars(select(m.Question).where(m.Question.user_id.is_(None))).all()
        orphans[0].user = s.get(m.User, c)
        orphans[1].user_id = c
        commit(s, m)
    assert assert_counts(engine) == {a: 1, b: 2, c: 2}


def test_reparent_with_unloaded_old_value(engine, strategy):
    """The foreign key's old value was never loaded: the database says where the child was."""
    m = setup(engine, strategy)
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        q = s.scalars(select(m.Question).where(m.Question.user_id == a)).first()
        s.expire(q)
        q.user_id = b
        commit(s, m)
    assert assert_counts(engine) == {a: 2, b: 3, c: 0}


def test_move_then_delete_counts_where_row_was(engine, strategy):
    m = setup(engine, strategy)
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        q = s.scalars(select(m.Question).where(m.Question.user_id == a)).first()
        q.user_id = b
        s.delete(q)
        commit(s, m)
    assert assert_counts(engine) == {a: 2, b: 2, c: 0}


# -- several flushes ---------------------------------------------------------


def test_many_flushes_and_autoflush_in_one_transaction(engine, strategy):
    m = setup(engine, strategy, cascade="all, delete-orphan")
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        ua, uc = s.get(m.User, a), s.get(m.User, c)
        for _i in range(4):
            s.add(m.Question(user_id=c))
            # the query autoflushes the pending question
            moved = s.scalars(select(m.Question).where(m.Question.user_id == a)).first()
            if moved is not None:
                moved.user = uc
        s.flush()
        flushed(s, m)
        commit(s, m)
        assert exact_value(s, ua) == 0
    assert assert_counts(engine) == {a: 0, b: 2, c: 7}


def test_rollback_leaves_nothing_counted(engine, strategy):
    m = setup(engine, strategy)
    a, b, c = seed(engine, m)
    with Session(engine, expire_on_commit=False) as s:
        user = s.get(m.User, a)
        user.questions.append(m.Question())
        s.flush()
        assert exact_value(s, user) == (3 if deferred(m) else 4)
        s.rollback()
        assert exact_value(s, user) == 3
    assert assert_counts(engine) == {a: 3, b: 2, c: 0}
