"""Declaring counters (SPEC §1): the column, and every misuse failing at configuration."""

from __future__ import annotations

from typing import Optional

import pytest
from sqlalchemy import BigInteger, Boolean, Column, Double, Float, ForeignKey, Integer, Numeric, SmallInteger, String, Table
from sqlalchemy.orm import DeclarativeBase, Mapped, MappedAsDataclass, Session, configure_mappers, mapped_column, relationship

import countercache
from countercache import CounterCache, CounterCacheError, counter_cache
from countercache.errors import ConfigurationError


def make(counter_kwargs=None, relationship_name="questions", child=True, **user_extra):
    """Declare User (with a counter built from ``counter_kwargs``) and Question; configure."""

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        questions: Mapped[list["Question"]] = relationship(back_populates="user")
        question_count: Mapped[int] = counter_cache(relationship_name, **(counter_kwargs or {}))

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))
        user: Mapped[Optional[User]] = relationship(back_populates="questions")

    configure_mappers()
    return User, Question


def test_column_shape_and_info():
    User, _ = make()
    column = User.__table__.c.question_count
    assert isinstance(column.type, Integer)
    assert column.nullable is False
    assert column.default.arg == 0
    assert column.server_default.arg == "0"
    definition = column.info["countercache"]
    assert isinstance(definition, CounterCache)
    assert definition.name == "User.question_count"
    assert definition.relationship == "questions"


def test_column_kwargs_pass_through():
    User, _ = make({"name": "n_questions", "type_": BigInteger, "index": True, "comment": "answers"})
    column = User.__table__.c.n_questions
    assert isinstance(column.type, BigInteger)
    assert column.index is True and column.comment == "answers"
    assert User.question_count.property.columns[0] is column


def test_child_declared_later_in_module():
    class Base(DeclarativeBase):
        pass

    class Forum(Base):
        __tablename__ = "forums"
        id: Mapped[int] = mapped_column(primary_key=True)
        posts: Mapped[list["Post"]] = relationship()
        post_count: Mapped[int] = counter_cache("posts")

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)
        forum_id: Mapped[int] = mapped_column(ForeignKey("forums.id"))

    configure_mappers()
    assert Forum.post_count.property.columns[0].info["countercache"].child_mapper.class_ is Post


@pytest.mark.parametrize(
    "kwargs, relationship_name, pattern",
    [
        ({}, "answers", r"User\.question_count: User has no relationship 'answers'"),
        ({}, "id", r"User\.question_count: 'id' is not a relationship"),
        ({"strategy": "eventually"}, "questions", r"User\.question_count: unknown strategy 'eventually'.*'bulk', 'per_row'"),
    ],
)
def test_misuse_names_the_counter(kwargs, relationship_name, pattern):
    with pytest.raises(CounterCacheError, match=pattern):
        make(kwargs, relationship_name)


def test_many_to_one_refused():
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
        user: Mapped[User] = relationship()
        user_count: Mapped[int] = counter_cache("user")

    with pytest.raises(CounterCacheError, match=r"Question\.user_count: 'user' is many-to-one"):
        configure_mappers()


def test_many_to_many_with_where_refused_for_now():
    class Base(DeclarativeBase):
        pass

    link = Table("post_tags", Base.metadata,
                 Column("post_id", ForeignKey("posts.id"), primary_key=True),
                 Column("tag_id", ForeignKey("tags.id"), primary_key=True))

    class Tag(Base):
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True)
        posts: Mapped[list["Post"]] = relationship(secondary=link)
        post_count: Mapped[int] = counter_cache("posts", where=lambda: Post.id > 1)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)

    with pytest.raises(CounterCacheError, match=r"Tag\.post_count: where= and sum= are not supported on a many-to-many"):
        configure_mappers()


def test_join_on_non_primary_key_refused():
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        handle: Mapped[str] = mapped_column(unique=True)
        questions: Mapped[list["Question"]] = relationship()
        question_count: Mapped[int] = counter_cache("questions")

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_handle: Mapped[str] = mapped_column(ForeignKey("users.handle"))

    with pytest.raises(CounterCacheError, match=r"User\.question_count: .*primary key"):
        configure_mappers()


def test_custom_primaryjoin_refused():
    from sqlalchemy import and_

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        live_questions: Mapped[list["Question"]] = relationship(
            primaryjoin=lambda: and_(User.id == Question.user_id, Question.deleted.is_(False)), viewonly=True)
        question_count: Mapped[int] = counter_cache("live_questions")

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))
        deleted: Mapped[bool] = mapped_column(default=False)

    with pytest.raises(CounterCacheError, match=r"User\.question_count: .*custom primaryjoin.*where="):
        configure_mappers()


def test_a_counter_assigned_after_the_class_body_is_a_counter(engine):
    """``User.question_count = counter_cache("questions")`` after the class body
    (SQLAlchemy maps such a column when mappers are configured): maintained,
    checked and guarded like one in the body (it was a plain column)."""
    from typing import Optional

    from sqlalchemy import ForeignKey, text
    from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

    import countercache
    from countercache import counter_cache

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        questions: Mapped[list["Question"]] = relationship()

    User.question_count = counter_cache("questions")

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        user = User(id=1)
        s.add_all([user, Question(id=1, user_id=1), Question(id=2, user_id=1)])
        s.commit()
        assert s.scalar(text("SELECT question_count FROM users")) == 2
        with pytest.raises(countercache.AssignmentError):
            user.question_count = 5
    assert [c.name for c in countercache.check(engine)] == []


def test_mapped_as_dataclass_constructor_gives_the_default(engine):
    """``MappedAsDataclass``: the generated ``__init__`` sets every field's default,
    the counter's 0 included (refused on SQLAlchemy 2.0 before); counted as usual."""

    class Base(MappedAsDataclass, DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True, init=False)
        questions: Mapped[list["Question"]] = relationship(default_factory=list, back_populates="user")
        question_count: Mapped[int] = counter_cache("questions")

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True, init=False)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), default=None)
        user: Mapped[Optional[User]] = relationship(default=None, back_populates="questions")

    Base.metadata.create_all(engine)
    with Session(engine, expire_on_commit=False) as s:
        user = User()
        user.questions.extend([Question(), Question()])
        s.add(user)
        s.commit()
        assert user.question_count == 2
    assert countercache.check(engine) == []


@pytest.mark.parametrize("strategy", ["bulk", "deferred"])
def test_a_counter_refused_at_configuration_keeps_refusing_every_flush(engine, strategy):
    """SQLAlchemy raises a mapper_configured listener's error once, then takes
    the mapper for configured: the counter must not be silently left unkept."""
    from sqlalchemy import String, func, text

    class Base(DeclarativeBase):
        pass

    class Owner(Base):
        __tablename__ = "owners"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        things: Mapped[list["Thing"]] = relationship()
        lowered: Mapped[int] = counter_cache("things", strategy=strategy,
                                        where=lambda: func.lower(Thing.state) == "a")

    class Thing(Base):
        __tablename__ = "things"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id"))
        state: Mapped[str] = mapped_column(String(10))

    Base.metadata.tables["owners"].create(engine)
    Base.metadata.tables["things"].create(engine)
    try:
        for attempt in (1, 2, 3):
            with Session(engine) as s:  # (the first time at the mappers' configuration, then at each flush)
                with pytest.raises(countercache.CounterCacheError, match=r"Owner\.lowered: where="):
                    s.add(Owner(id=attempt, things=[Thing(id=attempt * 10, state="A")]))
                    s.commit()
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM things")).scalar() == 0  # nothing kept uncounted
    finally:
        Base.metadata.drop_all(engine)


@pytest.mark.parametrize("kwargs, message", [
    ({"type_": String(5)}, r"type_ must be a number type .* not String\(length=5\)"),
    ({"type_": Boolean}, r"type_ must be a number type .* not Boolean\(\)"),
    ({"type_": "int"}, r"type_ must be a SQLAlchemy number type, not 'int'"),
    ({"nullable": True}, r"a counter column is never NULL"),
])
def test_a_column_that_cannot_hold_a_count_is_refused_at_the_declaration(kwargs, message):
    """(Outside tester: ``type_=String(5)`` was accepted, then PostgreSQL refused
    ``varchar + varchar`` at the first commit and SQLite and MariaDB stored ``'1'``.)"""
    with pytest.raises(ConfigurationError, match=r"counter_cache\('questions'\): " + message):
        counter_cache("questions", **kwargs)


@pytest.mark.parametrize("type_", [BigInteger, SmallInteger(), Numeric(12, 2), Float(), Double()])
def test_number_columns_are_taken(type_):
    assert counter_cache("questions", type_=type_).column.type is not None


@pytest.mark.parametrize("where", ["number", "boolean column", "comparison"])
def test_where_must_be_a_boolean_expression(where):
    """``where=lambda: Child.n`` (a number) was taken: the flush counted by Python's
    truth, and PostgreSQL refused it in check()'s recount (outside tester)."""
    from sqlalchemy import Boolean

    class Base(DeclarativeBase):
        pass

    class P(Base):
        __tablename__ = "p"
        id: Mapped[int] = mapped_column(primary_key=True)
        kids: Mapped[list["C"]] = relationship()
        flagged: Mapped[int] = counter_cache("kids", where={
            "number": lambda: C.n, "boolean column": lambda: C.on, "comparison": lambda: C.n > 0}[where])

    class C(Base):
        __tablename__ = "c"
        id: Mapped[int] = mapped_column(primary_key=True)
        p_id: Mapped[Optional[int]] = mapped_column(ForeignKey("p.id"))
        n: Mapped[Optional[int]]
        on: Mapped[bool] = mapped_column(Boolean, default=False)

    if where == "number":
        with pytest.raises(ConfigurationError, match=r"P\.flagged: where= must be a boolean expression, not Integer\(\) \(c\.n\)"):
            configure_mappers()
    else:
        configure_mappers()
        assert P.flagged.property.columns[0].info["countercache"].where_sql
