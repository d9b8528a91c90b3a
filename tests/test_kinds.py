"""Conditional (``where=``) and summing (``sum=``) counters (SPEC §1, §4)."""

from __future__ import annotations

import warnings
from decimal import Decimal
from typing import Optional

import pytest
from sqlalchemy import JSON, Column, ForeignKey, Integer, MetaData, Table, delete, func, insert, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, configure_mappers, mapped_column, relationship

import countercache
from countercache import CounterCacheError, counter_cache
from helpers import exact_value, fold, orm_kept_only
from kinds_models import shop


def truth(engine):
    """{customer id: (open_count, total, open_items)} computed from the orders."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT c.id, "
            " (SELECT count(*) FROM orders o WHERE o.customer_id = c.id AND o.status = 'open'),"
            " (SELECT coalesce(sum(o.amount), 0) FROM orders o WHERE o.customer_id = c.id),"
            " (SELECT coalesce(sum(o.items * 2), 0) FROM orders o WHERE o.customer_id = c.id AND o.status = 'open')"
            " FROM customers c ORDER BY c.id")).all()
    return {r[0]: (r[1], Decimal(r[2]).quantize(Decimal("0.01")), r[3]) for r in rows}


def stored(engine):
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, open_count, total, open_items FROM customers ORDER BY id")).all()
    return {r[0]: (r[1], Decimal(r[2]).quantize(Decimal("0.01")), r[3]) for r in rows}


def assert_exact(engine):
    """Stored values equal the truth: column + pending shard deltas first (``check``), then folded."""
    assert countercache.check(engine) == []
    fold(engine)
    assert stored(engine) == truth(engine)
    return stored(engine)


def prepare(engine, strategy):
    m = shop(strategy)
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        a, b = m.Customer(), m.Customer()
        a.orders.extend([m.Order(status="open", amount=Decimal("10.50"), items=2),
                         m.Order(status="paid", amount=Decimal("5.25"))])
        b.orders.append(m.Order(amount=None))  # status from the server default, amount NULL
        s.add_all([a, b])
        s.commit()
        return m, a.id, b.id


def test_insert_counts_by_condition_and_sums(engine, strategy):
    m, a, b = prepare(engine, strategy)
    counts = assert_exact(engine)
    assert counts[a] == (1, Decimal("15.75"), 4)
    assert counts[b] == (1, Decimal("0.00"), 2)


def test_changing_the_deciding_columns_moves_the_count(engine, strategy):
    m, a, b = prepare(engine, strategy)
    with Session(engine, expire_on_commit=False) as s:
        orders = s.scalars(select(m.Order).order_by(m.Order.id)).all()
        orders[0].status = "paid"  # leaves the condition
        orders[1].status = "open"  # enters it
        orders[1].amount = Decimal("6.00")  # the summed value changes
        orders[2].items = 5  # an open order's summed expression changes
        s.flush()
        orders[2].amount = Decimal("1.00")  # NULL -> value, in a second flush
        s.commit()
        customer = s.get(m.Customer, a)
        assert tuple(exact_value(s, customer, n) for n in ("open_count", "total", "open_items")) == (
            1, Decimal("16.50"), 2)
    assert assert_exact(engine)[b] == (1, Decimal("1.00"), 10)


def test_unloaded_values_are_read_from_the_database(engine, strategy):
    m, a, b = prepare(engine, strategy)
    with Session(engine) as s:
        order = s.scalars(select(m.Order).where(m.Order.status == "open", m.Order.customer_id == a)).one()
        s.expire(order)
        order.status = "cancelled"  # the old value was never loaded in this session
        s.commit()
    assert assert_exact(engine)[a] == (0, Decimal("15.75"), 0)


def test_move_delete_and_bulk_statements(engine, strategy):
    m, a, b = prepare(engine, strategy)
    with Session(engine) as s:
        order = s.scalars(select(m.Order).where(m.Order.customer_id == a, m.Order.status == "open")).one()
        order.customer_id = b
        s.flush()
        s.delete(s.scalars(select(m.Order).where(m.Order.status == "paid")).one())
        s.execute(insert(m.Order), [{"customer_id": a, "status": "open", "amount": Decimal("2.00"), "items": 3}])
        s.execute(update(m.Order).where(m.Order.customer_id == b).values(status="paid"))
        s.execute(update(m.Order).where(m.Order.customer_id == a).values(amount=m.Order.amount * 2),
                  execution_options={"synchronize_session": False})
        s.execute(delete(m.Order).where(m.Order.amount.is_(None)))
        s.commit()
    counts = assert_exact(engine)
    assert counts[a] == (1, Decimal("4.00"), 6)


def test_one_flush_deleting_many_rows_with_equal_values(engine, strategy):
    """Deleted rows are counted from the locked pre-read, grouped by their
    values: groups of several rows, NULL sums, and a row gone already."""
    orm_kept_only(strategy, "the other transaction counts by hand what the triggers count")
    m, a, b = prepare(engine, strategy)
    with Session(engine) as s:
        s.add_all([m.Order(customer_id=a, status="open", amount=Decimal("1.25"), items=3) for _ in range(5)]
                  + [m.Order(customer_id=b, status="paid", amount=Decimal("2.00")) for _ in range(4)]
                  + [m.Order(customer_id=b, status="open", amount=None, items=1) for _ in range(3)])
        s.commit()
    assert_exact(engine)
    with Session(engine) as s:
        orders = s.scalars(select(m.Order).order_by(m.Order.id)).all()
        keep = {orders[0].id, orders[-1].id}
        gone = orders[5].id
        with engine.begin() as other:  # another transaction deletes (and counts) one of them first
            other.execute(text("DELETE FROM orders WHERE id = :id"), {"id": gone})
            other.execute(text("UPDATE customers SET open_count = open_count - 1, total = total - 1.25, "
                               "open_items = open_items - 6 WHERE id = :id"), {"id": a})
        for order in orders:
            if order.id not in keep:
                s.delete(order)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "DELETE ... expected 10 rows, 9 matched"
            s.commit()
    counts = assert_exact(engine)
    assert counts == {a: (1, Decimal("10.50"), 4), b: (1, Decimal("0.00"), 2)}


def test_deleting_rows_whose_counted_value_is_json(engine, strategy):
    """A value that neither GROUP BY nor a dict key takes (JSON) is read row by row."""

    class Base(DeclarativeBase):
        pass

    class Doc(Base):
        __tablename__ = "docs"
        id: Mapped[int] = mapped_column(primary_key=True)
        notes: Mapped[list["Note"]] = relationship()
        tagged: Mapped[int] = counter_cache("notes", strategy=strategy, where=lambda: Note.tags.is_not(None))

    class Note(Base):
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(primary_key=True)
        doc_id: Mapped[Optional[int]] = mapped_column(ForeignKey("docs.id"))
        tags: Mapped[Optional[dict]] = mapped_column(JSON, nullable=True)

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        doc = Doc()
        s.add(doc)
        s.flush()
        s.add_all([Note(doc_id=doc.id, tags={"a": [1, 2]}) for _ in range(3)] + [Note(doc_id=doc.id)])
        s.commit()
        for note in s.scalars(select(Note).order_by(Note.id)).all()[1:]:
            s.delete(note)
        s.commit()
        assert s.scalar(select(countercache.exact_expression(Doc.tagged))) == 1
        assert countercache.check(s) == []


def test_check_and_reconcile_use_the_same_expressions(engine):
    m, a, b = prepare(engine, "bulk")
    with engine.begin() as conn:
        conn.execute(text("UPDATE orders SET status = 'paid', amount = 99"))
    drifts = countercache.check(engine)
    assert {(d.counter.key, d.pk) for d in drifts} == {
        ("open_count", a), ("open_count", b), ("total", a), ("total", b), ("open_items", a), ("open_items", b)}
    countercache.reconcile(engine)
    assert countercache.check(engine) == []
    assert_exact(engine)


def test_sql_text_for_migrations():
    m = shop()
    configure_mappers()
    definition = m.Customer.open_items.property.columns[0].info["countercache"]
    assert definition.where_sql == "orders.status = 'open'"
    assert definition.sum_sql == "orders.items * 2"
    assert m.Customer.total.property.columns[0].info["countercache"].sum_sql == "orders.amount"


OTHER = Table("other", MetaData(), Column("x", Integer))


def make_bad(**kw):
    class Base(DeclarativeBase):
        pass

    class Parent(Base):
        __tablename__ = "parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        kids: Mapped[list["Kid"]] = relationship()
        n: Mapped[int] = counter_cache("kids", **kw)

    class Kid(Base):
        __tablename__ = "kids"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[Optional[int]] = mapped_column(ForeignKey("parents.id"))
        name: Mapped[str] = mapped_column(default="")

    configure_mappers()


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"where": lambda: func.lower(text("name")) == "x"}, r"Parent\.n: where= cannot be evaluated in Python"),
        ({"sum": "nothing"}, r"Parent\.n: sum='nothing' is not a column of Kid"),
        ({"where": "name = 'x'"}, r"Parent\.n: where= takes a SQL expression"),
        ({"where": OTHER.c.x > 3}, r"Parent\.n: where= reads other\.x, a column of another table than Kid's, "
                                   r"which no strategy keeps yet"),
    ],
)
def test_bad_expressions_fail_at_configuration(kw, pattern):
    with pytest.raises(CounterCacheError, match=pattern):
        make_bad(**kw)
