"""The ``sharded`` strategy (issue 9): shard rows, exact reads, fold, repair, configuration.

Every test compares against an independent ``SELECT count(*)``; the shard
rows are read with plain SQL, not through the library.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from decimal import Decimal
from typing import Optional

import pytest
from sqlalchemy import ForeignKey, Numeric, String, create_engine, delete, insert, select, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import ConfigurationError, CounterCacheError, counter_cache
from helpers import assert_counts
from models import qa


def shard_rows(engine, counter: str = "users.question_count") -> list[tuple[str, int, int]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT parent_key, shard, delta FROM countercache_shards WHERE counter = :c "
            "ORDER BY parent_key, shard"), {"c": counter})]


def assert_exact(engine) -> dict[int, int]:
    """Column plus pending shard deltas equals ``SELECT count(*)`` for every user."""
    pending: dict[int, int] = {}
    for key, _, delta in shard_rows(engine):
        pending[int(key)] = pending.get(int(key), 0) + int(delta)
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT u.id, u.question_count, (SELECT count(*) FROM questions q WHERE q.user_id = u.id) "
            "FROM users u ORDER BY u.id")).all()
    wrong = [(pk, stored, pending.get(pk, 0), real) for pk, stored, real in rows
             if stored + pending.get(pk, 0) != real]
    assert not wrong, f"column + shards != count (id, column, pending, real): {wrong}"
    return {pk: real for pk, _, real in rows}


@pytest.fixture
def m(engine):
    models = qa("sharded")
    models.Base.metadata.create_all(engine)
    return models


def test_declaring_sharded_adds_the_side_table(m):
    table = m.Base.metadata.tables["countercache_shards"]
    assert [c.name for c in table.primary_key.columns] == ["counter", "parent_key", "shard"]
    assert countercache.configured_strategy(m.User.question_count) == "sharded"


def test_one_upsert_at_commit_and_the_parent_row_untouched(engine, m, statements):
    with Session(engine) as s:
        ada, bob = m.User(name="ada"), m.User(name="bob")
        s.add_all([ada, bob])
        s.commit()
        with statements.record() as rec:
            s.add_all([m.Question(user=ada) for _ in range(3)] + [m.Question(user=bob)])
            s.flush()
            s.add(m.Question(user=bob))
            s.flush()
            assert not [x for x in rec.sql() if "countercache_shards" in x]
            s.commit()
        upserts = [x for x in rec.sql() if x.lstrip().upper().startswith("INSERT INTO COUNTERCACHE_SHARDS")]
        assert len(upserts) == 1, rec.sql()
        assert rec.updates_to("users") == []
        assert ada.question_count == 0  # the column lags until fold
    assert_exact(engine)
    rows = shard_rows(engine)
    assert sorted((int(k), d) for k, _, d in rows) == [(1, 3), (2, 2)]
    assert len({shard for _, shard, _ in rows}) == 1  # one transaction, one shard


def test_deletes_moves_and_cancelling_changes(engine, m, statements):
    with Session(engine) as s:
        ada, bob = m.User(name="ada"), m.User(name="bob")
        ada.questions.extend(m.Question() for _ in range(4))
        s.add_all([ada, bob])
        s.commit()
        qs = list(ada.questions)
        s.delete(qs[0])
        qs[1].user = bob
        qs[2].user_id = None
        s.commit()
        assert_exact(engine)
        # a transaction whose changes cancel out writes nothing
        with statements.record() as rec:
            q = m.Question(user=bob)
            s.add(q)
            s.flush()
            s.delete(q)
            s.commit()
        assert not [x for x in rec.sql() if "countercache_shards" in x]
    assert assert_exact(engine) == {1: 1, 2: 1}


def test_rollback_and_savepoint_rollback_write_nothing(engine, m):
    if engine.dialect.name == "sqlite":
        from conftest import sqlite_real_transactions

        sqlite_real_transactions(engine)
    with Session(engine) as s:
        ada = m.User(name="ada")
        s.add(ada)
        s.commit()
        s.add(m.Question(user_id=ada.id))
        s.flush()
        s.rollback()
        s.add(m.Question(user_id=ada.id))
        with s.begin_nested():
            s.add_all([m.Question(user_id=ada.id) for _ in range(5)])
            s.flush()
        nested = s.begin_nested()
        s.add_all([m.Question(user_id=ada.id) for _ in range(7)])
        s.flush()
        assert countercache.exact(s, ada, "question_count") == 13
        nested.rollback()
        assert countercache.exact(s, ada, "question_count") == 6
        s.commit()
    assert assert_exact(engine) == {1: 6}


def test_exact_reads_own_pending_changes_and_exact_expression_orders(engine, m):
    with Session(engine) as s:
        users = [m.User(name=n) for n in ("a", "b", "c")]
        s.add_all(users)
        s.commit()
        for n, user in zip((2, 5, 1), users):
            s.add_all(m.Question(user_id=user.id) for _ in range(n))
        s.commit()
        s.add(m.Question(user_id=users[2].id))  # pending: exact() flushes and adds it
        assert [countercache.exact(s, u, "question_count") for u in users] == [2, 5, 2]
        assert countercache.exact(s, users[0], m.User.question_count) == 2
        s.commit()
        exact = countercache.exact_expression(m.User.question_count)
        ranked = s.execute(select(m.User.name, exact).order_by(exact.desc(), m.User.name)).all()
        assert [tuple(r) for r in ranked] == [("b", 5), ("a", 2), ("c", 2)]
        assert s.scalars(select(m.User.name).where(exact > 2)).all() == ["b"]


def test_exact_refuses_what_is_not_a_persistent_parent(engine, m):
    with Session(engine) as s:
        with pytest.raises(CounterCacheError, match="persistent"):
            countercache.exact(s, m.User(name="new"), "question_count")
        with pytest.raises(CounterCacheError, match="not a counter|no such counter"):
            countercache.exact(s, m.User(name="x"), "name")
        with pytest.raises(CounterCacheError, match=r"^User\.nope: no such counter$"):  # (the class named)
            countercache.exact(s, m.User(name="x"), "nope")


def test_fold_moves_pending_deltas_into_the_columns(engine, m):
    with Session(engine) as s:
        users = [m.User(name=str(i)) for i in range(7)]
        s.add_all(users)
        s.commit()
        for round_ in range(3):
            for i, user in enumerate(users):
                s.add_all(m.Question(user_id=user.id) for _ in range(i + round_))
            s.commit()
        # another connection, another shard
        with Session(engine) as other:
            other.add(m.Question(user_id=users[0].id))
            other.execute(select(1))
            other.commit()
        before = assert_exact(engine)
        assert shard_rows(engine)
        folded = countercache.fold(engine, batch_size=3)  # several batches
        assert folded >= 7
        assert shard_rows(engine) == []
        assert assert_counts(engine) == before
        assert countercache.fold(engine) == 0


def test_fold_with_a_session_expires_parents_in_memory(engine, m):
    with Session(engine, expire_on_commit=False) as s:
        ada = m.User(name="ada")
        s.add(ada)
        s.commit()
        s.add_all([m.Question(user_id=ada.id) for _ in range(3)])
        s.commit()
        assert ada.question_count == 0
        assert countercache.fold(s, m.User.question_count) == 1
        assert ada.question_count == 3  # expired by fold, reloaded
        s.commit()
    assert_counts(engine)


def test_check_and_reconcile_know_the_shards(engine, m):
    with Session(engine) as s:
        users = [m.User(name=str(i)) for i in range(3)]
        s.add_all(users)
        s.commit()
        s.add_all(m.Question(user_id=u.id) for u in users for _ in range(2))
        s.commit()
    assert countercache.check(engine) == []  # pending deltas are not drift
    with engine.begin() as conn:  # behind the ORM's back
        conn.execute(text("INSERT INTO questions (title, user_id) VALUES ('raw', 2)"))
    drifts = countercache.check(engine)
    assert [(d.pk, d.stored, d.actual) for d in drifts] == [(2, 2, 3)]
    assert [(d.pk, d.actual) for d in countercache.reconcile(engine)] == [(2, 3)]
    assert countercache.check(engine) == []
    assert_exact(engine)
    countercache.fold(engine)
    assert assert_counts(engine) == {1: 2, 2: 3, 3: 2}


def test_orm_bulk_statements_go_to_the_shards_at_commit(engine, m):
    with Session(engine) as s:
        ada, bob = m.User(name="ada"), m.User(name="bob")
        s.add_all([ada, bob])
        s.commit()
        s.execute(insert(m.Question), [{"user_id": ada.id} for _ in range(4)])
        s.execute(update(m.Question).where(m.Question.id <= 2).values(user_id=bob.id))
        s.execute(delete(m.Question).where(m.Question.id == 3))
        assert shard_rows(engine) == [] if engine.dialect.name != "sqlite" else True
        s.commit()
    assert assert_exact(engine) == {1: 1, 2: 2}


@pytest.mark.servers_only
def test_concurrent_writers_spread_over_shards(engine, m):
    with Session(engine) as s:
        s.add(m.User(name="hot"))
        s.commit()
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with Session(engine) as s:
                s.add(m.Question(user_id=1))
                s.flush()
                barrier.wait(10)  # all four hold a connection at once
                s.commit()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len({shard for _, shard, _ in shard_rows(engine)}) == 4
    assert assert_exact(engine) == {1: 4}


def test_a_pools_live_connections_never_share_a_shard(engine):
    """Slots are taken per pool and given back with the connection: a pool that
    opened and dropped 15 connections still spreads 4 live ones over 4 shards
    (a process-wide counter had moved on by 16 and put the 4th on the 1st's row)."""
    from countercache.shard_writes import _slot, forget_pools

    pool_engine = create_engine(engine.url, pool_size=4, max_overflow=20)
    try:
        first = pool_engine.connect()
        taken = [_slot(first)]
        for _ in range(15):
            dropped = pool_engine.connect()
            _slot(dropped)
            dropped.invalidate()  # the pool closes the DBAPI connection
            dropped.close()
        live = [pool_engine.connect() for _ in range(3)]
        taken += [_slot(c) for c in live]
        assert len({slot % 16 for slot in taken}) == 4, taken
        assert len({slot % 4 for slot in taken}) == 4, taken
        # a detached connection leaves the pool: its slot goes to the next connection
        extra = pool_engine.connect()
        extra_slot = _slot(extra)
        assert extra_slot not in taken
        extra.detach()
        extra.close()
        after = pool_engine.connect()
        assert _slot(after) == extra_slot
        after.close()
        # uninstall() forgets the pools: slots taken before are not kept over new ones
        forget_pools()
        assert len({_slot(c) % 4 for c in [first, *live]}) == 4
        for c in [first, *live]:
            c.close()
    finally:
        pool_engine.dispose()


@pytest.mark.servers_only
def test_fold_while_writers_write_counts_every_delta_once(engine, m):
    """Writers commit while another thread folds over and over."""
    with Session(engine) as s:
        s.add_all([m.User(name="a"), m.User(name="b")])
        s.commit()
    stop = threading.Event()
    failures: list[str] = []
    folds: list[int] = []

    def writer(seed: int) -> None:
        for i in range(40):
            try:
                with Session(engine) as s:
                    s.add(m.Question(user_id=1 + (seed + i) % 2))
                    if i % 3 == 0:
                        victim = s.scalars(select(m.Question).order_by(m.Question.id).limit(1)
                                           .with_for_update(skip_locked=True)).first()
                        if victim is not None:
                            s.delete(victim)
                    s.commit()
            except Exception as exc:  # noqa: BLE001
                failures.append(f"writer: {exc}"[:300])

    def folder() -> None:
        while not stop.is_set():
            try:
                folds.append(countercache.fold(engine, batch_size=2))
            except Exception as exc:  # noqa: BLE001
                failures.append(f"fold: {exc}"[:300])

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    fold_thread = threading.Thread(target=folder)
    fold_thread.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join(120)
    stop.set()
    fold_thread.join(60)
    assert not [f for f in failures if "eadlock" in f], failures
    assert sum(folds) > 0
    assert_exact(engine)
    countercache.fold(engine)
    assert shard_rows(engine) == []
    assert_counts(engine)


# -- kinds: where=, sum=, many-to-many ------------------------------------------


def test_where_sum_and_many_to_many_counters_can_be_sharded(engine):
    from sqlalchemy import Column, Table

    class Base(DeclarativeBase):
        pass

    post_tags = Table("post_tags", Base.metadata,
                      Column("post_id", ForeignKey("posts.id"), primary_key=True),
                      Column("tag_id", ForeignKey("tags.id"), primary_key=True))

    class Author(Base):
        __tablename__ = "authors"
        id: Mapped[int] = mapped_column(primary_key=True)
        posts: Mapped[list["Post"]] = relationship(back_populates="author")
        open_count: Mapped[int] = counter_cache("posts", strategy="sharded",
                                                where=lambda: Post.status == "open")
        score_total: Mapped[int] = counter_cache("posts", strategy="sharded", sum="score", shards=2)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)
        status: Mapped[str] = mapped_column(String(10), default="open")
        score: Mapped[int] = mapped_column(default=0)
        author_id: Mapped[Optional[int]] = mapped_column(ForeignKey("authors.id"))
        author: Mapped[Optional[Author]] = relationship(back_populates="posts")
        tags: Mapped[list["Tag"]] = relationship(secondary=post_tags, back_populates="posts")

    class Tag(Base):
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True)
        posts: Mapped[list[Post]] = relationship(secondary=post_tags, back_populates="tags")
        post_count: Mapped[int] = counter_cache("posts", strategy="sharded")

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        a = Author()
        t1, t2 = Tag(), Tag()
        posts = [Post(author=a, score=i, status="open" if i % 2 else "closed", tags=[t1] if i % 3 else [t1, t2])
                 for i in range(6)]
        s.add_all(posts)
        s.commit()
        posts[1].status = "closed"
        posts[2].score = 10
        posts[3].tags.remove(t1)
        s.delete(posts[4])
        s.commit()
        assert countercache.exact(s, a, "open_count") == 2  # posts 3 and 5
        assert countercache.exact(s, a, "score_total") == 0 + 1 + 10 + 3 + 5
        assert countercache.exact(s, t1, "post_count") == 4
        assert countercache.exact(s, t2, "post_count") == 2
        assert countercache.check(engine) == []
        s.commit()  # ends the read transaction (MariaDB's snapshot)
        countercache.fold(engine)
        assert (a.open_count, a.score_total, t1.post_count, t2.post_count) == (2, 19, 4, 2)
        assert countercache.check(engine) == []


# -- configuration and errors ---------------------------------------------------


def test_configuration_switches_to_sharded_with_a_shard_count(engine):
    m = qa("bulk")
    countercache.shard_table(m.Base.metadata)
    m.Base.metadata.create_all(engine)
    countercache.configure(overrides={"User.question_count": "sharded:4"})
    assert countercache.configured_strategy(m.User.question_count) == "sharded"
    counter = m.User.question_count.property.columns[0].info["countercache"]
    assert counter.shards() == 4
    countercache.configure(overrides={"User.question_count": "sharded"}, default_shards=32)
    assert counter.shards() == 32
    with Session(engine) as s:
        s.add(m.User(name="a", questions=[m.Question() for _ in range(3)]))
        s.commit()
    assert [int(d) for _, _, d in shard_rows(engine)] == [3]
    assert all(0 <= shard < 32 for _, shard, _ in shard_rows(engine))
    assert_exact(engine)


def test_configure_refuses_sharding_without_the_side_table():
    m = qa(None)
    from sqlalchemy.orm import configure_mappers

    configure_mappers()
    with pytest.raises(ConfigurationError, match=r"override User\.question_count.*countercache_shards"):
        countercache.configure(overrides={"User.question_count": "sharded"})
    with pytest.raises(ConfigurationError, match=r"default_strategy for User\.question_count"):
        countercache.configure(default_strategy="sharded")
    assert countercache.configured_strategy(m.User.question_count) == "bulk"  # nothing changed
    countercache.shard_table(m.Base.metadata)
    countercache.configure(default_strategy="sharded")
    assert countercache.configured_strategy(m.User.question_count) == "sharded"


@pytest.mark.parametrize("value", ["sharded:0", "sharded:x", "sharded:5000"])
def test_bad_shard_counts_in_overrides(value):
    qa("bulk")
    with pytest.raises(ConfigurationError, match="User.question_count"):
        countercache.configure(overrides={"User.question_count": value})


def test_bad_declarations_fail_at_mapper_configuration():
    from sqlalchemy.orm import configure_mappers

    class Base(DeclarativeBase):
        pass

    class Account(Base):
        __tablename__ = "accounts"
        region: Mapped[str] = mapped_column(String(5), primary_key=True)
        number: Mapped[int] = mapped_column(primary_key=True)
        entries: Mapped[list["Entry"]] = relationship()
        entry_count: Mapped[int] = counter_cache("entries", strategy="sharded")

    class Entry(Base):
        __tablename__ = "entries"
        id: Mapped[int] = mapped_column(primary_key=True)
        region: Mapped[str] = mapped_column(String(5))
        number: Mapped[int] = mapped_column()
        amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))
        __table_args__ = (
            __import__("sqlalchemy").ForeignKeyConstraint(["region", "number"],
                                                          ["accounts.region", "accounts.number"]),
        )

    with pytest.raises(ConfigurationError, match="Account.entry_count.*one-column"):
        configure_mappers()


def test_decimal_sums_and_bad_shards_are_refused():
    from sqlalchemy.orm import configure_mappers

    with pytest.raises(ConfigurationError, match=r"counter_cache\('cs'\): shards must be an integer"):
        counter_cache("cs", strategy="sharded", shards=0)

    class Base(DeclarativeBase):
        pass

    class Order(Base):
        __tablename__ = "orders"
        id: Mapped[int] = mapped_column(primary_key=True)
        lines: Mapped[list["Line"]] = relationship()
        total: Mapped[Decimal] = counter_cache("lines", strategy="sharded", sum="amount",
                                               type_=Numeric(12, 2))

    class Line(Base):
        __tablename__ = "lines"
        id: Mapped[int] = mapped_column(primary_key=True)
        order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"))
        amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))

    with pytest.raises(ConfigurationError, match="Order.total.*integer deltas"):
        configure_mappers()


# -- command line ----------------------------------------------------------------


def test_cli_fold(engine, tmp_path):
    if engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:"):
        pytest.skip("needs a file database")
    models = tmp_path / "sharded_models.py"
    models.write_text(
        "from models import qa\n"
        "m = qa('sharded')\n"
    )
    m = qa("sharded")
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(m.User(name="a", questions=[m.Question() for _ in range(4)]))
        s.commit()
    url = engine.url.render_as_string(hide_password=False)
    engine.dispose()
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.path.dirname(__file__)])}
    done = subprocess.run(
        [sys.executable, "-m", "countercache.cli", "fold", "--url", url, "--models", "sharded_models", "--json"],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    import json

    assert json.loads(done.stdout) == {"folded": {"User.question_count": 1}, "total": 1}
    assert shard_rows(engine) == []
    assert assert_counts(engine) == {1: 4}
    done = subprocess.run(
        [sys.executable, "-m", "countercache.cli", "fold", "--url", url, "--models", "sharded_models",
         "--counter", "User.nothing"],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


# -- Alembic ---------------------------------------------------------------------


def test_backfill_counter_with_shards_replaces_the_pending_rows(engine, m):
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    import countercache.alembic  # noqa: F401

    with Session(engine) as s:
        s.add_all([m.User(name="a", questions=[m.Question() for _ in range(3)]), m.User(name="b")])
        s.commit()
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO countercache_shards (counter, parent_key, shard, delta) "
                          "VALUES ('users.other_counter', '1', 0, 5)"))
    assert shard_rows(engine) and assert_exact(engine) == {1: 3, 2: 0}
    with engine.begin() as conn:
        Operations(MigrationContext.configure(conn)).backfill_counter(
            "users", "question_count", "questions", "user_id", parent_key="id", shards=True)
    assert shard_rows(engine) == []
    assert assert_counts(engine) == {1: 3, 2: 0}
    assert shard_rows(engine, "users.other_counter") == [("1", 0, 5)]  # another counter's: kept


def test_autogenerate_backfill_says_shards(engine):
    from alembic.autogenerate import render_python_code
    from alembic.autogenerate.api import produce_migrations
    from alembic.migration import MigrationContext

    import countercache.alembic  # noqa: F401

    plain = qa("bulk", counted=False)
    plain.Base.metadata.create_all(engine)
    m = qa("sharded")
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"target_metadata": m.Base.metadata})
        code = render_python_code(produce_migrations(ctx, m.Base.metadata).upgrade_ops)
    assert "op.create_table('countercache_shards'" in code
    # the table exists before the backfill's DELETE runs
    assert code.index("op.create_table('countercache_shards'") < code.index("op.backfill_counter")
    assert ("op.backfill_counter('users', 'question_count', 'questions', 'user_id', "
            "parent_key='id', shards=True)") in code


# -- found in review ---------------------------------------------------------------


def test_a_deleted_parent_takes_its_shard_rows_with_it(engine, m):
    with Session(engine) as s:
        ada = m.User(id=7, name="ada", questions=[m.Question() for _ in range(2)])
        s.add(ada)
        s.commit()
        assert shard_rows(engine) != []
        for q in list(ada.questions):
            s.delete(q)
        s.delete(ada)
        s.commit()  # the parent and its children go in the commit's own flush
        assert shard_rows(engine) == []
        s.add(m.User(id=7, name="new ada"))  # the same key again
        s.commit()
        assert countercache.exact(s, s.get(m.User, 7), "question_count") == 0
        # and in an earlier flush, with the children's deltas held for the commit
        bob = m.User(id=8, name="bob", questions=[m.Question()])
        s.add(bob)
        s.commit()
        s.delete(bob.questions[0])
        s.flush()
        s.delete(bob)
        s.flush()
        s.commit()
    assert shard_rows(engine) == []
    assert_exact(engine)


def test_reconcile_with_a_session_counts_what_the_transaction_holds(engine):
    for strategy in ("sharded", "deferred"):
        m = qa(strategy)
        m.Base.metadata.drop_all(engine)
        m.Base.metadata.create_all(engine)
        with Session(engine) as s:
            ada = m.User(name="ada")
            s.add(ada)
            s.commit()
            s.add(m.Question(user_id=ada.id))
            s.flush()
            assert countercache.check(s) == []  # the held +1 is written first
            assert countercache.reconcile(s) == []
            s.commit()
        if strategy == "sharded":
            countercache.fold(engine)
        assert assert_counts(engine) == {1: 1}, strategy
        m.Base.metadata.drop_all(engine)
        countercache._reset_for_tests()
        from sqlalchemy.orm import clear_mappers

        clear_mappers()


@pytest.mark.parametrize("key_type", ["uuid", "long string", "enum"])
def test_keys_the_side_table_cannot_hold_are_refused(key_type):
    """(An Enum: its member's text is not what the database stores, outside tester.)"""
    import enum
    import uuid

    from sqlalchemy import Enum, Uuid
    from sqlalchemy.orm import configure_mappers

    class Color(enum.Enum):
        red = "r"

    class Base(DeclarativeBase):
        pass

    class Post(Base):
        __tablename__ = "posts"
        id = mapped_column(Uuid, primary_key=True, default=uuid.uuid4) if key_type == "uuid" else \
            mapped_column(Enum(Color), primary_key=True) if key_type == "enum" else \
            mapped_column(String(200), primary_key=True)
        likes: Mapped[list["Like"]] = relationship()
        like_count: Mapped[int] = counter_cache("likes", strategy="sharded")

    class Like(Base):
        __tablename__ = "likes"
        id: Mapped[int] = mapped_column(primary_key=True)
        post_id = mapped_column(ForeignKey("posts.id"))

    with pytest.raises(ConfigurationError, match=r"Post.like_count: .*integer primary key, or a string one of at most 100"):
        configure_mappers()


@pytest.mark.mariadb_only
def test_exact_reads_on_a_utf8mb3_or_latin1_connection(engine):
    from sqlalchemy import create_engine

    m = qa("sharded")
    m.Base.metadata.create_all(engine)
    for charset in ("utf8", "latin1"):
        other = create_engine(engine.url.update_query_dict({"charset": charset}))
        try:
            with Session(other) as s:
                user = m.User(name=charset, questions=[m.Question()])
                s.add(user)
                s.commit()
                assert countercache.exact(s, user, "question_count") == 1
            assert countercache.check(other) == []
        finally:
            other.dispose()


@pytest.mark.mariadb_only
def test_fold_without_delete_returning_deletes_only_what_it_read(engine, monkeypatch):
    """MySQL's path (no DELETE ... RETURNING), tried on MariaDB."""
    m = qa("sharded")
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add(m.User(name="a", questions=[m.Question() for _ in range(3)]))
        s.commit()
    monkeypatch.setattr(engine.dialect, "delete_returning", False)
    assert countercache.fold(engine) == 1
    assert shard_rows(engine) == []
    assert assert_counts(engine) == {1: 3}


def test_fold_is_a_no_op_unless_sharded_and_assert_counts_exact_for_every_strategy(engine, strategy, statements):
    """``helpers.assert_counts`` folds for every strategy: without a sharded
    counter ``fold()`` finds no side table and emits no statement; with one it
    checks the column plus the pending deltas, then folds."""
    from helpers import pending_deltas

    m = qa(strategy)
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        a, b = m.User(name="a"), m.User(name="b")
        s.add_all([a, b, m.Question(user=a), m.Question(user=a), m.Question(user=b)])
        s.commit()
        ids = (a.id, b.id)
    pending = pending_deltas(engine, "users", "question_count")
    if strategy == "sharded":
        assert pending == {str(ids[0]): 2, str(ids[1]): 1}
    else:
        assert pending == {}
        with statements.record() as rec:
            assert countercache.fold(engine) == 0
        assert rec.sql() == []
    assert assert_counts(engine) == {ids[0]: 2, ids[1]: 1}
    assert pending_deltas(engine, "users", "question_count") == {}
    assert countercache.check(engine) == []


def test_exact_expression_before_the_mappers_are_configured():
    """As a query of the class would, it configures them (it raised a bare
    AssertionError; found by an outside tester)."""

    class Base(DeclarativeBase):
        pass

    countercache.shard_table(Base.metadata)

    class Blog(Base):
        __tablename__ = "xe_blogs"
        id: Mapped[int] = mapped_column(primary_key=True)
        entry_count: Mapped[int] = counter_cache("entries", strategy="sharded")
        entries: Mapped[list["Entry"]] = relationship(back_populates="blog")

    class Entry(Base):
        __tablename__ = "xe_entries"
        id: Mapped[int] = mapped_column(primary_key=True)
        blog_id: Mapped[int] = mapped_column(ForeignKey("xe_blogs.id"))
        blog: Mapped[Blog] = relationship(back_populates="entries")

    engine = create_engine("sqlite://")
    expression = countercache.exact_expression(Blog.entry_count)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Blog(id=1, entries=[Entry(), Entry()]))
        session.commit()
        assert session.scalar(select(expression).where(Blog.id == 1)) == 2


def test_exact_expression_of_an_aliased_class_follows_the_alias(engine, m):
    from sqlalchemy.orm import aliased

    with Session(engine) as s:
        users = [m.User(name=n) for n in ("a", "b", "c")]
        s.add_all(users)
        s.commit()
        for n, user in zip((1, 2, 3), users):
            s.add_all(m.Question(user_id=user.id) for _ in range(n))
        s.commit()
        ua = aliased(m.User, name="ua")
        rows = s.execute(select(ua.name, countercache.exact_expression(ua.question_count)).order_by(ua.name)).all()
        assert [tuple(r) for r in rows] == [("a", 1), ("b", 2), ("c", 3)]  # (not a cartesian product)
        pairs = s.execute(select(m.User.name, countercache.exact_expression(m.User.question_count), ua.name,
                                 countercache.exact_expression(ua.question_count))
                          .join(ua, ua.id == m.User.id + 1).order_by(m.User.id)).all()
        assert [tuple(r) for r in pairs] == [("a", 1, "b", 2), ("b", 2, "c", 3)]
