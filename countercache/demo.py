"""The example application behind ``countercache demo``: a small Q&A site.

Users ask questions; questions are deleted and moved between users in
several transactions; afterwards each user's ``question_count`` is shown
beside the real count, with the statements each strategy emitted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

from sqlalchemy import Engine, ForeignKey, String, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from . import configure
from .declaration import counter_cache


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    questions: Mapped[list["Question"]] = relationship(
        back_populates="user", cascade="all, delete-orphan"
    )
    question_count: Mapped[int] = counter_cache("questions")


class Question(Base):
    __tablename__ = "questions"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), index=True)
    user: Mapped[Optional[User]] = relationship(back_populates="questions")


NAMES = ["ada", "grace", "linus", "guido", "barbara"]


@dataclass
class Run:
    strategy: str
    transactions: int = 0
    statements: dict[str, int] = field(default_factory=dict)
    rows: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return all(stored == real for _, stored, real in self.rows)


def upgrade_schema(engine: Engine) -> None:
    """Drop the example's tables and run ``alembic upgrade head`` with ``migrations/``.

    ``migrations/`` is the example's Alembic environment in the source
    checkout (next to ``countercache/``).
    """
    from pathlib import Path

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import MetaData, Table

    from .errors import CounterCacheError

    script_location = Path(__file__).resolve().parent.parent / "migrations"
    if not (script_location / "env.py").is_file():
        raise CounterCacheError(
            f"the example's migrations are not at {script_location}: --migrate runs from a "
            "source checkout (pip install -e .)"
        )
    Base.metadata.drop_all(engine)
    Table("alembic_version", MetaData()).drop(engine, checkfirst=True)
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def run(engine: Engine, strategy: str, seed: int = 7, *, migrate: bool = False) -> Run:
    """Reset the schema, play the scripted workload with ``strategy``, report.

    With ``migrate``, the schema comes from ``alembic upgrade head`` (see
    :func:`upgrade_schema`) instead of ``create_all()``.
    """
    configure(default_strategy=strategy)
    if migrate:
        upgrade_schema(engine)
    else:
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
    result = Run(strategy)
    rng = random.Random(seed)

    def count(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        kind = statement.split(None, 1)[0].upper()
        if kind == "UPDATE" and "question_count" in statement:
            kind = "UPDATE users (counters)"
        elif kind == "UPDATE":
            kind = "UPDATE questions (moves)"
        result.statements[kind] = result.statements.get(kind, 0) + 1

    event.listen(engine, "before_cursor_execute", count)
    try:
        with Session(engine) as session:
            users = [User(name=n) for n in NAMES]
            session.add_all(users)
            session.commit()
            result.transactions += 1
            for round_ in range(6):
                # ask: a burst of questions, some through the relationship,
                # some through the foreign key
                for i in range(rng.randint(5, 15)):
                    author = rng.choice(users)
                    if i % 2:
                        author.questions.append(Question(title=f"q{round_}.{i}"))
                    else:
                        session.add(Question(title=f"q{round_}.{i}", user_id=author.id))
                session.flush()
                # delete a few (an autoflushing query picks them)
                ids = session.scalars(select(Question.id).order_by(Question.id)).all()
                for qid in rng.sample(ids, 3):
                    session.delete(session.get(Question, qid))
                # move a few between users
                for q in session.scalars(select(Question).order_by(Question.id.desc()).limit(4)):
                    q.user = rng.choice(users)
                session.commit()
                result.transactions += 1
            for user in users:
                real = session.scalar(select(func.count()).where(Question.user_id == user.id))
                result.rows.append((user.name, user.question_count, real or 0))
    finally:
        event.remove(engine, "before_cursor_execute", count)
        configure()
    return result
