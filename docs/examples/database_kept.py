"""Counters the database keeps: ``strategy="trigger"``.

``create_all()`` creates the triggers with the tables. Whatever writes the
answers (the ORM, a Core statement on a connection, raw SQL, a cascade),
the database keeps the counters in the same statement.
"""

from __future__ import annotations

from typing import Optional

from sqlalchemy import ForeignKey, create_engine, event, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache


class Base(DeclarativeBase):
    pass


class Question(Base):
    __tablename__ = "questions"
    id: Mapped[int] = mapped_column(primary_key=True)
    answers: Mapped[list["Answer"]] = relationship(back_populates="question", passive_deletes=True)
    answer_count: Mapped[int] = counter_cache("answers", strategy="trigger")
    accepted_count: Mapped[int] = counter_cache(
        "answers", strategy="trigger", where=lambda: Answer.accepted.is_(True))
    vote_total: Mapped[int] = counter_cache("answers", strategy="trigger", sum="votes")


class Answer(Base):
    __tablename__ = "answers"
    id: Mapped[int] = mapped_column(primary_key=True)
    question_id: Mapped[Optional[int]] = mapped_column(ForeignKey("questions.id", ondelete="CASCADE"))
    accepted: Mapped[bool] = mapped_column(default=False)
    votes: Mapped[int] = mapped_column(default=0)
    question: Mapped[Optional[Question]] = relationship(back_populates="answers")


engine = create_engine("sqlite://")


@event.listens_for(engine, "connect")
def _foreign_keys_on(dbapi_connection, record):  # SQLite enforces ON DELETE CASCADE only when asked
    dbapi_connection.execute("PRAGMA foreign_keys = ON")


Base.metadata.create_all(engine)  # the tables, then each counter's triggers

with Session(engine) as session:
    q1, q2 = Question(), Question()
    session.add_all([q1, q2, Answer(question=q1, votes=3), Answer(question=q1, votes=1, accepted=True)])
    session.flush()  # the ORM wrote no UPDATE of questions: the triggers did
    print("after the flush:", q1.answer_count, q1.accepted_count, q1.vote_total)
    session.commit()

with engine.begin() as connection:  # behind the ORM's back
    connection.execute(text("INSERT INTO answers (question_id, accepted, votes) VALUES (2, 0, 5), (2, 1, 2)"))
    connection.execute(insert(Answer.__table__).values(question_id=1, accepted=False, votes=4))
    connection.execute(text("UPDATE answers SET votes = votes + 10 WHERE question_id = 2"))

with Session(engine) as session:
    for q in session.scalars(select(Question).order_by(Question.id)):
        print(f"question {q.id}: {q.answer_count} answers, {q.accepted_count} accepted, {q.vote_total} votes")

with engine.begin() as connection:
    connection.execute(text("DELETE FROM questions WHERE id = 1"))  # its answers go by ON DELETE CASCADE

print("drift:", countercache.check(engine))
print("strategy:", countercache.configured_strategy(Question.answer_count))
