"""Nothing of a session outlives it because of countercache.

A session closed, rolled back or simply dropped leaves no object, state or
session held by the library (``weakref`` says so after ``gc.collect()``),
and a finished flush leaves no reference cycle: reference counting alone
frees what it touched, as it does without the library.
"""

from __future__ import annotations

import gc
import weakref

import pytest
from sqlalchemy import event, insert, inspect
from sqlalchemy.orm import Session

import countercache
from helpers import assert_counts
from models import qa_seeded

ENDS = ["close", "rollback", "dropped"]


def end(session: Session, how: str) -> None:
    if how == "close":
        session.close()
    elif how == "rollback":
        session.rollback()
    # "dropped": the caller lets go of it, not closed


def assert_freed(refs: list[weakref.ref], what: str) -> None:
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{what}: still referenced: {alive}"


def merged_in_a_session(engine, m, detached, uid: int, how: str) -> list[weakref.ref]:
    """merge() over a counter this session holds unloaded (remembered by the library until the flush)."""
    s = Session(engine)
    user = s.get(m.User, uid)
    s.expire(user, ["question_count"])
    merged = s.merge(detached)
    assert merged is user
    refs = [weakref.ref(merged), weakref.ref(s)]
    end(s, how)
    return refs


@pytest.mark.parametrize("how", ENDS)
def test_merged_objects_of_an_ended_session_are_not_kept(engine, how):
    m, ids = qa_seeded(engine, "bulk", (1,))
    with Session(engine) as s:
        detached = s.get(m.User, ids[0])
        s.expunge(detached)
    refs = []
    for _ in range(3):
        refs += merged_in_a_session(engine, m, detached, ids[0], how)
    assert_freed(refs, f"merge() then {how}")  # (the three parents stayed until that session's next flush)


def test_a_stale_merged_counter_is_still_never_written(engine):
    """The merged objects are held weakly now: the stale value must still be dropped before the flush."""
    m, ids = qa_seeded(engine, "bulk", (1,))
    with Session(engine) as s:
        detached = s.get(m.User, ids[0])
        s.expunge(detached)
    with Session(engine) as s:
        s.add(m.Question(user_id=ids[0]))
        s.commit()
    with Session(engine) as s:
        user = s.get(m.User, ids[0])
        s.expire(user, ["question_count"])
        s.merge(detached)  # question_count 1, stale: the database holds 2
        user.name = "renamed"
        s.commit()
    assert assert_counts(engine) == {ids[0]: 2}


class Invalid(Exception):
    pass


@pytest.mark.parametrize("how", ENDS)
def test_a_flush_refused_by_a_before_flush_listener_keeps_nothing(engine, how):
    """An application's ``before_flush`` validation raises after the library's
    own ``before_flush``: no ``after_flush`` nor rollback follows, and the
    flush must still be forgotten (it kept the session and its new objects)."""
    m, ids = qa_seeded(engine, "bulk", (0,))

    def validate(session, flush_context, instances):
        if any(getattr(o, "title", None) == "invalid" for o in session.new):
            raise Invalid

    event.listen(Session, "before_flush", validate)
    try:
        s = Session(engine)
        q = m.Question(user_id=ids[0], title="invalid")
        s.add(q)
        with pytest.raises(Invalid):
            s.flush()
        refs = [weakref.ref(s), weakref.ref(q), weakref.ref(inspect(q))]
        if how == "rollback":  # the session goes on and counts the next flush
            q.title = "fine"
            s.commit()
            assert s.get(m.User, ids[0]).question_count == 1
        end(s, how)
        del s, q
        assert_freed(refs, f"refused flush then {how}")
    finally:
        event.remove(Session, "before_flush", validate)
    assert_counts(engine)


@pytest.mark.parametrize("strategy", ["bulk", "deferred", "sharded"])
def test_a_dropped_session_holding_deltas_is_freed(engine, strategy):
    """Deltas held for the commit (``deferred``, ``sharded``), or parents set
    in memory inside a savepoint: the session dropped without close is freed,
    its connection given back to the pool, and nothing was counted."""
    m, ids = qa_seeded(engine, strategy, (1,))

    def work() -> list[weakref.ref]:
        s = Session(engine)
        user = s.get(m.User, ids[0])
        s.add(m.Question(user_id=ids[0]))
        s.flush()
        s.begin_nested()
        s.add(m.Question(user_id=ids[0]))
        s.flush()
        return [weakref.ref(s), weakref.ref(user)]

    assert_freed(work(), "a dropped session")
    assert engine.pool.checkedout() == 0
    assert_counts(engine)
    assert countercache.check(engine) == []


def test_a_finished_flush_leaves_no_reference_cycle(engine, strategy):
    """With the garbage collector off: after commit and close, the session, the
    children and their states are freed by reference counting alone (the
    flush's state and its strategies referred to each other)."""
    m, ids = qa_seeded(engine, strategy, (1, 0))
    gc.collect()
    gc.disable()
    try:
        s = Session(engine)
        children = [m.Question(user_id=ids[0]) for _ in range(3)]
        s.add_all(children)
        s.flush()
        s.delete(children[0])
        s.execute(insert(m.Question), [{"user_id": ids[1]}])  # an ORM bulk statement too
        s.commit()
        refs = [weakref.ref(s)] + [weakref.ref(c) for c in children] + [weakref.ref(inspect(c)) for c in children]
        s.close()
        del s, children
        alive = [r() for r in refs if r() is not None]
    finally:
        gc.enable()
    assert not alive, f"kept until the garbage collector runs: {alive}"
    assert_counts(engine)
