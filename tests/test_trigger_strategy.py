"""``strategy="trigger"`` (issue 19): the database keeps the counter with
triggers generated from the declaration; ``create_all()`` creates them; the
ORM writes nothing for the counter and shows the new value on parents in
memory; writes that bypass the ORM are counted too; a counter whose triggers
are missing fails at the first flush, naming it.
"""

from __future__ import annotations

from typing import Optional

import pytest
from sqlalchemy import ForeignKey, String, delete, event, insert, inspect, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache


def models(strategy: str = "trigger", where=None, sum=None):  # noqa: A002
    class Base(DeclarativeBase):
        pass

    class Forum(Base):
        __tablename__ = "forums"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        forum_id: Mapped[Optional[int]] = mapped_column(ForeignKey("forums.id", ondelete="CASCADE"))
        name: Mapped[str] = mapped_column(String(30), default="")
        questions: Mapped[list["Question"]] = relationship(back_populates="user", passive_deletes=True)
        question_count: Mapped[int] = counter_cache("questions", strategy=strategy)
        open_count: Mapped[int] = counter_cache("questions", strategy=strategy, where=lambda: Question.state == "open")
        score_total: Mapped[int] = counter_cache("questions", strategy=strategy, sum="score")

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
        state: Mapped[str] = mapped_column(String(10), default="open")
        score: Mapped[int] = mapped_column(default=0)
        user: Mapped[Optional[User]] = relationship(back_populates="questions")

    return Base, Forum, User, Question


def real(engine) -> dict[int, tuple[int, int, int]]:
    """Per user: (count, open count, score sum) recounted, independent of the counters."""
    with engine.connect() as c:
        rows = c.execute(text(
            "SELECT u.id, (SELECT count(*) FROM questions q WHERE q.user_id = u.id), "
            "(SELECT count(*) FROM questions q WHERE q.user_id = u.id AND q.state = 'open'), "
            "(SELECT coalesce(sum(q.score), 0) FROM questions q WHERE q.user_id = u.id) FROM users u")).all()
    return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}


def kept(engine) -> dict[int, tuple[int, int, int]]:
    with engine.connect() as c:
        rows = c.execute(text("SELECT id, question_count, open_count, score_total FROM users")).all()
    return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}


def assert_exact(engine) -> None:
    assert kept(engine) == real(engine)


@pytest.fixture
def schema(engine):
    Base, Forum, User, Question = models()
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Forum(id=1), Forum(id=2)])
        s.add_all([User(id=i, forum_id=1 + i % 2) for i in range(1, 5)])
        s.commit()
    yield Base, Forum, User, Question
    Base.metadata.drop_all(engine)


def test_the_orm_counts_through_the_triggers_without_writing_the_counter(engine, schema, statements):
    Base, Forum, User, Question = schema
    with Session(engine) as s, statements.record() as rec:
        s.add_all([Question(id=1, user_id=1, score=5), Question(id=2, user_id=1, state="closed", score=2),
                   Question(id=3, user_id=2, score=1)])
        s.commit()
    assert rec.updates_to("users") == []  # the database kept them
    assert kept(engine)[1] == (2, 1, 7) and kept(engine)[2] == (1, 1, 1)
    with Session(engine) as s:
        q = s.get(Question, 2)
        q.user_id, q.state, q.score = 3, "open", 10  # move, flip the where column, change the sum
        s.delete(s.get(Question, 3))
        s.commit()
    assert_exact(engine)
    assert kept(engine)[3] == (1, 1, 10)


@pytest.mark.parametrize("expire_on_commit", [True, False])
def test_loaded_parents_show_the_new_value_after_the_flush(engine, schema, expire_on_commit):
    Base, Forum, User, Question = schema
    with Session(engine, expire_on_commit=expire_on_commit) as s:
        user = s.get(User, 1)
        assert user.question_count == 0
        s.add(Question(id=1, user_id=1, score=4))
        s.flush()
        assert (user.question_count, user.open_count, user.score_total) == (1, 1, 4)
        s.commit()
        assert user.question_count == 1
    assert_exact(engine)


def test_writes_that_bypass_the_orm_are_counted(engine, schema):
    Base, Forum, User, Question = schema
    with engine.begin() as c:
        c.execute(text("INSERT INTO questions (id, user_id, state, score) VALUES (1, 1, 'open', 3), "
                       "(2, 1, 'closed', 4), (3, 2, 'open', 5)"))
        c.execute(insert(Question.__table__), [{"id": 4, "user_id": 3, "state": "open", "score": 1},
                                               {"id": 5, "user_id": 3, "state": "open", "score": 1}])
        c.execute(update(Question.__table__).where(Question.__table__.c.id == 1).values(user_id=2))
        c.execute(delete(Question.__table__).where(Question.__table__.c.id == 4))
    assert_exact(engine)
    assert kept(engine)[2] == (2, 2, 8)


def test_on_delete_cascade_is_counted(engine, schema):
    Base, Forum, User, Question = schema
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _fk_on(dbapi_connection, record):
            dbapi_connection.execute("PRAGMA foreign_keys=ON")
        engine.dispose()
    with Session(engine) as s:
        s.add_all([Question(id=1, user_id=1), Question(id=2, user_id=2), Question(id=3, user_id=2)])
        s.commit()
    with engine.begin() as c:
        if engine.dialect.name == "sqlite":
            assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        # forum 1 holds users 2 and 4: deleting it cascades to them and their questions
        c.execute(text("DELETE FROM forums WHERE id = 1"))
    assert_exact(engine)
    assert set(kept(engine)) == {1, 3}


def test_a_counter_without_its_triggers_fails_at_the_first_flush_naming_it(engine):
    Base, Forum, User, Question = models()
    Base.metadata.create_all(engine)
    try:
        from countercache import triggers

        counter = User.question_count.property.columns[0].info["countercache"]
        with engine.begin() as c:
            triggers.execute(c, triggers.drop_statements(counter, c.dialect))
        from countercache.strategies.trigger import forget_verified

        forget_verified()
        with engine.begin() as c:
            c.execute(insert(Forum.__table__), {"id": 1})
            c.execute(insert(User.__table__), {"id": 1, "forum_id": 1})
        with Session(engine) as s:
            s.add(Question(id=1, user_id=1))
            with pytest.raises(countercache.CounterCacheError, match=r"User\.question_count: strategy 'trigger'"):
                s.commit()
            s.rollback()
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM questions")).scalar() == 0  # nothing half-written
    finally:
        Base.metadata.drop_all(engine)


def test_configuration_can_choose_the_trigger_strategy(engine):
    countercache.configure(default_strategy="trigger")
    Base, Forum, User, Question = models(strategy=None)
    assert countercache.configured_strategy(User.question_count) == "trigger"
    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            s.add(Forum(id=1))
            s.add(User(id=1, forum_id=1))
            s.add_all([Question(id=i, user_id=1, score=i) for i in range(1, 4)])
            s.commit()
        assert kept(engine)[1] == (3, 3, 6)
        assert not countercache.check(engine, User.question_count, User.open_count, User.score_total)
    finally:
        Base.metadata.drop_all(engine)


def test_drop_all_drops_the_triggers(engine):
    from countercache import triggers

    Base, Forum, User, Question = models()
    Base.metadata.create_all(engine)
    counter = User.question_count.property.columns[0].info["countercache"]
    functions = {triggers.trigger_name(User.__mapper__.columns[k].info["countercache"]) + "_fn"
                 for k in ("question_count", "open_count", "score_total")}

    def functions_left(c) -> int:
        return c.execute(text("SELECT count(*) FROM pg_proc WHERE proname = ANY(:names)"),
                         {"names": sorted(functions)}).scalar()

    with engine.connect() as c:
        assert triggers.installed(c, counter)
        if engine.dialect.name == "postgresql":
            assert functions_left(c) == 3
    Base.metadata.drop_all(engine)
    with engine.connect() as c:
        assert not inspect(c).has_table("questions")
        if engine.dialect.name == "postgresql":  # (functions outlive their tables)
            assert functions_left(c) == 0


@pytest.mark.parametrize("expire_on_commit", [True, False])
def test_orm_statements_refresh_the_loaded_parents(engine, schema, expire_on_commit):
    Base, Forum, User, Question = schema
    with Session(engine, expire_on_commit=expire_on_commit) as s:
        s.add_all([Question(id=i, user_id=1, score=i) for i in range(1, 5)])
        s.commit()
        user = s.get(User, 1)
        assert user.question_count == 4
        s.execute(update(Question).where(Question.id <= 2).values(user_id=2))
        assert user.question_count == 2  # read back after the statement, not before
        s.execute(delete(Question).where(Question.id == 3))
        assert (user.question_count, user.score_total) == (1, 4)
        s.execute(insert(Question), [{"id": 9, "user_id": 1, "score": 1}])
        s.commit()
    assert_exact(engine)
    assert kept(engine)[1] == (2, 2, 5)


def test_the_flush_reads_nothing_for_a_database_kept_counter(engine, schema, statements):
    Base, Forum, User, Question = schema
    with Session(engine) as s:
        s.add_all([Question(id=i, user_id=1) for i in range(1, 4)])
        s.commit()
    with Session(engine) as s:
        q = s.get(Question, 1)
        s.delete(s.get(Question, 2))
        with statements.record() as rec:
            q.user_id = 2
            s.commit()
    # the UPDATE, the DELETE and the COMMIT's: no locking pre-read, no counter UPDATE
    assert [sql.split()[0].upper() for sql in rec.sql() if not sql.upper().startswith(("BEGIN", "COMMIT"))] \
        == ["UPDATE", "DELETE"]
    assert_exact(engine)


def key_models(on_update=None, passive_updates=True):
    class Base(DeclarativeBase):
        pass

    class Team(Base):
        __tablename__ = "teams"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        members: Mapped[list["Member"]] = relationship(passive_updates=passive_updates)
        member_count: Mapped[int] = counter_cache("members", strategy="trigger")

    class Member(Base):
        __tablename__ = "members"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        team_id: Mapped[Optional[int]] = mapped_column(ForeignKey("teams.id", onupdate=on_update))

    return Base, Team, Member


def team_counts(engine) -> tuple[dict, dict]:
    with engine.connect() as c:
        kept_ = dict(c.execute(text("SELECT id, member_count FROM teams")).all())
        real_ = dict(c.execute(text("SELECT t.id, (SELECT count(*) FROM members m WHERE m.team_id = t.id) "
                                    "FROM teams t")).all())
    return kept_, real_


@pytest.mark.parametrize("how", ["on_update_cascade", "passive_updates_false"])
def test_a_parent_key_change_keeps_the_count(engine, how):
    if how == "passive_updates_false" and engine.dialect.name != "sqlite":
        pytest.skip("the server refuses a referenced parent's key change without ON UPDATE (its own rule)")
    if how == "on_update_cascade" and engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _fk_on(dbapi_connection, record):
            dbapi_connection.execute("PRAGMA foreign_keys=ON")
        engine.dispose()
    Base, Team, Member = key_models(on_update="CASCADE" if how == "on_update_cascade" else None,
                                    passive_updates=how != "passive_updates_false")
    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            s.add_all([Team(id=1), Team(id=2)])
            s.flush()
            s.add_all([Member(id=i, team_id=1 + i % 2) for i in range(1, 8)])
            s.commit()
        with Session(engine) as s:
            team = s.get(Team, 1)
            team.members  # (loaded: passive_updates=False re-points them itself)
            team.id = 10
            s.commit()
        kept_, real_ = team_counts(engine)
        assert kept_ == real_ and kept_[10] == 3
    finally:
        Base.metadata.drop_all(engine)


@pytest.mark.sqlite_postgresql_only
def test_rows_inserted_before_their_parent_are_counted_when_it_comes(engine):
    """A foreign key checked at commit (PostgreSQL's DEFERRABLE INITIALLY DEFERRED),
    or not enforced (SQLite's default): the child rows come first."""
    Base, Team, Member = key_models()
    Base.metadata.create_all(engine)
    try:
        with engine.begin() as c:
            if engine.dialect.name == "postgresql":
                c.exec_driver_sql("ALTER TABLE members DROP CONSTRAINT members_team_id_fkey")
                c.exec_driver_sql("ALTER TABLE members ADD FOREIGN KEY (team_id) REFERENCES teams (id) "
                                  "DEFERRABLE INITIALLY DEFERRED")
            c.execute(text("INSERT INTO members (id, team_id) VALUES (1, 5), (2, 5), (3, 6)"))
            c.execute(text("INSERT INTO teams (id, member_count) VALUES (5, 0), (6, 7)"))  # (a wrong value too)
        kept_, real_ = team_counts(engine)
        assert kept_ == real_ == {5: 2, 6: 1}
    finally:
        Base.metadata.drop_all(engine)


def test_a_refused_counter_stops_create_all_before_any_table_is_made(engine):
    class Base(DeclarativeBase):
        pass

    class Org(Base):
        __tablename__ = "orgs"
        id: Mapped[int] = mapped_column(primary_key=True)
        teams: Mapped[list["Team"]] = relationship()
        member_count: Mapped[int] = counter_cache("teams.members", strategy="trigger")

    class Team(Base):
        __tablename__ = "teams"
        id: Mapped[int] = mapped_column(primary_key=True)
        org_id: Mapped[Optional[int]] = mapped_column(ForeignKey("orgs.id"))
        members: Mapped[list["Member"]] = relationship()

    class Member(Base):
        __tablename__ = "members"
        id: Mapped[int] = mapped_column(primary_key=True)
        team_id: Mapped[Optional[int]] = mapped_column(ForeignKey("teams.id", onupdate="CASCADE"))

    with pytest.raises(countercache.CounterCacheError,
                       match=r"Org\.member_count: members's foreign key to teams has ON UPDATE CASCADE"):
        Base.metadata.create_all(engine)
    with engine.connect() as c:
        assert not any(inspect(c).has_table(t) for t in ("orgs", "teams", "members"))


def test_where_only_sql_evaluates_is_kept_by_the_database_and_refused_elsewhere(engine):
    from sqlalchemy import func

    class Base(DeclarativeBase):
        pass

    class Shelf(Base):
        __tablename__ = "shelves"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        books: Mapped[list["Book"]] = relationship()
        lowered: Mapped[int] = counter_cache("books", strategy="trigger",
                                             where=lambda: func.lower(Book.title) == "dune")

    class Book(Base):
        __tablename__ = "books"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        shelf_id: Mapped[Optional[int]] = mapped_column(ForeignKey("shelves.id"))
        title: Mapped[str] = mapped_column(String(30))

    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            s.add(Shelf(id=1, books=[Book(id=1, title="DUNE"), Book(id=2, title="Dune"), Book(id=3, title="Emma")]))
            s.commit()
            assert s.get(Shelf, 1).lowered == 2
        with engine.begin() as c:
            c.execute(text("UPDATE books SET title = 'dune' WHERE id = 3"))
        assert not countercache.check(engine)
        with pytest.raises(countercache.CounterCacheError,
                           match=r"Shelf\.lowered: where= cannot be evaluated in Python.*strategy 'bulk'"):
            countercache.configure(overrides={"Shelf.lowered": "bulk"})
        assert countercache.configured_strategy(Shelf.lowered) == "trigger"  # nothing changed
    finally:
        Base.metadata.drop_all(engine)


def test_configuring_away_from_trigger_while_its_triggers_exist_fails_the_flush(engine, schema):
    Base, Forum, User, Question = schema
    with Session(engine) as s:
        s.add(Question(id=1, user_id=1))
        s.commit()
    countercache.configure(overrides={"User.question_count": "bulk"})
    with Session(engine) as s:
        s.add(Question(id=2, user_id=1))
        with pytest.raises(countercache.CounterCacheError,
                           match=r"User\.question_count: strategy 'bulk' now, but the database .* still has"):
            s.commit()
    assert_exact(engine)  # nothing counted twice: the flush was rolled back
    from countercache import triggers

    with engine.begin() as c:
        triggers.execute(c, triggers.drop_statements(User.question_count.property.columns[0].info["countercache"],
                                                     c.dialect))
    from countercache.strategies.trigger import forget_verified

    forget_verified()
    with Session(engine) as s:  # its triggers gone: the ORM keeps it
        s.add(Question(id=2, user_id=1))
        s.commit()
    assert kept(engine)[1][0] == 2


@pytest.mark.parametrize("how", ["flush", "insert", "update", "delete"])
@pytest.mark.parametrize("strategy", ["bulk", "deferred"])
def test_a_counter_declared_away_from_trigger_over_its_triggers_fails_the_first_write(engine, schema, strategy, how):
    """The application now declares the counter with an ORM strategy, but the migration
    that drops its triggers was not written or not run (outside testers': autogenerate
    missed it in another schema; an ORM statement as the first write): the triggers and
    the ORM would both count. The first write of its rows fails, naming it (a flush, or
    an ORM statement before it runs), and nothing is kept."""
    with Session(engine) as s:
        s.add_all([schema[3](id=1, user_id=1), schema[3](id=2, user_id=2)])
        s.commit()
    Base, Forum, User, Question = models(strategy)  # (the same tables, declared anew)
    with Session(engine) as s:
        s.get(User, 1)  # (loaded: the statement's rows would be counted in memory too)
        with pytest.raises(countercache.CounterCacheError,
                           match=rf"User\.question_count: strategy '{strategy}' now, but the database .* still has"):
            if how == "flush":
                s.add(Question(id=3, user_id=1))
                s.commit()
            elif how == "insert":
                s.execute(insert(Question), [{"id": 3, "user_id": 1}])
            elif how == "update":
                s.execute(update(Question).where(Question.id == 1).values(user_id=2))
            else:
                s.execute(delete(Question).where(Question.id == 1))
        s.rollback()
    assert_exact(engine)
    assert kept(engine)[1][0] == 1


@pytest.mark.parametrize("method", ["bulk_insert_mappings", "bulk_save_objects", "bulk_update_mappings"])
def test_legacy_bulk_methods_leave_no_stale_counter_in_memory(engine, method):
    """The database counts the rows of the legacy bulk methods (no ORM event): the
    loaded users read their counters again after the call."""
    Base, Forum, User, Question = models()
    Base.metadata.create_all(engine)
    try:
        with Session(engine) as s:
            s.add_all([User(id=1), User(id=2), Question(id=10, user_id=1, score=2)])
            s.commit()
            one, two = s.get(User, 1), s.get(User, 2)
            assert (one.question_count, two.question_count) == (1, 0)
            if method == "bulk_insert_mappings":
                s.bulk_insert_mappings(Question, [{"id": 11, "user_id": 2, "score": 3}, {"id": 12, "user_id": 2}])
                expected = ((1, 2), (2, 3))
            elif method == "bulk_save_objects":
                s.bulk_save_objects([Question(id=11, user_id=2, score=3)])
                expected = ((1, 1), (2, 3))
            else:
                s.bulk_update_mappings(Question, [{"id": 10, "user_id": 2}])
                expected = ((0, 1), (0, 2))
            assert ((one.question_count, two.question_count), (one.score_total, two.score_total)) == expected
            s.commit()
        assert_exact(engine)
    finally:
        Base.metadata.drop_all(engine)
