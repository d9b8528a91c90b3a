"""A multi-level counter: answers per user, through the user's questions."""

from __future__ import annotations

from typing import Optional

from sqlalchemy import ForeignKey, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    questions: Mapped[list["Question"]] = relationship(back_populates="user")

    # COUNT(*) of answers JOIN questions WHERE questions.user_id = users.id
    answer_count: Mapped[int] = counter_cache("questions.answers")
    # the same, accepted answers only (where= and sum= read the answers)
    accepted_count: Mapped[int] = counter_cache(
        "questions.answers", where=lambda: Answer.accepted.is_(True)
    )


class Question(Base):
    __tablename__ = "questions"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), index=True)
    user: Mapped[Optional[User]] = relationship(back_populates="questions")
    answers: Mapped[list["Answer"]] = relationship(back_populates="question", cascade="all, delete-orphan")


class Answer(Base):
    __tablename__ = "answers"
    id: Mapped[int] = mapped_column(primary_key=True)
    question_id: Mapped[Optional[int]] = mapped_column(ForeignKey("questions.id"), index=True)
    question: Mapped[Optional[Question]] = relationship(back_populates="answers")
    accepted: Mapped[bool] = mapped_column(default=False)


engine = create_engine("sqlite://")
Base.metadata.create_all(engine)


def show(session: Session, when: str) -> None:
    users = session.query(User).order_by(User.id).all()
    print(f"{when:<34}", "  ".join(f"{u.name}: {u.answer_count} ({u.accepted_count} accepted)" for u in users))


with Session(engine) as session:
    ada, bob = User(name="ada"), User(name="bob")
    q1 = Question(user=ada, answers=[Answer(), Answer(accepted=True)])
    q2 = Question(user=ada, answers=[Answer()])
    session.add_all([ada, bob, q1, q2])
    session.commit()
    show(session, "ada asks two questions:")

    q1.user = bob  # the question moves, its two answers with it
    session.commit()
    show(session, "q1 moves to bob:")

    q2.answers.append(Answer(accepted=True))
    session.commit()
    show(session, "q2 gets an accepted answer:")

    session.delete(q1)  # with its answers (cascade)
    session.commit()
    show(session, "q1 is deleted:")

print("drift:", countercache.check(engine))
with engine.connect() as conn:
    print(conn.execute(text(
        "SELECT u.name, count(a.id) FROM users u LEFT JOIN questions q ON q.user_id = u.id "
        "LEFT JOIN answers a ON a.question_id = q.id GROUP BY u.name ORDER BY u.name")).all())
