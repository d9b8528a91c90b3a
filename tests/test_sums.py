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
from sqlalchemy import REAL, Float, ForeignKey, Numeric, text
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
