"""Sums at the column's precision (issue 15): ``check()`` and ``reconcile()``
compare a ``sum=`` counter with its recount as the column holds values. A
``Numeric`` on SQLite is stored as a binary float, and a single-precision
``Float`` (MariaDB's ``FLOAT``, PostgreSQL's ``REAL``) keeps about seven digits:
the running sum and the recount then differ in digits the column does not
have, and that is not drift. A difference the column can show still is.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Optional

import pytest
from sqlalchemy import REAL, Float, ForeignKey, Numeric, text  # noqa: F401
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, configure_mappers, mapped_column, relationship

import countercache
from countercache import counter_cache


def models(strategy: str, total_type, amount_type):
    class Base(DeclarativeBase):
        pass

    class Account(Base):
        __tablename__ = "accounts"
        id: Mapped[int] = mapped_column(primary_key=True)
        entries: Mapped[list["Entry"]] = relationship()
        total = counter_cache("entries", strategy=strategy, sum="amount", type_=total_type)

    class Entry(Base):
        __tablename__ = "entries"
        id: Mapped[int] = mapped_column(primary_key=True)
        account_id: Mapped[Optional[int]] = mapped_column(ForeignKey("accounts.id"))
        amount = mapped_column(amount_type, nullable=False)

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    return Base, Account, Entry


AMOUNTS = ["0.10", "0.20", "0.70", "1.10", "2.20", "3.30", "19.99", "0.01", "1234.56", "0.07"]


def fill_and_churn(engine, Account, Entry, as_type) -> None:
    with Session(engine) as s:
        s.add_all([Account(id=1), Account(id=2)])
        s.flush()
        for n, a in enumerate(AMOUNTS * 3):
            s.add(Entry(id=n + 1, account_id=1 + n % 2, amount=as_type(a)))
            if n % 4 == 3:
                s.flush()
        s.commit()
        for n in (2, 5, 11, 17):
            s.delete(s.get(Entry, n))
        s.get(Entry, 8).account_id = 1 if s.get(Entry, 8).account_id == 2 else 2
        s.commit()


@pytest.mark.parametrize("kind", ["numeric", "float", pytest.param("real", marks=pytest.mark.servers_only)])
def test_a_sum_equal_at_the_columns_precision_is_not_drift(engine, strategy, kind):
    # (REAL: single precision on the servers; SQLite's REAL is the float case)
    total_type, amount_type, as_type = {
        "numeric": (Numeric(12, 2), Numeric(10, 2), Decimal),
        "float": (Float(), Float(), float),  # MariaDB: single-precision FLOAT
        "real": (REAL(), REAL(), float),  # PostgreSQL and MariaDB: single precision
    }[kind]
    if strategy == "sharded":  # integer deltas only: refused at configuration, naming the counter
        with pytest.raises(countercache.CounterCacheError, match=r"Account\.total: the sharded strategy keeps integer"):
            held = models(strategy, total_type, amount_type)  # (held: configured while alive)
            configure_mappers()
        del held
        return
    Base, Account, Entry = models(strategy, total_type, amount_type)
    Base.metadata.create_all(engine)
    fill_and_churn(engine, Account, Entry, as_type)
    assert countercache.check(engine) == []
    if strategy == "sharded":
        countercache.fold(engine)
    with engine.connect() as conn:
        before = conn.execute(text("SELECT id, total FROM accounts ORDER BY id")).all()
    assert countercache.reconcile(engine) == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id, total FROM accounts ORDER BY id")).all() == before
        # a difference the column can hold is still drift
        conn.execute(text("UPDATE accounts SET total = total + 0.05 WHERE id = 2"))
        conn.commit()
    found = countercache.check(engine)
    assert [d.pk for d in found] == [2], found
    assert [d.pk for d in countercache.reconcile(engine)] == [2]
    assert countercache.check(engine) == []


def test_values_are_counted_as_the_column_stores_them(engine, strategy):
    """``Decimal("9.999")`` in a ``Numeric(12, 2)`` is stored as 10.00 by
    PostgreSQL and MariaDB, 2.4 in an ``Integer`` as 2 (SQLite keeps both as
    given): ``where=`` and ``sum=`` count the stored value, as the recount
    does (the unrounded one drifted silently; found by an outside try)."""

    class Base(DeclarativeBase):
        pass

    class Customer(Base):
        __tablename__ = "customers"
        id: Mapped[int] = mapped_column(primary_key=True)
        orders: Mapped[list["Order"]] = relationship()
        big: Mapped[int] = counter_cache("orders", strategy=strategy, where=lambda: Order.amount >= 10)
        exactly_ten: Mapped[int] = counter_cache("orders", strategy=strategy, where=lambda: Order.amount == 10)
        many: Mapped[int] = counter_cache("orders", strategy=strategy, where=lambda: Order.qty > 2)
        if strategy != "sharded":  # (sharded keeps integer deltas)
            total = counter_cache("orders", strategy=strategy, sum="amount", type_=Numeric(14, 2))
            if engine.dialect.name != "sqlite":  # (SQLite keeps 1.4 in an integer column)
                qty_sum: Mapped[int] = counter_cache("orders", strategy=strategy, sum="qty")

    class Order(Base):
        __tablename__ = "orders"
        id: Mapped[int] = mapped_column(primary_key=True)
        customer_id: Mapped[Optional[int]] = mapped_column(ForeignKey("customers.id"))
        amount = mapped_column(Numeric(12, 2), nullable=False)
        qty: Mapped[int] = mapped_column(default=0)

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    Base.metadata.create_all(engine)
    as_float = engine.dialect.name == "sqlite"  # (SQLite's driver takes no Decimal for an integer)
    with Session(engine) as s:
        s.add(Customer(id=1))
        s.flush()
        s.add_all([Order(id=1, customer_id=1, amount=Decimal("9.999"), qty=2.4),
                   Order(id=2, customer_id=1, amount=9.995, qty=2.5 if as_float else Decimal("2.5")),
                   Order(id=3, customer_id=1, amount="10.004", qty=3),
                   Order(id=4, customer_id=1, amount=Decimal("0.004"), qty=1.4)])
        s.commit()
        s.get(Order, 3).amount = Decimal("9.996")
        s.commit()
    assert countercache.check(engine) == []
    if strategy == "sharded":
        countercache.fold(engine)
    with engine.connect() as conn:
        got = conn.execute(text("SELECT big, exactly_ten, many FROM customers")).one()
    if engine.dialect.name != "sqlite":
        assert tuple(got) == (3, 3, 2)  # 10.00, 10.00, 10.00, 0.00; qty 2, 3, 3, 1


@pytest.mark.servers_only  # (SQLite has no single-precision column)
def test_single_precision_columns_count_the_stored_float(engine, strategy):
    """A ``REAL`` column (``FLOAT`` on MariaDB, through ``with_variant``) keeps
    0.1 as 0.100000001 and 16777217 as 16777216: ``where=x == 0.1`` counts
    nothing, as SQL does, and a sum moves by the stored values (MariaDB sends
    such a FLOAT as 6 digits of text: the pre-read reads it exactly)."""
    from sqlalchemy import Double, insert
    from sqlalchemy.dialects import mysql

    class Base(DeclarativeBase):
        pass

    class P(Base):
        __tablename__ = "p"
        id: Mapped[int] = mapped_column(primary_key=True)
        kids: Mapped[list["K"]] = relationship()
        tenth: Mapped[int] = counter_cache("kids", strategy=strategy, where=lambda: K.x == 0.1)
        if strategy != "sharded":
            total = counter_cache("kids", strategy=strategy, sum="x", type_=Double)

    class K(Base):
        __tablename__ = "k"
        id: Mapped[int] = mapped_column(primary_key=True)
        p_id: Mapped[Optional[int]] = mapped_column(ForeignKey("p.id"))
        x = mapped_column(REAL().with_variant(mysql.FLOAT(), "mysql", "mariadb"))

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(P(id=1))
        s.flush()
        s.add_all([K(id=1, p_id=1, x=0.1), K(id=2, p_id=1, x=16777217.0)])
        s.commit()
        s.get(K, 2).x = 1.0
        s.commit()
        s.execute(insert(K), [{"id": 3, "p_id": 1, "x": "0.1"}])
        s.commit()
    assert countercache.check(engine) == []
    if strategy == "sharded":
        countercache.fold(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT tenth FROM p")).scalar() == 0
