"""A counter column is the library's (SPEC §5): every ORM way of writing it is
refused like attribute assignment, before anything runs; reconcile() and
fold() still write it."""

from __future__ import annotations

import pytest
from sqlalchemy import insert, literal, select, text, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import Session

import countercache
from helpers import assert_counts, exact_value
from models import qa_seeded

MESSAGE = r"User\.question_count is maintained by countercache: .* cannot set it \(it gives question_count a value\)"


def stored(engine, user_id):
    with engine.connect() as conn:
        return conn.scalar(text("SELECT question_count FROM users WHERE id = :id"), {"id": user_id})


def _upsert(m, backend):
    if backend == "postgresql":
        return postgresql.insert(m.User).on_conflict_do_update(index_elements=[m.User.id],
                                                               set_={"question_count": 9})
    if backend == "sqlite":
        return sqlite.insert(m.User).on_conflict_do_update(index_elements=[m.User.id],
                                                           set_={m.User.question_count: 9})
    return mysql.insert(m.User).on_duplicate_key_update(question_count=9)


#: (label, statement factory (m, a, backend), parameters factory (a)), each setting User.question_count
WRITES = [
    ("update values", lambda m, a, b: update(m.User).where(m.User.id == a).values(question_count=77), None),
    ("update values by attribute", lambda m, a, b: update(m.User).values({m.User.question_count: m.User.question_count + 1}),
     None),
    ("update values by column", lambda m, a, b: update(m.User).values({m.User.__table__.c.question_count: 0}), None),
    ("update ordered_values", lambda m, a, b: update(m.User).ordered_values((m.User.question_count, 5)), None),
    ("update with a parameter dict", lambda m, a, b: update(m.User).where(m.User.id == a),
     lambda a: {"question_count": 77}),
    ("update by primary key", lambda m, a, b: update(m.User), lambda a: [{"id": a, "question_count": 77}]),
    ("update by primary key, the counter in one set", lambda m, a, b: update(m.User),
     lambda a: [{"id": a, "name": "x"}, {"id": a, "question_count": 0}]),
    ("insert values", lambda m, a, b: insert(m.User).values(name="n", question_count=5), None),
    ("insert parameters", lambda m, a, b: insert(m.User), lambda a: [{"name": "n"}, {"name": "o", "question_count": 0}]),
    ("insert multi-values", lambda m, a, b: insert(m.User).values([{"name": "n", "question_count": 5}]), None),
    ("insert from select", lambda m, a, b: insert(m.User).from_select(
        ["name", "question_count"], select(literal("n"), literal(5))), None),
    ("upsert set", lambda m, a, b: _upsert(m, b), lambda a: [{"id": a, "name": "n"}]),
]


@pytest.mark.parametrize("label, make, params", WRITES, ids=[w[0] for w in WRITES])
def test_orm_statement_setting_a_counter_is_refused(engine, backend, statements, label, make, params):
    m, (a, b, c) = qa_seeded(engine, "bulk")
    with Session(engine) as s:
        statement = make(m, a, backend)
        with statements.record() as rec, pytest.raises(countercache.AssignmentError, match=MESSAGE):
            s.execute(statement, params(a) if params else None)
        assert rec.sql() == []  # before anything ran
        s.rollback()
    assert assert_counts(engine) == {a: 3, b: 2, c: 0}


def test_refused_inside_suspended_too(engine):
    """suspended() turns counting off; the column stays the library's (as for assignment)."""
    m, (a, b, c) = qa_seeded(engine, "bulk")
    with Session(engine) as s:
        with countercache.suspended(s), pytest.raises(countercache.AssignmentError, match=MESSAGE):
            s.execute(update(m.User).values(question_count=0))
    assert stored(engine, a) == 3


@pytest.mark.parametrize("method", ["bulk_update_mappings", "bulk_insert_mappings"])
def test_legacy_mappings_setting_a_counter_are_refused(engine, statements, method):
    m, (a, b, c) = qa_seeded(engine, "bulk")
    rows = [{"id": a, "question_count": 77}] if method == "bulk_update_mappings" else \
        [{"name": "new"}, {"name": "newer", "question_count": 5}]
    with Session(engine) as s:
        s.add(m.User(name="flushed first"))
        s.flush()
        with statements.record() as rec, pytest.raises(countercache.AssignmentError, match=MESSAGE):
            getattr(s, method)(m.User, rows)
        assert rec.sql() == []
        s.commit()  # the session goes on: the refused call did nothing
        assert s.scalar(select(m.User.id).where(m.User.name == "flushed first")) is not None
    assert stored(engine, a) == 3
    assert assert_counts(engine) == {a: 3, b: 2, c: 0, a + 3: 0}


def test_legacy_save_objects_writing_a_loaded_counter_back_is_refused(engine):
    """bulk_save_objects(update_changed_only=False) would write back the
    counter as loaded (a lost update, if another transaction counted since)."""
    m, (a, b, c) = qa_seeded(engine, "bulk")
    with Session(engine) as s:
        user = s.get(m.User, a)
        user.name = "renamed"
        with pytest.raises(countercache.AssignmentError, match=r"User\.question_count .*bulk_save_objects"):
            s.bulk_save_objects([user], update_changed_only=False)
        s.bulk_save_objects([user])  # only what changed: the name
        s.commit()
    assert assert_counts(engine) == {a: 3, b: 2, c: 0}


def test_writes_of_other_columns_and_new_parents_go_on(engine, strategy):
    m, (a, b, c) = qa_seeded(engine, strategy)
    with Session(engine) as s:
        s.execute(update(m.User).where(m.User.id == a).values(name="renamed"))
        s.execute(update(m.User), [{"id": b, "name": "renamed too"}])
        d = s.scalar(insert(m.User).values(name="new").returning(m.User.id))
        s.bulk_insert_mappings(m.User, [{"name": "legacy"}])
        s.bulk_update_mappings(m.User, [{"id": c, "name": "legacy rename"}])
        s.add(m.User(name="added"))
        s.execute(insert(m.Question), [{"user_id": d}])
        s.commit()
        assert exact_value(s, s.get(m.User, d)) == 1
    counts = assert_counts(engine)
    assert [counts[k] for k in (a, b, c, d)] == [3, 2, 0, 1] and len(counts) == 6


def test_reconcile_and_fold_still_write_the_column(engine, strategy):
    """Drift made behind the library's back (a Core statement on a connection) is repaired."""
    m, (a, b, c) = qa_seeded(engine, strategy)
    with engine.begin() as conn:
        conn.execute(text("UPDATE users SET question_count = 40"))
    with Session(engine) as s:
        s.execute(insert(m.Question), [{"user_id": c}])
        s.commit()
    countercache.fold(engine)
    fixed = countercache.reconcile(engine)
    assert sorted(d.pk for d in fixed) == [a, b, c]
    assert assert_counts(engine) == {a: 3, b: 2, c: 1}


def test_core_statement_through_the_session_setting_a_counter_is_refused(engine):
    """Like the ORM statement: an AssignmentError before anything runs."""
    m, (a, b, c) = qa_seeded(engine, "bulk")
    users = m.User.__table__
    before = stored(engine, a)
    with Session(engine) as s:
        with pytest.raises(countercache.AssignmentError,
                           match=r"User\.question_count is maintained by countercache: a Core UPDATE on users"):
            s.execute(users.update().where(users.c.id == a).values(question_count=7))
        with pytest.raises(countercache.AssignmentError, match=r"a Core INSERT on users cannot set it"):
            s.execute(users.insert(), [{"id": 9, "question_count": 2}])
        s.commit()
    assert stored(engine, a) == before
    assert countercache.check(engine) == []
