"""One lock plan: a direct and a multi-level counter on the same row (issue 14).

``Post.comment_count`` counts a post's comments; ``User.comment_received_count
= counter_cache("posts.comments")`` counts the comments on a user's posts. A
transaction that inserts comments locks each post row once, in the mode it
needs (for writing, since its counter is written), and every table in one
order: two writers never upgrade a shared lock to an exclusive one, which
deadlocked nearly every transaction before (PostgreSQL: 139 of 150 with
``deferred``). Counters stay exact whatever happens.
"""

from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace
from typing import Optional

import pytest
from sqlalchemy import ForeignKey, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache

pytestmark = [pytest.mark.servers_only, pytest.mark.slow]

THREADS = 6
TXNS = 8
SECONDS = 25  # no new transaction after this (a deadlock costs PostgreSQL's deadlock_timeout)


def models(strategy: str) -> SimpleNamespace:
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        posts: Mapped[list["Post"]] = relationship(back_populates="user")
        comment_received_count: Mapped[int] = counter_cache("posts.comments", strategy=strategy)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), index=True)
        user: Mapped[Optional[User]] = relationship(back_populates="posts")
        comments: Mapped[list["Comment"]] = relationship(back_populates="post")
        comment_count: Mapped[int] = counter_cache("comments", strategy=strategy)

    class Comment(Base):
        __tablename__ = "comments"
        id: Mapped[int] = mapped_column(primary_key=True)
        post_id: Mapped[Optional[int]] = mapped_column(ForeignKey("posts.id"), index=True)
        post: Mapped[Optional[Post]] = relationship(back_populates="comments")

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)
    return SimpleNamespace(Base=Base, User=User, Post=Post, Comment=Comment)


def is_deadlock(exc: DBAPIError) -> bool:
    text_ = str(exc.orig).lower()
    return "deadlock" in text_ or getattr(exc.orig, "sqlstate", None) == "40P01"


def run_writers(engine, m, *, comments: tuple[int, int], flushes: bool, seed: int) -> dict[str, int]:
    """THREADS writers, each TXNS transactions inserting comments on posts 1 and 2."""
    outcome = {"committed": 0, "deadlocked": 0}
    lock = threading.Lock()
    errors: list[BaseException] = []
    deadline = time.monotonic() + SECONDS

    def writer(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        try:
            for _ in range(TXNS):
                if time.monotonic() > deadline:
                    return
                with Session(engine) as s:
                    try:
                        for _ in range(rng.randint(*comments)):
                            s.add(m.Comment(post_id=rng.choice((1, 2))))
                            if flushes and rng.random() < 0.5:
                                s.flush()
                        s.commit()
                        key = "committed"
                    except DBAPIError as exc:
                        s.rollback()
                        if not is_deadlock(exc):
                            raise
                        key = "deadlocked"
                with lock:
                    outcome[key] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 60)
    assert not errors, errors[0]
    return outcome


def assert_exact(engine, strategy: str) -> None:
    if strategy == "sharded":
        assert countercache.check(engine) == []
        countercache.fold(engine)
    with engine.connect() as conn:
        posts = conn.execute(text(
            "SELECT p.id, p.comment_count, (SELECT count(*) FROM comments c WHERE c.post_id = p.id) FROM posts p"
        )).all()
        users = conn.execute(text(
            "SELECT u.id, u.comment_received_count, (SELECT count(*) FROM comments c JOIN posts p "
            "ON c.post_id = p.id WHERE p.user_id = u.id) FROM users u"
        )).all()
    wrong = [tuple(r) for r in posts + users if r[1] != r[2]]
    assert not wrong, f"(id, stored, actual): {wrong}"


def prepare(engine, strategy: str, owners: tuple[int, int]) -> SimpleNamespace:
    m = models(strategy)
    m.Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([m.User(id=1), m.User(id=2)])
        s.flush()
        s.add_all([m.Post(id=1, user_id=owners[0]), m.Post(id=2, user_id=owners[1])])
        s.commit()
    return m


@pytest.mark.parametrize("owners", [(1, 2), (1, 1)], ids=["two_owners", "one_owner"])
@pytest.mark.parametrize("strategy", ["bulk", "deferred", "sharded"])
def test_one_flush_transactions_do_not_deadlock(engine, backend, strategy, owners):
    """Each transaction flushes once (its commit): its rows are locked in one
    order and mode, so counters cause no deadlock. On MariaDB the INSERT's
    foreign-key check share-locks the post: the flush locks it for writing
    first (it deadlocked 100 of 150 transactions of bench/mixed_deadlock.py
    with the direct counter alone)."""
    m = prepare(engine, strategy, owners)
    outcome = run_writers(engine, m, comments=(1, 3), flushes=False, seed=1)
    assert_exact(engine, strategy)
    assert outcome["deadlocked"] == 0, outcome


def test_one_comment_transactions_do_not_deadlock_per_row(engine, backend):
    m = prepare(engine, "per_row", (1, 2))
    outcome = run_writers(engine, m, comments=(1, 1), flushes=False, seed=2)
    assert_exact(engine, "per_row")
    assert outcome["deadlocked"] == 0, outcome


@pytest.mark.parametrize("strategy", ["deferred", "sharded"])
def test_commit_time_strategies_do_not_deadlock_over_many_flushes(engine, backend, strategy):
    """``deferred`` / ``sharded``: locks only at commit, so however often a
    transaction flushes, no deadlock on PostgreSQL."""
    m = prepare(engine, strategy, (1, 2))
    outcome = run_writers(engine, m, comments=(1, 4), flushes=True, seed=3)
    assert_exact(engine, strategy)
    if backend == "postgresql":
        assert outcome["deadlocked"] == 0, outcome


@pytest.mark.mariadb_only
def test_per_row_one_flush_transactions_do_not_deadlock_on_mariadb(engine, backend):
    """MariaDB: per_row writes each new row's counters before the INSERT (the
    foreign-key check then finds the parent locked by its own transaction),
    rows in their parents' key order: transactions of several comments on
    both posts do not deadlock (in the rows' own order, 38 of 150 did)."""
    m = prepare(engine, "per_row", (1, 2))
    outcome = run_writers(engine, m, comments=(2, 4), flushes=False, seed=4)
    assert_exact(engine, "per_row")
    assert outcome["deadlocked"] == 0, outcome
