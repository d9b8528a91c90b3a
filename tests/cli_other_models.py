"""A second declarative base for the CLI tests (``--models cli_other_models``), whose
tables live in another database than :mod:`cli_models`' (``cli_members`` is never created there)."""

from __future__ import annotations

from typing import Optional

from sqlalchemy import ForeignKey
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from countercache import counter_cache


class OtherBase(DeclarativeBase):
    pass


class Member(OtherBase):
    __tablename__ = "cli_members"
    id: Mapped[int] = mapped_column(primary_key=True)
    orders: Mapped[list["Order"]] = relationship()
    order_count: Mapped[int] = counter_cache("orders")


class Order(OtherBase):
    __tablename__ = "cli_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    member_id: Mapped[Optional[int]] = mapped_column(ForeignKey("cli_members.id"))
