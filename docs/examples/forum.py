"""A small forum whose counters drift behind the ORM's back.

Importable as a models module (``countercache check --models forum``);
run as a script it builds ``forum.db`` (SQLite) in the current directory::

    python forum.py
    countercache check --url sqlite:///forum.db --models forum
"""

from __future__ import annotations

from typing import Optional

from sqlalchemy import ForeignKey, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from countercache import counter_cache


class Base(DeclarativeBase):
    pass


class Forum(Base):
    __tablename__ = "forums"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    posts: Mapped[list["Post"]] = relationship(back_populates="forum")
    post_count: Mapped[int] = counter_cache("posts")
    pinned_count: Mapped[int] = counter_cache("posts", where=lambda: Post.pinned.is_(True))


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    forum_id: Mapped[Optional[int]] = mapped_column(ForeignKey("forums.id"), index=True)
    forum: Mapped[Optional[Forum]] = relationship(back_populates="posts")
    pinned: Mapped[bool] = mapped_column(default=False)


def build(url: str) -> None:
    """Create the schema, add posts through the ORM, then change rows with raw SQL."""
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        news, help_ = Forum(name="news"), Forum(name="help")
        session.add_all([Post(forum=news, pinned=True), Post(forum=news), Post(forum=help_)])
        session.commit()  # counted: news 2 posts (1 pinned), help 1
    with engine.begin() as conn:  # raw SQL: the ORM never sees it, no counter moves
        conn.execute(text("INSERT INTO posts (forum_id, pinned) VALUES (2, 1), (2, 0)"))
        conn.execute(text("DELETE FROM posts WHERE forum_id = 1 AND pinned = 1"))
    engine.dispose()


if __name__ == "__main__":
    build("sqlite:///forum.db")
    print("forum.db built: 2 forums, 4 posts, 4 counter values drifted")
