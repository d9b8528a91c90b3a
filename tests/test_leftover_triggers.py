"""Countercache triggers left in a database under a counter the application keeps
on the ORM side (switched away from ``trigger``, its migration not run): the
first flush writing its rows on each engine fails, naming it, rather than both
counting (tests/test_trigger_strategy.py has the plain case). Found by a second
reader: triggers of another counter whose names read alike were refused, and a
session routing its flushes to another engine skipped the check there."""

from __future__ import annotations

from typing import Optional

import pytest
import sqlalchemy as sa
from sqlalchemy import ForeignKey, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache


def users_posts(strategy: str = "bulk"):
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        posts: Mapped[list["Post"]] = relationship()
        post_count: Mapped[int] = counter_cache("posts", strategy=strategy)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))

    return Base, User, Post


def no_op_trigger(connection, name: str, table: str) -> None:
    """A trigger named like countercache's that does nothing (another application's counter)."""
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.exec_driver_sql(f"CREATE FUNCTION {name}_fn() RETURNS trigger LANGUAGE plpgsql AS "
                                   "$$ BEGIN RETURN NULL; END $$")
        connection.exec_driver_sql(f"CREATE TRIGGER {name} AFTER INSERT ON {table} "
                                   f"FOR EACH STATEMENT EXECUTE FUNCTION {name}_fn()")
    elif dialect == "sqlite":
        connection.exec_driver_sql(f"CREATE TRIGGER {name} AFTER INSERT ON {table} BEGIN SELECT 1; END")
    else:
        connection.exec_driver_sql(f"CREATE TRIGGER {name} AFTER INSERT ON {table} FOR EACH ROW SET @cc_test = 1")


@pytest.fixture
def drop_functions(engine):
    yield
    if engine.dialect.name == "postgresql":
        with engine.begin() as c:
            c.exec_driver_sql("DROP FUNCTION IF EXISTS cc_users_post_count_0123abcd_ins_fn() CASCADE")


@pytest.mark.parametrize("on", ["items", "posts"])
def test_triggers_named_alike_on_another_table_are_not_its_own(engine, drop_functions, on):
    """``users_post.count``'s triggers read as ``cc_users_post_count_<hash>``, as
    ``users.post_count``'s would: on its own counted table (posts) they are its own
    leftovers (refused); on another table (items) another counter's (let through)."""
    Base, User, Post = users_posts()
    Base.metadata.create_all(engine)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE items (id INTEGER PRIMARY KEY)"))
        no_op_trigger(c, "cc_users_post_count_0123abcd_ins", on)
    try:
        with Session(engine) as s:
            s.add_all([User(id=1), Post(id=1, user_id=1)])
            if on == "posts":
                with pytest.raises(countercache.CounterCacheError, match=r"User\.post_count: strategy 'bulk' now"):
                    s.commit()
            else:
                s.commit()
    finally:
        with engine.begin() as c:
            if engine.dialect.name != "postgresql":
                c.exec_driver_sql("DROP TRIGGER IF EXISTS cc_users_post_count_0123abcd_ins")
            c.exec_driver_sql("DROP TABLE items")


def test_a_session_routing_its_flush_to_another_engine_is_checked_there(engine, tmp_path):
    """The session is bound to a database without leftover triggers, and routes a
    tenant's flushes to another that still has the counter's triggers: refused there,
    once the first database was found clean for the same classes."""
    Base, User, Post = users_posts("trigger")
    other = sa.create_engine(f"sqlite:///{tmp_path / 'tenant_b.db'}")
    Base.metadata.create_all(other)  # (tenant b: the triggers of the counter's former strategy)
    Base, User, Post = users_posts("bulk")
    Base.metadata.create_all(engine)
    for database in (engine, other):
        with database.begin() as c:
            c.execute(sa.insert(User.__table__), [{"id": 1}])

    class Routing(Session):
        def get_bind(self, mapper=None, clause=None, **kw):
            return other if self.info.get("tenant") == "b" else super().get_bind(mapper, clause=clause, **kw)

    try:
        with Routing(bind=engine, info={"tenant": "a"}) as s:
            s.add(Post(id=1, user_id=1))
            s.commit()
        with Routing(bind=engine, info={"tenant": "b"}) as s:
            s.add(Post(id=1, user_id=1))
            with pytest.raises(countercache.CounterCacheError, match=r"User\.post_count: strategy 'bulk' now"):
                s.commit()
        with other.connect() as c:
            assert c.execute(text("SELECT post_count, (SELECT count(*) FROM posts) FROM users")).one() == (0, 0)
    finally:
        other.dispose()


def tags(strategy: str):
    from sqlalchemy import Column, Table

    class Base(DeclarativeBase):
        pass

    post_tags = Table("post_tags", Base.metadata,
                      Column("post_id", ForeignKey("posts.id"), primary_key=True),
                      Column("tag_id", ForeignKey("tags.id"), primary_key=True))

    class Tag(Base):
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        posts: Mapped[list["Post"]] = relationship(secondary=post_tags, back_populates="tags")
        post_count: Mapped[int] = counter_cache("posts", strategy=strategy)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        tags: Mapped[list[Tag]] = relationship(secondary=post_tags, back_populates="posts")

    return Base, Tag, Post, post_tags


def links_and_count(engine) -> tuple[int, int]:
    with engine.connect() as c:
        return c.execute(text("SELECT (SELECT count(*) FROM post_tags), post_count FROM tags")).one()


def test_a_core_insert_of_links_over_leftover_triggers_is_refused(engine):
    """A Core INSERT of association rows through the session, counted by the ORM strategy,
    while the counter's former triggers are still there: refused before it runs (second reader)."""
    Base, Tag, Post, post_tags = tags("trigger")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Tag(id=1), Post(id=1), Post(id=2)])
        s.commit()
    Base, Tag, Post, post_tags = tags("bulk")
    sa.orm.configure_mappers()
    with Session(engine) as s:
        with pytest.raises(countercache.CounterCacheError, match=r"Tag\.post_count: strategy 'bulk' now"):
            s.execute(post_tags.insert(), [{"post_id": 1, "tag_id": 1}, {"post_id": 2, "tag_id": 1}])
    assert links_and_count(engine) == (0, 0)


def test_a_core_insert_of_links_before_any_query_is_counted(engine):
    """The first thing a process does is a Core INSERT of association rows through the
    session, before anything configured the mappers: counted (it was not: second reader)."""
    Base, Tag, Post, post_tags = tags("bulk")
    Base.metadata.create_all(engine)
    with engine.begin() as c:
        c.execute(sa.insert(Base.metadata.tables["tags"]), [{"id": 1, "post_count": 0}])
        c.execute(sa.insert(Base.metadata.tables["posts"]), [{"id": 1}, {"id": 2}])
    Base, Tag, Post, post_tags = tags("bulk")  # (declared anew: not configured yet)
    with Session(engine) as s:
        s.execute(post_tags.insert(), [{"post_id": 1, "tag_id": 1}, {"post_id": 2, "tag_id": 1}])
        s.commit()
    assert links_and_count(engine) == (2, 2)

