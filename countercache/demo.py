"""The example application behind ``countercache demo``: a small Q&A site.

Users ask questions; questions are answered, voted on, deleted and moved
between users in several transactions. Each user has three counters: all
questions (``question_count``), open ones only (a ``where=`` condition) and
the sum of their questions' scores (``sum=``). Afterwards each counter is
shown beside its real value, with the statements each strategy emitted.
With ``sharded``, :func:`countercache.exact` is compared with the real
values first, then :func:`countercache.fold` brings the columns up to date.

What it writes: the tables ``users``, ``questions`` and ``countercache_shards``
(and ``alembic_version`` with ``migrate``), which it drops and re-creates on
every run, and a marker table ``countercache_demo`` saying the database is
the demo's. It refuses (:class:`~countercache.CounterCacheError`, before
writing anything) a database that holds any other table or view, or these
tables without the marker: it never drops what it did not create.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

from sqlalchemy import Column, Engine, ForeignKey, MetaData, String, Table, event, inspect, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from . import configure
from .errors import CounterCacheError
from .installation import counter_cache
from .shards import exact, fold
from .sidetable import shard_table
from .strategies import STRATEGY_CLASSES


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
    open_question_count: Mapped[int] = counter_cache("questions", where=lambda: Question.status == "open")
    score_total: Mapped[int] = counter_cache("questions", sum="score")


class Question(Base):
    __tablename__ = "questions"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), index=True)
    user: Mapped[Optional[User]] = relationship(back_populates="questions")
    status: Mapped[str] = mapped_column(String(20), default="open", server_default="open")
    score: Mapped[int] = mapped_column(default=0, server_default="0")


#: The side table of the ``sharded`` strategy (``countercache demo --strategy sharded``).
shard_table(Base.metadata)

#: The counters the demo shows, with the SQL that computes each one's real value.
COUNTERS = {
    "question_count": "SELECT count(*) FROM questions WHERE user_id = :u",
    "open_question_count": "SELECT count(*) FROM questions WHERE user_id = :u AND status = 'open'",
    "score_total": "SELECT coalesce(sum(score), 0) FROM questions WHERE user_id = :u",
}


NAMES = ["ada", "grace", "linus", "guido", "barbara"]

#: The marker table: the demo only writes to an empty database or one holding it.
MARKER = Table("countercache_demo", MetaData(), Column("note", String(100)))
#: Every table the demo may create (and so drop): its models, the version
#: table of ``--migrate``, the marker.
TABLES = frozenset([*Base.metadata.tables, "alembic_version", MARKER.name])


def claim(engine: Engine) -> None:
    """Make sure the database at ``engine`` is the demo's, before writing anything.

    An empty database gets the marker table; one holding the marker and
    nothing but the demo's tables is the demo's; anything else raises a
    :class:`CounterCacheError` naming the tables the demo did not create.
    """
    insp = inspect(engine)
    found = set(insp.get_table_names()) | set(insp.get_view_names())
    foreign = sorted(found - TABLES) if MARKER.name in found else sorted(found)
    if foreign:
        where = engine.url.render_as_string()
        raise CounterCacheError(
            f"the database at {where} holds tables the demo did not create ({', '.join(foreign)}); "
            "the demo drops and re-creates its tables, so it runs only on an empty database "
            "(or one it created before): point --url at an empty database"
        )
    if not found:
        with engine.begin() as conn:
            MARKER.create(conn)
            conn.execute(MARKER.insert().values(note="created by countercache demo"))


@dataclass
class Run:
    strategy: str
    transactions: int = 0
    statements: dict[str, int] = field(default_factory=dict)
    #: (user name, {counter: (stored, real)})
    rows: list[tuple[str, dict[str, tuple[int, int]]]] = field(default_factory=list)
    #: ``sharded``: shard rows folded into the columns at the end, and
    #: whether countercache.exact() read the real values before that
    folded: int | None = None
    exact_before_fold: bool = True

    @property
    def exact(self) -> bool:
        return self.exact_before_fold and all(
            stored == real for _, values in self.rows for stored, real in values.values())


def upgrade_schema(engine: Engine) -> None:
    """Drop the example's tables and run ``alembic upgrade head`` with ``migrations/``.

    ``migrations/`` is the example's Alembic environment in the source
    checkout (next to ``countercache/``). Call :func:`claim` first.
    """
    from pathlib import Path

    from alembic import command
    from alembic.config import Config

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
    :func:`upgrade_schema`) instead of ``create_all()``. Refuses a database
    that is not the demo's (see :func:`claim`).
    """
    claim(engine)
    configure(default_strategy=strategy)
    if migrate:
        upgrade_schema(engine)
    else:
        Base.metadata.drop_all(engine)
        Table("alembic_version", MetaData()).drop(engine, checkfirst=True)
        Base.metadata.create_all(engine)
    result = Run(strategy)
    rng = random.Random(seed)

    def count(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        kind = statement.split(None, 1)[0].upper()
        if kind == "INSERT" and "countercache_shards" in statement.split("(")[0]:
            kind = "INSERT countercache_shards (upserts)"
        elif kind == "UPDATE" and statement.split("SET")[0].strip().split()[1].strip('"`') == "users":
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
                # answer some (they leave the open count) and vote on others
                for q in session.scalars(select(Question).order_by(Question.id).limit(12)):
                    if rng.random() < 0.3:
                        q.status = "answered"
                    else:
                        q.score += rng.choice((-1, 1, 2))
                session.commit()
                result.transactions += 1
            if STRATEGY_CLASSES[strategy].uses_shard_table:
                # the columns lag by the pending shard deltas; exact() adds them,
                # and fold() moves them into the columns
                result.exact_before_fold = all(
                    exact(session, user, name) == int(session.scalar(text(sql), {"u": user.id}) or 0)
                    for user in users for name, sql in COUNTERS.items())
                session.commit()
                result.folded = fold(engine)
            for user in users:
                values = {}
                for name, sql in COUNTERS.items():
                    real = session.scalar(text(sql), {"u": user.id}) or 0
                    values[name] = (getattr(user, name), int(real))
                result.rows.append((user.name, values))
    finally:
        event.remove(engine, "before_cursor_execute", count)
        configure()
    return result
