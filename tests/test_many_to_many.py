"""Many-to-many counters (``Tag.post_count`` over ``secondary``): SPEC §1, §4."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, ForeignKey, String, Table, delete, event, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache
from helpers import assert_counts, exact_value, orm_kept_only_on_mariadb
from models import passive_links


def blog(strategy):
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
        name: Mapped[str] = mapped_column(String(20), default="")
        posts: Mapped[list["Post"]] = relationship(secondary=post_tags, back_populates="tags")
        post_count: Mapped[int] = counter_cache("posts", strategy=strategy)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)
        tags: Mapped[list[Tag]] = relationship(secondary=post_tags, back_populates="posts")

    return Base, Tag, Post


def assert_exact(engine):
    """Every tag's counter equals its association rows (``sharded``: pending deltas, then folded)."""
    return assert_counts(engine, "tags", "post_count", "post_tags", "tag_id")


def values(s, *tags):
    return tuple(exact_value(s, t, "post_count") for t in tags)


def test_links_from_either_side(engine, strategy):
    orm_kept_only_on_mariadb(engine, strategy, "MariaDB refuses it: its foreign key actions fire no trigger (test_trigger_ddl checks the refusal)")
    Base, Tag, Post = blog(strategy)
    Base.metadata.create_all(engine)
    with Session(engine, expire_on_commit=False) as s:
        a, b, c = Tag(name="a"), Tag(name="b"), Tag(name="c")
        p1, p2 = Post(tags=[a, b]), Post()  # pending on both sides in one flush
        s.add_all([a, b, c, p1, p2])
        s.flush()
        c.posts.append(p1)  # from the parent's side
        p2.tags.extend([a, c])  # from the child's side
        s.commit()
        assert values(s, a, b, c) == (2, 1, 2)
        p1.tags.remove(a)
        c.posts.remove(p2)
        s.commit()
        assert values(s, a, b, c) == (1, 1, 1)
    assert sorted(assert_exact(engine).values()) == [1, 1, 1]


def test_deleting_either_side(engine, strategy):
    orm_kept_only_on_mariadb(engine, strategy, "MariaDB refuses it: its foreign key actions fire no trigger (test_trigger_ddl checks the refusal)")
    Base, Tag, Post = blog(strategy)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        a, b = Tag(name="a"), Tag(name="b")
        s.add_all([Post(tags=[a, b]), Post(tags=[a]), Post(tags=[b])])
        s.commit()
        ids = (a.id, b.id)
    with Session(engine) as s:
        post = s.query(Post).order_by(Post.id).first()  # its tags not loaded
        s.delete(post)
        s.commit()
    assert assert_exact(engine) == {ids[0]: 1, ids[1]: 1}
    with Session(engine) as s:
        s.delete(s.get(Tag, ids[0]))  # a deleted parent: its rows go, nothing to update
        s.commit()
    assert assert_exact(engine) == {ids[1]: 1}


def test_check_and_reconcile(engine):
    Base, Tag, Post = blog("bulk")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        t = Tag(name="t")
        s.add(Post(tags=[t]))
        s.commit()
        tid = t.id
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM post_tags"))
    assert [(d.pk, d.stored, d.actual) for d in countercache.check(engine)] == [(tid, 1, 0)]
    countercache.reconcile(engine)
    assert assert_exact(engine) == {tid: 0}


def test_migration_backfill_counts_association_rows():
    from sqlalchemy.orm import configure_mappers

    from countercache.alembic.autogenerate import _backfill_for

    Base, Tag, Post = blog(None)
    configure_mappers()
    column = Tag.__table__.c.post_count
    op = _backfill_for(column, column.info["countercache"], None, None)
    assert (op.table_name, op.child_table, op.child_fk, op.parent_key) == ("tags", "post_tags", "tag_id", "id")


def test_links_written_by_any_relationship_over_the_association_table(engine, strategy):
    """The counted side is ``viewonly`` (it writes no rows: changing it counts
    nothing) and the links are written by relationships not tied to it by
    ``back_populates`` (one-sided ``Post.tags``, and a second one,
    ``Tag.featured``, over the same table): each link the flush writes or
    removes moves the counter, once."""
    import warnings

    from sqlalchemy import exc as sa_exc

    class Base(DeclarativeBase):
        pass

    post_tags = Table(
        "post_tags", Base.metadata,
        Column("post_id", ForeignKey("posts.id"), primary_key=True),
        Column("tag_id", ForeignKey("tags.id"), primary_key=True),
    )

    class Tag(Base):
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True)
        posts: Mapped[list["Post"]] = relationship(secondary=post_tags, viewonly=True)
        featured: Mapped[list["Post"]] = relationship(secondary=post_tags, overlaps="tags")
        post_count: Mapped[int] = counter_cache("posts", strategy=strategy)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)
        tags: Mapped[list[Tag]] = relationship(secondary=post_tags, overlaps="featured")

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    Base.metadata.create_all(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa_exc.SAWarning)
        with Session(engine, expire_on_commit=False) as s:
            a, b = Tag(id=1), Tag(id=2)
            p1, p2, p3 = Post(id=1, tags=[a, b]), Post(id=2, tags=[a]), Post(id=3)
            s.add_all([a, b, p1, p2, p3])
            s.commit()
            assert values(s, a, b) == (2, 1)
            b.featured.append(p3)  # the second writer
            p1.tags.remove(a)
            s.commit()
            assert values(s, a, b) == (1, 2)
            a.posts.append(p3)  # viewonly: no row, no count
            s.commit()
            s.delete(p2)
            s.commit()
            assert values(s, a, b) == (0, 2)
    assert_exact(engine)


def test_links_the_database_cascade_removes(engine, strategy):
    """``passive_deletes=True`` with ``ON DELETE CASCADE`` on the association
    table: deleting a post whose tags are not loaded lets the database remove
    its links; they are read (and locked) before the flush and counted."""
    orm_kept_only_on_mariadb(engine, strategy, "MariaDB refuses it: its foreign key actions fire no trigger (test_trigger_ddl checks the refusal)")
    from sqlalchemy import event

    m = passive_links(strategy)
    Base, Tag, Post = m.Base, m.Tag, m.Post
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", lambda conn, record: conn.execute("PRAGMA foreign_keys=ON"))
        engine.dispose()
    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        a, b = Tag(id=1), Tag(id=2)
        s.add_all([Post(id=1, tags=[a, b]), Post(id=2, tags=[a]), Post(id=3, tags=[b])])
        s.commit()
    with Session(engine) as s:
        s.delete(s.get(Post, 1))  # tags not loaded: the database removes its two links
        post = s.get(Post, 2)
        post.tags  # loaded: the flush removes the link itself
        s.delete(post)
        s.commit()
    assert_exact(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM post_tags")).scalar() == 1


def test_an_association_table_mapped_by_a_class_is_refused():
    """``class Enrolment: __table__ = enrolment`` beside a many-to-many counter
    over that table: its rows are links no relationship event reports (they
    were never counted); refused when mappers are configured, with the way
    that counts them."""
    import pytest
    from sqlalchemy.orm import configure_mappers

    class Base(DeclarativeBase):
        pass

    enrolment = Table(
        "enrolment", Base.metadata,
        Column("student_id", ForeignKey("students.id"), primary_key=True),
        Column("course_id", ForeignKey("courses.id"), primary_key=True),
    )

    class Course(Base):
        __tablename__ = "courses"
        id: Mapped[int] = mapped_column(primary_key=True)
        students: Mapped[list["Student"]] = relationship(secondary=enrolment, viewonly=True)
        student_count: Mapped[int] = counter_cache("students")

    class Student(Base):
        __tablename__ = "students"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Enrolment(Base):
        __table__ = enrolment

    with pytest.raises(countercache.CounterCacheError,
                       match=r"Course\.student_count: its association table enrolment is also mapped by Enrolment"):
        configure_mappers()
    del Course, Student, Enrolment


def test_core_insert_into_the_association_table_through_the_session_is_counted(engine, strategy):
    """The bulk way to link many rows: ``session.execute(post_tags.insert(), [...])``
    (a parameter list, ``values()`` of one row or of several) is counted once
    it succeeded; what cannot be counted from the statement, and links removed
    or re-pointed by a Core statement, are refused before anything runs."""
    orm_kept_only_on_mariadb(engine, strategy, "MariaDB refuses it: its foreign key actions fire no trigger (test_trigger_ddl checks the refusal)")
    Base, Tag, Post = blog(strategy)
    Base.metadata.create_all(engine)
    post_tags = Base.metadata.tables["post_tags"]
    with Session(engine, expire_on_commit=False) as s:
        a, b = Tag(id=1, name="a"), Tag(id=2, name="b")
        s.add_all([a, b, Post(id=1), Post(id=2), Post(id=3)])
        s.commit()
        s.execute(post_tags.insert(), [{"post_id": 1, "tag_id": 1}, {"post_id": 2, "tag_id": 1},
                                       {"post_id": 1, "tag_id": 2}])
        s.execute(post_tags.insert().values(post_id=3, tag_id=1))
        s.execute(post_tags.insert().values([{"post_id": 2, "tag_id": 2}, {"post_id": 3, "tag_id": 2}]))
        s.commit()
        assert values(s, a, b) == (3, 3)
        for statement, why in [
            (post_tags.delete().where(post_tags.c.post_id == 1), r"a Core DELETE on post_tags"),
            (post_tags.update().values(tag_id=1), r"a Core UPDATE on post_tags"),
            (post_tags.insert().from_select(["post_id", "tag_id"], post_tags.select()), r"INSERT INTO post_tags ... FROM SELECT"),
        ]:
            with pytest.raises(countercache.CounterCacheError, match=r"Tag\.post_count: " + why):
                s.execute(statement)
        s.commit()
    assert assert_exact(engine) == {1: 3, 2: 3}


def test_row_switch_of_a_tag_counts_the_links_it_lost_and_gained(engine, strategy):
    """A tag deleted and a new Tag with its key added in one flush: SQLAlchemy
    UPDATEs the row (a row switch) and deletes the old object's links; the
    row keeps its counter, so the links it lost and gained are counted."""
    orm_kept_only_on_mariadb(engine, strategy, "MariaDB refuses it: its foreign key actions fire no trigger (test_trigger_ddl checks the refusal)")
    Base, Tag, Post = blog(strategy)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Tag(id=1, posts=[Post(id=1), Post(id=2)]))
        s.add(Post(id=3))
        s.commit()
    with Session(engine) as s:
        s.delete(s.get(Tag, 1))
        s.add(Tag(id=1, name="again"))
        s.commit()
    assert assert_exact(engine) == {1: 0}
    with Session(engine) as s:
        s.delete(s.get(Tag, 1))
        s.add(Tag(id=1, name="and again", posts=[s.get(Post, 3)]))
        s.commit()
    assert assert_exact(engine) == {1: 1}


def test_core_delete_the_database_cascades_into_links_is_refused(engine, backend, strategy):
    """``session.execute(posts.delete())``: ON DELETE CASCADE removes the post's
    links, which no hook sees: refused; the ORM ``delete(Post)`` counts them.
    Deleting tags is let through: the links go with their own counter's row."""
    orm_kept_only_on_mariadb(engine, strategy, "MariaDB refuses it: its foreign key actions fire no trigger (test_trigger_ddl checks the refusal)")
    if backend == "sqlite":  # (SQLite cascades only with foreign keys on)
        event.listen(engine, "connect", lambda dbapi, record: dbapi.execute("PRAGMA foreign_keys = ON"))
        engine.dispose()
    Base, Tag, Post = blog(strategy)
    Base.metadata.create_all(engine)
    posts, tags = Post.__table__, Tag.__table__
    with Session(engine) as s:
        a, b, c = Tag(id=1), Tag(id=2), Tag(id=3)
        s.add_all([Post(id=1, tags=[a, b]), Post(id=2, tags=[a, c])])
        s.commit()
        with pytest.raises(countercache.CounterCacheError,
                           match=r"Tag\.post_count: a Core DELETE on posts makes the database delete counted rows "
                                 r"\(ON DELETE CASCADE into post_tags\)"):
            s.execute(posts.delete().where(posts.c.id == 1))
        s.execute(delete(Post).where(Post.id == 1))  # the ORM statement: counted
        s.execute(tags.delete().where(tags.c.id == 3))  # its own links: no other counter
        s.commit()
    assert assert_exact(engine) == {1: 1, 2: 0}


def test_core_insert_of_links_through_a_session_with_binds(engine, strategy):
    """``Session(binds={Base: engine, post_tags: engine})``: the statement's bind is found from its table."""
    orm_kept_only_on_mariadb(engine, strategy, "MariaDB refuses it: its foreign key actions fire no trigger (test_trigger_ddl checks the refusal)")
    Base, Tag, Post = blog(strategy)
    Base.metadata.create_all(engine)
    post_tags = Base.metadata.tables["post_tags"]
    with Session(binds={Base: engine, post_tags: engine}) as s:
        s.add_all([Tag(id=1), Post(id=1), Post(id=2)])
        s.commit()
        s.execute(post_tags.insert(), [{"post_id": 1, "tag_id": 1}, {"post_id": 2, "tag_id": 1}])
        s.commit()
    assert assert_exact(engine) == {1: 2}
