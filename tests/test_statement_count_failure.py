"""An ORM statement on a counted class runs, then its rows are counted. Should
the counting fail after the statement ran (a bug, a lost connection), the
session's transaction is rolled back before the error goes on, as SQLAlchemy
does for a failed flush: a commit must not keep the statement's rows
uncounted (an outside tester's case did: a TypeError raised after a bulk
INSERT, the session committed, the counters short by its rows).

The failure is injected into the library's own counting step; the database
is real."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, insert, text, update
from sqlalchemy.orm import Session

from countercache import tracking
from helpers import assert_counts, orm_kept_only
from models import qa_seeded


class Injected(Exception):
    pass


@pytest.fixture
def failing_count(monkeypatch):
    def record_rows(*args, **kwargs):
        raise Injected("counting failed")

    monkeypatch.setattr(tracking, "record_rows", record_rows)


STATEMENTS = {
    "insert": lambda m, a, b: (insert(m.Question), [{"title": "x", "user_id": a}, {"title": "y", "user_id": b}]),
    "update": lambda m, a, b: (update(m.Question).where(m.Question.user_id == a).values(user_id=b), None),
    "delete": lambda m, a, b: (delete(m.Question).where(m.Question.user_id == a), None),
}


@pytest.mark.parametrize("kind", list(STATEMENTS))
@pytest.mark.parametrize("scope", ["plain", "begin"])
def test_a_failed_count_rolls_the_statement_back(engine, strategy, kind, scope, request):
    orm_kept_only(strategy, "the database counts its own statements")
    m, (a, b, c) = qa_seeded(engine, strategy)
    with engine.connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM questions")).scalar_one()
    request.getfixturevalue("failing_count")
    statement, params = STATEMENTS[kind](m, a, b)
    with Session(engine) as s:
        s.add(m.Question(title="earlier", user_id=c))
        s.flush()
        if scope == "begin":
            with pytest.raises(Injected):
                with s.begin_nested():
                    s.execute(statement, params)
        else:
            with pytest.raises(Injected):
                s.execute(statement, params)
        assert not s.in_transaction()  # rolled back: the earlier flush too, as after a failed flush
        s.commit()  # (nothing to commit)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM questions")).scalar_one() == before
    assert_counts(engine)
