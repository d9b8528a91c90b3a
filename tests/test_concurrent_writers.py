"""Two sessions changing the same child at once (SPEC §4, PostgreSQL and MariaDB).

The second session's flush waits on the first one's row lock; once the first
commits, the second must count where the row really is (or nothing, when the
row is gone), not where its stale in-memory copy says.
"""

from __future__ import annotations

import threading
import time
import warnings

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from helpers import assert_counts
from models import qa_seeded

pytestmark = [pytest.mark.servers_only, pytest.mark.slow]  # two sessions racing, with sleeps


def prepare(engine, strategy):
    """Users a, b, c with 2, 0 and 0 questions."""
    return qa_seeded(engine, strategy, (2, 0, 0))


def race(first, second):
    """Run ``second`` (which blocks on ``first``'s locks) in a thread, then commit ``first``."""
    errors = []

    def run():
        try:
            second()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    first_session = first()
    thread.start()
    time.sleep(0.5)  # the second flush is now waiting on the first one's row lock
    first_session.commit()
    first_session.close()
    thread.join(30)
    assert not thread.is_alive(), "second session still blocked"
    if errors:
        raise errors[0]


def test_same_child_deleted_twice_counts_once(engine, strategy):
    m, (a, b, c) = prepare(engine, strategy)
    child_id = Session(engine).scalar(select(m.Question.id).where(m.Question.user_id == a).limit(1))
    s2 = Session(engine)
    doomed2 = s2.get(m.Question, child_id)  # loaded before the first delete commits

    def first():
        s1 = Session(engine)
        s1.delete(s1.get(m.Question, child_id))
        s1.flush()
        return s1

    def second():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "DELETE ... expected 1 row, 0 matched"
            s2.delete(doomed2)
            s2.commit()
        s2.close()

    race(first, second)
    assert assert_counts(engine) == {a: 1, b: 0, c: 0}


def test_child_moved_concurrently_counts_where_it_is(engine, strategy):
    m, (a, b, c) = prepare(engine, strategy)
    child_id = Session(engine).scalar(select(m.Question.id).where(m.Question.user_id == a).limit(1))
    s2 = Session(engine)
    moved2 = s2.get(m.Question, child_id)  # still says user a

    def first():
        s1 = Session(engine)
        s1.get(m.Question, child_id).user_id = b
        s1.flush()
        return s1

    def second():
        moved2.user_id = c
        s2.commit()
        s2.close()

    race(first, second)
    assert assert_counts(engine) == {a: 1, b: 0, c: 1}


def test_child_deleted_after_concurrent_move(engine, strategy):
    m, (a, b, c) = prepare(engine, strategy)
    child_id = Session(engine).scalar(select(m.Question.id).where(m.Question.user_id == a).limit(1))
    s2 = Session(engine)
    doomed2 = s2.get(m.Question, child_id)

    def first():
        s1 = Session(engine)
        s1.get(m.Question, child_id).user_id = b
        s1.flush()
        return s1

    def second():
        s2.delete(doomed2)
        s2.commit()
        s2.close()

    race(first, second)
    assert assert_counts(engine) == {a: 1, b: 0, c: 0}
