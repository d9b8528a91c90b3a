"""Database-kept counters whose trigger names read alike before their hash
(outside tester): one counter's column name a prefix of another's (``n`` and
``n_open``), a table and column joining to another's (``users.post_count``
and ``users_post.count``), long table names cut to the same length. Each
counter's triggers are its own: the first flush took the other counter's for
a stale definition of this one and refused. A stale definition is still
refused, and so is a counter configured away from ``trigger`` whose triggers
remain, whatever other counter reads alike.
"""

from __future__ import annotations

from typing import Optional

import pytest
from sqlalchemy import ForeignKey, String, text
from sqlalchemy.orm import DeclarativeBase, configure_mappers, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache, triggers
from countercache.strategies.trigger import forget_verified

LONG = "customer_loyalty_programme_membership_enrolments"  # (48 characters: names cut alike)


def prefix_models(strategy: str, n_where=None):
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        posts: Mapped[list["Post"]] = relationship(back_populates="user")
        n: Mapped[int] = counter_cache("posts", strategy=strategy, where=n_where and (lambda: Post.state == n_where))
        n_open: Mapped[int] = counter_cache("posts", strategy=strategy, where=lambda: Post.state == "open")

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))
        state: Mapped[str] = mapped_column(String(20), default="open")
        user: Mapped[Optional[User]] = relationship(back_populates="posts")

    return Base, User, Post, "SELECT n, n_open FROM users WHERE id = 1", \
        "SELECT count(*), count(CASE WHEN state = 'open' THEN 1 END) FROM posts WHERE user_id = 1"


def joined_models(strategy: str):
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        posts: Mapped[list["Post"]] = relationship(back_populates="user")
        post_count: Mapped[int] = counter_cache("posts", strategy=strategy)

    class UsersPost(Base):
        __tablename__ = "users_post"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        posts: Mapped[list["Post"]] = relationship(back_populates="group")
        count: Mapped[int] = counter_cache("posts", strategy=strategy)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))
        group_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users_post.id"))
        state: Mapped[str] = mapped_column(String(20), default="open")
        user: Mapped[Optional[User]] = relationship(back_populates="posts")
        group: Mapped[Optional[UsersPost]] = relationship(back_populates="posts")

    return Base, User, Post, "SELECT (SELECT post_count FROM users WHERE id = 1), " \
        "(SELECT count FROM users_post WHERE id = 1)", \
        "SELECT count(*), count(group_id) FROM posts WHERE user_id = 1"


def long_models(strategy: str):
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = LONG
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        posts: Mapped[list["Post"]] = relationship(back_populates="user")
        post_count: Mapped[int] = counter_cache("posts", strategy=strategy)
        points_total: Mapped[int] = counter_cache("posts", strategy=strategy, sum="points")

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey(f"{LONG}.id"))
        points: Mapped[int] = mapped_column(default=3)
        state: Mapped[str] = mapped_column(String(20), default="open")
        user: Mapped[Optional[User]] = relationship(back_populates="posts")

    return Base, User, Post, f"SELECT post_count, points_total FROM {LONG} WHERE id = 1", \
        "SELECT count(*), coalesce(sum(points), 0) FROM posts WHERE user_id = 1"


SHAPES = {"column_prefix": prefix_models, "table_and_column_joined": joined_models, "long_table": long_models}


def _pair(engine, sql: str) -> tuple[int, int]:
    with engine.connect() as c:
        row = c.execute(text(sql)).one()
    return int(row[0]), int(row[1])


@pytest.mark.parametrize("strategy", ["trigger", "sharded_trigger"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_counters_whose_names_read_alike_each_keep_their_own(engine, backend, shape, strategy):
    Base, User, Post, stored, real = SHAPES[shape](strategy)
    forget_verified()
    Base.metadata.create_all(engine)
    try:
        bases = [triggers.trigger_name(col.info["countercache"]) for m in Base.registry.mappers
                 for col in m.local_table.columns if "countercache" in col.info]
        # (the names read alike: the same before the hash, or one's a prefix of the other's)
        assert any(a != b and b.startswith(a.rsplit("_", 1)[0] + "_") for a in bases for b in bases)
        with Session(engine) as s:
            s.add(User(id=1))
            if shape == "table_and_column_joined":
                s.add(Post.group.property.mapper.class_(id=1))
            s.flush()
            posts = [Post(id=i, user_id=1) for i in range(1, 4)]
            if shape == "table_and_column_joined":
                for p in posts[:2]:
                    p.group_id = 1
            s.add_all(posts)
            s.flush()  # (refused here before: "also has countercache triggers ... of another definition")
            s.delete(posts[0])
            s.commit()
        if strategy == "sharded_trigger":
            countercache.fold(engine)
        assert _pair(engine, stored) == _pair(engine, real)
        assert countercache.check(engine, metadata=Base.metadata) == []
    finally:
        Base.metadata.drop_all(engine)
        forget_verified()


def test_a_stale_definition_is_still_refused_and_a_counter_moved_away_still_checked(engine, backend):
    Base, User, Post, stored, real = prefix_models("trigger")
    forget_verified()
    Base.metadata.create_all(engine)
    try:
        # n_open configured away from trigger, its triggers left: refused, naming n_open
        countercache.configure(overrides={"User.n_open": "bulk"})
        with Session(engine) as s:
            s.add(User(id=1))
            s.add(Post(id=1, user_id=1))
            with pytest.raises(countercache.CounterCacheError, match=r"User\.n_open: strategy 'bulk' now"):
                s.commit()
        countercache.configure()
        forget_verified()
        # another definition of n (where= state 'closed') installed beside n's own: refused for n
        _, OldUser, _, _, _ = prefix_models("trigger", n_where="closed")
        configure_mappers()
        with engine.begin() as c:
            triggers.execute(c, triggers.create_statements(OldUser.n.property.columns[0].info["countercache"],
                                                           c.dialect))
        with Session(engine) as s:
            s.add(User(id=1))
            s.add(Post(id=1, user_id=1))
            with pytest.raises(countercache.CounterCacheError,
                               match=r"User\.n: the database .* also has countercache triggers cc_users_n_[0-9a-f]{8} "):
                s.commit()
        assert _pair(engine, "SELECT count(*), (SELECT count(*) FROM users) FROM posts") == (0, 0)  # all rolled back
    finally:
        countercache.configure()
        Base.metadata.drop_all(engine)
        forget_verified()
