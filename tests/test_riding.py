"""The commit-time write riding with the COMMIT (psycopg 3, PostgreSQL): one message, ``<writes>; COMMIT``.

Round trips are counted by the benchmark's loopback proxy (``bench/latency.py``,
no delay): what the database saw, not what the library thinks it sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import PG_HOST, PG_PORT, PG_URL
from sqlalchemy import CheckConstraint, ForeignKey, event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from bench.latency import LatencyProxy
from countercache import counter_cache

STRATEGIES = ("deferred", "sharded", "bulk")

pytestmark = pytest.mark.postgresql_only  # (psycopg 3)


@pytest.fixture(scope="module")
def proxy(_pg_engine: sa.Engine) -> Iterator[LatencyProxy]:
    with LatencyProxy(PG_HOST, PG_PORT, 0) as px:
        yield px


@pytest.fixture
def through_proxy(proxy: LatencyProxy) -> Iterator[sa.Engine]:
    engine = sa.create_engine(proxy.url(PG_URL))
    yield engine
    engine.dispose()


def normal(dbapi_connection: Any) -> bool:
    """Not recording, outside any pipeline, with psycopg's own cursors."""
    import psycopg

    return (dbapi_connection._pipeline is None and dbapi_connection.cursor_factory is psycopg.Cursor
            and not hasattr(dbapi_connection, "_countercache_recorded"))


def declare(strategy: str | None) -> Any:
    class Base(DeclarativeBase):
        pass

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)

    class Post(Base):
        __tablename__ = "ride_posts"
        __table_args__ = (CheckConstraint("likes >= 0", name="ride_likes_not_negative"),)
        id: Mapped[int] = mapped_column(primary_key=True)
        if strategy is None:
            likes: Mapped[int] = mapped_column(default=0)
        else:
            likes: Mapped[int] = counter_cache("post_likes", strategy=strategy)  # type: ignore[no-redef]
        post_likes: Mapped[list[Like]] = relationship(back_populates="post")

    class Like(Base):
        __tablename__ = "ride_likes"
        id: Mapped[int] = mapped_column(primary_key=True)
        post_id: Mapped[int] = mapped_column(ForeignKey("ride_posts.id"))
        post: Mapped[Post] = relationship(back_populates="post_likes")

    sa.orm.configure_mappers()
    return Base, Post, Like


@pytest.fixture
def models(backend: str, _pg_engine: sa.Engine) -> Iterator[Any]:
    made: list[Any] = []

    def make(strategy: str | None) -> Any:
        found = declare(strategy)
        with _pg_engine.begin() as connection:
            for base in made:
                base.metadata.drop_all(connection)
            found[0].metadata.drop_all(connection)
            found[0].metadata.create_all(connection)
            connection.execute(found[1].__table__.insert(), [{"id": 1, "likes": 0}, {"id": 2, "likes": 0}])
        made.append(found[0])
        return found

    yield make
    with _pg_engine.begin() as connection:
        for base in made:
            base.metadata.drop_all(connection)


def counted(engine: sa.Engine, post_id: int = 1) -> tuple[int, int]:
    """(the counter as the database has it, exact for sharded too; the real count)."""
    with engine.connect() as connection:
        column = connection.execute(sa.text("SELECT likes FROM ride_posts WHERE id = :i"), {"i": post_id}).scalar_one()
        shards = 0
        if sa.inspect(connection).has_table("countercache_shards"):
            shards = connection.execute(sa.text(
                "SELECT coalesce(sum(delta), 0) FROM countercache_shards WHERE parent_key = :k"),
                {"k": str(post_id)}).scalar_one()
        real = connection.execute(sa.text("SELECT count(*) FROM ride_likes WHERE post_id = :i"),
                                  {"i": post_id}).scalar_one()
    return int(column) + int(shards), int(real)


def round_trips(proxy: LatencyProxy, engine: sa.Engine, work: Any, times: int = 3, warm: int = 6) -> float:
    for _ in range(warm):  # the connection exists, statements are cached and prepared
        work()  # (psycopg prepares a statement on its 5th run: a round trip of its own, once)
    before = proxy.round_trips
    for _ in range(times):
        work()
    return (proxy.round_trips - before) / times


def insert_one(engine: sa.Engine, Like: Any) -> Any:
    def work() -> None:
        with Session(engine) as session:
            session.add(Like(post_id=1))
            session.commit()
    return work


def test_insert_costs_the_round_trips_of_no_counter(proxy, through_proxy, models):
    """BEGIN, INSERT, COMMIT: 3 round trips without a counter; deferred and
    sharded add none (their write rides with the COMMIT), bulk one."""
    found = {}
    for strategy in (None, *STRATEGIES):
        countercache._reset_for_tests()
        sa.orm.clear_mappers()
        _, _, Like = models(strategy)
        found[strategy] = round_trips(proxy, through_proxy, insert_one(through_proxy, Like))
        if strategy is not None:
            assert counted(through_proxy)[0] == counted(through_proxy)[1], (strategy, found)
    assert found[None] == 3
    assert found["deferred"] == found[None]
    assert found["sharded"] == found[None]
    assert found["bulk"] <= found[None] + 1


@pytest.mark.parametrize("strategy", ["deferred", "sharded"])
def test_delete_and_move_cost_at_most_one_more(proxy, through_proxy, models, strategy):
    """A loaded child deleted or moved: at most the locking pre-read more than without a counter."""
    found = {}
    for kind in (None, strategy):
        countercache._reset_for_tests()
        sa.orm.clear_mappers()
        _, _, Like = models(kind)
        with Session(through_proxy) as session:
            session.add_all([Like(post_id=1) for _ in range(20)])
            session.commit()
        with Session(through_proxy, expire_on_commit=False) as session:
            likes = list(session.scalars(sa.select(Like).order_by(Like.id)))
        it = iter(likes)

        def delete() -> None:
            with Session(through_proxy) as session:
                session.delete(session.merge(next(it), load=False))
                session.commit()

        def move() -> None:
            with Session(through_proxy) as session:
                like = session.merge(next(it), load=False)
                like.post_id = 2
                session.commit()

        found[(kind, "delete")] = round_trips(proxy, through_proxy, delete, times=2, warm=6)
        found[(kind, "move")] = round_trips(proxy, through_proxy, move, times=2, warm=6)
        if kind is not None:
            for post in (1, 2):
                assert counted(through_proxy, post)[0] == counted(through_proxy, post)[1]
    for what in ("delete", "move"):
        assert found[(strategy, what)] <= found[(None, what)] + 1, found


@pytest.mark.parametrize("strategy", ["deferred", "sharded"])
def test_write_is_still_one_statement_and_seen_by_events(through_proxy, models, strategy):
    """The statements go through SQLAlchemy as before (recorded there, then sent with the
    COMMIT): events see each once, with its parameters."""
    _, _, Like = models(strategy)
    seen: list[str] = []

    @event.listens_for(through_proxy, "before_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        seen.append(statement)

    with Session(through_proxy) as session:
        session.add_all([Like(post_id=1), Like(post_id=1), Like(post_id=2)])
        session.commit()
    target = "ride_posts" if strategy == "deferred" else "countercache_shards"
    writes = [s for s in seen if target in s and not s.lstrip().upper().startswith("SELECT")]
    assert len(writes) == 1, seen
    assert counted(through_proxy, 1) == (2, 2) and counted(through_proxy, 2) == (1, 1)


def test_failed_write_fails_the_commit_and_keeps_nothing(through_proxy, models):
    """The counter's CHECK fails in the COMMIT's message: the COMMIT fails with it,
    the child row is not kept, and the connection goes back to normal."""
    _, Post, Like = models("deferred")
    with through_proxy.begin() as connection:  # a counter already wrong: a delete takes it below 0
        connection.execute(Like.__table__.insert(), [{"id": 100, "post_id": 1}])
    with Session(through_proxy) as session:
        session.delete(session.get(Like, 100))
        session.add(Like(post_id=2))
        with pytest.raises(IntegrityError, match="ride_likes_not_negative"):
            session.commit()
        session.rollback()
    with through_proxy.connect() as connection:
        assert normal(connection.connection.dbapi_connection)
        assert connection.execute(sa.text("SELECT count(*) FROM ride_likes")).scalar_one() == 1
        assert connection.execute(sa.text("SELECT likes FROM ride_posts WHERE id = 2")).scalar_one() == 0
    insert_one(through_proxy, Like)()  # and the next transaction rides again
    assert counted(through_proxy, 1) == (1, 2)  # (the row inserted behind its back is not counted)


def test_other_before_commit_listeners_run_first_and_are_counted(through_proxy, models):
    _, Post, Like = models("deferred")
    with Session(through_proxy) as session:
        @event.listens_for(session, "before_commit")
        def add_one_more(s: Session) -> None:
            s.add(Like(post_id=1))
            s.flush()

        session.add(Like(post_id=1))
        session.commit()
    assert counted(through_proxy) == (2, 2)


@pytest.mark.parametrize("expire_on_commit", [True, False])
def test_loaded_parent_is_fresh_after_the_commit(through_proxy, models, expire_on_commit):
    _, Post, Like = models("deferred")
    with Session(through_proxy, expire_on_commit=expire_on_commit) as session:
        post = session.get(Post, 1)
        assert post.likes == 0
        after: list[int] = []

        @event.listens_for(session, "after_commit")
        def read(s: Session) -> None:
            after.append(post.__dict__.get("likes", "expired"))

        session.add_all([Like(post_id=1), Like(post_id=1)])
        session.commit()
        assert post.likes == 2
        assert after[0] in (2, "expired")  # never the stale 0


def test_connections_return_to_the_pool_as_they_were(through_proxy, models):
    _, Post, Like = models("sharded")
    for _ in range(3):
        insert_one(through_proxy, Like)()
        with through_proxy.connect() as connection:
            assert normal(connection.connection.dbapi_connection)
    with Session(through_proxy) as session:  # a rollback after the writes were held
        session.add(Like(post_id=1))
        session.flush()
        session.rollback()
    with through_proxy.connect() as connection:
        assert normal(connection.connection.dbapi_connection)
    assert counted(through_proxy) == (3, 3)


def test_no_listener_on_the_engine_or_its_pool(through_proxy, models):
    """Riding puts nothing on the engine: its statements dispatch no events."""
    _, _, Like = models("deferred")
    insert_one(through_proxy, Like)()
    assert not through_proxy._has_events
    assert not through_proxy.dialect._has_events
    assert not through_proxy.pool.dispatch.reset

def test_failed_write_made_as_statements_at_the_commit_keeps_nothing(through_proxy, models):
    """A loaded parent the commit does not expire: its new value is asked for,
    so the write is made as statements at the last moment; its failure fails
    the commit just the same."""
    _, Post, Like = models("deferred")
    with through_proxy.begin() as connection:
        connection.execute(Like.__table__.insert(), [{"id": 100, "post_id": 1}])
    with Session(through_proxy, expire_on_commit=False) as session:
        session.get(Post, 1)
        session.delete(session.get(Like, 100))
        with pytest.raises(IntegrityError, match="ride_likes_not_negative"):
            session.commit()
        session.rollback()
    assert counted(through_proxy, 1) == (0, 1)
    with Session(through_proxy, expire_on_commit=False) as session:
        post = session.get(Post, 1)
        session.add(Like(post_id=1))
        session.commit()
        assert post.__dict__["likes"] == 1  # from RETURNING, no expiry


REFUSE = """CREATE OR REPLACE FUNCTION ride_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'counter write refused'; END $$"""


@pytest.mark.parametrize("strategy", ["deferred", "sharded"])
@pytest.mark.parametrize("expire_on_commit", [True, False])
def test_failed_write_leaves_the_pooled_connection_usable(proxy, models, strategy, expire_on_commit):
    """No explicit rollback, one pooled connection: the failed commit must not
    hand the next transaction a connection still inside the aborted one
    (SQLAlchemy takes a failed commit for an ended transaction). Found by an
    outside tester."""
    _, Post, Like = models(strategy)
    engine = sa.create_engine(proxy.url(PG_URL), pool_size=1, max_overflow=0)
    target = "ride_posts" if strategy == "deferred" else "countercache_shards"
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(REFUSE)
            connection.exec_driver_sql(f"CREATE TRIGGER ride_refuse BEFORE UPDATE OR INSERT ON {target} "
                                       "FOR EACH ROW EXECUTE FUNCTION ride_refuse()")
        for _ in range(3):
            with Session(engine, expire_on_commit=expire_on_commit) as session:
                if not expire_on_commit:
                    session.get(Post, 1)  # (a loaded parent: its new value is asked for, no pipeline)
                session.add_all([Like(post_id=1), Like(post_id=2)])
                with pytest.raises(sa.exc.DBAPIError, match="counter write refused"):
                    session.commit()
            with Session(engine) as session:  # the same connection, at once
                assert session.scalar(sa.select(sa.func.count()).select_from(Like)) == 0
        with engine.begin() as connection:
            connection.exec_driver_sql(f"DROP TRIGGER ride_refuse ON {target}")
        insert_one(engine, Like)()
        with engine.connect() as connection:
            assert normal(connection.connection.dbapi_connection)
        assert counted(engine) == (1, 1)
    finally:
        engine.dispose()


def trips_against_none(proxy: LatencyProxy, engine: sa.Engine, models: Any, strategy: str,
                       post_ids: list[int]) -> dict[str | None, float]:
    """Round trips of a transaction adding one like per id in ``post_ids``,
    without a counter and with ``strategy``."""
    found: dict[str | None, float] = {}
    for kind in (None, strategy):
        countercache._reset_for_tests()
        sa.orm.clear_mappers()
        _, _, Like = models(kind)

        def work() -> None:
            with Session(engine) as session:
                session.add_all([Like(post_id=p) for p in post_ids])
                session.commit()

        found[kind] = round_trips(proxy, engine, work)
    return found


def test_sharded_rows_of_several_parents_ride_together(proxy, through_proxy, models):
    """Several shard rows: one multi-row upsert, queued (psycopg's executemany
    would wait for its answers), still no round trip of its own."""
    found = trips_against_none(proxy, through_proxy, models, "sharded", [1, 2])
    assert found["sharded"] == found[None], found
    assert counted(through_proxy, 1) == (9, 9) and counted(through_proxy, 2) == (9, 9)


def test_bulk_flush_of_several_parents_costs_one_round_trip_more(proxy, through_proxy, models):
    """The key-ordered lock and the UPDATE after it, nothing read from
    either: sent together (psycopg pipeline), one round trip."""
    found = trips_against_none(proxy, through_proxy, models, "bulk", [1, 2, 2])
    assert found["bulk"] == found[None] + 1, found
    assert counted(through_proxy, 1) == (9, 9) and counted(through_proxy, 2) == (18, 18)


def test_bulk_write_sent_together_fails_as_sqlalchemy_error(through_proxy, models):
    _, Post, Like = models("bulk")
    with through_proxy.begin() as connection:  # counters already wrong: the delete takes them below 0
        connection.execute(Like.__table__.insert(), [{"id": 100, "post_id": 1}, {"id": 101, "post_id": 2}])
    with Session(through_proxy) as session:
        for like in session.scalars(sa.select(Like)):
            session.delete(like)
        with pytest.raises(IntegrityError, match="ride_likes_not_negative"):
            session.flush()
        session.rollback()
    assert counted(through_proxy, 1) == (0, 1) and counted(through_proxy, 2) == (0, 1)
    insert_one(through_proxy, Like)()
    assert counted(through_proxy, 1) == (1, 2)


@pytest.mark.parametrize("strategy", ["deferred", "sharded", "bulk"])
def test_backend_gone_before_the_commit_is_an_operational_error(proxy, models, strategy):
    """The connection dies before the COMMIT: SQLAlchemy's OperationalError,
    as without counters (it was an AttributeError from leaving the pipeline
    of a connection already let go of; found by an outside tester)."""
    _, _, Like = models(strategy)
    engine = sa.create_engine(proxy.url(PG_URL), pool_size=1, max_overflow=0)
    try:
        with Session(engine) as session:
            session.add_all([Like(post_id=1), Like(post_id=2)])
            session.flush()
            pid = session.scalar(sa.text("SELECT pg_backend_pid()"))
            with sa.create_engine(PG_URL, poolclass=sa.pool.NullPool).connect() as other:
                other.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                other.commit()
            with pytest.raises(sa.exc.OperationalError):
                session.commit()
        insert_one(engine, Like)()  # the pool replaced the connection
        assert counted(engine, 1) == (1, 1) and counted(engine, 2) == (0, 0)
    finally:
        engine.dispose()


def test_bulk_write_sent_together_tells_handle_error_listeners(through_proxy, models):
    """The lock and the UPDATE of several parents fail at their closing sync,
    outside an execute: handle_error listeners hear of it as of any statement
    (found by an outside tester)."""
    _, Post, Like = models("bulk")
    heard: list[str] = []

    @event.listens_for(through_proxy, "handle_error")
    def hear(context: Any) -> None:
        heard.append(type(context.original_exception).__name__)

    with through_proxy.begin() as connection:
        connection.execute(Like.__table__.insert(), [{"id": 100, "post_id": 1}, {"id": 101, "post_id": 2}])
    with Session(through_proxy) as session:
        for like in session.scalars(sa.select(Like)):
            session.delete(like)
        with pytest.raises(IntegrityError, match="ride_likes_not_negative"):
            session.flush()
    assert heard == ["CheckViolation"]


@pytest.mark.parametrize("strategy", ["deferred", "sharded"])
def test_values_written_inline_keep_their_types(proxy, through_proxy, _pg_engine, strategy):
    """The write's values travel inline in the COMMIT's message: UUID keys and Numeric sums
    with fractions (deferred; sharded takes integer ones), negative deltas arrive as the
    statements' parameters would."""
    key = sa.Uuid() if strategy == "deferred" else sa.Integer()
    money = sa.Numeric(12, 2) if strategy == "deferred" else sa.Integer()
    cents = (Decimal("10.25"), Decimal("-3.50")) if strategy == "deferred" else (10, -3)
    class Base(DeclarativeBase):
        pass

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)

    class Wallet(Base):
        __tablename__ = "ride_wallets"
        id: Mapped[Any] = mapped_column(key, primary_key=True)
        total: Mapped[Any] = counter_cache("entries", sum="amount", strategy=strategy, type_=money)
        entries: Mapped[list[Entry]] = relationship()

    class Entry(Base):
        __tablename__ = "ride_entries"
        id: Mapped[int] = mapped_column(primary_key=True)
        wallet_id: Mapped[Any] = mapped_column(key, ForeignKey("ride_wallets.id"))
        amount: Mapped[Any] = mapped_column(money)

    sa.orm.configure_mappers()
    ids = [uuid.uuid4(), uuid.uuid4()] if strategy == "deferred" else [7, 8]
    with _pg_engine.begin() as connection:
        Base.metadata.drop_all(connection)
        Base.metadata.create_all(connection)
        connection.execute(Wallet.__table__.insert(), [{"id": i, "total": 0} for i in ids])
    try:
        def add() -> None:
            with Session(through_proxy) as session:
                session.add_all([Entry(wallet_id=ids[0], amount=cents[0]), Entry(wallet_id=ids[1], amount=cents[1])])
                session.commit()

        assert round_trips(proxy, through_proxy, add, times=2, warm=2) == 3  # BEGIN, INSERT, the write + COMMIT
        countercache.fold(through_proxy)
        with through_proxy.connect() as connection:
            totals = dict(connection.execute(sa.text("SELECT id, total FROM ride_wallets")).all())
        assert totals == {ids[0]: cents[0] * 4, ids[1]: cents[1] * 4}
        assert countercache.check(through_proxy) == []
    finally:
        with _pg_engine.begin() as connection:
            Base.metadata.drop_all(connection)


@pytest.mark.parametrize("table", ["ride_plain", "ride_o'quote", "ride_back\\slash", "ride_café"])
def test_shard_rows_of_any_counter_name_ride_exact(proxy, through_proxy, _pg_engine, table):
    """The shard rows' upsert rides with the COMMIT, its texts inline (the counter's
    name holds its table's): plain ones written directly, a quote, a backslash or
    another alphabet's letter quoted by psycopg; every form is counted as written."""
    class Base(DeclarativeBase):
        pass

    countercache.shard_table(Base.metadata)

    class Wallet(Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        n: Mapped[int] = counter_cache("entries", strategy="sharded")
        entries: Mapped[list[Entry]] = relationship()

    class Entry(Base):
        __tablename__ = table + "_entries"
        id: Mapped[int] = mapped_column(primary_key=True)
        wallet_id: Mapped[int] = mapped_column(ForeignKey(Wallet.id))

    sa.orm.configure_mappers()
    with _pg_engine.begin() as connection:
        Base.metadata.drop_all(connection)
        Base.metadata.create_all(connection)
        connection.execute(Wallet.__table__.insert(), [{"id": 1, "n": 0}])
    try:
        def add() -> None:
            with Session(through_proxy) as session:
                session.add_all([Entry(wallet_id=1), Entry(wallet_id=1)])
                session.commit()

        assert round_trips(proxy, through_proxy, add, times=2, warm=1) == 3  # BEGIN, INSERT, the write + COMMIT
        with through_proxy.connect() as connection:
            shards = connection.execute(sa.text("SELECT counter, sum(delta) FROM countercache_shards GROUP BY counter")).all()
        assert [(name, int(total)) for name, total in shards] == [(f"{table}.n", 6)]
        with Session(through_proxy) as session:
            assert countercache.exact(session, session.get(Wallet, 1), "n") == 6
        assert countercache.check(through_proxy) == []
    finally:
        with _pg_engine.begin() as connection:
            Base.metadata.drop_all(connection)
