"""Models for conditional and summing counters (a fresh DeclarativeBase per call)."""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace
from typing import Optional

from sqlalchemy import ForeignKey, Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from countercache import counter_cache


def shop(strategy: str | None = "bulk") -> SimpleNamespace:
    """Customers with orders: open orders counted, amounts summed.

    A ``Numeric`` sum cannot be sharded (refused at configuration): with
    ``strategy="sharded"``, ``total`` is ``deferred`` and the integer counters
    are sharded.
    """
    money = "deferred" if strategy == "sharded" else strategy

    class Base(DeclarativeBase):
        pass

    class Customer(Base):
        __tablename__ = "customers"
        id: Mapped[int] = mapped_column(primary_key=True)
        orders: Mapped[list["Order"]] = relationship(back_populates="customer", cascade="all, delete-orphan")
        open_count: Mapped[int] = counter_cache("orders", strategy=strategy,
                                                where=lambda: Order.status == "open")
        total: Mapped[Decimal] = counter_cache("orders", strategy=money, sum="amount",
                                               type_=Numeric(12, 2))
        open_items: Mapped[int] = counter_cache("orders", strategy=strategy,
                                                where=lambda: Order.status == "open",
                                                sum=lambda: Order.items * 2)

    class Order(Base):
        __tablename__ = "orders"
        id: Mapped[int] = mapped_column(primary_key=True)
        customer_id: Mapped[Optional[int]] = mapped_column(ForeignKey("customers.id"), index=True)
        customer: Mapped[Optional[Customer]] = relationship(back_populates="orders")
        status: Mapped[Optional[str]] = mapped_column(String(20), server_default="open")
        amount: Mapped[Optional[Decimal]] = mapped_column(Numeric(12, 2))
        items: Mapped[int] = mapped_column(default=1)

    return SimpleNamespace(Base=Base, Customer=Customer, Order=Order)
