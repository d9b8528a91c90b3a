"""Keys as applications pass them (issue 15): a foreign key from a web form is
a string (``q.user_id = "3"`` on an integer column, a UUID key as text).
Plain SQLAlchemy commits it; the counters group, sort and write such keys as
the database stores them, and the parent in memory shows its count.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from types import SimpleNamespace
from typing import Optional

import pytest
from sqlalchemy import DateTime, Enum, ForeignKey, Integer, LargeBinary, TypeDecorator, Uuid, delete, func, insert, select, text
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, configure_mappers, mapped_column, relationship

import countercache
from countercache import counter_cache
from helpers import assert_counts, exact_value


def models(strategy: str, key_type: type = int) -> SimpleNamespace:
    uuid_keys = key_type is uuid.UUID

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id = mapped_column(Uuid if uuid_keys else Integer, primary_key=True, autoincrement=False)
        questions: Mapped[list["Question"]] = relationship(back_populates="user")
        question_count: Mapped[int] = counter_cache("questions", strategy=strategy)
        answer_count: Mapped[int] = counter_cache("questions.answers", strategy=strategy)

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id = mapped_column(Uuid if uuid_keys else Integer, ForeignKey("users.id"), nullable=True)
        user: Mapped[Optional[User]] = relationship(back_populates="questions")
        answers: Mapped[list["Answer"]] = relationship(back_populates="question")

    class Answer(Base):
        __tablename__ = "answers"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        question_id: Mapped[Optional[int]] = mapped_column(ForeignKey("questions.id"))
        question: Mapped[Optional[Question]] = relationship(back_populates="answers")

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    return SimpleNamespace(Base=Base, User=User, Question=Question, Answer=Answer)


def answers_exact(engine) -> None:
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT u.answer_count, (SELECT count(*) FROM answers a JOIN questions q ON a.question_id = q.id "
            "WHERE q.user_id = u.id) FROM users u")).all()
    assert all(stored == actual for stored, actual in rows), rows


def test_integer_keys_given_as_strings(engine, strategy):
    m = models(strategy)
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([m.User(id=1), m.User(id=2), m.User(id=3)])
        s.commit()
    with Session(engine, expire_on_commit=False) as s:
        users = [s.get(m.User, i) for i in (1, 2, 3)]
        s.add_all([m.Question(id=1, user_id="3"), m.Question(id=2, user_id=3), m.Question(id=3, user_id="1"),
                   m.Question(id=4, user_id=2)])
        s.flush()
        s.add_all([m.Answer(id=10, question_id="1"), m.Answer(id=11, question_id=1),
                   m.Answer(id=12, question_id="3")])
        s.flush()
        if strategy in ("bulk", "per_row"):
            assert [u.question_count for u in users] == [1, 1, 2]
        assert [countercache.exact(s, u, "question_count") for u in users] == [1, 1, 2]
        s.get(m.Question, 1).user_id = "2"  # moved (a form posts it back as text)
        s.get(m.Question, 2).user_id = "3"  # the same value, as text: no move
        s.execute(insert(m.Question), [{"id": 5, "user_id": "1"}, {"id": 6, "user_id": "3"}])
        s.commit()
        assert [exact_value(s, u, "question_count") for u in users] == [2, 2, 2]  # (committed)
    assert assert_counts(engine) == {1: 2, 2: 2, 3: 2}
    answers_exact(engine)


@pytest.mark.postgresql_only  # (elsewhere SQLAlchemy's Uuid type itself takes only UUID objects)
@pytest.mark.parametrize("strategy", ["bulk", "per_row", "deferred"])  # (sharded: integer or string keys)
def test_uuid_keys_given_as_strings(engine, strategy):
    m = models(strategy, uuid.UUID)
    m.Base.metadata.create_all(engine)
    a, b = uuid.UUID(int=1), uuid.UUID(int=2)
    with Session(engine) as s:
        s.add_all([m.User(id=a), m.User(id=b)])
        s.commit()
    with Session(engine) as s:
        s.add_all([m.Question(id=1, user_id=str(a)), m.Question(id=2, user_id=a), m.Question(id=3, user_id=str(b))])
        s.commit()
        s.get(m.Question, 2).user_id = str(b)
        s.commit()
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT u.question_count, (SELECT count(*) FROM questions q WHERE q.user_id = u.id) FROM users u")).all()
    assert sorted(rows) == [(1, 1), (2, 2)]


class Status(enum.Enum):
    open = "o"
    closed = "c"


def test_where_on_an_enum_column_counts_members_and_strings_as_sql_does(engine, strategy):
    """``where=Question.status == "open"`` on an ``Enum(PyEnum)`` column: the flush
    compares as the database does (the member, or its name as a string), so
    it agrees with ``check()``."""

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        questions: Mapped[list["Question"]] = relationship()
        by_name: Mapped[int] = counter_cache("questions", strategy=strategy, where=lambda: Question.status == "open")
        by_member: Mapped[int] = counter_cache("questions", strategy=strategy,
                                               where=lambda: Question.status == Status.open)
        listed: Mapped[int] = counter_cache("questions", strategy=strategy,
                                            where=lambda: Question.status.in_([Status.open, "closed"]))

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        status: Mapped[Status] = mapped_column(Enum(Status), default=Status.open)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(User(id=1))
        s.flush()
        s.add_all([Question(id=1, user_id=1), Question(id=2, user_id=1, status=Status.closed),
                   Question(id=3, user_id=1, status="open"), Question(id=4, user_id=1, status="closed")])
        s.commit()
        s.get(Question, 2).status = Status.open
        s.get(Question, 3).status = "closed"
        s.commit()
    assert countercache.check(engine) == []
    if strategy == "sharded":
        countercache.fold(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT by_name, by_member, listed FROM users")).one() == (2, 2, 4)


class BinaryUUID(TypeDecorator):
    """A UUID stored as 16 bytes (``BINARY(16)``), the way MySQL applications store them."""

    impl = LargeBinary(16)
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.BINARY(16))
        return dialect.type_descriptor(LargeBinary(16))

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        return (value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))).bytes

    def process_result_value(self, value, dialect):
        return None if value is None else uuid.UUID(bytes=bytes(value))


def test_sharded_refuses_a_type_decorator_key():
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id = mapped_column(BinaryUUID, primary_key=True)
        questions: Mapped[list["Question"]] = relationship()
        question_count: Mapped[int] = counter_cache("questions", strategy="sharded")

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id = mapped_column(BinaryUUID, ForeignKey("users.id"))

    with pytest.raises(countercache.CounterCacheError, match=r"User.question_count: the sharded strategy needs"):
        configure_mappers()


@pytest.mark.parametrize("strategy", ["bulk", "per_row", "deferred"])  # (sharded: refused, above)
def test_type_decorator_keys_as_the_database_stores_them(engine, strategy):
    """A primary key with a ``TypeDecorator`` (a UUID stored as ``BINARY(16)``):
    every statement passes the keys through the type, so a flush touching
    several parents updates each of them (it updated none on SQLite and
    MariaDB, and PostgreSQL refused ``uuid[]`` as ``bytea[]``)."""

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id = mapped_column(BinaryUUID, primary_key=True)
        questions: Mapped[list["Question"]] = relationship(back_populates="user")
        question_count: Mapped[int] = counter_cache("questions", strategy=strategy)
        answer_count: Mapped[int] = counter_cache("questions.answers", strategy=strategy)

    class Question(Base):
        __tablename__ = "questions"
        id = mapped_column(BinaryUUID, primary_key=True)
        user_id = mapped_column(BinaryUUID, ForeignKey("users.id"), nullable=True)
        user: Mapped[Optional[User]] = relationship(back_populates="questions")
        answers: Mapped[list["Answer"]] = relationship(back_populates="question")

    class Answer(Base):
        __tablename__ = "answers"
        id: Mapped[int] = mapped_column(primary_key=True)
        question_id = mapped_column(BinaryUUID, ForeignKey("questions.id"))
        question: Mapped[Optional[Question]] = relationship(back_populates="answers")

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    Base.metadata.create_all(engine)
    uids = [uuid.UUID(int=n) for n in (3, 1, 2)]
    qids = [uuid.uuid4() for _ in range(6)]
    with Session(engine, expire_on_commit=False) as s:
        users = [User(id=u) for u in uids]
        s.add_all(users)
        s.flush()
        # one parent named by its UUID and by the UUID's text in one flush
        s.add_all([Question(id=q, user_id=uids[n % 3] if n != 4 else str(uids[1])) for n, q in enumerate(qids)])
        s.flush()
        if strategy in ("bulk", "per_row"):  # the parents in memory show their counts
            assert [u.question_count for u in users] == [2, 2, 2]
        s.add_all([Answer(question_id=qids[n % 6]) for n in range(9)])
        s.commit()
        s.get(Question, qids[0]).user_id = uids[1]
        s.get(Question, qids[1]).user = users[2]
        s.execute(insert(Question), [{"id": uuid.uuid4(), "user_id": uids[0]}, {"id": uuid.uuid4(), "user_id": uids[2]}])
        s.delete(s.get(Question, qids[5]))
        s.execute(delete(Answer).where(Answer.question_id == qids[5]))
        s.commit()
        if strategy == "sharded":
            countercache.fold(engine)
        s.expire_all()
        got = {u.id: (u.question_count, u.answer_count) for u in users}
    assert countercache.check(engine) == []
    with engine.connect() as conn:
        qs = conn.execute(select(Question.user_id, func.count()).group_by(Question.user_id)).all()
        ans = conn.execute(select(Question.user_id, func.count()).join(Answer, Answer.question_id == Question.id)
                           .group_by(Question.user_id)).all()
    real = {u: (dict(qs).get(u, 0), dict(ans).get(u, 0)) for u in uids}
    assert got == real
    assert sum(n for n, _ in real.values()) == 7


def test_numbers_given_as_text_count_as_the_number_stored(engine, strategy):
    """``q.score = "7"`` (a web form) on an Integer column that ``where=`` compares
    and ``sum=`` adds: the database stores 7, and the counters count 7."""

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        questions: Mapped[list["Question"]] = relationship()
        high: Mapped[int] = counter_cache("questions", strategy=strategy, where=lambda: Question.score > 5)
        total: Mapped[int] = counter_cache("questions", strategy=strategy, sum="score")

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))
        score: Mapped[int] = mapped_column(default=0)

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(User(id=1))
        s.flush()
        s.add_all([Question(id=1, user_id=1, score="7"), Question(id=2, user_id=1, score=" 2"),
                   Question(id=3, user_id=1, score=9)])
        s.commit()
        s.get(Question, 3).score = "1"
        s.get(Question, 2).score = "12"
        s.commit()
    assert countercache.check(engine) == []
    if strategy == "sharded":
        countercache.fold(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT high, total FROM users")).one() == (2, 20)


def test_values_python_cannot_compare_are_a_clear_error(engine):
    """A naive datetime compared with an aware one: the flush stops with a
    CounterCacheError naming the counter and the values, not a TypeError."""
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        questions: Mapped[list["Question"]] = relationship()
        recent: Mapped[int] = counter_cache("questions", where=lambda: Question.created > dt.datetime(2026, 1, 1))

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))
        created = mapped_column(DateTime(timezone=True))

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(User(id=1))
        s.flush()
        s.add(Question(id=1, user_id=1, created=dt.datetime(2026, 5, 1, tzinfo=dt.timezone.utc)))
        with pytest.raises(countercache.CounterCacheError,
                           match=r"User\.recent: where= \(.*created.*\) cannot be evaluated on a row with created="):
            s.flush()


@pytest.mark.parametrize("strategy", ["bulk", "per_row", "deferred"])  # (sharded refuses UUID keys)
def test_uuid_keys_parents_in_memory_show_their_counts(engine, strategy):
    """Native ``Uuid`` keys (SQLite and MariaDB store them as text): a flush over
    several parents updates the parents in memory (the UPDATE's RETURNING
    keys came back as text on SQLite, matching no parent in the session)."""
    m = models(strategy, uuid.UUID)
    m.Base.metadata.create_all(engine)
    a, b = uuid.UUID(int=7), uuid.UUID(int=9)
    with Session(engine, expire_on_commit=False) as s:
        users = [m.User(id=a), m.User(id=b)]
        s.add_all(users)
        s.commit()
        s.add_all([m.Question(id=1, user_id=a), m.Question(id=2, user_id=a), m.Question(id=3, user_id=b)])
        s.commit()
        assert [u.question_count for u in users] == [2, 1]  # (no refresh)


@pytest.mark.parametrize("path", ["flush", "statement"])
def test_a_number_given_for_a_string_key(engine, strategy, path):
    """A string-keyed parent whose children get the key as a number (JSON,
    form data) next to strings: counted under the key the database stores
    ("1"), as without a counter (outside tester: TypeError from sorting mixed
    keys, after a bulk INSERT had run: its rows left uncounted)."""
    from sqlalchemy import String

    class Base(DeclarativeBase):
        pass

    class Tag(Base):
        __tablename__ = "tags"
        code: Mapped[str] = mapped_column(String(20), primary_key=True)
        posts: Mapped[list["Post"]] = relationship()
        post_count: Mapped[int] = countercache.counter_cache("posts", strategy=strategy)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)
        tag_code: Mapped[Optional[str]] = mapped_column(ForeignKey("tags.code"))

    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            s.add_all([Tag(code="1"), Tag(code="2")])
            s.commit()
        with Session(engine) as s:
            rows = [{"tag_code": 1}, {"tag_code": "2"}, {"tag_code": 1}]
            if path == "flush":
                s.add_all([Post(**row) for row in rows])
            else:
                s.execute(insert(Post), rows)
            s.commit()
            got = {t.code: countercache.exact(s, t, "post_count") for t in s.query(Tag)}
        assert got == {"1": 2, "2": 1}
        assert countercache.check(engine) == []
    finally:
        Base.metadata.drop_all(engine)


class Shade(enum.Enum):  # (declared out of alphabetical order, names unlike values)
    RED = "r"
    BLUE = "b"
    GREEN = "g"


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("strategy", ["bulk", "per_row", "deferred", "trigger"])  # (sharded: refused, test_sharded)
def test_enum_keys(engine, strategy, native):
    """A parent keyed by a Python ``Enum`` (outside tester): a flush touching several
    parents sorted the members, which do not sort, and the commit raised. Keys are
    ordered as the database orders what it stores (a native ENUM by its declaration)."""

    class Base(DeclarativeBase):
        pass

    key = Enum(Shade, native_enum=native, name="shade_key")

    class Palette(Base):
        __tablename__ = "palettes"
        shade = mapped_column(key, primary_key=True)
        swatches: Mapped[list["Swatch"]] = relationship()
        swatch_count: Mapped[int] = counter_cache("swatches", strategy=strategy)
        dot_count: Mapped[int] = counter_cache("swatches.dots", strategy=strategy)

    class Swatch(Base):
        __tablename__ = "swatches"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        shade = mapped_column(key, ForeignKey("palettes.shade"), nullable=True)
        dots: Mapped[list["Dot"]] = relationship()

    class Dot(Base):
        __tablename__ = "dots"
        id: Mapped[int] = mapped_column(primary_key=True)
        swatch_id: Mapped[Optional[int]] = mapped_column(ForeignKey("swatches.id"))

    Base.metadata.create_all(engine)
    try:
        with Session(engine, expire_on_commit=False) as s:
            palettes = [Palette(shade=c) for c in Shade]
            s.add_all(palettes)
            s.flush()
            s.add_all([Swatch(id=n, shade=list(Shade)[n % 3]) for n in range(7)])
            s.flush()
            s.add_all([Dot(swatch_id=n % 7) for n in range(10)])
            s.commit()
            s.get(Swatch, 0).shade = Shade.GREEN
            s.get(Swatch, 1).shade = Shade.RED
            s.delete(s.get(Swatch, 2))
            s.execute(delete(Dot).where(Dot.swatch_id == 2))
            s.commit()
            s.expire_all()
            got = {p.shade: (p.swatch_count, p.dot_count) for p in palettes}
        assert countercache.check(engine) == []
        with engine.connect() as conn:
            swatches = dict(conn.execute(select(Swatch.shade, func.count()).group_by(Swatch.shade)).all())
            dots = dict(conn.execute(select(Swatch.shade, func.count()).join(Dot, Dot.swatch_id == Swatch.id)
                                     .group_by(Swatch.shade)).all())
        assert got == {c: (swatches.get(c, 0), dots.get(c, 0)) for c in Shade}
        assert sum(n for n, _ in got.values()) == 6
    finally:
        Base.metadata.drop_all(engine)
