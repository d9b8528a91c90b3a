"""ORM bulk statements run through the session are counted; raw SQL is not."""

from __future__ import annotations

from typing import Optional

from sqlalchemy import ForeignKey, create_engine, delete, insert, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache


class Base(DeclarativeBase):
    pass


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    posts: Mapped[list["Post"]] = relationship(back_populates="tag")
    post_count: Mapped[int] = counter_cache("posts")


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    tag_id: Mapped[Optional[int]] = mapped_column(ForeignKey("tags.id"), index=True)
    tag: Mapped[Optional[Tag]] = relationship(back_populates="posts")
    score: Mapped[int] = mapped_column(default=0)


engine = create_engine("sqlite://")
Base.metadata.create_all(engine)

with Session(engine) as session:
    python, sql = Tag(id=1), Tag(id=2)
    session.add_all([python, sql])
    session.commit()

    # ORM-enabled INSERT with a list of parameter sets
    session.execute(insert(Post), [{"tag_id": 1, "score": s} for s in range(5)] + [{"tag_id": 2}])
    print("after insert:", python.post_count, sql.post_count)  # in memory too

    # ORM-enabled UPDATE that re-parents rows, and a DELETE
    session.execute(update(Post).where(Post.score >= 3).values(tag_id=2))
    print("after update:", python.post_count, sql.post_count)
    session.execute(delete(Post).where(Post.tag_id == 2, Post.score == 0))
    print("after delete:", python.post_count, sql.post_count)
    session.commit()

    # An UPDATE of columns no counter uses costs nothing extra.
    session.execute(update(Post).values(score=Post.score + 1))
    session.commit()

    # Not maintained: raw SQL and Core statements on a connection.
    session.execute(text("DELETE FROM posts WHERE tag_id = 1"))
    session.commit()
    print("after raw SQL:", python.post_count, sql.post_count, "(stale)")
    print("drift:", [(d.pk, d.stored, d.actual) for d in countercache.check(session)])

    # The remedy: a recount that writes the true values.
    countercache.reconcile(session)
    session.commit()
    print("after reconcile:", python.post_count, sql.post_count)
    assert countercache.check(session) == []

    # A bulk import with maintenance off, then one reconcile().
    with countercache.suspended(session):
        session.execute(insert(Post), [{"tag_id": 1} for _ in range(1000)])
        session.commit()
    print("after a suspended import:", python.post_count)
    countercache.reconcile(session)
    session.commit()
    print("after reconcile:", python.post_count)
