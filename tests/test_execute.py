"""countercache's own statements take a shorter way than ``Connection.execute``
where nothing can tell the difference (``countercache/_execute.py``), and
SQLAlchemy's own way wherever something watches or changes statements.

Each test makes engines of its own: a listener, once added to an engine,
leaves it flagged for good.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import CheckConstraint, ForeignKey, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import _execute, counter_cache

ORM_STRATEGIES = ("bulk", "per_row", "deferred", "sharded")


@pytest.fixture
def fresh(backend: str, engine: sa.Engine, tmp_path: Any) -> Iterator[Any]:
    """``fresh(**create_engine options)``: a new engine on the test's database,
    with no listener of the test suite's."""
    made: list[sa.Engine] = []

    def make(**options: Any) -> sa.Engine:
        new = sa.create_engine(engine.url.render_as_string(hide_password=False), **options)
        made.append(new)
        return new

    yield make
    for new in made:
        new.dispose()


def compiled(engine: sa.Engine) -> list[Any]:
    """What the short way compiled for the engine's dialect: (statement, SQL, order, usable)."""
    return list(_execute._compiled.get(engine.dialect, {}).values())


def declare(strategy: str, limit: int = 1000) -> Any:
    class Base(DeclarativeBase):
        pass

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)

    class Post(Base):
        __tablename__ = "exe_posts"
        __table_args__ = (CheckConstraint(f"likes <= {limit}", name="exe_likes_limit"),)
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        likes: Mapped[int] = counter_cache("post_likes", strategy=strategy)
        post_likes: Mapped[list[Like]] = relationship()

    class Like(Base):
        __tablename__ = "exe_likes"
        id: Mapped[int] = mapped_column(primary_key=True)
        post_id: Mapped[int] = mapped_column(ForeignKey("exe_posts.id"))

    sa.orm.configure_mappers()
    return Base, Post, Like


def prepare(engine: sa.Engine, strategy: str, limit: int = 1000) -> Any:
    Base, Post, Like = declare(strategy, limit)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Post(id=1), Post(id=2)])
        session.commit()
    return Post, Like


def exact(engine: sa.Engine, post_id: int) -> tuple[int, int]:
    """(the counter, exact for sharded too; the real count)."""
    with engine.connect() as connection:
        column = connection.execute(sa.text("SELECT likes FROM exe_posts WHERE id = :i"), {"i": post_id}).scalar_one()
        shards = 0
        if sa.inspect(connection).has_table("countercache_shards"):
            shards = connection.execute(sa.text(
                "SELECT coalesce(sum(delta), 0) FROM countercache_shards WHERE parent_key = :k"),
                {"k": str(post_id)}).scalar_one()
        real = connection.execute(sa.text("SELECT count(*) FROM exe_likes WHERE post_id = :i"),
                                  {"i": post_id}).scalar_one()
    return int(column) + int(shards), int(real)


def work(engine: sa.Engine, Like: Any) -> None:
    """Inserts, a delete and a move, in three transactions."""
    with Session(engine) as session:
        session.add_all([Like(id=1, post_id=1), Like(id=2, post_id=1), Like(id=3, post_id=2)])
        session.commit()
    with Session(engine) as session:
        session.delete(session.get(Like, 2))
        session.commit()
    with Session(engine) as session:
        session.get(Like, 3).post_id = 1
        session.add(Like(id=4, post_id=2))
        session.commit()


@pytest.mark.parametrize("strategy", ORM_STRATEGIES)
def test_counts_exact_the_short_way(backend, fresh, strategy):
    engine = fresh()
    Post, Like = prepare(engine, strategy)
    _execute._compiled.pop(engine.dialect, None)
    work(engine, Like)
    assert exact(engine, 1) == (2, 2) and exact(engine, 2) == (1, 1)
    # the short way was taken: the write's statement is compiled and kept by it
    assert any("exe_posts" in entry[1] or "countercache_shards" in entry[1]
               for entry in compiled(engine))
    if backend == "postgresql":  # the delete's and the move's locking pre-read too (one array of keys)
        reads = [entry for entry in compiled(engine) if "FOR UPDATE" in entry[1] and "exe_likes" in entry[1]]
        assert reads and all(entry[3] for entry in reads)


@pytest.mark.parametrize("strategy", ORM_STRATEGIES)
def test_listeners_and_logging_still_see_every_counter_write(backend, fresh, strategy, caplog):
    """A ``before_cursor_execute`` listener and SQL logging see the counter's
    writes with their parameters, as any statement's."""
    engine = fresh()
    Post, Like = prepare(engine, strategy)
    seen: list[tuple[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> None:
        seen.append((statement, parameters))

    with Session(engine) as session:
        session.add_all([Like(post_id=1), Like(post_id=1)])
        session.commit()
    target = "countercache_shards" if strategy == "sharded" else "exe_posts"
    writes = [(s, p) for s, p in seen if target in s and not s.lstrip().upper().startswith(("SELECT", "CREATE"))]
    assert writes, seen
    assert len(writes) == (2 if strategy == "per_row" else 1), writes

    logged = fresh(echo=True)
    with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"):
        with Session(logged) as session:
            session.add(Like(post_id=2))
            session.commit()
    assert any(target in record.getMessage() and "INSERT INTO exe_likes" not in record.getMessage()
               for record in caplog.records), [r.getMessage() for r in caplog.records]
    assert exact(engine, 1) == (2, 2) and exact(engine, 2) == (1, 1)


@pytest.mark.parametrize("strategy", ("bulk", "per_row", "deferred"))
def test_failed_counter_write_raises_sqlalchemys_error_and_keeps_nothing(backend, fresh, strategy):
    """The counter column's CHECK fails: the error is SQLAlchemy's (as from
    ``Connection.execute``), ``handle_error`` listeners are not needed for it,
    the transaction keeps nothing, and the connection is usable after."""
    engine = fresh(pool_size=1, max_overflow=0)
    Post, Like = prepare(engine, strategy, limit=2)
    with Session(engine) as session:
        session.add_all([Like(post_id=1), Like(post_id=1), Like(post_id=1), Like(post_id=2)])
        with pytest.raises(DBAPIError, match="exe_likes_limit"):  # (MariaDB: an OperationalError)
            session.commit()
        session.rollback()
    assert exact(engine, 1) == (0, 0) and exact(engine, 2) == (0, 0)
    with Session(engine) as session:  # (the one pooled connection, usable)
        session.add_all([Like(post_id=1), Like(post_id=1)])
        session.commit()
    assert exact(engine, 1) == (2, 2)


def test_handle_error_listener_sees_a_failed_counter_write(backend, fresh):
    engine = fresh()
    Post, Like = prepare(engine, "bulk", limit=0)
    caught: list[Any] = []

    @event.listens_for(engine, "handle_error")
    def on_error(context: Any) -> None:
        caught.append(context.statement)

    with Session(engine) as session:
        session.add(Like(post_id=1))
        with pytest.raises(DBAPIError):
            session.commit()
    assert any("exe_posts" in (s or "") for s in caught), caught


def test_schema_translate_map_takes_sqlalchemys_way(backend, fresh):
    """A connection with a ``schema_translate_map`` compiles every statement
    through it; the counter's writes are not compiled apart from it."""
    engine = fresh()
    Post, Like = prepare(engine, "bulk")
    mapped = engine.execution_options(schema_translate_map={None: None})
    before = len(compiled(engine))
    with Session(mapped) as session:
        session.add(Like(post_id=1))
        session.commit()
    assert len(compiled(engine)) == before
    assert exact(engine, 1) == (1, 1)


@pytest.mark.parametrize("strategy", ("bulk", "per_row"))
def test_loaded_parent_gets_the_new_value_read_back(backend, fresh, strategy):
    """The write's ``RETURNING`` (PostgreSQL, SQLite) read the short way sets the
    loaded parent's counter; MariaDB expires it instead."""
    engine = fresh()
    Post, Like = prepare(engine, strategy)
    _execute._compiled.pop(engine.dialect, None)
    with Session(engine) as session:
        post = session.get(Post, 1)
        session.add(Like(post_id=1))
        session.flush()
        assert post.likes == 1
        session.add_all([Like(post_id=1), Like(post_id=1), Like(post_id=2)])
        session.flush()
        assert post.likes == 3 and session.get(Post, 2).likes == 1
        session.commit()
    assert exact(engine, 1) == (3, 3)
    if backend != "mariadb":
        assert any("RETURNING" in entry[1] and entry[3] for entry in compiled(engine))


@pytest.mark.parametrize("strategy", ORM_STRATEGIES)
def test_moves_and_deletes_on_an_engine_made_by_execution_options(backend, fresh, strategy):
    """SQLAlchemy 2.0.29 refuses a listener on a connection of such an engine
    ("No such event"): a flush that moved rows raised there (the pre-read
    listens for the next statement); on newer ones this is the plain case."""
    engine = fresh()
    Post, Like = prepare(engine, strategy)
    view = engine.execution_options(isolation_level="READ COMMITTED") if backend != "sqlite" \
        else engine.execution_options()
    work(view, Like)
    assert exact(engine, 1) == (2, 2) and exact(engine, 2) == (1, 1)
    with Session(view) as session:  # (and once more, the listener already in place)
        session.get(Like, 1).post_id = 2
        session.commit()
    assert exact(engine, 1) == (1, 1) and exact(engine, 2) == (2, 2)
