"""Parents whose children the database's foreign keys do not hold (no FOREIGN KEY
declared: ``relationship(primaryjoin="Tag.code == foreign(Post.tag_code)")``, as
applications that check keys themselves declare them). Rows may wait under a key
no parent has yet, or outlive a parent deleted and created again under the same
key. A new parent starts from them: ``bulk``, ``per_row`` and ``deferred`` wrote
0 (their writes to a parent that was not there changed nothing) and drifted by
every waiting row. Each test compares with an independent ``SELECT count(*)``.
"""

from __future__ import annotations

from typing import Optional

import pytest
from sqlalchemy import String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache

from helpers import exact_value


def models(strategy: str):
    class Base(DeclarativeBase):
        pass

    class Tag(Base):
        __tablename__ = "tags"
        code: Mapped[str] = mapped_column(String(20), primary_key=True)
        posts = relationship("Post", primaryjoin="Tag.code == foreign(Post.tag_code)")
        post_count: Mapped[int] = counter_cache("posts", strategy=strategy)
        open_count: Mapped[int] = counter_cache("posts", strategy=strategy, where=lambda: Post.state == "open")
        score_total: Mapped[int] = counter_cache("posts", strategy=strategy, sum="score")

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        tag_code: Mapped[Optional[str]] = mapped_column(String(20))
        state: Mapped[str] = mapped_column(String(10), default="open")
        score: Mapped[int] = mapped_column(default=1)

    return Base, Tag, Post


REAL = ("SELECT t.code, (SELECT count(*) FROM posts p WHERE p.tag_code = t.code), "
        "(SELECT count(*) FROM posts p WHERE p.tag_code = t.code AND p.state = 'open'), "
        "(SELECT coalesce(sum(p.score), 0) FROM posts p WHERE p.tag_code = t.code) FROM tags t ORDER BY t.code")


@pytest.fixture
def schema(engine, strategy):
    Base, Tag, Post = models(strategy)
    Base.metadata.create_all(engine)
    yield Tag, Post
    Base.metadata.drop_all(engine)


def assert_exact(engine, Tag) -> dict[str, tuple[int, int, int]]:
    with engine.connect() as c:
        want = {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in c.execute(text(REAL))}
    with Session(engine) as s:
        got = {t.code: tuple(exact_value(s, t, n) for n in ("post_count", "open_count", "score_total"))
               for t in s.query(Tag)}
    assert got == want
    assert countercache.check(engine) == []
    return want


def test_a_new_parent_counts_the_rows_waiting_under_its_key(engine, schema):
    Tag, Post = schema
    with Session(engine) as s:
        s.add_all([Post(id=1, tag_code="py", score=5), Post(id=2, tag_code="py", state="closed", score=2),
                   Post(id=3, tag_code="rs")])
        s.commit()
    with Session(engine, expire_on_commit=False) as s:
        py, go = Tag(code="py"), Tag(code="go")
        s.add_all([py, go])
        s.add_all([Post(id=4, tag_code="py", score=10), Post(id=5, tag_code="go")])  # (and new ones, same flush)
        s.commit()
    assert assert_exact(engine, Tag) == {"go": (1, 1, 1), "py": (3, 2, 17)}


def test_a_parent_deleted_and_created_again_counts_the_rows_that_outlived_it(engine, schema):
    Tag, Post = schema
    with Session(engine) as s:
        s.add(Tag(code="py"))
        s.flush()
        s.add_all([Post(id=i, tag_code="py") for i in range(1, 4)])
        s.commit()
    with engine.begin() as c:
        c.execute(text("DELETE FROM tags"))  # (its posts stay: nothing cascades)
    with Session(engine) as s:
        s.add(Tag(code="py"))
        s.commit()
        s.delete(s.get(Post, 1))
        s.commit()
    assert assert_exact(engine, Tag) == {"py": (2, 2, 2)}


def test_parents_whose_rows_a_foreign_key_holds_cost_nothing_more(engine, strategy, statements):
    """A declared foreign key: a new parent has no rows yet, and nothing is read for it."""
    from sqlalchemy import ForeignKey

    class Base(DeclarativeBase):
        pass

    class Tag(Base):
        __tablename__ = "tags"
        code: Mapped[str] = mapped_column(String(20), primary_key=True)
        posts: Mapped[list["Post"]] = relationship()
        post_count: Mapped[int] = counter_cache("posts", strategy=strategy)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        tag_code: Mapped[Optional[str]] = mapped_column(ForeignKey("tags.code"))

    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            with statements.record() as rec:
                s.add(Tag(code="py"))
                s.flush()
            assert [st for st, _, _ in rec if "posts" in st.lower()] == []
            s.commit()
    finally:
        Base.metadata.drop_all(engine)


def test_an_insert_statement_of_parents_counts_the_rows_waiting_under_their_keys(engine, schema):
    from sqlalchemy import insert

    Tag, Post = schema
    with Session(engine) as s:
        s.add_all([Post(id=1, tag_code="py", score=4), Post(id=2, tag_code="go")])
        s.commit()
        s.execute(insert(Tag), [{"code": "py"}, {"code": "go"}, {"code": "rs"}])
        s.execute(insert(Tag).values(code="c"))
        s.commit()
    assert assert_exact(engine, Tag) == {"c": (0, 0, 0), "go": (1, 1, 1), "py": (1, 1, 4), "rs": (0, 0, 0)}


@pytest.mark.parametrize("method", ["bulk_insert_mappings", "bulk_save_objects"])
def test_a_legacy_bulk_insert_of_such_parents_is_refused_before_it_writes(engine, schema, strategy, method):
    from helpers import orm_kept_only

    if strategy == "sharded":
        pytest.skip("sharded: a new parent's waiting rows are its pending shard rows already")
    orm_kept_only(strategy, "the database's triggers count a new parent's rows themselves")
    Tag, Post = schema
    with Session(engine) as s:
        with pytest.raises(countercache.CounterCacheError, match=r"Tag\.post_count.*inserts Tag rows, whose counters "
                                                                 r"start from the rows already under their keys"):
            if method == "bulk_insert_mappings":
                s.bulk_insert_mappings(Tag, [{"code": "py"}])
            else:
                s.bulk_save_objects([Tag(code="py")])
        s.rollback()
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM tags")).scalar_one() == 0


@pytest.mark.parametrize("how", ["object", "statement"])
def test_a_parent_key_change_is_refused_before_anything_is_written(engine, schema, strategy, how):
    """Without a foreign key a re-keyed parent's rows stay under its old key and others
    may wait under the new one: its counters, which the ORM strategies keep with the
    row, cannot follow. Refused before anything is written (the triggers recount it)."""
    from sqlalchemy import update

    Tag, Post = schema
    with Session(engine) as s:
        s.add(Tag(code="py"))
        s.flush()
        s.add_all([Post(id=1, tag_code="py"), Post(id=2, tag_code="python"), Post(id=3, tag_code="python")])
        s.commit()
    with Session(engine) as s:
        if strategy in ("trigger", "sharded_trigger") or (how == "statement" and strategy in ("deferred", "sharded")):
            # (the database recounts it; deferred/sharded refuse every key-changing statement: test_identity)
            if strategy in ("trigger", "sharded_trigger"):
                if how == "object":
                    s.get(Tag, "py").code = "python"
                else:
                    s.execute(update(Tag).where(Tag.code == "py").values(code="python"))
                s.commit()
                assert assert_exact(engine, Tag) == {"python": (2, 2, 2)}
            return
        with pytest.raises(countercache.CounterCacheError,
                           match=r"Tag\.post_count.*no foreign key in the database holds the counted rows"):
            if how == "object":
                s.get(Tag, "py").code = "python"
                s.flush()
            else:
                s.execute(update(Tag).where(Tag.code == "py").values(code="python"))
        s.rollback()
    assert assert_exact(engine, Tag) == {"py": (1, 1, 1)}


def test_inside_suspended_a_new_parent_is_not_recounted(engine, schema, strategy, statements):
    """Nothing is counted inside ``suspended()`` (a bulk import, then one ``reconcile()``):
    a new parent reads nothing for the rows under its key either."""
    Tag, Post = schema
    with Session(engine) as s:
        s.add(Post(id=1, tag_code="py"))
        s.commit()
        with countercache.suspended(s), statements.record() as rec:
            s.add(Tag(code="py"))
            s.flush()
        assert [st for st, _, _ in rec if "posts" in st.lower()] == []
        s.commit()
    countercache.reconcile(engine)
    assert assert_exact(engine, Tag) == {"py": (1, 1, 1)}


@pytest.mark.parametrize("how", ["flush", "statement"])
def test_rows_flushed_before_their_parent_in_one_transaction_count_once(engine, schema, strategy, how):
    """A child flushed before its parent, in the parent's transaction: the recount
    of the new parent has it, and what ``deferred`` held for it was added again at
    the commit (second reading: 2 for 1)."""
    from sqlalchemy import insert

    Tag, Post = schema
    with Session(engine) as s:
        s.add(Post(id=1, tag_code="py", score=3))
        s.flush()  # (its delta held for the commit, or written to no row)
        if how == "flush":
            s.add_all([Tag(code="py"), Post(id=2, tag_code="py")])  # (and one of the parent's own flush)
        else:
            s.execute(insert(Tag), [{"code": "py"}])
            s.add(Post(id=2, tag_code="py"))
        s.commit()
    assert assert_exact(engine, Tag) == {"py": (2, 2, 4)}


def test_a_joined_subclass_parent_whose_rows_its_own_key_holds(engine, strategy, statements):
    """The children's foreign key names the subclass table's key (``admins.id``), the
    mapper's primary key is the base table's (``users.id``): held, so a new parent reads
    nothing, its key may change, and the legacy bulk insert goes through (second reading)."""
    from sqlalchemy import ForeignKey

    from helpers import orm_kept_only

    orm_kept_only(strategy, "refused: a joined subclass's counter column (test_trigger_ddl)")

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        kind: Mapped[str] = mapped_column(String(10))
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "user"}

    class Admin(User):
        __tablename__ = "admins"
        id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
        posts = relationship("Post")
        post_count: Mapped[int] = counter_cache("posts", strategy=strategy)
        __mapper_args__ = {"polymorphic_identity": "admin"}

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        admin_id: Mapped[Optional[int]] = mapped_column(ForeignKey("admins.id"))

    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            with statements.record() as rec:
                s.add(Admin(id=1))
                s.flush()
            assert [st for st, _, _ in rec if "posts" in st.lower()] == []
            s.add(Post(id=1, admin_id=1))
            s.commit()
            s.bulk_insert_mappings(Admin, [{"id": 2, "kind": "admin"}])
            s.commit()
        assert countercache.check(engine) == []
    finally:
        Base.metadata.drop_all(engine)
