"""Writes the database may skip, or that replace other rows: every spelling
of INSERT IGNORE / OR IGNORE / OR REPLACE / an upsert on counted rows is
refused before it runs, on the database that renders it; UPDATE ... IGNORE is
counted exactly (rows read back); DELETE IGNORE and UPDATE OR REPLACE are
refused; on SQLite, a counted table declaring ON CONFLICT IGNORE/REPLACE is
refused at the flush or statement, and counted elsewhere."""

from __future__ import annotations

from typing import Optional

import pytest
from sqlalchemy import ForeignKey, String, UniqueConstraint, delete, insert, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.orm.exc import StaleDataError

import countercache
from countercache import counter_cache
from helpers import assert_counts, orm_kept_only


def models(strategy, *, child_conflict=None, parent_conflict=None):
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True, **(
            {"sqlite_on_conflict_primary_key": parent_conflict} if parent_conflict else {}))
        name: Mapped[str] = mapped_column(String(20), default="")
        questions: Mapped[list["Question"]] = relationship()
        question_count: Mapped[int] = counter_cache("questions", strategy=strategy)

    class Question(Base):
        __tablename__ = "questions"
        __table_args__ = (UniqueConstraint("user_id", "title", name="uq_user_title",
                                           **({"sqlite_on_conflict": child_conflict} if child_conflict else {})),)
        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str] = mapped_column(String(20), default="")
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))

    return Base, User, Question


def seeded(engine, strategy="bulk", **kw):
    """Users 1, 2, 3 with questions 1, 2 ("a", "b") of user 1 and 3 ("a") of user 2."""
    Base, User, Question = models(strategy, **kw)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        with countercache.suspended(s):
            s.add_all([User(id=i) for i in (1, 2, 3)])
            s.flush()
            s.add_all([Question(id=1, title="a", user_id=1), Question(id=2, title="b", user_id=1),
                       Question(id=3, title="a", user_id=2)])
            s.commit()
    countercache.reconcile(engine)
    return User, Question


ROW = [{"id": 3, "title": "x", "user_id": 3}]  # a key already there: skipped, or replacing question 3

INSERTS = {
    "sqlite": [
        ("OR IGNORE", lambda Q: insert(Q).prefix_with("OR IGNORE")),
        ("or ignore, lowercase", lambda Q: insert(Q).prefix_with("or ignore")),
        ("OR REPLACE", lambda Q: insert(Q).prefix_with("OR REPLACE")),
        ("OR IGNORE for sqlite", lambda Q: insert(Q).prefix_with("OR IGNORE", dialect="sqlite")),
        ("on_conflict_do_nothing", lambda Q: sqlite.insert(Q).on_conflict_do_nothing()),
        ("on_conflict_do_update", lambda Q: sqlite.insert(Q).on_conflict_do_update(
            index_elements=[Q.id], set_={"title": "y"})),
    ],
    "postgresql": [
        ("on_conflict_do_nothing", lambda Q: postgresql.insert(Q).on_conflict_do_nothing()),
        ("on_conflict_do_update", lambda Q: postgresql.insert(Q).on_conflict_do_update(
            index_elements=[Q.id], set_={"user_id": 3})),
    ],
    "mariadb": [
        ("IGNORE", lambda Q: insert(Q).prefix_with("IGNORE")),
        ("ignore, lowercase", lambda Q: insert(Q).prefix_with("ignore")),
        ("IGNORE for mysql", lambda Q: insert(Q).prefix_with("IGNORE", dialect="mysql")),
        ("mysql.insert IGNORE", lambda Q: mysql.insert(Q).prefix_with("IGNORE")),
        ("on_duplicate_key_update", lambda Q: mysql.insert(Q).on_duplicate_key_update(user_id=3)),
    ],
}


def test_insert_skipping_or_replacing_rows_refused(engine, backend, statements):
    """Every spelling the database in use has, each refused before anything runs."""
    User, Question = seeded(engine)
    for label, make in INSERTS[backend]:
        with Session(engine) as s:
            with statements.record() as rec, pytest.raises(countercache.CounterCacheError,
                                                           match=r"User\.question_count: (INSERT|an upsert)"):
                s.execute(make(Question), ROW)
            assert rec.sql() == [], label
    assert assert_counts(engine) == {1: 2, 2: 1, 3: 0}


def test_prefix_for_another_database_runs_and_is_counted(engine, backend, strategy):
    """A prefix the database in use does not render is no prefix: the statement runs as without countercache."""
    User, Question = seeded(engine, strategy)
    other = "sqlite" if backend != "sqlite" else "mysql"
    with Session(engine) as s:
        s.execute(insert(Question).prefix_with("IGNORE" if other == "mysql" else "OR IGNORE", dialect=other),
                  [{"id": 4, "title": "x", "user_id": 3}])
        s.commit()
    assert assert_counts(engine) == {1: 2, 2: 1, 3: 1}


@pytest.mark.sqlite_mariadb_only  # (PostgreSQL has no UPDATE ... IGNORE)
@pytest.mark.parametrize("by_key", [False, True])
def test_update_ignoring_conflicts_is_counted(engine, backend, strategy, by_key):
    """UPDATE IGNORE (MariaDB) / UPDATE OR IGNORE (SQLite): a row whose update
    would break a unique key is left as it was, and not counted as moved. (By
    key on SQLite, SQLAlchemy's own rowcount check raises StaleDataError for
    the row SQLite skipped: the statement fails as without countercache.)"""
    User, Question = seeded(engine, strategy)
    if backend == "mariadb" and strategy == "trigger":  # the skipped rows fire the AFTER UPDATE trigger too
        with Session(engine) as s, pytest.raises(countercache.CounterCacheError,
                                                 match=r"User\.question_count: UPDATE IGNORE fires"):
            s.execute(update(Question).prefix_with("IGNORE").where(Question.user_id == 1).values(user_id=2))
        assert assert_counts(engine) == {1: 2, 2: 1, 3: 0}
        return
    if backend == "sqlite" and by_key:
        with Session(engine) as s, pytest.raises(StaleDataError):
            s.execute(update(Question).prefix_with("OR IGNORE"), [{"id": 1, "user_id": 2}, {"id": 2, "user_id": 2}])
        assert assert_counts(engine) == {1: 2, 2: 1, 3: 0}
        return
    prefix = "IGNORE" if backend == "mariadb" else "OR IGNORE"
    with Session(engine) as s:
        if by_key:  # question 1 ("a") to user 2, who has an "a": skipped; question 2 ("b") moves
            s.execute(update(Question).prefix_with(prefix), [{"id": 1, "user_id": 2}, {"id": 2, "user_id": 2}])
        else:
            s.execute(update(Question).prefix_with(prefix).where(Question.user_id == 1).values(user_id=2))
        s.commit()
    assert assert_counts(engine) == {1: 1, 2: 2, 3: 0}


@pytest.mark.sqlite_only
def test_update_or_replace_refused(engine, backend):
    User, Question = seeded(engine)
    with Session(engine) as s, pytest.raises(countercache.CounterCacheError,
                                             match=r"User\.question_count: UPDATE OR REPLACE deletes the rows"):
        s.execute(update(Question).prefix_with("OR REPLACE").where(Question.id == 1).values(user_id=2))
    assert assert_counts(engine) == {1: 2, 2: 1, 3: 0}


@pytest.mark.mariadb_only
def test_delete_ignore_refused(engine, backend):
    User, Question = seeded(engine)
    with Session(engine) as s, pytest.raises(countercache.CounterCacheError,
                                             match=r"User\.question_count: DELETE IGNORE may leave rows"):
        s.execute(delete(Question).prefix_with("IGNORE").where(Question.user_id == 1))
    assert assert_counts(engine) == {1: 2, 2: 1, 3: 0}


@pytest.mark.parametrize("conflict", ["IGNORE", "REPLACE"])
def test_sqlite_table_conflict_clause(engine, backend, strategy, conflict):
    """SQLite's ON CONFLICT on a counted table skips or replaces rows a flush
    or statement counts: refused there, before anything is written; other
    databases ignore the option, and count."""
    orm_kept_only(strategy, "the database's triggers count the rows a conflict clause keeps (SQLite REPLACE: see docs/database.rst)")
    Base, User, Question = models(strategy, child_conflict=conflict)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([User(id=1), User(id=2)])
        s.commit()
        s.add(Question(id=1, title="a", user_id=1))
        if backend == "sqlite":
            with pytest.raises(countercache.CounterCacheError,
                               match=rf"User\.question_count: questions declares ON CONFLICT {conflict}, so SQLite"):
                s.flush()
            s.rollback()
            with pytest.raises(countercache.CounterCacheError, match=r"this INSERT writes; drop the ON CONFLICT"):
                s.execute(insert(Question), [{"id": 2, "user_id": 1}])
            with pytest.raises(countercache.CounterCacheError, match=r"this UPDATE writes"):
                s.execute(update(Question).values(user_id=2))
            with countercache.suspended(s):  # the way out: not counted, repaired
                s.add(Question(id=1, title="a", user_id=1))
                s.commit()
            countercache.reconcile(engine)
        else:
            s.execute(insert(Question), [{"id": 2, "title": "b", "user_id": 2}])
            s.commit()
    assert assert_counts(engine) == ({1: 1, 2: 0} if backend == "sqlite" else {1: 1, 2: 1})


@pytest.mark.sqlite_only
def test_sqlite_replace_on_a_parent_table(engine, backend):
    """A parent row replaced would start again at 0 with its children still there."""
    User, Question = seeded(engine, parent_conflict="REPLACE")
    with Session(engine) as s:
        with pytest.raises(countercache.CounterCacheError, match=r"User\.question_count: users declares ON CONFLICT"):
            s.add(User(id=1, name="again"))
            s.flush()
        s.rollback()
        with pytest.raises(countercache.CounterCacheError, match=r"User\.question_count: INSERT OR REPLACE"):
            s.execute(insert(User).prefix_with("OR REPLACE"), [{"id": 1}])
    assert assert_counts(engine) == {1: 2, 2: 1, 3: 0}


def test_statement_on_a_base_class_reaching_counted_subclasses(engine, backend):
    """insert(Post) whose rows become Questions (single-table inheritance):
    the same refusals as on the counted class itself."""
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        questions: Mapped[list["Question"]] = relationship()
        question_count: Mapped[int] = counter_cache("questions")

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)
        type: Mapped[str] = mapped_column(String(20))
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"))
        __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "post"}

    class Question(Post):
        __mapper_args__ = {"polymorphic_identity": "question"}

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(User(id=1))
        s.add(Question(id=1, user_id=1))
        s.commit()
        upsert = {"sqlite": lambda: sqlite.insert(Post).on_conflict_do_nothing(),
                  "postgresql": lambda: postgresql.insert(Post).on_conflict_do_nothing(),
                  "mariadb": lambda: insert(Post).prefix_with("IGNORE")}[backend]()
        with pytest.raises(countercache.CounterCacheError, match=r"User\.question_count: (an upsert|INSERT IGNORE)"):
            s.execute(upsert, [{"id": 1, "type": "question", "user_id": 1}])
    assert [d.pk for d in countercache.check(engine)] == []
