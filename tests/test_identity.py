"""Rows that change identity (issue 16): row switches, parents deleted and created again.

* A **row switch**: ``session.delete(q)`` and a new object with ``q``'s primary
  key in one flush. SQLAlchemy UPDATEs the row to the new object's values
  (``before_insert`` then ``after_update`` on the new object, nothing on the
  deleted one); it is counted as the move it is.
* A **parent deleted and inserted again** with the same key in one
  transaction: what ``deferred``/``sharded`` held for the old row must not
  reach the new one, which starts at 0 (SQLite reuses a deleted rowid, so this
  happens without explicit keys too).
* A **parent's primary key changed**: the row keeps its counters; children
  re-pointed by ``ON UPDATE CASCADE`` or by SQLAlchemy (``passive_updates=
  False``) are not counted again, and what is held for the old key (and
  ``sharded``'s shard rows) follows the new key.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import pytest
from sqlalchemy import Column, ForeignKey, Table, delete, event, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache

from helpers import assert_counts, orm_kept_only, orm_kept_only_on_mariadb
from models import qa


@pytest.fixture
def m(engine, strategy):
    found = qa(strategy)
    found.Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([found.User(id=1), found.User(id=2)])
        s.flush()
        s.add_all([found.Question(id=1, user_id=1), found.Question(id=2, user_id=1)])
        s.commit()
    return found


def test_row_switch_of_a_child_moves_it(engine, m):
    with Session(engine) as s:
        s.delete(s.get(m.Question, 1))
        s.add(m.Question(id=1, user_id=2, title="switched"))
        s.commit()
    assert assert_counts(engine) == {1: 1, 2: 1}


def test_row_switch_keeps_what_the_new_object_does_not_set(engine, m):
    """A column the new object leaves unset is not in the UPDATE: the row keeps it."""
    with Session(engine) as s:
        s.delete(s.get(m.Question, 1))
        s.add(m.Question(id=1, title="no user given"))  # user_id not set: the row keeps user 1
        s.delete(s.get(m.Question, 2))
        s.add(m.Question(id=2, title="to nobody", user_id=None))  # set to NULL: leaves user 1
        s.commit()
    assert assert_counts(engine) == {1: 1, 2: 0}


def test_row_switch_inside_a_rolled_back_savepoint(engine, m):
    with Session(engine) as s:
        with s.begin_nested() as nested:
            s.delete(s.get(m.Question, 1))
            s.add(m.Question(id=1, user_id=2))
            s.flush()
            nested.rollback()
        s.commit()
    assert assert_counts(engine) == {1: 2, 2: 0}


@pytest.mark.parametrize("flushes", ["one flush", "flush between"])
def test_parent_deleted_and_created_again_starts_at_zero(engine, m, flushes):
    with Session(engine) as s:
        for q in s.get(m.User, 1).questions:
            s.delete(q)
        if flushes == "flush between":
            s.flush()
        s.delete(s.get(m.User, 1))
        s.flush()
        s.add(m.User(id=1))
        if flushes == "flush between":
            s.flush()
        s.add(m.Question(id=9, user_id=1))
        s.commit()
    assert assert_counts(engine) == {1: 1, 2: 0}


def test_parent_created_again_without_explicit_keys(engine, m, backend):
    """No keys given: SQLite hands the deleted row's rowid to the next row."""
    if backend == "postgresql":  # (the fixture gave explicit ids: move the sequence past them)
        with engine.begin() as conn:
            for table in ("users", "questions"):
                conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 10)")
    with Session(engine) as s:
        s.add(m.User())  # the highest id, deleted below
        s.commit()
    with Session(engine) as s:
        newest = max(s.scalars(m.User.__table__.select().with_only_columns(m.User.id)).all())
        s.add(m.Question(user_id=newest))
        s.flush()
        for q in s.get(m.User, newest).questions:
            s.delete(q)
        s.delete(s.get(m.User, newest))
        s.flush()
        again = m.User()
        s.add(again)
        s.flush()
        if backend == "sqlite":
            assert again.id == newest  # the rowid is reused
        s.add_all([m.Question(user_id=again.id), m.Question(user_id=again.id)])
        s.commit()
        expected = {1: 2, 2: 0, again.id: 2}
    assert assert_counts(engine) == expected


def test_parent_deleted_in_a_rolled_back_savepoint_keeps_what_was_held(engine, m):
    with Session(engine) as s:
        s.add(m.Question(id=5, user_id=2))
        s.flush()
        with s.begin_nested() as nested:
            s.delete(s.get(m.Question, 5))
            s.delete(s.get(m.User, 2))
            s.flush()
            nested.rollback()
        s.add(m.Question(id=6, user_id=2))
        s.commit()
    assert assert_counts(engine) == {1: 2, 2: 2}
    assert countercache.check(engine) == []


def rekey_models(strategy: str, cascade: bool) -> SimpleNamespace:
    """Users whose primary key changes: children re-pointed by the database
    (``ON UPDATE CASCADE``, ``passive_updates=True``) or by SQLAlchemy
    (``passive_updates=False``, no constraint action)."""

    class Base(DeclarativeBase):
        pass

    # (passive_updates=False is for keys the database does not enforce: no constraint there)
    join = {} if cascade else {"primaryjoin": "User.id == foreign(Question.user_id)"}

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        questions: Mapped[list["Question"]] = relationship(back_populates="user", passive_updates=cascade, **join)
        question_count: Mapped[int] = counter_cache("questions", strategy=strategy)

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[Optional[int]] = (
            mapped_column(ForeignKey("users.id", onupdate="CASCADE"), index=True) if cascade
            else mapped_column(index=True))
        user: Mapped[Optional[User]] = relationship(back_populates="questions", **join)

    return SimpleNamespace(Base=Base, User=User, Question=Question)


@pytest.mark.parametrize("cascade", [True, False], ids=["on_update_cascade", "passive_updates_false"])
def test_parent_primary_key_change_takes_its_counts_along(engine, backend, strategy, cascade):
    if backend == "sqlite":  # (SQLite cascades only with foreign keys on)
        event.listen(engine, "connect", lambda dbapi, record: dbapi.execute("PRAGMA foreign_keys = ON"))
        engine.dispose()
    m = rekey_models(strategy, cascade)
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([m.User(id=1), m.User(id=2)])
        s.flush()
        s.add_all([m.Question(id=1, user_id=1), m.Question(id=2, user_id=1)])
        s.commit()
    with Session(engine) as s:
        u = s.get(m.User, 1)
        u.questions.append(m.Question(id=3))  # held by deferred/sharded until the commit
        # (passive_updates=False re-points the children in the loaded collection)
        s.flush()
        u.id = 10
        s.flush()
        with s.begin_nested() as nested:  # a change of key rolled back takes nothing along
            s.get(m.User, 2).id = 20
            s.flush()
            nested.rollback()
        s.add(m.Question(id=4, user_id=2))
        s.commit()
    assert assert_counts(engine) == {2: 1, 10: 3}


@pytest.mark.parametrize("how", ["orm statement", "core statement"])
def test_statement_changing_a_held_parents_key_is_refused(engine, backend, strategy, how):
    """deferred/sharded: the key changed by a statement (not on the object)
    would leave what the transaction holds, and shard rows, under the old key."""
    if backend == "sqlite":  # (SQLite cascades only with foreign keys on)
        event.listen(engine, "connect", lambda dbapi, record: dbapi.execute("PRAGMA foreign_keys = ON"))
        engine.dispose()
    m = rekey_models(strategy, cascade=True)
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(m.User(id=1, questions=[m.Question(id=1)]))
        s.commit()
        users = m.User.__table__
        statement = (update(m.User).where(m.User.id == 1).values(id=10) if how == "orm statement"
                     else users.update().where(users.c.id == 1).values(id=10))
        if strategy in ("deferred", "sharded"):
            with pytest.raises(countercache.CounterCacheError,
                               match=rf"User\.question_count: an UPDATE statement giving users\.id new values is not "
                                     rf"counted with the {strategy} strategy"):
                s.execute(statement)
        else:  # the row keeps its counter; the database moves the children
            s.execute(statement)
        s.commit()
    assert countercache.check(engine) == []


def test_middle_rows_key_change_is_refused_before_the_flush(engine, strategy):
    """A multi-level counter's middle row (a post, under User.comment_received_count)
    given a new key: refused in before_flush, nothing written."""
    orm_kept_only(strategy, "the trigger strategy refuses this model's ON UPDATE CASCADE on the leaves' foreign "
                            "key (test_trigger_multilevel)")

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        posts: Mapped[list["Post"]] = relationship()
        comment_received_count: Mapped[int] = counter_cache("posts.comments", strategy=strategy)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))
        comments: Mapped[list["Comment"]] = relationship()

    class Comment(Base):
        __tablename__ = "comments"
        id: Mapped[int] = mapped_column(primary_key=True)
        post_id: Mapped[Optional[int]] = mapped_column(ForeignKey("posts.id", onupdate="CASCADE"))

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(User(id=1, posts=[Post(id=1, comments=[Comment(id=1)])]))
        s.commit()
        s.get(Post, 1).id = 20
        with pytest.raises(countercache.CounterCacheError,
                           match=r"User\.comment_received_count: Post\.id changed; the primary key of a middle row"):
            s.flush()
        assert s.in_transaction()  # (nothing flushed, nothing rolled back)
        s.rollback()
    assert countercache.check(engine) == []


def cascade_models(strategy: str) -> SimpleNamespace:
    """Users, posts and comments; a post's comments and its tag links go by the
    database's ON DELETE CASCADE (passive_deletes=True)."""

    class Base(DeclarativeBase):
        pass

    links = Table("post_tags", Base.metadata,
                  Column("post_id", ForeignKey("posts.id", ondelete="CASCADE"), primary_key=True),
                  Column("tag_id", ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True))

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        posts: Mapped[list["Post"]] = relationship()
        comment_received_count: Mapped[int] = counter_cache("posts.comments", strategy=strategy)

    class Tag(Base):
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True)
        posts: Mapped[list["Post"]] = relationship(secondary=links, back_populates="tags", passive_deletes=True)
        post_count: Mapped[int] = counter_cache("posts", strategy=strategy)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))
        comments: Mapped[list["Comment"]] = relationship(cascade="all, delete-orphan", passive_deletes=True)
        tags: Mapped[list[Tag]] = relationship(secondary=links, back_populates="posts", passive_deletes=True)
        comment_count: Mapped[int] = counter_cache("comments", strategy=strategy)

    class Comment(Base):
        __tablename__ = "comments"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        post_id: Mapped[Optional[int]] = mapped_column(ForeignKey("posts.id", ondelete="CASCADE"))

    return SimpleNamespace(Base=Base, User=User, Tag=Tag, Post=Post, Comment=Comment)


def _cascade_seeded(engine, backend, strategy):
    if backend == "sqlite":  # (SQLite cascades only with foreign keys on)
        event.listen(engine, "connect", lambda dbapi, record: dbapi.execute("PRAGMA foreign_keys = ON"))
        engine.dispose()
    m = cascade_models(strategy)
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        tag = m.Tag(id=1)
        s.add(m.User(id=1, posts=[m.Post(id=1, tags=[tag], comments=[m.Comment(id=1), m.Comment(id=2)]),
                                  m.Post(id=2, tags=[tag], comments=[m.Comment(id=3)])]))
        s.commit()
    return m


@pytest.mark.parametrize("how", ["session.delete", "bulk delete"])
def test_middle_row_deleted_with_its_leaves_by_the_database_counts_them_once(engine, backend, strategy, how):
    orm_kept_only_on_mariadb(engine, strategy, "MariaDB refuses it: the association table's cascade fires no trigger")
    m = _cascade_seeded(engine, backend, strategy)
    with Session(engine) as s:
        if how == "session.delete":
            s.delete(s.get(m.Post, 1))
        else:
            s.execute(delete(m.Post).where(m.Post.id == 1))
        s.commit()
    assert countercache.check(engine) == []
    countercache.fold(engine)
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT comment_received_count FROM users")) == 1
        assert conn.scalar(text("SELECT post_count FROM tags")) == 1


def test_row_switch_of_a_row_with_database_cascades_counts_nothing_gone(engine, backend, strategy):
    """No DELETE runs (SQLAlchemy UPDATEs the row), so no cascade: its comments and links stay."""
    orm_kept_only_on_mariadb(engine, strategy, "MariaDB refuses it: the association table's cascade fires no trigger")
    m = _cascade_seeded(engine, backend, strategy)
    with Session(engine) as s:
        s.delete(s.get(m.Post, 1))
        s.add(m.Post(id=1, user_id=1))
        s.commit()
    assert countercache.check(engine) == []
    countercache.fold(engine)
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT comment_received_count FROM users")) == 3
        assert conn.scalar(text("SELECT post_count FROM tags")) == 2
