"""check() and reconcile() (SPEC §6): drift made behind the ORM's back is found and repaired."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

import countercache
from countercache import CounterCacheError, Drift
from helpers import assert_counts
from models import qa


def prepare(engine, per_user=(3, 2, 0, 1, 4)):
    m = qa("bulk")
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        users = [m.User(name=f"u{i}") for i in range(len(per_user))]
        for user, n in zip(users, per_user):
            user.questions.extend(m.Question() for _ in range(n))
        s.add_all(users)
        s.commit()
        ids = [u.id for u in users]
    return m, ids


def drift_behind_the_orm(engine, ids):
    """Raw SQL: a counter overwritten, children inserted and deleted with no counter update."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE users SET question_count = 7 WHERE id = :i"), {"i": ids[0]})
        conn.execute(text("INSERT INTO questions (title, user_id) VALUES ('raw', :i), ('raw', :i)"), {"i": ids[2]})
        conn.execute(text("DELETE FROM questions WHERE user_id = :i"), {"i": ids[4]})


def test_check_finds_exactly_the_drift(engine):
    m, ids = prepare(engine)
    assert countercache.check(engine) == []
    drift_behind_the_orm(engine, ids)
    drifts = countercache.check(engine, m.User.question_count, batch_size=2)
    assert drifts == [
        Drift(m.User.question_count, ids[0], 7, 3),
        Drift(m.User.question_count, ids[2], 0, 2),
        Drift(m.User.question_count, ids[4], 4, 0),
    ]
    assert countercache.check(engine, "User.question_count") == drifts  # by name too


@pytest.mark.parametrize("bind_kind", ["engine", "connection", "session"])
def test_reconcile_repairs_and_returns_what_it_fixed(engine, bind_kind):
    m, ids = prepare(engine)
    drift_behind_the_orm(engine, ids)
    if bind_kind == "engine":
        fixed = countercache.reconcile(engine, batch_size=2)
    elif bind_kind == "connection":
        with engine.connect() as conn:
            fixed = countercache.reconcile(conn, batch_size=2)
            conn.commit()
    else:
        with Session(engine, expire_on_commit=False) as s:
            loaded = s.get(m.User, ids[0])
            assert loaded.question_count == 7
            fixed = countercache.reconcile(s, m.User.question_count, batch_size=2)
            assert loaded.question_count == 3  # expired by reconcile, read back
            s.commit()
    assert [(d.pk, d.stored, d.actual) for d in fixed] == [(ids[0], 7, 3), (ids[2], 0, 2), (ids[4], 4, 0)]
    assert countercache.check(engine) == []
    assert_counts(engine)


def test_reconcile_touches_only_rows_that_differ(engine, statements):
    m, ids = prepare(engine)
    drift_behind_the_orm(engine, ids)
    with statements.record() as rec:
        countercache.reconcile(engine, batch_size=100)
    updates = rec.updates_to("users")
    assert len(updates) == 1 and ("<>" in updates[0] or "!=" in updates[0])
    with engine.connect() as conn:
        rowcount = conn.execute(text(
            "UPDATE users SET question_count = question_count WHERE question_count <> "
            "(SELECT count(*) FROM questions WHERE questions.user_id = users.id)")).rowcount
    assert rowcount == 0
    assert countercache.reconcile(engine) == []  # nothing left: nothing written


def test_reconcile_caller_transaction_rolls_back(engine):
    m, ids = prepare(engine)
    drift_behind_the_orm(engine, ids)
    with engine.connect() as conn:
        assert len(countercache.reconcile(conn)) == 3
        conn.rollback()
    assert len(countercache.check(engine)) == 3


def test_bad_arguments_name_the_problem(engine):
    m, ids = prepare(engine)
    with pytest.raises(CounterCacheError, match="User.answer_count: no such counter"):
        countercache.check(engine, "User.answer_count")
    with pytest.raises(CounterCacheError, match="not a counter"):
        countercache.check(engine, m.User.name)
    with pytest.raises(CounterCacheError, match="batch_size"):
        countercache.check(engine, batch_size=0)


@pytest.mark.postgresql_only
@pytest.mark.slow  # stress: 200,000 parents
def test_reconcile_200k_parents_in_bounded_memory(engine):
    """200,000 parents: batches keep Python's memory small whatever the table size."""
    import time
    import tracemalloc

    m = qa("bulk")
    m.Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (name, question_count) SELECT 'u', 1 FROM generate_series(1, 200000)"))
        conn.execute(text("INSERT INTO questions (title, user_id) SELECT 'q', id FROM users"))
        # 2,000 parents drift: 1 in 100
        conn.execute(text("UPDATE users SET question_count = 5 WHERE id % 100 = 0"))
        conn.execute(text("ANALYZE users"))
        conn.execute(text("ANALYZE questions"))
    tracemalloc.start()
    started = time.perf_counter()
    fixed = countercache.reconcile(engine, m.User.question_count, batch_size=5000)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(fixed) == 2000
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert countercache.check(engine, batch_size=20000) == []
    print(f"\nreconcile 200,000 parents: {elapsed:.2f} s, peak {peak / 2**20:.1f} MiB")
