"""The order of SQLAlchemy's own steps is kept (issue 14).

* An ORM bulk UPDATE/DELETE run while the session holds unflushed changes
  affects exactly the rows, and reports exactly the rowcount, that it does
  without countercache: the autoflush comes first, then the statement's rows
  are read and counted.
* An application's own ``before_insert`` / ``before_update`` listener that
  sets a counted column (the foreign key, a ``where=`` column, a ``sum=``
  column) is counted with the value the flush writes, whether it was
  registered before or after countercache's hooks.

Every check compares with an independent recount.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import pytest
from sqlalchemy import ForeignKey, String, delete, event, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, configure_mappers, mapped_column, relationship

import countercache
from countercache import counter_cache, preread
from helpers import orm_kept_only

SYNC = [False, "evaluate", "fetch", "auto"]


def models(strategy: str | None) -> SimpleNamespace:
    """Users and questions; ``strategy=None``: the same tables without counters."""

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        questions: Mapped[list["Question"]] = relationship(back_populates="user")
        if strategy is not None:
            question_count: Mapped[int] = counter_cache("questions", strategy=strategy)
            open_count: Mapped[int] = counter_cache("questions", strategy=strategy,
                                                    where=lambda: Question.status == "open")
            score_total: Mapped[int] = counter_cache("questions", strategy=strategy, sum="score")

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str] = mapped_column(String(10), default="")
        status: Mapped[str] = mapped_column(String(10), default="open")
        score: Mapped[int] = mapped_column(default=1)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), index=True)
        user: Mapped[Optional[User]] = relationship(back_populates="questions")

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    return SimpleNamespace(Base=Base, User=User, Question=Question, strategy=strategy)


REAL = """
SELECT u.id, u.question_count, u.open_count, u.score_total,
  (SELECT count(*) FROM questions q WHERE q.user_id = u.id),
  (SELECT count(*) FROM questions q WHERE q.user_id = u.id AND q.status = 'open'),
  (SELECT coalesce(sum(q.score), 0) FROM questions q WHERE q.user_id = u.id)
FROM users u ORDER BY u.id
"""


def assert_exact(engine, strategy: str) -> dict[int, tuple[int, int, int]]:
    """Every counter equals its recount (a sharded one after a fold); {user: (count, open, score)}."""
    if strategy == "sharded":
        assert countercache.check(engine) == []
        countercache.fold(engine)
    with engine.connect() as conn:
        rows = conn.execute(text(REAL)).all()
    wrong = [tuple(r) for r in rows if tuple(r[1:4]) != tuple(r[4:7])]
    assert not wrong, f"(id, stored x3, real x3): {wrong}"
    return {r[0]: tuple(r[4:7]) for r in rows}


def seed(engine, m) -> None:
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([m.User(id=1), m.User(id=2)])
        s.flush()
        s.add_all([m.Question(id=i, user_id=1 if i <= 2 else 2) for i in (1, 2, 3, 4)])
        s.commit()


def questions(engine) -> list[tuple[int, int | None]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT id, user_id FROM questions ORDER BY id"))]


# -- bulk statements after unflushed changes ----------------------------------

def _pending_move_then_delete(s, m, autoflush):
    q1 = s.get(m.Question, 1)
    q1.user_id = 2  # not flushed
    return s.execute(delete(m.Question).where(m.Question.user_id == 2), execution_options=autoflush)


def _pending_move_then_move(s, m, autoflush):
    q1 = s.get(m.Question, 1)
    q1.user_id = 2
    return s.execute(update(m.Question).where(m.Question.user_id == 2).values(user_id=1),
                     execution_options=autoflush)


def _pending_delete_then_delete(s, m, autoflush):
    s.delete(s.get(m.Question, 3))
    return s.execute(delete(m.Question).where(m.Question.user_id == 2), execution_options=autoflush)


def _pending_status_then_move(s, m, autoflush):
    q3 = s.get(m.Question, 3)
    q3.status = "closed"
    q3.score = 5
    return s.execute(update(m.Question).where(m.Question.user_id == 2).values(user_id=1),
                     execution_options=autoflush)


SCENARIOS = {
    "pending_move_then_delete": _pending_move_then_delete,
    "pending_move_then_move": _pending_move_then_move,
    "pending_delete_then_delete": _pending_delete_then_delete,
    "pending_status_then_move": _pending_status_then_move,
}


def _run(engine, m, scenario, sync, autoflush) -> tuple[int, list[tuple[int, int | None]]]:
    options = {"synchronize_session": sync}
    with Session(engine, autoflush=autoflush) as s:
        result = SCENARIOS[scenario](s, m, options)
        rowcount = result.rowcount
        s.commit()
    return rowcount, questions(engine)


@pytest.mark.parametrize("autoflush", [True, False], ids=["autoflush", "no_autoflush"])
@pytest.mark.parametrize("sync", SYNC)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_bulk_statement_after_unflushed_changes_does_what_sqlalchemy_does(engine, strategy, scenario, sync, autoflush):
    plain = models(None)
    seed(engine, plain)
    try:
        expected = _run(engine, plain, scenario, sync, autoflush)
    except Exception as exc:  # what plain SQLAlchemy does, countercache must do too
        expected = type(exc)
    plain.Base.metadata.drop_all(engine)
    countercache._reset_for_tests()

    m = models(strategy)
    seed(engine, m)
    if isinstance(expected, type):
        with pytest.raises(expected):
            _run(engine, m, scenario, sync, autoflush)
    else:
        assert _run(engine, m, scenario, sync, autoflush) == expected  # rowcount and rows
    assert_exact(engine, strategy)


# -- application listeners that set counted columns ---------------------------

def _listen(m, when: str):
    """An application's listeners: a question titled "move" is re-parented,
    closed and re-scored by before_insert / before_update (the application
    itself changes no counted column of it)."""

    def rewrite(mapper, connection, target):
        if target.title == "move":
            target.user_id = 2
            target.status = "closed"
            target.score = 7

    event.listen(m.Question, "before_insert", rewrite)
    event.listen(m.Question, "before_update", rewrite)


@pytest.mark.parametrize("when", ["before_configure", "after_configure"])
def test_application_listener_setting_counted_columns(engine, strategy, when):
    m = models(strategy)
    if when == "after_configure":
        configure_mappers()  # countercache's hooks first, the application's after them
    _listen(m, when)
    configure_mappers()
    seed(engine, m)
    with Session(engine) as s:
        # several rows of the class per flush, the listener's row in the middle and last
        for i in (1, 2, 3):
            s.get(m.Question, i).title = "move" if i in (2, 3) else "stay"
        s.get(m.Question, 4).status = "closed"  # a counted change read before the listeners ran
        s.add_all([m.Question(id=10, user_id=1), m.Question(id=11, user_id=1, title="move")])
        s.commit()
    assert questions(engine) == [(1, 1), (2, 2), (3, 2), (4, 2), (10, 1), (11, 2)]
    assert assert_exact(engine, strategy) == {1: (2, 2, 2), 2: (4, 0, 22)}


def test_application_listener_setting_counted_columns_within_one_row_only(engine, strategy):
    """One row, changed only by the listener (no counted attribute set by the application)."""
    m = models(strategy)
    configure_mappers()

    @event.listens_for(m.Question, "before_update")
    def reparent(mapper, connection, target):
        target.user_id = 2

    seed(engine, m)
    with Session(engine) as s:
        s.get(m.Question, 1).title = "x"  # a change of a column no counter reads: the listener moves it
        s.commit()
    assert assert_exact(engine, strategy) == {1: (1, 1, 1), 2: (3, 3, 3)}


def test_the_flush_leaves_no_listener_on_its_connection(engine, strategy):
    """The pre-read's statement listener goes with the read: later statements
    on the connection (a per_row UPDATE per row, the application's own) are
    not dispatched through it."""
    m = models(strategy)
    seed(engine, m)
    with Session(engine) as s:
        connection = s.connection()
        had_events = connection._has_events
        for i in (1, 2, 3):
            s.get(m.Question, i).user_id = 2
        s.flush()
        assert not event.contains(connection, "before_execute", preread._before_statement)
        assert connection._has_events == had_events
        s.commit()
    assert_exact(engine, strategy)


@pytest.mark.parametrize("prefix", ["OR IGNORE", "OR REPLACE", "IGNORE"])
def test_insert_that_may_skip_or_replace_rows_is_refused(engine, strategy, prefix):
    """``insert(...).prefix_with("IGNORE")`` (MariaDB) / ``"OR IGNORE"``, ``"OR
    REPLACE"`` (SQLite) through the session: the rows it skips or replaces
    cannot be known from its parameters. Refused before it runs (they were
    counted as inserted), like an upsert; nothing is written."""
    orm_kept_only(strategy, "the database's triggers count the rows a conflict clause keeps (SQLite REPLACE: see docs/database.rst)")
    from sqlalchemy import insert

    m = models(strategy)
    seed(engine, m)
    with Session(engine) as s:
        with pytest.raises(countercache.CounterCacheError, match=rf"User\.question_count.*INSERT {prefix} may insert"):
            s.execute(insert(m.Question).prefix_with(prefix), [{"id": 1, "user_id": 2}, {"id": 9, "user_id": 2}])
    assert questions(engine) == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert_exact(engine, strategy)
