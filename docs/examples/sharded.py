"""A hot parent with a ``sharded`` counter: exact reads, ordering, and fold.

Four sessions stand for four concurrent writers on one popular post: each
commits its own like. The column lags until ``fold()``; ``exact()`` and
``exact_expression()`` add the pending shard deltas.
"""

from __future__ import annotations

from typing import Optional

from sqlalchemy import ForeignKey, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache


class Base(DeclarativeBase):
    pass


class Post(Base):
    __tablename__ = "posts"
    id: Mapped[int] = mapped_column(primary_key=True)
    likes: Mapped[list["Like"]] = relationship(back_populates="post")
    like_count: Mapped[int] = counter_cache("likes", strategy="sharded", shards=8)


class Like(Base):
    __tablename__ = "likes"
    id: Mapped[int] = mapped_column(primary_key=True)
    post_id: Mapped[Optional[int]] = mapped_column(ForeignKey("posts.id"), index=True)
    post: Mapped[Optional[Post]] = relationship(back_populates="likes")


engine = create_engine("sqlite://")
Base.metadata.create_all(engine)  # the side table countercache_shards included
print(sorted(Base.metadata.tables))

with Session(engine) as session:
    session.add_all([Post(id=1), Post(id=2)])
    session.commit()

writers = [Session(engine) for _ in range(4)]
for writer in writers:
    writer.add(Like(post_id=1))
for writer in writers:
    writer.commit()  # each adds +1 to a shard row of post 1
    writer.close()

with Session(engine) as session:
    session.add(Like(post_id=2))
    session.flush()
    post = session.get(Post, 1)
    print("column:", post.like_count, "exact:", countercache.exact(session, post, "like_count"))
    print("post 2, its own like not yet committed:", countercache.exact(session, session.get(Post, 2), "like_count"))
    session.commit()

    popular = countercache.exact_expression(Post.like_count)
    print("by exact likes:", session.execute(select(Post.id, popular).order_by(popular.desc())).all())
    print("drift:", countercache.check(engine))

    print("shard rows folded:", countercache.fold(engine))
    session.expire_all()
    print("column after fold:", session.get(Post, 1).like_count,
          "shard rows left:", session.scalar(select(func.count()).select_from(Base.metadata.tables["countercache_shards"])))
