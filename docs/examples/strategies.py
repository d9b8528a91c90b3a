"""When each strategy writes: UPDATE statements on the parent table, counted.

One transaction, two flushes: the first adds 3 questions for 2 users, the
second moves one question and deletes another. Prints how many UPDATEs of
``users`` each strategy sent at each moment, and the counters in memory.
"""

from __future__ import annotations

from typing import Optional

from sqlalchemy import ForeignKey, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    questions: Mapped[list["Question"]] = relationship(back_populates="user")
    question_count: Mapped[int] = counter_cache("questions")


class Question(Base):
    __tablename__ = "questions"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), index=True)
    user: Mapped[Optional[User]] = relationship(back_populates="questions")


engine = create_engine("sqlite://")
Base.metadata.create_all(engine)
updates: list[str] = []


@event.listens_for(engine, "before_cursor_execute")
def count_updates(conn, cursor, statement, parameters, context, executemany):
    if statement.startswith("UPDATE users"):
        updates.append(statement)


print(f"{'strategy':<10}{'flush 1':>9}{'flush 2':>9}{'commit':>8}   counters after flush 2")
for strategy in ("bulk", "per_row", "deferred"):  # sharded: see sharded.py
    countercache.configure(default_strategy=strategy)
    assert countercache.configured_strategy(User.question_count) == strategy
    with Session(engine, expire_on_commit=False) as session:
        ada, bob = User(), User()
        session.add_all([ada, bob])
        session.commit()
        seen = []

        updates.clear()
        q1, q2, q3 = Question(user=ada), Question(user=ada), Question(user=bob)
        session.add_all([q1, q2, q3])
        session.flush()
        seen.append(len(updates))

        updates.clear()
        q1.user = bob
        session.delete(q2)
        session.flush()
        seen.append(len(updates))
        in_memory = (ada.question_count, bob.question_count)

        updates.clear()
        session.commit()
        seen.append(len(updates))
        assert (ada.question_count, bob.question_count) == (0, 2)
    print(f"{strategy:<10}{seen[0]:>9}{seen[1]:>9}{seen[2]:>8}   {in_memory}")

countercache.configure()  # back to the defaults
