"""ORM DELETE and UPDATE statements count the rows they really changed (outside tester):

* MariaDB/MySQL ``delete(...).with_dialect_options(mysql_limit=N)`` deletes N of the
  rows its WHERE matches: counted were every matching row (a counter of 4 went to 0
  with 3 rows left). Now the rows still there after it are not counted.
* A PostgreSQL ``BEFORE DELETE`` trigger that keeps some rows (returns NULL): the same.
* Such a LIMIT on a DELETE whose rows take counted rows along (ON DELETE CASCADE) is
  refused before it runs: which rows it deletes is known only after it.
* A bulk UPDATE by primary key given ``"2"`` for the integer key 2 (a web form's
  text) crashed with mixed key types, or counted the row twice.
"""

from __future__ import annotations

from typing import Optional

import pytest
from sqlalchemy import ForeignKey, String, delete, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache

from helpers import assert_counts, orm_kept_only


def models(strategy: str):
    class Base(DeclarativeBase):
        pass

    class Forum(Base):
        __tablename__ = "forums"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        users: Mapped[list["User"]] = relationship(passive_deletes=True)
        answer_count: Mapped[int] = counter_cache("users.questions", strategy=strategy) \
            if strategy not in ("sharded_trigger",) else counter_cache("users", strategy=strategy)

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        forum_id: Mapped[Optional[int]] = mapped_column(ForeignKey("forums.id", ondelete="CASCADE"))
        questions: Mapped[list["Question"]] = relationship()
        question_count: Mapped[int] = counter_cache("questions", strategy=strategy)

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))
        title: Mapped[str] = mapped_column(String(20), default="")

    return Base, Forum, User, Question


@pytest.fixture
def schema(engine, strategy):
    Base, Forum, User, Question = models(strategy)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(Forum(id=1))
        s.flush()
        s.add_all([User(id=1, forum_id=1), User(id=2, forum_id=1)])
        s.flush()
        s.add_all([Question(id=i, user_id=1) for i in range(1, 5)])
        s.commit()
    yield Base, Forum, User, Question
    Base.metadata.drop_all(engine)


def _rows(engine, sql: str) -> int:
    with engine.connect() as c:
        return int(c.execute(text(sql)).scalar_one())


@pytest.mark.mariadb_only
def test_a_delete_with_a_limit_counts_the_rows_it_deleted(engine, schema, strategy):
    Base, Forum, User, Question = schema
    with Session(engine) as s:
        result = s.execute(delete(Question).where(Question.user_id == 1).with_dialect_options(mysql_limit=1))
        assert result.rowcount == 1
        s.commit()
    assert _rows(engine, "SELECT count(*) FROM questions") == 3
    assert assert_counts(engine) == {1: 3, 2: 0}
    assert countercache.check(engine, metadata=Base.metadata) == []


@pytest.mark.mariadb_only
def test_a_delete_with_a_limit_that_cascades_into_counted_rows_is_refused_first(engine, schema, strategy):
    orm_kept_only(strategy, "the database's triggers count what the cascade deletes")
    Base, Forum, User, Question = schema
    with Session(engine) as s:
        with pytest.raises(countercache.CounterCacheError, match=r"with a LIMIT.*ON DELETE CASCADE"):
            s.execute(delete(Forum).where(Forum.id == 1).with_dialect_options(mysql_limit=1))
        s.rollback()
    assert _rows(engine, "SELECT count(*) FROM users") == 2  # nothing ran


@pytest.mark.postgresql_only
def test_rows_a_before_delete_trigger_keeps_are_not_counted(engine, schema, strategy):
    Base, Forum, User, Question = schema
    with engine.begin() as c:
        c.execute(text("CREATE FUNCTION keep_pinned() RETURNS trigger LANGUAGE plpgsql AS $$ "
                       "BEGIN IF OLD.title = 'pinned' THEN RETURN NULL; END IF; RETURN OLD; END $$"))
        c.execute(text("CREATE TRIGGER keep_pinned BEFORE DELETE ON questions FOR EACH ROW "
                       "EXECUTE FUNCTION keep_pinned()"))
        c.execute(text("UPDATE questions SET title = 'pinned' WHERE id IN (1, 2)"))
    try:
        with Session(engine) as s:
            result = s.execute(delete(Question).where(Question.user_id == 1))
            assert result.rowcount == 2
            s.commit()
        assert _rows(engine, "SELECT count(*) FROM questions") == 2
        assert assert_counts(engine) == {1: 2, 2: 0}
    finally:
        with engine.begin() as c:
            c.execute(text("DROP TRIGGER IF EXISTS keep_pinned ON questions"))
            c.execute(text("DROP FUNCTION IF EXISTS keep_pinned()"))


def test_a_bulk_update_by_primary_key_given_text_keys_counts_each_row_once(engine, schema, strategy):
    Base, Forum, User, Question = schema
    with Session(engine) as s:
        s.execute(update(Question), [{"id": "2", "user_id": 2}, {"id": 3, "user_id": 2}])
        s.commit()
    assert assert_counts(engine) == {1: 2, 2: 2}


def test_a_flush_deleting_rows_keyed_in_several_forms(engine, schema, strategy):
    """Rows whose keys the session holds as given (``"5"`` from a form) deleted with
    rows it loaded (``1``): the flush's locking read takes both forms."""
    Base, Forum, User, Question = schema
    with Session(engine) as s:
        given = Question(id="5", user_id=1)
        s.add(given)
        s.commit()
        s.delete(given)
        s.delete(s.get(Question, 1))
        s.get(Question, 2).user_id = 2
        s.commit()
    assert assert_counts(engine) == {1: 2, 2: 1}


def jti_models(strategy: str):
    class Base(DeclarativeBase):
        pass

    class Person(Base):
        __tablename__ = "people"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        items: Mapped[list["Item"]] = relationship()
        item_count: Mapped[int] = counter_cache("items", strategy=strategy)

    class Item(Base):
        __tablename__ = "items"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        kind: Mapped[str] = mapped_column(String(20))
        owner_id: Mapped[Optional[int]] = mapped_column(ForeignKey("people.id"))
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "item"}

    class Book(Item):
        __tablename__ = "books"
        id: Mapped[int] = mapped_column(ForeignKey("items.id"), primary_key=True)
        title: Mapped[str] = mapped_column(String(20), default="")
        __mapper_args__ = {"polymorphic_identity": "book"}

    return Base, Person, Item, Book


def test_statements_on_a_joined_subclass_read_only_their_rows(engine, strategy):
    """``update(Book)`` / ``delete(Book)`` name the subclass's table: the locking read
    went over every row of the base table (a cross join, SQLAlchemy's cartesian-product
    warning, every row locked); an UPDATE that SQLAlchemy refuses (a base table's
    column in its SET) sent that read before the refusal (outside tester)."""
    import warnings

    from sqlalchemy import event
    from sqlalchemy.exc import CompileError

    Base, Person, Item, Book = jti_models(strategy)
    Base.metadata.create_all(engine)
    sent: list[str] = []

    def record(conn, cursor, statement, *args):
        sent.append(statement)

    try:
        with Session(engine) as s:
            s.add_all([Person(id=1), Person(id=2)])
            s.flush()
            s.add_all([Item(id=1, owner_id=1), Book(id=2, owner_id=1), Book(id=3, owner_id=1)])
            s.commit()
        event.listen(engine, "before_cursor_execute", record)
        with Session(engine) as s, warnings.catch_warnings():
            warnings.simplefilter("error")  # (no cartesian-product warning)
            with pytest.raises(CompileError):
                s.execute(update(Book).where(Book.id == 2).values(owner_id=2))
            assert sent == []  # refused before anything was sent, as without countercache
            s.rollback()
            s.execute(delete(Book).where(Book.id == 2))
            s.commit()
        reads = [stmt for stmt in sent if "FOR UPDATE" in stmt]
        assert all("JOIN" in stmt for stmt in reads)
        with engine.connect() as c:  # books' rows go, items' stay: the owner keeps counting it
            assert c.execute(text("SELECT count(*) FROM books")).scalar_one() == 1
        assert assert_counts(engine, "people", "item_count", "items", "owner_id") == {1: 3, 2: 0}
    finally:
        if event.contains(engine, "before_cursor_execute", record):
            event.remove(engine, "before_cursor_execute", record)
        Base.metadata.drop_all(engine)


@pytest.mark.sqlite_only
@pytest.mark.parametrize("how", ["update", "update_by_pk", "delete"])
def test_sqlite_statements_take_the_write_lock_before_their_read(engine, strategy, how):
    """SQLite has no row locks: the ORM statement's read ran outside the write
    transaction, and another connection could move a row it read before its
    UPDATE ran (counted from where it no longer was; outside tester). The read
    now begins the write transaction, as a flush's does: the other writer waits."""
    from sqlalchemy import create_engine, event

    orm_kept_only(strategy, "the database's triggers count each statement as it runs")
    Base, Forum, User, Question = models(strategy)
    Base.metadata.create_all(engine)
    other = create_engine(engine.url, connect_args={"timeout": 0.2})
    outcome: list[str] = []

    def move_meanwhile(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith(("UPDATE QUESTIONS", "DELETE FROM QUESTIONS")) and not outcome:
            try:
                with other.begin() as c:
                    c.execute(text("UPDATE questions SET user_id = 2 WHERE id = 1"))
                outcome.append("moved")
            except Exception as exc:  # noqa: BLE001 - the write lock held: what is expected
                outcome.append(type(exc).__name__)

    try:
        with Session(engine) as s:
            s.add_all([User(id=1), User(id=2), User(id=3)])
            s.flush()
            s.add_all([Question(id=1, user_id=1), Question(id=2, user_id=1)])
            s.commit()
        event.listen(engine, "before_cursor_execute", move_meanwhile)
        with Session(engine) as s:
            if how == "update":
                s.execute(update(Question).where(Question.user_id == 1).values(user_id=3))
            elif how == "update_by_pk":
                s.execute(update(Question), [{"id": 1, "user_id": 3}, {"id": 2, "user_id": 3}])
            else:
                s.execute(delete(Question).where(Question.user_id == 1))
            s.commit()
        assert outcome == ["OperationalError"]
        assert assert_counts(engine) == ({1: 0, 2: 0, 3: 2} if how != "delete" else {1: 0, 2: 0, 3: 0})
    finally:
        event.remove(engine, "before_cursor_execute", move_meanwhile)
        other.dispose()
        Base.metadata.drop_all(engine)


@pytest.mark.servers_only  # (SQLite: SQLAlchemy refuses a DELETE with another table's criteria itself)
def test_a_joined_subclass_delete_over_a_base_table_column_deletes_what_sqlalchemy_does(engine, strategy):
    """``delete(Book).where(Book.tag_code == "b")``, ``tag_code`` in the base table: SQLAlchemy's
    statement is a cross join (it warns) and deletes every ``books`` row while any item has
    ``b``. The locking read went through the subclass's join and picked only the books
    under ``b``: the statement deleted 2 of 3 rows, not 3; and a counter of Books over the
    base table's column kept the deleted ones (outside tester)."""
    import warnings

    orm_kept_only(strategy, "refused: a subclass counted by its base table's column (test_trigger_ddl)")

    class Base(DeclarativeBase):
        pass

    class Tag(Base):
        __tablename__ = "jtags"
        code: Mapped[str] = mapped_column(String(20), primary_key=True)
        books = relationship("Book", primaryjoin="Tag.code == foreign(Book.tag_code)")
        book_count: Mapped[int] = counter_cache("books", strategy=strategy)

    class Item(Base):
        __tablename__ = "jitems"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        type: Mapped[str] = mapped_column(String(20))
        tag_code: Mapped[Optional[str]] = mapped_column(String(20))
        __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "item"}

    class Book(Item):
        __tablename__ = "jbooks"
        id: Mapped[int] = mapped_column(ForeignKey("jitems.id"), primary_key=True)
        __mapper_args__ = {"polymorphic_identity": "book"}

    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            s.add_all([Tag(code="a"), Tag(code="b")])
            s.flush()
            s.add_all([Book(id=1, tag_code="a"), Book(id=2, tag_code="b"), Book(id=3, tag_code="b")])
            s.commit()
        with Session(engine) as s, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (SQLAlchemy's cartesian-product warning, its own statement's)
            result = s.execute(delete(Book).where(Book.tag_code == "b"),
                               execution_options={"synchronize_session": False})
            assert result.rowcount == 3
            s.commit()
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM jbooks")).scalar_one() == 0
        assert countercache.check(engine, metadata=Base.metadata) == []
    finally:
        Base.metadata.drop_all(engine)


def test_a_joined_subclass_delete_without_a_where_counts_its_own_rows_only(engine, strategy):
    """``delete(Book)`` with no WHERE deletes every ``books`` row; the base table's
    plain items stay. The read took every base-table row for a deleted Book: a
    counter of Books went to -2 with 1 book deleted (second reading)."""
    orm_kept_only(strategy, "refused: a subclass counted by its base table's column (test_trigger_ddl)")

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "jusers"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        books = relationship("Book")
        book_count: Mapped[int] = counter_cache("books", strategy=strategy)

    class Item(Base):
        __tablename__ = "jitems"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        kind: Mapped[str] = mapped_column(String(10))
        owner_id: Mapped[int] = mapped_column(ForeignKey("jusers.id"))
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "item"}

    class Book(Item):
        __tablename__ = "jbooks"
        id: Mapped[int] = mapped_column(ForeignKey("jitems.id"), primary_key=True)
        __mapper_args__ = {"polymorphic_identity": "book"}

    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            s.add(User(id=1))
            s.flush()
            s.add_all([Book(id=1, owner_id=1), Item(id=2, owner_id=1), Item(id=3, owner_id=1)])
            s.commit()
            s.execute(delete(Book))
            s.commit()
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM jbooks")).scalar_one() == 0
            assert c.execute(text("SELECT count(*) FROM jitems")).scalar_one() == 3
        assert countercache.check(engine, metadata=Base.metadata) == []
    finally:
        Base.metadata.drop_all(engine)
