"""A counter that keeps its pending deltas in ``countercache_shards`` where the
database has no such table (tables made by an earlier model, before the
counter was switched to ``sharded`` or ``sharded_trigger``): the first flush
that holds deltas, ``exact()`` and ``fold()`` fail with a
:class:`~countercache.CounterCacheError` naming the counter and the table,
not the driver's error at the commit, and nothing of the transaction is
kept (found by an outside tester)."""

from __future__ import annotations

import pytest
from sqlalchemy import ForeignKey, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import CounterCacheError, counter_cache


def models(strategy: str):
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        questions: Mapped[list["Question"]] = relationship()
        question_count: Mapped[int] = counter_cache("questions", strategy=strategy, shards=4)

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))

    return Base, User, Question


MISSING = r"User\.question_count: strategy '{}' keeps its pending deltas in the side table countercache_shards, " \
          r"which the database( \(\w+\))? does not have"


@pytest.mark.parametrize("strategy", ["sharded", "sharded_trigger"])
def test_a_missing_side_table_is_named(engine, strategy):
    """(``sharded_trigger``'s own triggers write the table: there the flush fails
    in the database, as any statement; exact() and fold() name it.)"""
    Base, User, Question = models(strategy)
    Base.metadata.create_all(engine)
    side = Base.metadata.tables["countercache_shards"]
    try:
        with engine.begin() as c:
            c.execute(text("INSERT INTO users (id, question_count) VALUES (1, 0)"))
        side.drop(engine)
        if strategy == "sharded":
            with Session(engine) as s:
                s.add(Question(id=1, user_id=1))
                with pytest.raises(CounterCacheError, match=MISSING.format(strategy)):
                    s.commit()
            with engine.connect() as c:  # nothing kept
                assert c.execute(text("SELECT count(*) FROM questions")).scalar_one() == 0
        with Session(engine) as s:
            with pytest.raises(CounterCacheError, match=MISSING.format(strategy)):
                countercache.exact(s, s.get(User, 1), "question_count")
        with pytest.raises(CounterCacheError, match=r"User\.question_count: .*countercache_shards"):
            countercache.fold(engine, User.question_count)
        # made now, it is found (only a table found is remembered)
        side.create(engine)
        with Session(engine) as s:
            s.add(Question(id=2, user_id=1))
            s.commit()
            assert countercache.exact(s, s.get(User, 1), "question_count") == 1
        countercache.fold(engine, User.question_count)
        with engine.connect() as c:
            assert c.execute(text("SELECT question_count FROM users")).scalar_one() == 1
    finally:
        Base.metadata.drop_all(engine)


def test_rows_left_by_a_counter_switched_away_from_sharded(engine):
    """A counter configured from ``sharded`` to ``bulk`` with deltas still pending:
    its value is its column, which check() finds short and reconcile() repairs,
    deleting the rows it left (a switch back would add them again; outside
    tester: check() and reconcile() added them and reported nothing)."""
    Base, User, Question = models("sharded")
    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            s.add(User(id=1))
            s.commit()
            s.add_all([Question(id=1, user_id=1), Question(id=2, user_id=1)])
            s.commit()  # two deltas pending, the column 0
        countercache.configure(overrides={"User.question_count": "bulk"})
        with Session(engine) as s:
            s.add(Question(id=3, user_id=1))
            s.commit()
            assert countercache.exact(s, s.get(User, 1), "question_count") == 1  # (the column: what is read)
        assert [(d.pk, d.stored, d.actual) for d in countercache.check(engine)] == [(1, 1, 3)]
        assert [(d.pk, d.stored, d.actual) for d in countercache.reconcile(engine)] == [(1, 1, 3)]
        assert countercache.check(engine) == []
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM countercache_shards")).scalar_one() == 0
        countercache.configure(overrides={"User.question_count": "sharded"})  # and back: nothing counted twice
        with Session(engine) as s:
            assert countercache.exact(s, s.get(User, 1), "question_count") == 3
        countercache.fold(engine)
        with engine.connect() as c:
            assert c.execute(text("SELECT question_count FROM users")).scalar_one() == 3
    finally:
        countercache.configure()
        Base.metadata.drop_all(engine)
