"""Models imported by the CLI tests with ``--models cli_models``."""

from __future__ import annotations

from typing import Optional

from sqlalchemy import ForeignKey
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from countercache import counter_cache


class Base(DeclarativeBase):
    pass


class Forum(Base):
    __tablename__ = "cli_forums"
    id: Mapped[int] = mapped_column(primary_key=True)
    posts: Mapped[list["Post"]] = relationship()
    post_count: Mapped[int] = counter_cache("posts")


class Post(Base):
    __tablename__ = "cli_posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    forum_id: Mapped[Optional[int]] = mapped_column(ForeignKey("cli_forums.id"))
