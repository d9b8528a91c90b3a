"""Statement counts the contract promises (SPEC §2)."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from helpers import assert_counts
from models import qa


def setup(engine, strategy, n_users=10, **kw):
    m = qa(strategy, **kw)
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all(m.User(name=f"u{i}") for i in range(n_users))
        s.commit()
        ids = list(s.scalars(select(m.User.id).order_by(m.User.id)))
    return m, ids


def test_bulk_one_update_per_parent_table_per_flush(engine, statements):
    m, ids = setup(engine, "bulk")
    with Session(engine) as s:
        with statements.record() as rec:
            s.add_all(m.Question(user_id=ids[i % 10]) for i in range(50))
            s.flush()
        assert len(rec.updates_to("users")) == 1
        s.commit()
    with Session(engine) as s:
        questions = s.scalars(select(m.Question).order_by(m.Question.id)).all()
        with statements.record() as rec:
            for q in questions[:20]:
                s.delete(q)
            for q in questions[20:35]:
                q.user_id = ids[(q.user_id - ids[0] + 3) % 10]
            s.flush()
        assert len(rec.updates_to("users")) == 1
        s.commit()
    assert sum(assert_counts(engine).values()) == 30


def test_per_row_one_update_per_changed_child_row(engine, statements):
    m, ids = setup(engine, "per_row")
    with Session(engine) as s:
        with statements.record() as rec:
            s.add_all(m.Question(user_id=ids[i % 10]) for i in range(12))
            s.flush()
        assert len(rec.updates_to("users")) == 12
        s.commit()
    with Session(engine) as s:
        questions = s.scalars(select(m.Question).order_by(m.Question.id)).all()
        with statements.record() as rec:
            s.delete(questions[0])
            questions[1].user_id = ids[5]  # moves: old -1 and new +1 in one statement
            questions[2].title = "not counted"
            s.flush()
        assert len(rec.updates_to("users")) == 2
        s.commit()
    assert sum(assert_counts(engine).values()) == 11


@pytest.mark.parametrize("strategy", ["bulk", "per_row"])
def test_net_zero_emits_nothing(engine, statements, strategy):
    m, ids = setup(engine, strategy)
    with Session(engine) as s:
        s.add_all([m.Question(user_id=ids[0]), m.Question(user_id=ids[1])])
        s.commit()
    with Session(engine) as s:
        q0, q1 = s.scalars(select(m.Question).order_by(m.Question.id)).all()
        with statements.record() as rec:
            q0.user_id = ids[2]
            q0.user_id = ids[0]  # one child's changes cancel out
            if strategy == "bulk":
                q1.user_id = ids[0]  # parents' deltas cancel within the flush
                s.delete(q0)
                s.add(m.Question(user_id=ids[1]))
            s.flush()
        assert rec.updates_to("users") == []
        s.commit()
    assert_counts(engine)


@pytest.mark.parametrize("strategy", ["bulk", "per_row"])
def test_flush_without_counted_changes_emits_nothing_extra(engine, statements, strategy):
    m, ids = setup(engine, strategy)
    with Session(engine) as s:
        s.add(m.Question(user_id=ids[0]))
        s.commit()
    with Session(engine) as s:
        q = s.scalars(select(m.Question)).one()
        user = s.get(m.User, ids[1])
        with statements.record() as rec:
            s.add(m.Tag(name="x"))
            q.title = "edited"
            user.name = "renamed"
            s.flush()
        kinds = sorted(sql.split()[0].upper() for sql in rec.sql())
        assert kinds == ["INSERT", "UPDATE", "UPDATE"], rec.sql()
        s.commit()
    assert_counts(engine)


def test_bulk_orders_parent_tables_and_skips_deleted_parents(engine, statements):
    m, ids = setup(engine, "bulk", cascade="all, delete-orphan")
    with Session(engine) as s:
        for uid in ids[:3]:
            s.add_all([m.Question(user_id=uid), m.Question(user_id=uid)])
        s.commit()
    with Session(engine) as s:
        s.delete(s.get(m.User, ids[0]))  # its questions go with it; no error for the gone parent
        s.add(m.Question(user_id=ids[1]))
        s.commit()
    assert assert_counts(engine)[ids[1]] == 3


def test_deferred_one_update_per_parent_table_per_transaction(engine, statements):
    m, ids = setup(engine, "deferred")
    with Session(engine, expire_on_commit=False) as s:
        users = s.scalars(select(m.User).order_by(m.User.id)).all()
        with statements.record() as rec:
            for round_ in range(3):  # three flushes, one of them an autoflush
                s.add_all(m.Question(user_id=ids[(i + round_) % 10]) for i in range(7))
                if round_ == 1:
                    s.scalars(select(m.Question)).all()
                else:
                    s.flush()
        assert rec.updates_to("users") == []  # nothing before the commit
        assert users[0].question_count == 0
        with statements.record() as rec:
            s.commit()
        assert len(rec.updates_to("users")) == 1
        assert sum(u.question_count for u in users) == 21
    assert sum(assert_counts(engine).values()) == 21


def test_deferred_net_zero_transaction_emits_nothing(engine, statements):
    m, ids = setup(engine, "deferred")
    with Session(engine) as s:
        s.add(m.Question(user_id=ids[0]))
        s.commit()
    with Session(engine) as s:
        q = s.scalars(select(m.Question)).one()
        with statements.record() as rec:
            q.user_id = ids[1]
            s.flush()
            q.user_id = ids[0]  # moved back in a second flush: the transaction nets to zero
            s.flush()
            s.add(m.Question(user_id=ids[2]))
            s.flush()
            s.delete(s.scalars(select(m.Question).where(m.Question.user_id == ids[2])).one())
            s.commit()
        assert rec.updates_to("users") == []
    assert assert_counts(engine)[ids[0]] == 1


def pre_reads(rec) -> list[str]:
    """The locking pre-read of questions' foreign keys (SELECT ... FOR UPDATE)."""
    return [s for s in rec.sql() if s.lstrip().upper().startswith("SELECT")
            and ("FOR UPDATE" in s.upper() or "FOR NO KEY UPDATE" in s.upper())
            and "questions.user_id" in s and "questions.title" not in s]


@pytest.mark.servers_only
@pytest.mark.parametrize("strategy", ["bulk", "deferred", "sharded"])
def test_rows_locked_by_the_transaction_need_no_pre_read(engine, statements, strategy):
    m = qa(strategy)
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        ada, bob = m.User(name="ada"), m.User(name="bob")
        ada.questions.extend(m.Question() for _ in range(4))
        s.add_all([ada, bob])
        s.commit()
        ids, bob_id = [q.id for q in ada.questions], bob.id
        s.expunge_all()
        with statements.record() as rec:
            # loaded with a row lock: as in the database until the commit
            locked = s.scalars(select(m.Question).where(m.Question.id.in_(ids[:2]))
                               .order_by(m.Question.id).with_for_update(skip_locked=True)).all()
            s.delete(locked[0])
            locked[1].user_id = bob_id
            s.flush()
        assert pre_reads(rec) == []
        with statements.record() as rec:
            # loaded without a lock: the pre-read reads (and locks) the row first
            plain = s.scalars(select(m.Question).where(m.Question.id.in_(ids[2:])).order_by(m.Question.id)).all()
            s.delete(plain[0])
            s.flush()
        assert len(pre_reads(rec)) == 1
        # KEY SHARE lets others move the row: pre-read
        if engine.dialect.name == "postgresql":
            with statements.record() as rec:
                shared = s.scalars(select(m.Question).where(m.Question.id == ids[3])
                                   .with_for_update(key_share=True, read=True)).one()
                shared.user_id = bob_id
                s.flush()
            assert len(pre_reads(rec)) == 1
        s.commit()
    if strategy == "sharded":
        import countercache

        countercache.fold(engine)
    assert assert_counts(engine) == ({1: 0, 2: 2} if engine.dialect.name == "postgresql" else {1: 1, 2: 1})


@pytest.mark.servers_only
def test_locked_rows_are_read_again_after_a_bulk_update_or_a_savepoint_rollback(engine, statements):
    from sqlalchemy import update

    m = qa("bulk")
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        ada, bob = m.User(name="ada"), m.User(name="bob")
        ada.questions.extend(m.Question() for _ in range(3))
        s.add_all([ada, bob])
        s.commit()
        ids, bob_id = [q.id for q in ada.questions], bob.id
        s.expunge_all()
        q0, q1, q2 = s.scalars(select(m.Question).order_by(m.Question.id).with_for_update()).all()
        # behind the loaded objects' back: they still say ada
        s.execute(update(m.Question).where(m.Question.id == ids[0]).values(user_id=bob_id)
                  .execution_options(synchronize_session=False))
        with statements.record() as rec:
            s.delete(q0)  # the database says bob
            s.flush()
        assert len(pre_reads(rec)) == 1
        s.commit()
        q1, q2 = s.scalars(select(m.Question).order_by(m.Question.id).with_for_update()).all()
        nested = s.begin_nested()
        nested.rollback()  # the locks taken before it stay, but are forgotten: read again
        with statements.record() as rec:
            s.delete(q1)
            s.flush()
        assert len(pre_reads(rec)) == 1
        s.commit()
    assert assert_counts(engine) == {1: 1, 2: 0}


@pytest.mark.servers_only
def test_a_partial_locked_refresh_does_not_vouch_for_a_stale_foreign_key(engine, statements):
    from sqlalchemy.orm import load_only

    m = qa("bulk")
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        ada, bob = m.User(name="ada"), m.User(name="bob")
        ada.questions.extend(m.Question() for _ in range(2))
        s.add_all([ada, bob])
        s.commit()
        q1, q2 = sorted(ada.questions, key=lambda q: q.id)
        bob_id = bob.id
        with Session(engine) as other:  # moves both behind s's back
            for q in other.scalars(select(m.Question)):
                q.user_id = bob_id
            other.commit()
        s.refresh(q1, ["title"], with_for_update=True)  # locked, but user_id not reloaded
        s.scalars(select(m.Question).where(m.Question.id == q2.id).options(load_only(m.Question.title))
                  .execution_options(populate_existing=True).with_for_update()).one()
        with statements.record() as rec:
            s.delete(q1)
            s.delete(q2)
            s.flush()
        assert len(pre_reads(rec)) == 1  # both read from the database
        s.commit()
    assert assert_counts(engine) == {1: 0, 2: 0}


@pytest.mark.postgresql_only
def test_for_no_key_update_vouches_for_the_row(engine, statements):
    m = qa("bulk")
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        ada = m.User(name="ada", questions=[m.Question()])
        s.add(ada)
        s.commit()
        s.expunge_all()
        q = s.scalars(select(m.Question).with_for_update(key_share=True)).one()  # FOR NO KEY UPDATE
        with statements.record() as rec:
            s.delete(q)
            s.flush()
        assert pre_reads(rec) == []
        s.commit()
    assert assert_counts(engine) == {1: 0}
