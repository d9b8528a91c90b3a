"""``passive_deletes=True`` over ``ON DELETE CASCADE``, where ORM strategies read
what the database will delete (found by an outside tester):

* where the database runs no foreign key action (SQLite without ``PRAGMA
  foreign_keys=ON``, its default; MariaDB/MySQL under ``foreign_key_checks=0``;
  PostgreSQL under ``session_replication_role = replica``) the child rows stay,
  so no counter may lose them (SQLite counted them out);
* a ``trigger`` counter over the cascaded rows: a loaded parent shows the value
  the trigger left (it kept the old one in memory)."""

from __future__ import annotations

import contextlib

import pytest
from typing import Iterator, Optional

from sqlalchemy import ForeignKey, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache
from helpers import assert_counts, orm_kept_only_on_mariadb
from models import passive_links

WHY = "MariaDB refuses it: its foreign key actions fire no trigger (test_trigger_ddl checks the refusal)"


@contextlib.contextmanager
def actions_off(session: Session) -> Iterator[None]:
    """The session's transaction runs no foreign key action (SQLite: none by default)."""
    connection = session.connection()
    name = connection.dialect.name
    if name == "postgresql":
        connection.exec_driver_sql("SET LOCAL session_replication_role = replica")  # (ends with the transaction)
    elif name in ("mysql", "mariadb"):
        connection.exec_driver_sql("SET foreign_key_checks = 0")
    try:
        yield
    finally:
        if name in ("mysql", "mariadb"):
            connection.exec_driver_sql("SET foreign_key_checks = 1")


def enrolments(strategy: str):
    class Base(DeclarativeBase):
        pass

    class Student(Base):
        __tablename__ = "students"
        id: Mapped[int] = mapped_column(primary_key=True)
        enrolments: Mapped[list["Enrolment"]] = relationship()
        enrolment_count: Mapped[int] = counter_cache("enrolments", strategy=strategy)

    class Course(Base):
        __tablename__ = "courses"
        id: Mapped[int] = mapped_column(primary_key=True)
        enrolments: Mapped[list["Enrolment"]] = relationship(cascade="all, delete-orphan", passive_deletes=True)

    class Enrolment(Base):
        __tablename__ = "enrolments"
        id: Mapped[int] = mapped_column(primary_key=True)
        student_id: Mapped[Optional[int]] = mapped_column(ForeignKey("students.id"))
        course_id: Mapped[Optional[int]] = mapped_column(ForeignKey("courses.id", ondelete="CASCADE"))

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    return Base, Student, Course, Enrolment


def test_a_cascade_the_database_does_not_run_deletes_nothing(engine, strategy):
    orm_kept_only_on_mariadb(engine, strategy, WHY)
    Base, Student, Course, Enrolment = enrolments(strategy)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Student(id=1), Course(id=1), Course(id=2)])
        s.flush()
        s.add_all([Enrolment(student_id=1, course_id=1), Enrolment(student_id=1, course_id=1),
                   Enrolment(student_id=1, course_id=2)])
        s.commit()
    with Session(engine) as s:
        with actions_off(s):
            s.delete(s.get(Course, 1))  # enrolments not loaded: left to a cascade that does not run
            s.flush()
        s.commit()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM enrolments")).scalar() == 3
    assert assert_counts(engine, "students", "enrolment_count", "enrolments", "student_id") == {1: 3}


def test_links_a_cascade_the_database_does_not_run_leaves(engine, strategy):
    orm_kept_only_on_mariadb(engine, strategy, WHY)

    m = passive_links(strategy)
    Base, Tag, Post = m.Base, m.Tag, m.Post
    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        a, b = Tag(id=1), Tag(id=2)
        s.add_all([Post(id=1, tags=[a, b]), Post(id=2, tags=[a])])
        s.commit()
    with Session(engine) as s:
        with actions_off(s):
            s.delete(s.get(Post, 1))  # tags not loaded: its links are left to a cascade that does not run
            s.flush()
        s.commit()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM post_tags")).scalar() == 3
    assert assert_counts(engine, "tags", "post_count", "post_tags", "tag_id") == {1: 2, 2: 1}


@pytest.mark.parametrize("expire_on_commit", [True, False])
def test_a_trigger_counter_over_cascaded_rows_is_fresh_in_memory(engine, expire_on_commit):
    if engine.dialect.name in ("mysql", "mariadb"):
        pytest.skip("MariaDB refuses it: its foreign key actions fire no trigger (test_trigger_ddl checks the refusal)")
    Base, Student, Course, Enrolment = enrolments("trigger")
    if engine.dialect.name == "sqlite":
        from sqlalchemy import event

        event.listen(engine, "connect", lambda conn, record: conn.execute("PRAGMA foreign_keys=ON"))
        engine.dispose()
    Base.metadata.create_all(engine)
    with Session(engine, expire_on_commit=expire_on_commit) as s:
        student = Student(id=1)
        s.add_all([student, Course(id=1), Course(id=2)])
        s.flush()
        s.add_all([Enrolment(student_id=1, course_id=1), Enrolment(student_id=1, course_id=2)])
        s.commit()
        assert student.enrolment_count == 2
        s.delete(s.get(Course, 1))  # its enrolment goes by the database's cascade, counted by the trigger
        s.flush()
        assert student.enrolment_count == 1
        s.commit()
        assert student.enrolment_count == 1
    assert assert_counts(engine, "students", "enrolment_count", "enrolments", "student_id") == {1: 1}
