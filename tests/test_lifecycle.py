"""Models declared again: after ``clear_mappers()`` and ``countercache.uninstall()``, in any order.

Test suites (SQLAlchemy's own way) dispose of their mappers and declare
fresh models: the counters of the disposed classes must not linger (at the
next declaration, in ``check()``, in a lookup by name), and a table mapped
again must have its counter maintained, not silently left alone.
"""

from __future__ import annotations

import pytest
from sqlalchemy import Column, ForeignKey, Table, delete, event, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, clear_mappers, configure_mappers, mapped_column, relationship

import countercache
from countercache import CounterCacheError, counter_cache
from helpers import assert_counts
from models import qa

STEPS = {"clear_mappers": clear_mappers, "uninstall": countercache.uninstall}


def use(engine, m, per_user=(2, 0, 1)) -> None:
    """Users with questions through the ORM; every counter equals its count(*)."""
    with Session(engine) as s:
        users = [m.User(name=f"u{i}") for i in range(len(per_user))]
        s.add_all(users)
        s.flush()
        for user, n in zip(users, per_user):
            s.add_all(m.Question(user_id=user.id) for _ in range(n))
        s.commit()
        assert [u.question_count for u in users] == list(per_user)
        with pytest.raises(CounterCacheError, match=r"User\.question_count"):
            users[0].question_count = 9
    assert countercache.check(engine) == []
    assert countercache.check(engine, "User.question_count") == []
    assert_counts(engine)


@pytest.mark.parametrize("order", [("clear_mappers", "uninstall"), ("uninstall", "clear_mappers"),
                                   ("clear_mappers",)], ids="+".join)
def test_models_declared_again_after_their_mappers_are_cleared(engine, order):
    old = qa("bulk")
    old.Base.metadata.create_all(engine)
    use(engine, old)
    for step in order:
        STEPS[step]()
    old.Base.metadata.drop_all(engine)
    new = qa("bulk")  # (crashed: AttributeError: type object 'User' has no attribute 'question_count')
    new.Base.metadata.create_all(engine)
    use(engine, new)
    assert [c.cls for c in countercache.reconcile(engine)] == []


def test_uninstall_then_models_declared_again_without_clearing(engine):
    """The old classes stay mapped: their counters resume with the new ones;
    naming ``User.question_count`` is then ambiguous, and says so."""
    old = qa("bulk")
    old.Base.metadata.create_all(engine)
    countercache.uninstall()
    new = qa("bulk")
    with Session(engine) as s:
        s.add_all([old.User(id=1), new.User(id=2)])
        s.flush()
        s.add_all([old.Question(user_id=1), new.Question(user_id=2), new.Question(user_id=2)])
        s.commit()
    assert_counts(engine)
    assert countercache.check(engine, new.User.question_count) == []
    with pytest.raises(CounterCacheError, match="User.question_count: several classes declare this counter"):
        countercache.check(engine, "User.question_count")


def test_a_table_mapped_again_after_clear_mappers_keeps_its_counter(engine):
    """The same Table (its column carrying the old class's counter) mapped by a
    new class: the counter is the new class's, maintained and checked."""
    old = qa("bulk")
    users, questions = old.User.__table__, old.Question.__table__
    old.Base.metadata.create_all(engine)
    clear_mappers()

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __table__ = users
        questions = relationship("Question")

    class Question(Base):
        __table__ = questions

    with Session(engine) as s:
        user = User(name="ada")
        user.questions.extend([Question(), Question()])
        s.add(user)
        s.commit()
        assert user.question_count == 2  # (was 0: not maintained, and check() saw no counter)
        s.execute(text("UPDATE users SET question_count = 5"))
        s.commit()
    assert [(d.name, d.stored, d.actual) for d in countercache.check(engine)] == [("User.question_count", 5, 2)]
    countercache.reconcile(engine)
    assert_counts(engine)


def tagged(tables: tuple[Table, Table, Table] | None = None):
    """Tags counting their posts over an association table whose links the
    database deletes with their post (``ON DELETE CASCADE``); the tables
    given are mapped again."""

    class Base(DeclarativeBase):
        pass

    posts, tags, links = tables or (None, None, Table(
        "post_tags", Base.metadata,
        Column("post_id", ForeignKey("posts.id", ondelete="CASCADE"), primary_key=True),
        Column("tag_id", ForeignKey("tags.id"), primary_key=True)))

    class Post(Base):
        if posts is None:
            __tablename__ = "posts"
            id: Mapped[int] = mapped_column(primary_key=True)
        else:
            __table__ = posts
        tags = relationship("Tag", secondary=links, back_populates="posts", passive_deletes=True)

    class Tag(Base):
        if tags is None:
            __tablename__ = "tags"
            id: Mapped[int] = mapped_column(primary_key=True)
            post_count: Mapped[int] = counter_cache("posts")
        else:
            __table__ = tags
        posts = relationship(Post, secondary=links, back_populates="tags", passive_deletes=True)

    return Base, Post, Tag, links


def test_an_association_table_mapped_again_counts_once(engine):
    """The cleared class's counter must not count the links the database
    deletes a second time (into the same column)."""
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", lambda conn, record: conn.execute("PRAGMA foreign_keys=ON"))
        engine.dispose()
    Base, Post, Tag, links = tagged()
    tables = (Post.__table__, Tag.__table__, links)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Post(id=1, tags=[Tag(id=1)]))
        s.commit()
    clear_mappers()
    _, Post, Tag, _ = tagged(tables)
    with Session(engine) as s:
        tag = s.get(Tag, 1)
        s.add_all([Post(id=2, tags=[tag]), Post(id=3, tags=[tag]), Post(id=4, tags=[tag])])
        s.commit()
    with Session(engine) as s:
        s.delete(s.get(Post, 1))  # tags not loaded: the database removes the link
        s.execute(delete(Post).where(Post.id == 2))  # (counted the link twice: 2 instead of 3)
        s.commit()
        assert s.get(Tag, 1).post_count == 2
    assert_counts(engine, "tags", "post_count", "post_tags", "tag_id")
    assert countercache.check(engine) == []


def test_an_unmapped_class_counter_is_not_a_counter(engine):
    """A counter attribute kept from a class whose mapper was cleared names the problem."""
    old = qa("bulk")
    attribute = old.User.question_count
    clear_mappers()
    new = qa("bulk")
    new.Base.metadata.create_all(engine)
    assert countercache.check(engine, new.User.question_count) == []
    with pytest.raises(CounterCacheError, match="User.question_count: its class is no longer mapped"):
        countercache.check(engine, attribute)


def test_a_cascading_relationship_added_after_a_flush_is_followed(engine):
    """Which relationships the database's ``ON DELETE CASCADE`` follows is found once per
    mapper; a relationship the mapper gains later (``passive_deletes=True``) is followed
    from then on: the children the database deletes with a board are counted out of their
    author."""
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", lambda conn, record: conn.execute("PRAGMA foreign_keys=ON"))
        engine.dispose()

    class Base(DeclarativeBase):
        pass

    class Author(Base):
        __tablename__ = "lc_authors"
        id: Mapped[int] = mapped_column(primary_key=True)
        note_count: Mapped[int] = counter_cache("notes")
        notes = relationship("Note")

    class Board(Base):
        __tablename__ = "lc_boards"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Note(Base):
        __tablename__ = "lc_notes"
        id: Mapped[int] = mapped_column(primary_key=True)
        author_id: Mapped[int] = mapped_column(ForeignKey("lc_authors.id"))
        board_id: Mapped[int] = mapped_column(ForeignKey("lc_boards.id", ondelete="CASCADE"))

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Author(id=1), Board(id=1), Board(id=2), Board(id=3)])
        s.flush()
        s.add_all([Note(author_id=1, board_id=b) for b in (1, 2, 2, 3, 3, 3)])
        s.commit()
    with Session(engine) as s:
        s.delete(s.get(Board, 1))  # (no relationship yet: a flush that deletes asks, and finds none)
        s.commit()
    countercache.reconcile(engine)  # (the one note the database deleted uncounted)
    Board.notes = relationship(Note, passive_deletes=True)
    configure_mappers()
    with Session(engine) as s:
        s.delete(s.get(Board, 2))
        s.commit()
        assert s.get(Author, 1).note_count == 3
    assert countercache.check(engine) == []
