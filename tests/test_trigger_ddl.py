"""countercache.triggers: the DDL of triggers that keep a counter in the database.

The children are written only through connections (raw SQL and Core
statements), never through the ORM: what the counters show is what the
triggers made of every statement, compared after each one with an
independent recount.
"""

from __future__ import annotations

from types import SimpleNamespace
from decimal import Decimal
from typing import Optional

import pytest
import sqlalchemy as sa
from sqlalchemy import Column, ForeignKey, ForeignKeyConstraint, Numeric, String, Table, event, text
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, configure_mappers, mapped_column, relationship

from countercache import _registry, counter_cache, triggers
from countercache.errors import ConfigurationError

DIALECTS = {"sqlite": sqlite.dialect(), "postgresql": postgresql.dialect(), "mariadb": mysql.dialect()}


def counter_of(attribute):
    configure_mappers()
    return _registry.lookup(attribute)


def foreign_keys_on(engine) -> None:
    """SQLite enforces foreign keys (and their ON DELETE) only when asked, per connection."""
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _on(dbapi_connection, record):
            dbapi_connection.execute("PRAGMA foreign_keys=ON")


def install(engine, *counters) -> None:
    with engine.begin() as conn:
        for counter in counters:
            assert not triggers.installed(conn, counter)
            triggers.execute(conn, triggers.create_statements(counter, engine.dialect))
            assert triggers.installed(conn, counter)


def run(engine, *statements) -> None:
    """Each statement (SQL text, or a Core statement with its parameters) in its own transaction."""
    for statement in statements:
        with engine.begin() as conn:
            if isinstance(statement, str):
                conn.exec_driver_sql(statement, execution_options={"no_parameters": True})
            else:
                conn.execute(*statement)


def exact(engine, parent: str, column: str, child: str, joins: str, value: str = "count(*)",
          where: str = "", key: str = "id") -> dict:
    """Every parent's ``column`` equals its recount; returns ``{key: value}``."""
    keys = ", ".join(f"p.{k}" for k in key.split(","))
    query = text(f"SELECT p.{column}, (SELECT {value} FROM {child} c WHERE {joins}"
                 f"{' AND ' + where if where else ''}), {keys} FROM {parent} p ORDER BY {keys}")
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    wrong = [(k, stored, actual) for stored, actual, *k in rows if stored != actual]
    assert not wrong, f"{parent}.{column} drifted (key, stored, recount): {wrong}"
    return {(k[0] if len(k) == 1 else tuple(k)): stored for stored, _, *k in rows}


# -- one-to-many: count, where=, sum=, where= + sum=, a single-table subclass --


def forum(cascade: bool) -> SimpleNamespace:
    class Base(DeclarativeBase):
        pass

    class Board(Base):
        __tablename__ = "boards"
        id: Mapped[int] = mapped_column(primary_key=True)

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        questions: Mapped[list["Question"]] = relationship()
        polls: Mapped[list["Poll"]] = relationship(overlaps="questions")
        n_all: Mapped[int] = counter_cache("questions")
        n_open: Mapped[int] = counter_cache("questions", where=lambda: Question.status == "open")
        points: Mapped[int] = counter_cache("questions", sum="points")
        open_points: Mapped[int] = counter_cache("questions", where=lambda: Question.status == "open",
                                                 sum=lambda: Question.points * 2)
        n_polls: Mapped[int] = counter_cache("polls")
        n_un: Mapped[int] = counter_cache("questions", where=lambda: Question.title == "un%")

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))
        board_id: Mapped[Optional[int]] = mapped_column(
            ForeignKey("boards.id", ondelete="CASCADE" if cascade else None))
        status: Mapped[Optional[str]] = mapped_column(String(20))
        points: Mapped[Optional[int]]
        title: Mapped[Optional[str]] = mapped_column(String(50))
        note: Mapped[Optional[str]] = mapped_column(String(50))
        qtype: Mapped[str] = mapped_column(String(20))
        __mapper_args__ = {"polymorphic_on": "qtype", "polymorphic_identity": "question"}

    class Poll(Question):
        __mapper_args__ = {"polymorphic_identity": "poll"}

    return SimpleNamespace(Base=Base, User=User, Question=Question, Poll=Poll, Board=Board)


FORUM_CHECKS = {  # counter column: (value, where) of its recount over questions c
    "n_all": ("count(*)", ""),
    "n_open": ("count(*)", "c.status = 'open'"),
    "points": ("coalesce(sum(c.points), 0)", ""),
    "open_points": ("coalesce(sum(c.points * 2), 0)", "c.status = 'open'"),
    "n_polls": ("count(*)", "c.qtype = 'poll'"),
    "n_un": ("count(*)", "c.title = 'un%'"),  # a % in a literal of where=
}


def forum_exact(engine) -> dict:
    return {column: exact(engine, "users", column, "questions", "c.user_id = p.id", value, where)
            for column, (value, where) in FORUM_CHECKS.items()}


def test_one_to_many_kinds_follow_every_statement(engine, backend):
    foreign_keys_on(engine)
    cascade = backend != "mariadb"  # MariaDB: refused (test below), foreign key actions fire no trigger
    m = forum(cascade)
    counters = [counter_of(getattr(m.User, name)) for name in FORUM_CHECKS]
    for counter in counters:
        assert triggers.refusal(counter, engine.dialect) is None
    m.Base.metadata.create_all(engine)
    install(engine, *counters)
    q = m.Question.__table__
    run(engine, (m.Board.__table__.insert(), [{"id": 1}, {"id": 2}]),
        (m.User.__table__.insert(), [{"id": i} for i in (1, 2, 3, 4)]))
    forum_exact(engine)
    steps = [
        # one row (raw SQL), several (executemany), one multi-row VALUES, NULL key and NULL sum
        "INSERT INTO questions (id, user_id, board_id, status, points, qtype) VALUES (1, 1, 1, 'open', 5, 'question')",
        (q.insert(), [{"id": 2, "user_id": 1, "board_id": 2, "status": "closed", "points": 3, "qtype": "poll"},
                      {"id": 3, "user_id": 2, "board_id": 1, "status": "open", "points": None, "qtype": "poll"}]),
        (q.insert().values([{"id": 4, "user_id": 2, "board_id": 2, "status": "open", "points": 7, "qtype": "question"},
                            {"id": 5, "user_id": None, "board_id": 1, "status": "open", "points": 1, "qtype": "poll"},
                            {"id": 6, "user_id": 3, "board_id": 1, "status": None, "points": 2, "qtype": "poll"}]),),
        "INSERT INTO questions (id, user_id, board_id, status, points, qtype) "
        "SELECT id + 100, user_id, board_id, status, points, qtype FROM questions WHERE id <= 4",
        # moving children between parents, both ways in one statement, to and from NULL
        "UPDATE questions SET user_id = 4 WHERE user_id = 1",
        "UPDATE questions SET user_id = CASE user_id WHEN 2 THEN 3 WHEN 3 THEN 2 END WHERE user_id IN (2, 3)",
        (q.update().where(q.c.id == 5).values(user_id=1),),
        (q.update().where(q.c.id == 101).values(user_id=None),),
        # the where= column, the sum= column, the discriminator, an unrelated column
        "UPDATE questions SET status = 'closed' WHERE status = 'open' AND id > 100",
        "UPDATE questions SET status = 'open' WHERE status IS NULL OR id = 2",
        "UPDATE questions SET points = points + 3 WHERE points IS NOT NULL",
        "UPDATE questions SET points = NULL WHERE id = 4",
        "UPDATE questions SET qtype = 'poll' WHERE id IN (1, 4)",
        "UPDATE questions SET title = 'un%' WHERE id IN (1, 2, 101)",
        "UPDATE questions SET note = 'unrelated'",
        (q.update().where(q.c.id == 102).values(user_id=4, status="open", points=11),),
        # deletes: one, several
        (q.delete().where(q.c.id == 2),),
        "DELETE FROM questions WHERE id IN (3, 103)",
    ]
    if backend != "mariadb":  # MariaDB: error 1442, see test_mariadb_refuses_statements_reading_the_parent_table
        steps.append("INSERT INTO questions (id, user_id, status, points, qtype) "
                     "SELECT id + 200, id, 'open', id, 'question' FROM users WHERE id > 1")
    for step in steps:
        run(engine, step)
        forum_exact(engine)
    seen = forum_exact(engine)
    assert all(any(v for v in values.values()) for values in seen.values()), seen
    if cascade:  # the children of board 1 go with it
        run(engine, "DELETE FROM boards WHERE id = 1")
        after = forum_exact(engine)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM questions WHERE board_id = 1")\
                .scalar_one() == 0
        assert after != seen
    run(engine, "DELETE FROM questions")
    assert all(set(values.values()) == {0} for values in forum_exact(engine).values())


def test_upserts_and_replace(engine, backend):
    """Each database's upsert, and REPLACE (SQLite: its deletes fire triggers only under
    ``PRAGMA recursive_triggers = ON``, set here per connection)."""
    if backend == "sqlite":
        @event.listens_for(engine, "connect")
        def _recursive(dbapi_connection, record):
            dbapi_connection.execute("PRAGMA recursive_triggers = ON")
    m = forum(cascade=False)
    counters = [counter_of(getattr(m.User, name)) for name in FORUM_CHECKS]
    m.Base.metadata.create_all(engine)
    install(engine, *counters)
    run(engine, (m.User.__table__.insert(), [{"id": i} for i in (1, 2, 3)]),
        "INSERT INTO questions (id, user_id, status, points, qtype) VALUES "
        "(1, 1, 'open', 1, 'question'), (2, 1, 'open', 2, 'poll'), (3, 2, 'closed', 3, 'question')")
    columns = "INSERT INTO questions (id, user_id, status, points, qtype) VALUES "
    rows = "(1, 2, 'open', 10, 'poll'), (3, 3, 'open', 5, 'question'), (4, 1, 'open', 4, 'question')"
    if backend == "mariadb":
        steps = [columns + rows + " ON DUPLICATE KEY UPDATE user_id = VALUES(user_id), status = VALUES(status), "
                 "points = VALUES(points), qtype = VALUES(qtype)",
                 "REPLACE INTO questions (id, user_id, status, points, qtype) VALUES (2, 3, 'open', 7, 'question')",
                 columns + "(4, 2, 'closed', 0, 'poll') ON DUPLICATE KEY UPDATE points = points + 1"]
    else:
        steps = [columns + rows + " ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id, "
                 "status = excluded.status, points = excluded.points, qtype = excluded.qtype",
                 columns + "(2, 3, 'closed', 0, 'poll') ON CONFLICT (id) DO NOTHING",
                 columns + "(4, 2, 'closed', 0, 'poll') ON CONFLICT (id) DO UPDATE SET points = questions.points + 1"]
        if backend == "sqlite":
            steps.append("REPLACE INTO questions (id, user_id, status, points, qtype) VALUES (2, 3, 'open', 7, 'question')")
    for step in steps:
        run(engine, step)
        forum_exact(engine)
    assert forum_exact(engine)["n_all"] == ({1: 2, 2: 1, 3: 1} if backend == "postgresql" else {1: 1, 2: 1, 3: 2})


@pytest.mark.mariadb_only
def test_mariadb_refuses_a_child_table_changed_by_foreign_key_actions(engine):
    m = forum(cascade=True)
    counter = counter_of(m.User.n_all)
    message = triggers.refusal(counter, engine.dialect)
    assert message is not None and "User.n_all" in message and "MariaDB" in message
    assert "foreign key action" in message and "boards" in message and "'bulk'" in message
    with pytest.raises(ConfigurationError, match="User.n_all"):
        triggers.create_statements(counter, engine.dialect)


@pytest.mark.mariadb_only
def test_mariadb_refuses_statements_reading_the_parent_table(engine):
    """A trigger may not update a table the statement that fired it reads (error 1442):
    such statements fail, and change nothing, rather than leave the counter wrong."""
    m = forum(cascade=False)
    counter = counter_of(m.User.n_all)
    m.Base.metadata.create_all(engine)
    install(engine, counter)
    run(engine, (m.User.__table__.insert(), [{"id": 1}, {"id": 2}]),
        "INSERT INTO questions (id, user_id, qtype) VALUES (1, 1, 'question')")
    for statement in ["INSERT INTO questions (id, user_id, qtype) SELECT id + 10, id, 'question' FROM users",
                      "DELETE FROM questions WHERE user_id IN (SELECT id FROM users)"]:
        with pytest.raises(sa.exc.OperationalError, match="1442"):
            run(engine, statement)
    assert exact(engine, "users", "n_all", "questions", "c.user_id = p.id") == {1: 1, 2: 0}


@pytest.mark.postgresql_only
def test_postgresql_truncate_zeroes_the_counters(engine):
    m = forum(cascade=False)
    counters = [counter_of(getattr(m.User, name)) for name in FORUM_CHECKS]
    m.Base.metadata.create_all(engine)
    install(engine, *counters)
    rows = "INSERT INTO questions (id, user_id, status, points, qtype) VALUES " \
           "(1, 1, 'open', 1, 'question'), (2, 1, 'open', 2, 'poll'), (3, 2, 'closed', 3, 'question')"
    run(engine, (m.User.__table__.insert(), [{"id": i} for i in (1, 2, 3)]), rows)
    assert forum_exact(engine)["n_all"] == {1: 2, 2: 1, 3: 0}
    run(engine, "TRUNCATE questions")
    assert all(set(values.values()) == {0} for values in forum_exact(engine).values())
    run(engine, rows)
    assert forum_exact(engine)["points"] == {1: 3, 2: 3, 3: 0}


# -- composite foreign key -------------------------------------------------------


def test_composite_foreign_key(engine, backend):
    class Base(DeclarativeBase):
        pass

    class Shelf(Base):
        __tablename__ = "shelves"
        room: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        slot: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        books: Mapped[list["Book"]] = relationship()
        book_count: Mapped[int] = counter_cache("books")
        pages: Mapped[int] = counter_cache("books", sum="pages")
        weight: Mapped[Decimal] = counter_cache("books", sum="weight", type_=Numeric(10, 2))

    class Book(Base):
        __tablename__ = "books"
        id: Mapped[int] = mapped_column(primary_key=True)
        room: Mapped[Optional[int]]
        slot: Mapped[Optional[int]]
        pages: Mapped[Optional[int]]
        weight: Mapped[Optional[Decimal]] = mapped_column(Numeric(8, 2))  # (binary-exact values below)
        __table_args__ = (ForeignKeyConstraint(["room", "slot"], ["shelves.room", "shelves.slot"]),)

    counters = [counter_of(Shelf.book_count), counter_of(Shelf.pages), counter_of(Shelf.weight)]
    Base.metadata.create_all(engine)
    install(engine, *counters)
    b = Book.__table__

    def check():
        for column, value in (("book_count", "count(*)"), ("pages", "coalesce(sum(c.pages), 0)"),
                              ("weight", "coalesce(sum(c.weight), 0)")):
            exact(engine, "shelves", column, "books", "c.room = p.room AND c.slot = p.slot", value, key="room,slot")

    run(engine, (Shelf.__table__.insert(), [{"room": r, "slot": s} for r in (1, 2) for s in (1, 2)]))
    for step in [
        (b.insert(), [{"id": 1, "room": 1, "slot": 1, "pages": 10, "weight": Decimal("0.5")},
                      {"id": 2, "room": 1, "slot": 2, "pages": 20, "weight": Decimal("1.25")},
                      {"id": 3, "room": 2, "slot": 1, "pages": 30, "weight": None},
                      {"id": 4, "room": 1, "slot": None, "pages": 5, "weight": Decimal("2.75")}]),
        "INSERT INTO books (id, room, slot, pages, weight) SELECT id + 10, room, slot, pages, weight FROM books",
        "UPDATE books SET slot = 2 WHERE room = 1 AND slot = 1",  # one column of the key moves
        "UPDATE books SET room = 2 WHERE id IN (2, 12)",
        "UPDATE books SET slot = 1 WHERE id = 4",  # NULL part: counted from now on
        "UPDATE books SET pages = pages * 2, weight = weight + 0.25",
        "DELETE FROM books WHERE id IN (1, 13)",
    ]:
        run(engine, step)
        check()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT sum(book_count) FROM shelves").scalar_one() == 5  # 6 books, one with a NULL slot


# -- self-referential --------------------------------------------------------------


def comments() -> SimpleNamespace:
    class Base(DeclarativeBase):
        pass

    class Comment(Base):
        __tablename__ = "comments"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[Optional[int]] = mapped_column(ForeignKey("comments.id", ondelete="CASCADE"))
        status: Mapped[str] = mapped_column(String(20), default="open")
        replies: Mapped[list["Comment"]] = relationship()
        reply_count: Mapped[int] = counter_cache("replies")
        open_replies: Mapped[int] = counter_cache("replies", where=lambda: Comment.status == "open")

    return SimpleNamespace(Base=Base, Comment=Comment)


@pytest.mark.sqlite_postgresql_only
def test_self_referential_counter(engine):
    foreign_keys_on(engine)
    m = comments()
    counters = [counter_of(m.Comment.reply_count), counter_of(m.Comment.open_replies)]
    m.Base.metadata.create_all(engine)
    install(engine, *counters)
    c = m.Comment.__table__

    def check():
        exact(engine, "comments", "reply_count", "comments", "c.parent_id = p.id")
        return exact(engine, "comments", "open_replies", "comments", "c.parent_id = p.id", where="c.status = 'open'")

    for step in [
        (c.insert(), [{"id": 1, "parent_id": None, "status": "open"}, {"id": 2, "parent_id": None, "status": "open"}]),
        (c.insert(), [{"id": 3, "parent_id": 1, "status": "open"}, {"id": 4, "parent_id": 1, "status": "closed"}]),
        (c.insert().values([{"id": 5, "parent_id": 3, "status": "open"}, {"id": 6, "parent_id": 3, "status": "open"},
                            {"id": 7, "parent_id": 2, "status": "open"}]),),
        "INSERT INTO comments (id, parent_id, status) SELECT id + 10, parent_id, status FROM comments "
        "WHERE parent_id IS NOT NULL",
        "UPDATE comments SET parent_id = 2 WHERE id IN (5, 14)",
        "UPDATE comments SET status = 'closed' WHERE id = 15",
        "UPDATE comments SET status = 'open'",
        "DELETE FROM comments WHERE id = 17",
    ]:
        run(engine, step)
        check()
    assert check()[1] > 0
    run(engine, "DELETE FROM comments WHERE id = 1")  # its replies and theirs go by ON DELETE CASCADE
    left = check()
    assert 1 not in left and 3 not in left


@pytest.mark.mariadb_only
def test_mariadb_refuses_a_self_referential_counter(engine):
    counter = counter_of(comments().Comment.reply_count)
    message = triggers.refusal(counter, engine.dialect)
    assert message == ("Comment.reply_count: MariaDB/MySQL triggers cannot update the table that fired them "
                       "(comments: a self-referential counter); use strategy 'bulk', or 'sharded_trigger' "
                       "(its triggers write the side table)")
    with pytest.raises(ConfigurationError, match="self-referential"):
        triggers.create_statements(counter, engine.dialect)


# -- many-to-many ------------------------------------------------------------------


def test_many_to_many(engine, backend):
    foreign_keys_on(engine)
    cascade = backend != "mariadb"

    class Base(DeclarativeBase):
        pass

    post_tags = Table(
        "post_tags", Base.metadata,
        Column("post_id", ForeignKey("posts.id", ondelete="CASCADE" if cascade else None), primary_key=True),
        Column("tag_id", ForeignKey("tags.id"), primary_key=True),
    )

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Tag(Base):
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True)
        posts: Mapped[list[Post]] = relationship(secondary=post_tags)
        post_count: Mapped[int] = counter_cache("posts")

    counter = counter_of(Tag.post_count)
    assert triggers.refusal(counter, engine.dialect) is None
    Base.metadata.create_all(engine)
    install(engine, counter)
    run(engine, (Post.__table__.insert(), [{"id": i} for i in (1, 2, 3)]),
        (Tag.__table__.insert(), [{"id": i} for i in (1, 2, 3)]))
    for step in [
        "INSERT INTO post_tags (post_id, tag_id) VALUES (1, 1)",
        (post_tags.insert(), [{"post_id": 2, "tag_id": 1}, {"post_id": 3, "tag_id": 1}, {"post_id": 1, "tag_id": 2}]),
        "INSERT INTO post_tags (post_id, tag_id) SELECT post_id, 3 FROM post_tags WHERE tag_id = 1",
        "UPDATE post_tags SET tag_id = 2 WHERE tag_id = 1 AND post_id = 3",
        (post_tags.delete().where(post_tags.c.post_id == 2, post_tags.c.tag_id == 1),),
    ]:
        run(engine, step)
        exact(engine, "tags", "post_count", "post_tags", "c.tag_id = p.id")
    assert exact(engine, "tags", "post_count", "post_tags", "c.tag_id = p.id") == {1: 1, 2: 2, 3: 3}
    if cascade:
        run(engine, "DELETE FROM posts WHERE id = 3")
        assert exact(engine, "tags", "post_count", "post_tags", "c.tag_id = p.id") == {1: 1, 2: 1, 3: 2}


# -- installed, drop, re-create ----------------------------------------------------


def test_installed_drop_and_create_again(engine):
    m = forum(cascade=False)
    counter = counter_of(m.User.n_open)
    m.Base.metadata.create_all(engine)
    with engine.begin() as conn:
        assert not triggers.installed(conn, counter)
        triggers.execute(conn, triggers.drop_statements(counter, engine.dialect))  # nothing to drop: fine
    for _ in range(2):
        install(engine, counter)
        with engine.begin() as conn:
            triggers.execute(conn, triggers.drop_statements(counter, engine.dialect))
            assert not triggers.installed(conn, counter)
    install(engine, counter)
    run(engine, (m.User.__table__.insert(), [{"id": 1}]),
        "INSERT INTO questions (id, user_id, status, qtype) VALUES (1, 1, 'open', 'q'), (2, 1, 'closed', 'q')")
    assert exact(engine, "users", "n_open", "questions", "c.user_id = p.id", where="c.status = 'open'") == {1: 1}


# -- names and refusals (no database) ------------------------------------------------


def test_trigger_names_are_short_distinct_identifiers():
    class Base(DeclarativeBase):
        pass

    long = "a_very_long_table_name_" * 4

    class Parent(Base):
        __tablename__ = long + "parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        children: Mapped[list["Child"]] = relationship()
        first: Mapped[int] = counter_cache("children", name="x" * 60 + "_one")
        second: Mapped[int] = counter_cache("children", name="x" * 60 + "_two")
        third: Mapped[int] = counter_cache("children")

    class Child(Base):
        __tablename__ = long + "children"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int] = mapped_column(ForeignKey(Parent.id))

    counters = [counter_of(Parent.first), counter_of(Parent.second), counter_of(Parent.third)]
    names = [n for c in counters for n in triggers.trigger_names(c, DIALECTS["postgresql"]).values()]
    assert len(names) == 18  # (INSERT, DELETE, UPDATE, TRUNCATE, PARENT_INSERT, PARENT_UPDATE) x 3
    names += [triggers.trigger_name(c) + suffix for c in counters
              for suffix in (triggers.FUNCTION_SUFFIX, triggers.PARENT_FUNCTION_SUFFIX)]
    assert len(set(names)) == len(names)
    assert all(len(n) <= 63 and n.isidentifier() and n == n.lower() and n.startswith("cc_") for n in names)
    assert [triggers.trigger_name(c) for c in counters] == [triggers.trigger_name(c) for c in counters]
    short = counter_of(forum(False).User.n_open)
    assert triggers.trigger_name(short).startswith("cc_users_n_open_")
    for dialect in DIALECTS.values():  # each statement fits the names it was given
        assert all(isinstance(s, str) for s in triggers.create_statements(counters[0], dialect))


# -- concurrency (PostgreSQL) ----------------------------------------------------------


@pytest.mark.postgresql_only
def test_concurrent_statements_over_the_same_parents(engine):
    """Two writers move their own children back and forth between the same parents,
    in opposite key orders: the parents are locked in key order, no deadlock, exact."""
    import threading

    m = forum(cascade=False)
    counters = [counter_of(m.User.n_all), counter_of(m.User.points)]
    m.Base.metadata.create_all(engine)
    install(engine, *counters)
    run(engine, (m.User.__table__.insert(), [{"id": i} for i in (1, 2, 3)]),
        (m.Question.__table__.insert(), [{"id": i, "user_id": 1 + i % 3, "points": i, "qtype": "question"}
                                         for i in range(40)]))
    errors: list[BaseException] = []

    def writer(first: int, rows: str) -> None:
        try:
            for n in range(25):
                with engine.begin() as conn:
                    # rows moved from the highest parent to the lowest, or the reverse
                    conn.exec_driver_sql(
                        f"UPDATE questions SET user_id = 4 - user_id, points = points + {n % 2} WHERE id IN ({rows})")
                    conn.exec_driver_sql(
                        "INSERT INTO questions (id, user_id, points, qtype) SELECT 1000 * %d + %d + g, 4 - g, g, 'q' "
                        "FROM generate_series(1, 3) AS g" % (first, n * 10))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(1, "0, 1, 2, 3, 4, 5")),
               threading.Thread(target=writer, args=(2, "10, 11, 12, 13, 14, 15"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    exact(engine, "users", "n_all", "questions", "c.user_id = p.id")
    exact(engine, "users", "points", "questions", "c.user_id = p.id", "coalesce(sum(c.points), 0)")


@pytest.mark.postgresql_only
def test_a_statement_locks_its_parents_in_key_order(engine):
    """A statement whose rows name parents 3, 2, 1 (in that order) locks them in
    key order: waiting for parent 2, it holds 1 and not yet 3."""
    import threading
    import time

    from sqlalchemy.exc import OperationalError

    m = forum(cascade=False)
    counter = counter_of(m.User.n_all)
    m.Base.metadata.create_all(engine)
    install(engine, counter)
    run(engine, (m.User.__table__.insert(), [{"id": i} for i in (1, 2, 3)]))
    errors: list[BaseException] = []
    with engine.connect() as holder, engine.connect() as writer, engine.connect() as probe:
        holder.exec_driver_sql("SELECT 1 FROM users WHERE id = 2 FOR NO KEY UPDATE")  # (not the foreign key's lock)
        pid = writer.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        writer.commit()

        def write() -> None:
            try:
                writer.exec_driver_sql("INSERT INTO questions (id, user_id, qtype) VALUES "
                                       "(1, 3, 'q'), (2, 2, 'q'), (3, 1, 'q'), (4, 3, 'q')")
                writer.commit()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=write)
        thread.start()
        try:
            for _ in range(500):  # the writer waits for parent 2
                waiting = probe.exec_driver_sql(  # (a row lock's wait: on the holder's transaction)
                    f"SELECT wait_event_type || ':' || wait_event FROM pg_stat_activity WHERE pid = {pid}").scalar()
                probe.rollback()
                if waiting == "Lock:transactionid":
                    break
                time.sleep(0.01)
            assert waiting == "Lock:transactionid"
            with pytest.raises(OperationalError, match="could not obtain lock"):
                probe.exec_driver_sql("SELECT 1 FROM users WHERE id = 1 FOR NO KEY UPDATE NOWAIT")
            probe.rollback()
            assert probe.exec_driver_sql("SELECT id FROM users WHERE id = 3 FOR NO KEY UPDATE NOWAIT").scalar() == 3
            probe.rollback()
        finally:
            probe.rollback()
            holder.rollback()
            thread.join()
    assert errors == []
    assert exact(engine, "users", "n_all", "questions", "c.user_id = p.id") == {1: 1, 2: 1, 3: 2}


@pytest.mark.parametrize("action", ["CASCADE", "SET NULL"])
def test_on_update_actions_of_the_counted_key_are_refused_only_where_no_trigger_fires(action):
    class Base(DeclarativeBase):
        pass

    class Parent(Base):
        __tablename__ = "parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        children: Mapped[list["Child"]] = relationship()
        child_count: Mapped[int] = counter_cache("children")

    class Child(Base):
        __tablename__ = "children"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[Optional[int]] = mapped_column(ForeignKey(Parent.id, onupdate=action))

    counter = counter_of(Parent.child_count)
    for name, dialect in DIALECTS.items():
        message = triggers.refusal(counter, dialect)
        # PostgreSQL, SQLite: the action's UPDATE fires the triggers, and the parent row's
        # new key starts from its real count; MariaDB CASCADE: the count moves with its row
        if name != "mariadb" or action == "CASCADE":
            assert message is None, (name, message)
            continue
        assert message is not None and message.startswith(f"Parent.child_count: its foreign key to parents has "
                                                          f"ON UPDATE {action}")
        assert "'bulk'" in message


def test_other_databases_are_refused():
    from sqlalchemy.dialects import mssql

    counter = counter_of(forum(False).User.n_all)
    assert triggers.refusal(counter, mssql.dialect()) == (
        "User.n_all: the trigger strategy does not support mssql yet; use strategy 'bulk'")
