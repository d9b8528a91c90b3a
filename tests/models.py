"""Model factories for the tests: every call builds fresh classes on a new DeclarativeBase."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

from sqlalchemy import CheckConstraint, Column, ForeignKey, String, Table, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from countercache import counter_cache


def qa(strategy: str | None = "bulk", *, cascade: str = "save-update, merge",
       parent_cascade: str | None = None, version: bool = False,
       counted: bool = True) -> SimpleNamespace:
    """Users with questions: ``User.question_count`` counts ``User.questions``.

    ``cascade`` is the cascade of ``User.questions`` (add ``delete-orphan``
    or ``delete`` for those cases); ``counted=False`` leaves the counter out
    (the no-counter floor of the concurrency test).
    """

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
        name: Mapped[str] = mapped_column(String(50), default="")
        questions: Mapped[list["Question"]] = relationship(back_populates="user", cascade=cascade)
        if counted:
            question_count: Mapped[int] = counter_cache("questions", strategy=strategy)
        if version:
            version_id: Mapped[int] = mapped_column(default=1)
            __mapper_args__ = {"version_id_col": version_id}

    class Question(Base):
        __tablename__ = "questions"
        # lets a test fail a flush halfway on every backend (title="invalid")
        __table_args__ = (CheckConstraint("title <> 'invalid'", name="ck_questions_title"),)
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
        title: Mapped[str] = mapped_column(String(50), default="")
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), index=True)
        user: Mapped[Optional[User]] = relationship(back_populates="questions")

    class Tag(Base):
        """A table with no counter, for flushes that touch no counted class."""

        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
        name: Mapped[str] = mapped_column(String(50), default="")

    def real(session_or_conn, user_id: int) -> int:
        return session_or_conn.scalar(
            select(func.count()).select_from(Question.__table__).where(Question.__table__.c.user_id == user_id)
        )

    return SimpleNamespace(Base=Base, User=User, Question=Question, Tag=Tag, real=real)


def seed(engine, m: SimpleNamespace, per_user=(3, 2, 0)) -> list[int]:
    """Commit users ``u0, u1, ...`` of :func:`qa` models with ``per_user[i]``
    questions ``q0, q1, ...`` each; return their ids, in order."""
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        users = [m.User(name=f"u{i}") for i in range(len(per_user))]
        for user, n in zip(users, per_user, strict=True):
            user.questions.extend(m.Question(title=f"q{j}") for j in range(n))
        s.add_all(users)
        s.commit()
        return [u.id for u in users]


def qa_seeded(engine, strategy: str | None = "bulk", per_user=(3, 2, 0),
              **kw) -> tuple[SimpleNamespace, list[int]]:
    """:func:`qa` models (``kw`` passed on), their tables created, and :func:`seed`'s users: ``(m, ids)``."""
    m = qa(strategy, **kw)
    m.Base.metadata.create_all(engine)
    return m, seed(engine, m, per_user)


def passive_links(strategy: str) -> SimpleNamespace:
    """``Tag.post_count`` over ``post_tags``, whose foreign keys say ``ON DELETE CASCADE``,
    both relationships ``passive_deletes=True``: a deleted post's unloaded links are left
    to the database (and read before it goes)."""

    class Base(DeclarativeBase):
        pass

    post_tags = Table(
        "post_tags", Base.metadata,
        Column("post_id", ForeignKey("posts.id", ondelete="CASCADE"), primary_key=True),
        Column("tag_id", ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True),
    )

    class Tag(Base):
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True)
        posts: Mapped[list["Post"]] = relationship(secondary=post_tags, back_populates="tags", passive_deletes=True)
        post_count: Mapped[int] = counter_cache("posts", strategy=strategy)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)
        tags: Mapped[list[Tag]] = relationship(secondary=post_tags, back_populates="posts", passive_deletes=True)

    return SimpleNamespace(Base=Base, Tag=Tag, Post=Post)
