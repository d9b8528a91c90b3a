"""Counter kinds: a plain count, a conditional count (where=) and a sum (sum=)."""

from __future__ import annotations

from decimal import Decimal
from typing import Optional

from sqlalchemy import ForeignKey, Numeric, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    orders: Mapped[list["Order"]] = relationship(back_populates="customer")

    # COUNT(*) of the orders
    order_count: Mapped[int] = counter_cache("orders")
    # COUNT(*) of the orders WHERE status = 'open'; a callable binds late,
    # so Order may be declared below
    open_order_count: Mapped[int] = counter_cache(
        "orders", where=lambda: Order.status == "open"
    )
    # SUM(amount) of the orders (NULL adds 0), in a Numeric column
    order_total: Mapped[Decimal] = counter_cache(
        "orders", sum="amount", type_=Numeric(12, 2)
    )
    # both: SUM(amount) of the open orders only
    open_total: Mapped[Decimal] = counter_cache(
        "orders", where=lambda: Order.status == "open",
        sum=lambda: Order.amount, type_=Numeric(12, 2),
    )


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[Optional[int]] = mapped_column(ForeignKey("customers.id"), index=True)
    customer: Mapped[Optional[Customer]] = relationship(back_populates="orders")
    status: Mapped[str] = mapped_column(String(20), default="open")
    amount: Mapped[Optional[Decimal]] = mapped_column(Numeric(12, 2))


def show(label: str, c: Customer) -> None:
    print(f"{label:<26} orders={c.order_count} open={c.open_order_count} "
          f"total={c.order_total} open_total={c.open_total}")


engine = create_engine("sqlite://")
Base.metadata.create_all(engine)

with Session(engine) as session:
    alice = Customer()
    big = Order(customer=alice, amount=Decimal("120.00"))
    small = Order(customer=alice, amount=Decimal("15.50"))
    unpriced = Order(customer=alice, amount=None)
    session.add_all([alice, big, small, unpriced])
    session.commit()
    show("three open orders:", alice)

    big.status = "shipped"  # a column of where= changed: leaves the open ones
    session.commit()
    show("one shipped:", alice)

    small.amount = Decimal("20.00")  # a column of sum= changed: +4.50
    unpriced.amount = Decimal("5.00")  # NULL -> 5.00
    session.commit()
    show("amounts changed:", alice)

    session.delete(small)
    session.commit()
    show("one deleted:", alice)

    assert countercache.check(engine) == []
    print("check(): no drift")
