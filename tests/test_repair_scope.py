"""What ``check()``, ``reconcile()`` and ``fold()`` cover with no counter named:
the counters of the bind's database, optionally of ``metadata=`` (issue 16).

An application with two declarative bases on two databases: the backend's
database holds the first base's tables, a SQLite file the second's. Both
bases have a table called ``users``: a counter is in a database when its
parent table *and* the tables its recount reads are there.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import pytest
from sqlalchemy import ForeignKey, MetaData, String, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import CounterCacheError, counter_cache
from helpers import assert_counts
from models import qa, seed


def shop(strategy: str = "bulk") -> SimpleNamespace:
    """The second base: members (table ``users`` too) counting their orders."""

    class Base(DeclarativeBase):
        pass

    class Member(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        login: Mapped[str] = mapped_column(String(20), default="")
        orders: Mapped[list["Order"]] = relationship()
        order_count: Mapped[int] = counter_cache("orders", strategy=strategy)

    class Order(Base):
        __tablename__ = "orders"
        id: Mapped[int] = mapped_column(primary_key=True)
        member_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))

    return SimpleNamespace(Base=Base, Member=Member, Order=Order)


@pytest.fixture
def two(engine, tmp_path):
    """``(qa models on engine, shop models on a SQLite file, its engine)``, each
    with one drifted parent (raw SQL behind the ORM's back)."""
    m = qa("bulk")
    m.Base.metadata.create_all(engine)
    ids = seed(engine, m, (2, 1))
    other = create_engine(f"sqlite:///{tmp_path / 'shop.db'}")
    s = shop()
    s.Base.metadata.create_all(other)
    with Session(other) as session:
        session.add_all([s.Member(id=1, orders=[s.Order(), s.Order()]), s.Member(id=2)])
        session.commit()
    with engine.begin() as conn:
        conn.execute(text("UPDATE users SET question_count = 5 WHERE id = :i"), {"i": ids[0]})
    with other.begin() as conn:
        conn.execute(text("INSERT INTO orders (member_id) VALUES (2)"))
    yield m, s, other, ids
    other.dispose()


def test_each_database_checks_its_own_counters(engine, two):
    m, s, other, ids = two
    # (was: "no such table: orders" / "relation orders does not exist" on the first)
    assert [(d.name, d.pk, d.stored, d.actual) for d in countercache.check(engine)] == [
        ("User.question_count", ids[0], 5, 2)]
    assert [(d.name, d.pk, d.stored, d.actual) for d in countercache.check(other)] == [
        ("Member.order_count", 2, 0, 1)]
    with engine.connect() as conn:
        assert [d.name for d in countercache.check(conn)] == ["User.question_count"]
    assert [d.pk for d in countercache.reconcile(engine)] == [ids[0]]
    assert [d.pk for d in countercache.reconcile(other)] == [2]
    assert countercache.check(engine) == [] and countercache.check(other) == []
    assert_counts(engine)
    assert_counts(other, "users", "order_count", "orders", "member_id")


def test_a_session_checks_each_counter_where_its_mapper_is_bound(engine, two):
    m, s, other, ids = two
    with Session(binds={m.Base: engine, s.Base: other}) as session:
        assert sorted(d.name for d in countercache.check(session)) == ["Member.order_count", "User.question_count"]
        assert len(countercache.reconcile(session)) == 2
        session.commit()
    with Session(engine) as session:  # one bind: the other base's counter is not in its database
        assert countercache.check(session) == []
    with Session(binds={s.Base: other}) as session:  # no bind for the first base: not one of its databases
        assert countercache.check(session) == []
        with pytest.raises(CounterCacheError, match=r"User\.question_count: the session has no bind for"):
            countercache.check(session, m.User.question_count)


def test_metadata_restricts_to_its_counters(engine, two):
    m, s, other, ids = two
    assert [d.name for d in countercache.check(engine, metadata=m.Base.metadata)] == ["User.question_count"]
    assert [d.name for d in countercache.check(engine, metadata=[m.Base.metadata, s.Base.metadata])] == [
        "User.question_count"]
    assert [d.name for d in countercache.check(other, metadata=(s.Base.metadata,))] == ["Member.order_count"]
    with pytest.raises(CounterCacheError, match="no counter has its tables in the database at"):
        countercache.check(engine, metadata=s.Base.metadata)
    with pytest.raises(CounterCacheError, match=r"User\.question_count: its table users is not in the metadata given"):
        countercache.check(engine, m.User.question_count, metadata=s.Base.metadata)
    with pytest.raises(CounterCacheError, match="holds no counter"):
        countercache.check(engine, metadata=MetaData())
    with pytest.raises(CounterCacheError, match="metadata= takes a MetaData"):
        countercache.check(engine, metadata="users")
    assert countercache.check(engine) != []  # (nothing was repaired on the way)


def test_a_counter_named_whose_tables_are_elsewhere_is_refused(engine, two):
    m, s, other, ids = two
    with pytest.raises(CounterCacheError, match=r"Member\.order_count: no table orders in the database at "):
        countercache.check(engine, s.Member.order_count)
    with pytest.raises(CounterCacheError, match=r"User\.question_count: no table questions in the database at "):
        countercache.reconcile(other, "User.question_count")
    assert len(countercache.check(engine, "User.question_count")) == 1  # named and there: as before


def test_a_database_without_any_counter_is_an_error(engine, two, tmp_path):
    empty = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        with pytest.raises(CounterCacheError, match="no counter has its tables in the database at sqlite:///"):
            countercache.check(empty)
        assert countercache.fold(empty) == 0  # (no side table: nothing to fold, no error)
    finally:
        empty.dispose()


def test_fold_folds_the_sharded_counters_of_its_database(engine, tmp_path):
    """The second base's counter is sharded, its side table in its own database only."""
    m = qa("bulk")
    m.Base.metadata.create_all(engine)
    seed(engine, m, (2, 1))
    other = create_engine(f"sqlite:///{tmp_path / 'shop.db'}")
    try:
        s = shop("sharded")
        s.Base.metadata.create_all(other)
        with Session(other) as session:
            session.add(s.Member(id=1, orders=[s.Order(), s.Order()]))
            session.commit()
        assert countercache.fold(engine) == 0  # (was: no such table countercache_shards)
        assert countercache.fold(other) == 1
        assert_counts(engine)
        assert_counts(other, "users", "order_count", "orders", "member_id")
        with pytest.raises(CounterCacheError, match=r"Member\.order_count: no table countercache_shards"):
            countercache.fold(engine, s.Member.order_count)
    finally:
        other.dispose()
