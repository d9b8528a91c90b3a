"""Models imported by the CLI tests with ``--models cli_sum_models``: a ``sum=`` counter."""

from __future__ import annotations

from typing import Optional

from sqlalchemy import ForeignKey
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from countercache import counter_cache


class Base(DeclarativeBase):
    pass


class Shop(Base):
    __tablename__ = "cli_shops"
    id: Mapped[int] = mapped_column(primary_key=True)
    sales: Mapped[list["Sale"]] = relationship()
    revenue: Mapped[int] = counter_cache("sales", sum="amount")


class Sale(Base):
    __tablename__ = "cli_sales"
    id: Mapped[int] = mapped_column(primary_key=True)
    shop_id: Mapped[Optional[int]] = mapped_column(ForeignKey("cli_shops.id"))
    amount: Mapped[int]
