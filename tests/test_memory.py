"""Parents in memory (SPEC §5): fresh after the flush, never dirty, never assigned.

A ``sharded`` column is only moved by ``countercache.fold()``: its value in
memory lags by design, so these tests read it through ``countercache.exact``
(``helpers.exact_value``) and check the lag itself where it matters.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

import countercache
from countercache import CounterCacheError
from helpers import assert_counts, exact_value, orm_kept_only
from models import qa_seeded


def settle(s, strategy):
    """Flush, or commit for ``deferred`` and ``sharded`` (whose counters move at commit)."""
    if strategy in ("deferred", "sharded"):
        s.commit()
    else:
        s.flush()


def setup(engine, strategy, **kw):
    """Two users without questions."""
    return qa_seeded(engine, strategy, (0, 0), **kw)[0]


def test_new_value_without_select_where_returning_exists(engine, strategy, statements, backend):
    m = setup(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        a, b = s.scalars(select(m.User).order_by(m.User.id)).all()
        assert (a.question_count, b.question_count) == (0, 0)
        a.questions.extend([m.Question(), m.Question()])
        s.add(m.Question(user_id=b.id))
        settle(s, strategy)
        with statements.record() as rec:
            values = (a.question_count, b.question_count)
        if strategy == "sharded":  # the column lags until a fold; nothing to read back
            assert values == (0, 0) and len(rec) == 0, rec.sql()
            assert (exact_value(s, a), exact_value(s, b)) == (2, 1)
        else:
            assert values == (2, 1)
            # (MariaDB has no UPDATE ... RETURNING: with expire_on_commit=False, as
            # here, read back at the flush; else expired and read on access)
            assert len(rec) == 0, rec.sql()
        s.commit()


def test_counter_never_makes_parent_dirty(engine, strategy):
    m = setup(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        a = s.scalars(select(m.User).order_by(m.User.id)).first()
        s.add(m.Question(user=a))
        settle(s, strategy)
        assert a not in s.dirty
        assert not s.is_modified(a)
        assert exact_value(s, a) == 1
        assert a not in s.dirty
        s.commit()


def test_version_id_not_bumped(engine, strategy):
    m = setup(engine, strategy, version=True)
    with Session(engine) as s:
        a = s.scalars(select(m.User).order_by(m.User.id)).first()
        version = a.version_id
        a.questions.append(m.Question())
        s.commit()
        assert exact_value(s, a) == 1
        assert a.version_id == version
        a.name = "renamed"  # the user's own change still versions, and does not conflict
        s.commit()
        assert a.version_id == version + 1
    assert_counts(engine)


def test_assignment_refused(engine, strategy):
    m = setup(engine, strategy)
    with Session(engine) as s:
        a = s.scalars(select(m.User)).first()
        with pytest.raises(CounterCacheError, match=r"User\.question_count"):
            a.question_count = 5
        with pytest.raises(CounterCacheError, match=r"User\.question_count"):
            m.User(question_count=3)
        assert a.question_count == 0 and not s.dirty


def test_merge_of_loaded_parent_is_not_assignment(engine, strategy):
    m = setup(engine, strategy)
    with Session(engine) as s:
        detached = s.scalars(select(m.User).order_by(m.User.id)).first()
        s.expunge(detached)
    with Session(engine) as s:
        s.add(m.Question(user_id=detached.id))
        s.commit()
        merged = s.merge(detached)
        assert exact_value(s, merged) == 1
        s.commit()
    assert_counts(engine)


def test_suspended_flush_is_never_counted(engine, strategy):
    orm_kept_only(strategy, "suspended() cannot suspend the database's triggers: they count inside it")
    m = setup(engine, strategy)
    with Session(engine) as s:
        a = s.scalars(select(m.User).order_by(m.User.id)).first()
        with countercache.suspended(s):
            s.add_all([m.Question(user=a), m.Question(user=a)])
            s.flush()
        s.add(m.Question(user=a))
        s.commit()
        assert exact_value(s, a) == 1
        assert m.real(s, a.id) == 3


def test_expire_on_commit_false_keeps_the_value_after_close(engine, strategy):
    """With ``expire_on_commit=False`` the application reads its objects after
    the commit, often detached: the counter must be there, not expired
    (MariaDB/MySQL have no UPDATE ... RETURNING: it is read back at the flush)."""
    m, (a, b, c) = qa_seeded(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        user = s.get(m.User, a)
        user.questions.append(m.Question(title="new"))
        s.flush()
        s.add(m.Question(title="other", user_id=a))
        s.commit()
    expected = assert_counts(engine)[a]
    if strategy == "sharded":  # (its column lags until a fold: in memory as stored before the fold)
        return
    assert user.question_count == expected  # detached: no load possible


@pytest.mark.parametrize("rollback", ["explicit", "context"])
def test_a_savepoint_rolled_back_leaves_no_expired_counter_at_a_keeping_commit(engine, strategy, rollback):
    """``expire_on_commit=False``: a savepoint's rollback takes its counts back
    by expiring the counters it had set; the commit reads them back, so that
    the objects, used after it detached, hold the value (outside tester: the
    counter stayed expired, DetachedInstanceError). Inside ``with
    begin_nested():`` nothing may run after its rollback until it ends: the
    read waits for the commit."""
    m, (a, b) = qa_seeded(engine, strategy, (0, 0))
    with Session(engine, expire_on_commit=False) as s:
        user = s.get(m.User, b)
        s.add(m.Question(title="kept", user_id=b))
        s.flush()
        if rollback == "explicit":
            nested = s.begin_nested()
            s.add(m.Question(title="gone", user_id=b))
            s.flush()
            nested.rollback()
        else:
            with s.begin_nested() as nested:
                s.add(m.Question(title="gone", user_id=b))
                s.flush()
                nested.rollback()
        s.commit()
    expected = assert_counts(engine)[b]
    assert expected == 1
    if strategy == "sharded":  # (its column lags until a fold)
        return
    assert user.question_count == expected  # detached: no load possible


def stored(engine_or_session, user_id: int) -> int:
    return engine_or_session.execute(text("SELECT question_count FROM users WHERE id = :i"), {"i": user_id}).scalar()


def written_at_the_commit(strategy: str) -> None:
    if strategy in ("deferred", "sharded", "sharded_trigger"):
        pytest.skip(f"{strategy}: the column changes at the commit (or a fold), not in the savepoint")


def test_a_parent_loaded_inside_a_rolled_back_savepoint_shows_no_value_of_it(engine, strategy):
    """A savepoint changes a counter while its parent is not loaded, then loads it and
    changes it again: what it showed was the savepoint's own; after the rollback it
    shows the database's, not that (found by a second reader)."""
    written_at_the_commit(strategy)
    m, ids = qa_seeded(engine, strategy, per_user=(0,))
    with Session(engine) as s:
        s.execute(select(m.Question)).all()  # (the transaction begun)
        with s.begin_nested() as savepoint:
            s.add(m.Question(user_id=ids[0]))
            s.flush()
            user = s.get(m.User, ids[0])
            assert user.question_count == 1
            s.add(m.Question(user_id=ids[0]))
            s.flush()
            assert user.question_count == 2
            savepoint.rollback()
        assert user.question_count == stored(s, ids[0]) == 0
        s.commit()
    assert_counts(engine)


def test_a_parent_deleted_inside_a_rolled_back_savepoint_comes_back_with_its_counter(engine, strategy):
    """The savepoint deletes one of a parent's children, then the parent (and its other
    child): SQLAlchemy puts the parent back after the rollback, with the counter it had
    before the savepoint (found by a second reader: it kept the lowered one)."""
    written_at_the_commit(strategy)
    m, ids = qa_seeded(engine, strategy, per_user=(2,), cascade="all, delete-orphan")
    with Session(engine) as s:
        user = s.get(m.User, ids[0])
        assert user.question_count == 2
        with s.begin_nested() as savepoint:
            user.questions.pop(0)  # (an orphan: deleted)
            s.flush()
            assert user.question_count == 1
            s.delete(user)
            s.flush()
            savepoint.rollback()
        assert user in s
        assert user.question_count == stored(s, ids[0]) == 2
        s.commit()
    assert_counts(engine)


def test_a_parent_deleted_and_replaced_under_its_key_in_a_rolled_back_savepoint(engine, strategy):
    """The savepoint deletes a parent and adds a new one under its key: after the rollback
    the first one is back with its own counter, not the newcomer's (second reader)."""
    written_at_the_commit(strategy)
    m, ids = qa_seeded(engine, strategy, per_user=(2,), cascade="all, delete-orphan")
    with Session(engine) as s:
        first = s.get(m.User, ids[0])
        assert first.question_count == 2
        with s.begin_nested() as savepoint:
            s.delete(first)
            s.flush()
            newcomer = m.User(id=ids[0])
            s.add(newcomer)
            s.flush()
            s.add(m.Question(user=newcomer))
            s.flush()
            savepoint.rollback()
        assert s.get(m.User, ids[0]) is first
        assert first.question_count == stored(s, ids[0]) == 2
        s.commit()
    assert_counts(engine)


def test_a_counter_reconciled_inside_a_rolled_back_savepoint_shows_the_value_before(engine, strategy):
    """``reconcile()`` inside a savepoint expires what it repairs, a query loads it again
    (SQLAlchemy fills in the attribute only: the object counts as loaded before), a flush
    changes it: after the rollback it shows what it showed before (second reader)."""
    orm_kept_only(strategy, "reconcile() of a database-kept counter repairs nothing the ORM shows")
    written_at_the_commit(strategy)
    m, ids = qa_seeded(engine, strategy, per_user=(2,))
    with engine.begin() as c:
        c.execute(text("UPDATE users SET question_count = 5"))  # (drift)
    with Session(engine) as s:
        user = s.get(m.User, ids[0])
        assert user.question_count == 5
        with s.begin_nested() as savepoint:
            countercache.reconcile(s)
            s.scalars(select(m.User)).all()
            assert user.question_count == 2
            s.add(m.Question(user_id=ids[0]))
            s.flush()
            savepoint.rollback()
        assert user.question_count == stored(s, ids[0]) == 5
        s.rollback()
