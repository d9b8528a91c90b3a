"""``strategy="sharded_trigger"``: the database's triggers add each statement's
deltas to a shard row of ``countercache_shards`` (never to the parent row);
``exact()``, ``check()`` and ``fold()`` read and fold them as for ``sharded``.

Every test compares against an independent ``SELECT count(*)``; the shard
rows are read with plain SQL.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Optional

import pytest
from sqlalchemy import ForeignKey, Numeric, String, delete, event, insert, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import ConfigurationError, CounterCacheError, counter_cache
from countercache import triggers

SHARDS = 4


def models(strategy: str = "sharded_trigger", shards: int = SHARDS):
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(String(30), default="")
        questions: Mapped[list["Question"]] = relationship(back_populates="user", passive_deletes=True)
        question_count: Mapped[int] = counter_cache("questions", strategy=strategy, shards=shards)
        open_count: Mapped[int] = counter_cache("questions", strategy=strategy, shards=shards,
                                                where=lambda: Question.state == "open")
        score_total: Mapped[int] = counter_cache("questions", strategy=strategy, shards=shards, sum="score")

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
        state: Mapped[str] = mapped_column(String(10), default="open")
        score: Mapped[int] = mapped_column(default=0)
        user: Mapped[Optional[User]] = relationship(back_populates="questions")

    return Base, User, Question


COLUMNS = ("question_count", "open_count", "score_total")


def real(engine) -> dict[int, tuple[int, int, int]]:
    with engine.connect() as c:
        rows = c.execute(text(
            "SELECT u.id, (SELECT count(*) FROM questions q WHERE q.user_id = u.id), "
            "(SELECT count(*) FROM questions q WHERE q.user_id = u.id AND q.state = 'open'), "
            "(SELECT coalesce(sum(q.score), 0) FROM questions q WHERE q.user_id = u.id) FROM users u")).all()
    return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}


def columns(engine) -> dict[int, tuple[int, int, int]]:
    with engine.connect() as c:
        rows = c.execute(text("SELECT id, question_count, open_count, score_total FROM users")).all()
    return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}


def shard_rows(engine, column: str = "question_count") -> list[tuple[str, int, int]]:
    with engine.connect() as c:
        return [(r[0], int(r[1]), int(r[2])) for r in c.execute(text(
            "SELECT parent_key, shard, delta FROM countercache_shards WHERE counter = :c "
            "ORDER BY parent_key, shard"), {"c": f"users.{column}"})]


def pending(engine) -> dict[int, tuple[int, int, int]]:
    found: dict[int, list[int]] = {}
    for i, column in enumerate(COLUMNS):
        for key, _, delta in shard_rows(engine, column):
            found.setdefault(int(key), [0, 0, 0])[i] += delta
    return {k: tuple(v) for k, v in found.items()}  # type: ignore[misc]


def assert_exact(engine, User) -> None:
    """Column + shard deltas == recount (plain SQL and exact()); check() finds nothing."""
    want, kept, more = real(engine), columns(engine), pending(engine)
    assert {k: tuple(c + p for c, p in zip(kept[k], more.get(k, (0, 0, 0)))) for k in kept} == want
    with Session(engine) as s:
        for user in s.query(User):
            assert tuple(countercache.exact(s, user, n) for n in COLUMNS) == want[user.id]
    assert countercache.check(engine) == []


def assert_folded(engine) -> None:
    countercache.fold(engine)
    assert columns(engine) == real(engine)
    for column in COLUMNS:
        assert shard_rows(engine, column) == []


@pytest.fixture
def schema(engine):
    Base, User, Question = models()
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=i) for i in range(1, 5)])
        s.commit()
    yield Base, User, Question
    Base.metadata.drop_all(engine)


def test_configuration(schema):
    Base, User, Question = schema
    assert "countercache_shards" in Base.metadata.tables
    assert countercache.configured_strategy(User.question_count) == "sharded_trigger"
    assert "sharded_trigger" in countercache.config.DATABASE_STRATEGIES


def test_orm_writes_go_to_shard_rows_not_the_parent(engine, schema):
    Base, User, Question = schema
    with Session(engine) as s:
        s.add_all([Question(id=i, user_id=1 + i % 3, score=i, state="open" if i % 2 else "closed")
                   for i in range(1, 31)])
        s.commit()
    with Session(engine) as s:
        s.delete(s.get(Question, 1))
        s.get(Question, 2).user_id = 4  # a move
        s.get(Question, 3).state = "closed"
        s.get(Question, 4).score = 100
        s.get(Question, 5).user_id = None
        s.commit()
    assert columns(engine) == {k: (0, 0, 0) for k in range(1, 5)}  # the column lags
    assert shard_rows(engine)  # the deltas are in the side table
    assert_exact(engine, User)
    assert_folded(engine)
    assert_exact(engine, User)


def test_raw_sql_and_core_statements(engine, schema):
    Base, User, Question = schema
    questions = Base.metadata.tables["questions"]
    with engine.begin() as c:
        c.execute(insert(questions), [{"id": i, "user_id": 1 + i % 4, "state": "open", "score": 2}
                                      for i in range(1, 21)])
        c.execute(text("INSERT INTO questions (id, user_id, state, score) VALUES (100, 2, 'closed', 7)"))
        c.execute(update(questions).where(questions.c.id < 5).values(user_id=3))
        c.execute(text("UPDATE questions SET state = 'closed' WHERE id > 15"))
        c.execute(delete(questions).where(questions.c.id.in_([6, 7, 8])))
        c.execute(text("DELETE FROM questions WHERE id = 100"))
    assert columns(engine) == {k: (0, 0, 0) for k in range(1, 5)}
    assert_exact(engine, User)
    assert_folded(engine)
    # writes after a fold land in shard rows again
    with engine.begin() as c:
        c.execute(text("DELETE FROM questions WHERE user_id = 3"))
    assert_exact(engine, User)
    assert_folded(engine)


def test_orm_statements(engine, schema):
    Base, User, Question = schema
    with Session(engine) as s:
        s.execute(insert(Question), [{"id": i, "user_id": 1 + i % 2} for i in range(1, 11)])
        s.execute(update(Question).where(Question.id < 4).values(user_id=4))
        s.execute(delete(Question).where(Question.id == 9))
        s.commit()
    assert_exact(engine, User)
    assert_folded(engine)


def test_parent_delete_takes_its_shard_rows(engine, schema):
    Base, User, Question = schema
    with Session(engine) as s:
        s.add_all([Question(id=i, user_id=1 + i % 2) for i in range(1, 11)])
        s.commit()
    with engine.begin() as c:  # no children left: the foreign key lets it go everywhere
        c.execute(text("DELETE FROM questions WHERE user_id = 2"))
        c.execute(text("DELETE FROM users WHERE id = 2"))
    assert {k for k, _, _ in shard_rows(engine)} == {"1"}
    with Session(engine) as s:  # through the ORM, and the key comes back with nothing pending
        s.add(User(id=2))
        s.commit()
    assert_exact(engine, User)


@pytest.mark.sqlite_postgresql_only
def test_on_delete_cascade(engine, schema):
    Base, User, Question = schema
    if engine.dialect.name == "sqlite":
        with engine.begin() as c:
            c.exec_driver_sql("PRAGMA foreign_keys = ON")
    with Session(engine) as s:
        s.add_all([Question(id=i, user_id=1 + i % 3) for i in range(1, 13)])
        s.commit()
    with engine.begin() as c:
        if engine.dialect.name == "sqlite":
            c.exec_driver_sql("PRAGMA foreign_keys = ON")
        c.execute(text("DELETE FROM users WHERE id = 1"))
    assert real(engine).keys() == {2, 3, 4}
    with engine.connect() as c:  # the children went with it
        assert c.execute(text("SELECT count(*) FROM questions WHERE user_id = 1")).scalar_one() == 0
        assert c.execute(text("SELECT count(*) FROM questions")).scalar_one() == 8
    assert {k for k, _, _ in shard_rows(engine)} == {"2", "3"}
    assert_exact(engine, User)
    assert_folded(engine)


def test_create_all_creates_the_triggers(engine, schema):
    Base, User, Question = schema
    with engine.connect() as c:
        assert triggers.installed(c, User.question_count.property.columns[0].info["countercache"])


@pytest.mark.postgresql_only
def test_two_connections_use_their_own_shard(engine, schema):
    Base, User, Question = schema
    import sqlalchemy as sa

    fresh = sa.create_engine(engine.url, poolclass=sa.NullPool)  # (a new backend, a new pid, per connect)
    opened = [fresh.connect()]
    pid_a = opened[0].execute(text("SELECT pg_backend_pid()")).scalar_one()
    for _ in range(64):  # a backend on another shard than the first: 15 in 16 at each try
        opened.append(fresh.connect())
        if opened[-1].execute(text("SELECT pg_backend_pid()")).scalar_one() % SHARDS != pid_a % SHARDS:
            break
    a, b = opened[0], opened[-1]
    for c in opened[1:-1]:
        c.close()
    with a, b:
        pids = [c.execute(text("SELECT pg_backend_pid()")).scalar_one() for c in (a, b)]
        assert pids[0] % SHARDS != pids[1] % SHARDS
        a.execute(text("INSERT INTO questions (id, user_id, state, score) VALUES (1, 1, 'open', 0), (2, 1, 'open', 0)"))
        b.execute(text("INSERT INTO questions (id, user_id, state, score) VALUES (3, 1, 'open', 0)"))  # does not wait for a
        b.commit()
        a.commit()
    fresh.dispose()
    assert shard_rows(engine) == sorted([("1", pids[0] % SHARDS, 2), ("1", pids[1] % SHARDS, 1)],
                                        key=lambda r: r[1])
    assert_exact(engine, User)


def test_decimal_sums_are_refused():
    from sqlalchemy.orm import configure_mappers

    class Base(DeclarativeBase):
        pass

    class Order(Base):
        __tablename__ = "orders"
        id: Mapped[int] = mapped_column(primary_key=True)
        lines: Mapped[list["Line"]] = relationship()
        total: Mapped[Decimal] = counter_cache("lines", strategy="sharded_trigger", sum="amount",
                                               type_=Numeric(12, 2))

    class Line(Base):
        __tablename__ = "lines"
        id: Mapped[int] = mapped_column(primary_key=True)
        order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"))
        amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))

    with pytest.raises(ConfigurationError, match=r"Order\.total: the sharded_trigger strategy keeps integer deltas.*"
                                                 r"on any database; use strategy 'trigger'"):
        configure_mappers()


def test_composite_keys_are_refused():
    from sqlalchemy import ForeignKeyConstraint
    from sqlalchemy.orm import configure_mappers

    class Base(DeclarativeBase):
        pass

    class Account(Base):
        __tablename__ = "accounts"
        region: Mapped[str] = mapped_column(String(5), primary_key=True)
        number: Mapped[int] = mapped_column(primary_key=True)
        entries: Mapped[list["Entry"]] = relationship()
        entry_count: Mapped[int] = counter_cache("entries", strategy="sharded_trigger")

    class Entry(Base):
        __tablename__ = "entries"
        id: Mapped[int] = mapped_column(primary_key=True)
        region: Mapped[str] = mapped_column(String(5))
        number: Mapped[int] = mapped_column()
        __table_args__ = (ForeignKeyConstraint(["region", "number"], ["accounts.region", "accounts.number"]),)

    with pytest.raises(ConfigurationError, match=r"Account\.entry_count: the sharded_trigger strategy needs .*"
                                                 r"one-column.*on every database; use strategy 'trigger'"):
        configure_mappers()


def test_multi_level_is_refused(engine):
    class Base(DeclarativeBase):
        pass

    class Forum(Base):
        __tablename__ = "forums"
        id: Mapped[int] = mapped_column(primary_key=True)
        topics: Mapped[list["Topic"]] = relationship()
        post_count: Mapped[int] = counter_cache("topics.posts", strategy="sharded_trigger")

    class Topic(Base):
        __tablename__ = "topics"
        id: Mapped[int] = mapped_column(primary_key=True)
        forum_id: Mapped[int] = mapped_column(ForeignKey("forums.id"))
        posts: Mapped[list["Post"]] = relationship()

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)
        topic_id: Mapped[int] = mapped_column(ForeignKey("topics.id"))

    with pytest.raises(CounterCacheError, match=r"Forum.post_count: a multi-level counter .*not supported by the "
                                                r"sharded_trigger strategy.*use strategy 'sharded'"):
        Base.metadata.create_all(engine)


def test_exact_sees_the_sessions_own_flushed_rows(engine, schema):
    Base, User, Question = schema
    with Session(engine) as s:
        user = s.get(User, 1)
        s.add_all([Question(id=i, user_id=1, score=3) for i in range(1, 4)])
        s.flush()
        assert countercache.exact(s, user, "question_count") == 3
        assert countercache.exact(s, user, "score_total") == 9
        assert user.question_count == 0  # the column lags until fold()
        s.rollback()
    assert shard_rows(engine) == []


def test_shards_from_the_configuration(engine):
    Base, User, Question = models(shards=None)
    countercache.configure(overrides={"User.question_count": "sharded_trigger:2"})
    assert User.question_count.property.columns[0].info["countercache"].shards() == 2
    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            s.add(User(id=1))
            s.add_all([Question(id=i, user_id=1) for i in range(1, 6)])
            s.commit()
        assert {shard for _, shard, _ in shard_rows(engine)} <= {0, 1}
        assert_exact(engine, User)
        assert_folded(engine)
    finally:
        Base.metadata.drop_all(engine)


def self_referential():
    class Base(DeclarativeBase):
        pass

    class Comment(Base):
        __tablename__ = "comments"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        parent_id: Mapped[Optional[int]] = mapped_column(ForeignKey("comments.id"))
        replies: Mapped[list["Comment"]] = relationship(back_populates="parent")
        parent: Mapped[Optional["Comment"]] = relationship(back_populates="replies", remote_side=[id])
        reply_count: Mapped[int] = counter_cache("replies", strategy="sharded_trigger", shards=SHARDS)

    return Base, Comment


def test_self_referential(engine):
    """The triggers write the side table, never the counted table: MariaDB too."""
    Base, Comment = self_referential()
    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            s.add_all([Comment(id=1), Comment(id=2)])
            s.flush()
            s.add_all([Comment(id=i, parent_id=1 + i % 2) for i in range(3, 10)])
            s.commit()
        with engine.begin() as c:
            c.execute(text("UPDATE comments SET parent_id = 3 WHERE id IN (4, 6)"))
            c.execute(text("DELETE FROM comments WHERE id = 5"))

        def recount():
            with engine.connect() as c:
                return dict(c.execute(text("SELECT p.id, (SELECT count(*) FROM comments r WHERE r.parent_id = p.id) "
                                           "FROM comments p")).all())

        with Session(engine) as s:
            assert {c.id: countercache.exact(s, c, "reply_count") for c in s.query(Comment)} == recount()
        assert countercache.check(engine) == []
        countercache.fold(engine)
        with engine.connect() as c:
            assert dict(c.execute(text("SELECT id, reply_count FROM comments")).all()) == recount()
    finally:
        Base.metadata.drop_all(engine)


@pytest.mark.mariadb_only
def test_mariadb_refuses_a_self_referential_cascade(engine):
    class Base(DeclarativeBase):
        pass

    class Node(Base):
        __tablename__ = "nodes"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[Optional[int]] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
        children: Mapped[list["Node"]] = relationship()
        child_count: Mapped[int] = counter_cache("children", strategy="sharded_trigger")

    with pytest.raises(CounterCacheError, match=r"Node.child_count: .*ON DELETE CASCADE.*fire no trigger on "
                                                r"MariaDB/MySQL.*use strategy 'sharded'"):
        Base.metadata.create_all(engine)


@pytest.mark.postgresql_only
def test_truncate(engine, schema):
    Base, User, Question = schema
    with Session(engine) as s:
        s.add_all([Question(id=i, user_id=1 + i % 2) for i in range(1, 7)])
        s.commit()
    countercache.fold(engine)
    with Session(engine) as s:
        s.add(Question(id=10, user_id=3))
        s.commit()
    with engine.begin() as c:
        c.execute(text("TRUNCATE questions"))
    assert columns(engine) == {k: (0, 0, 0) for k in range(1, 5)}
    assert shard_rows(engine) == []
    assert_exact(engine, User)


def test_many_to_many(engine, backend):
    from sqlalchemy import Column, Table

    cascade = backend != "mariadb"
    if backend == "sqlite":  # (before the first connection: enforced per connection)
        event.listen(engine, "connect", lambda dbapi_connection, _: dbapi_connection.execute("PRAGMA foreign_keys=ON"))

    class Base(DeclarativeBase):
        pass

    post_tags = Table(
        "post_tags", Base.metadata,
        Column("post_id", ForeignKey("posts.id", ondelete="CASCADE" if cascade else None), primary_key=True),
        Column("tag_id", ForeignKey("tags.id"), primary_key=True),
    )

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)

    class Tag(Base):
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        posts: Mapped[list[Post]] = relationship(secondary=post_tags)
        post_count: Mapped[int] = counter_cache("posts", strategy="sharded_trigger", shards=SHARDS)

    def recount():
        with engine.connect() as c:
            return dict(c.execute(text("SELECT t.id, (SELECT count(*) FROM post_tags pt WHERE pt.tag_id = t.id) "
                                       "FROM tags t")).all())

    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            posts = [Post(id=i) for i in range(1, 5)]
            s.add_all([Tag(id=1, posts=posts[:3]), Tag(id=2, posts=posts[1:]), Tag(id=3)])
            s.commit()
        with Session(engine) as s:
            tag, other, post = s.get(Tag, 1), s.get(Tag, 3), s.get(Post, 1)
            tag.posts.remove(post)
            other.posts.append(post)
            s.commit()
        with engine.begin() as c:
            c.execute(text("INSERT INTO post_tags (post_id, tag_id) SELECT post_id, 3 FROM post_tags WHERE tag_id = 2 "
                           "AND post_id <> 1"))
            c.execute(text("UPDATE post_tags SET tag_id = 1 WHERE tag_id = 2 AND post_id = 4"))
            if cascade:
                c.execute(text("DELETE FROM posts WHERE id = 2"))  # ON DELETE CASCADE
                assert c.execute(text("SELECT count(*) FROM post_tags WHERE post_id = 2")).scalar_one() == 0
        with Session(engine) as s:
            assert {t.id: countercache.exact(s, t, "post_count") for t in s.query(Tag)} == recount()
        assert countercache.check(engine) == []
        countercache.fold(engine)
        with engine.connect() as c:
            assert dict(c.execute(text("SELECT id, post_count FROM tags")).all()) == recount()
    finally:
        Base.metadata.drop_all(engine)


def test_autogenerate_leaves_its_triggers_alone(engine, tmp_path):
    """Autogenerate does not generate sharded_trigger's triggers yet, nor drops those create_all() made."""
    pytest.importorskip("alembic")
    from test_alembic_triggers import Env

    Base, User, Question = models()
    Base.metadata.create_all(engine)
    env = Env(tmp_path / "migrations", engine)
    env.metadata = Base.metadata
    source = env.revision("0001")
    assert "counter_trigger" not in source
    with engine.connect() as c:
        assert triggers.installed(c, User.question_count.property.columns[0].info["countercache"])


def test_string_keys_as_the_parent_spells_them(engine, backend):
    """A string key is written as the parent row stores it: on MariaDB, whose
    collation holds 'python' equal to 'Python', a child row may spell it otherwise."""

    class Base(DeclarativeBase):
        pass

    class Tag(Base):
        __tablename__ = "tags"
        name: Mapped[str] = mapped_column(String(20), primary_key=True)
        posts: Mapped[list["Post"]] = relationship()
        post_count: Mapped[int] = counter_cache("posts", strategy="sharded_trigger", shards=SHARDS)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        tag_name: Mapped[Optional[str]] = mapped_column(ForeignKey("tags.name"))

    other = "python" if backend == "mariadb" else "Python"
    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            s.add_all([Tag(name="Python"), Tag(name="SQL")])
            s.add_all([Post(id=1, tag_name="Python"), Post(id=2, tag_name="SQL")])
            s.commit()
        with engine.begin() as c:
            c.execute(text("INSERT INTO posts (id, tag_name) VALUES (3, :t), (4, :t)"), {"t": other})
            c.execute(text("DELETE FROM posts WHERE id = 2"))
        with engine.connect() as c:
            assert sorted(c.execute(text("SELECT parent_key, sum(delta) FROM countercache_shards "
                                         "GROUP BY parent_key")).all()) == [("Python", 3), ("SQL", 0)]
        with Session(engine) as s:
            assert {t.name: countercache.exact(s, t, "post_count") for t in s.query(Tag)} == {"Python": 3, "SQL": 0}
        assert countercache.check(engine) == []
        countercache.fold(engine)
        with engine.connect() as c:
            assert dict(c.execute(text("SELECT name, post_count FROM tags")).all()) == {"Python": 3, "SQL": 0}
    finally:
        Base.metadata.drop_all(engine)


def test_configuring_away_from_sharded_trigger_while_its_triggers_exist_fails_the_flush(engine):
    import countercache as cc_mod

    m = _away_models()
    m.Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            s.add(m.Owner(id=1, items=[m.Item(id=1)]))
            s.commit()
        cc_mod.configure(overrides={"AwayOwner.item_count": "bulk"})
        with Session(engine) as s:
            s.add(m.Item(id=2, owner_id=1))
            with pytest.raises(cc_mod.CounterCacheError, match=r"AwayOwner\.item_count: strategy 'bulk' now"):
                s.commit()
    finally:
        cc_mod.configure()
        m.Base.metadata.drop_all(engine)


def _away_models():
    from types import SimpleNamespace

    class Base(DeclarativeBase):
        pass

    class AwayOwner(Base):
        __tablename__ = "away_owners"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        items: Mapped[list["AwayItem"]] = relationship()
        item_count: Mapped[int] = counter_cache("items", strategy="sharded_trigger")

    class AwayItem(Base):
        __tablename__ = "away_items"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        owner_id: Mapped[int] = mapped_column(ForeignKey("away_owners.id"))

    return SimpleNamespace(Base=Base, Owner=AwayOwner, Item=AwayItem)


def _switch_models():
    from types import SimpleNamespace

    class Base(DeclarativeBase):
        pass

    class SwOwner(Base):
        __tablename__ = "sw_owners"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        items: Mapped[list["SwItem"]] = relationship()
        item_count: Mapped[int] = counter_cache("items", strategy="trigger")

    class SwItem(Base):
        __tablename__ = "sw_items"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        owner_id: Mapped[int] = mapped_column(ForeignKey("sw_owners.id"))

    countercache.shard_table(Base.metadata)
    return SimpleNamespace(Base=Base, Owner=SwOwner, Item=SwItem)


def test_switching_between_database_strategies_needs_the_triggers_of_the_new_one_only(engine):
    m = _switch_models()
    m.Base.metadata.create_all(engine)
    counter = m.Owner.item_count.property.columns[0].info["countercache"]
    try:
        with Session(engine) as s:
            s.add(m.Owner(id=1, items=[m.Item(id=1)]))
            s.commit()
        countercache.configure(overrides={"SwOwner.item_count": "sharded_trigger"})
        with Session(engine) as s:  # its own triggers missing (the trigger ones still there)
            s.add(m.Item(id=2, owner_id=1))
            with pytest.raises(CounterCacheError, match=r"SwOwner\.item_count: strategy 'sharded_trigger', but"):
                s.commit()
        with engine.begin() as c:  # made, but the old ones left behind: both would count
            triggers.execute(c, triggers.create_statements(counter, c.dialect))
        with Session(engine) as s:
            s.add(m.Item(id=2, owner_id=1))
            with pytest.raises(CounterCacheError, match=r"SwOwner\.item_count: the database .* also has countercache"):
                s.commit()
    finally:
        countercache.configure()
        m.Base.metadata.drop_all(engine)


def test_create_all_after_only_the_counted_table_was_dropped(engine):
    m = _switch_models()
    m.Base.metadata.create_all(engine)
    try:
        m.Item.__table__.drop(engine)  # (the parent table's triggers stay)
        m.Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add(m.Owner(id=1, items=[m.Item(id=1), m.Item(id=2)]))
            s.commit()
            assert s.get(m.Owner, 1).item_count == 2
    finally:
        m.Base.metadata.drop_all(engine)


@pytest.mark.parametrize("action", ["CASCADE", "SET NULL"])
def test_on_update_actions_are_refused_for_sharded_trigger(action):
    from sqlalchemy.dialects import postgresql, sqlite
    from sqlalchemy.orm import configure_mappers

    class Base(DeclarativeBase):
        pass

    class UpOwner(Base):
        __tablename__ = "up_owners"
        id: Mapped[int] = mapped_column(primary_key=True)
        items: Mapped[list["UpItem"]] = relationship()
        item_count: Mapped[int] = counter_cache("items", strategy="sharded_trigger")

    class UpItem(Base):
        __tablename__ = "up_items"
        id: Mapped[int] = mapped_column(primary_key=True)
        owner_id: Mapped[Optional[int]] = mapped_column(ForeignKey("up_owners.id", onupdate=action))

    configure_mappers()
    counter = UpOwner.item_count.property.columns[0].info["countercache"]
    for dialect in (postgresql.dialect(), sqlite.dialect()):
        message = triggers.refusal(counter, dialect)
        assert message is not None and message.startswith(
            f"UpOwner.item_count: its foreign key to up_owners has ON UPDATE {action}"), message
        assert "'trigger'" in message
