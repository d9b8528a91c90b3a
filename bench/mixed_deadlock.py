"""Deadlocks when a direct and a multi-level counter share a parent row.

Models: ``User`` (``comment_received_count = counter_cache("posts.comments")``),
``Post`` (``comment_count = counter_cache("comments")``) and ``Comment``.
Variants: ``both`` counters, ``direct`` (only ``Post.comment_count``),
``multi`` (only ``User.comment_received_count``), ``none`` (no counter).

Setup: 2 users and 2 posts (post 1 of user 1, post 2 of user 2; with
``--same-user`` both posts belong to user 1). N threads, each with its own
Session on one Engine, run transactions that only insert 1-4 comments, each on
a random one of the two posts, with a ``flush()`` after some of them (so a
transaction flushes several times; not with ``--single-flush``), then commit. Nothing is retried: a failed
transaction is rolled back and counted as ``deadlocked`` (PostgreSQL 40P01,
MariaDB 1213) or ``other``. After each cell every counter is compared with a
recount (``sharded``: ``countercache.check`` with the pending shard deltas,
then ``fold`` and the recount); a mismatch is reported as ``drift``.

Run (a scratch database is created when missing; its tables are dropped)::

    .venv/bin/python bench/mixed_deadlock.py \\
        --url postgresql+psycopg://postgres@127.0.0.1:5432/ccbench_deadlock \\
        [--strategy bulk ...] [--variant both ...] [--threads 6] [--txns 25] \\
        [--seconds 60] [--seed 1] [--same-user] [--single-flush] [--isolation "READ COMMITTED"] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy import ForeignKey, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, clear_mappers, mapped_column, relationship

import countercache
from countercache import counter_cache

STRATEGIES = ["bulk", "per_row", "deferred", "sharded"]
VARIANTS = ["both", "direct", "multi", "none"]


def models(variant: str, strategy: Optional[str]) -> dict[str, Any]:
    """User/Post/Comment on a fresh DeclarativeBase, with the variant's counters."""

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        posts: Mapped[list["Post"]] = relationship(back_populates="user")
        if variant in ("both", "multi"):
            comment_received_count: Mapped[int] = counter_cache("posts.comments", strategy=strategy)

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)
        user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
        user: Mapped[User] = relationship(back_populates="posts")
        comments: Mapped[list["Comment"]] = relationship(back_populates="post")
        if variant in ("both", "direct"):
            comment_count: Mapped[int] = counter_cache("comments", strategy=strategy)

    class Comment(Base):
        __tablename__ = "comments"
        id: Mapped[int] = mapped_column(primary_key=True)
        post_id: Mapped[int] = mapped_column(ForeignKey("posts.id"), index=True)
        post: Mapped[Post] = relationship(back_populates="comments")

    if strategy == "sharded":
        countercache.shard_table(Base.metadata)  # already added by the declaration; harmless
    return {"Base": Base, "User": User, "Post": Post, "Comment": Comment}


def ensure_database(url: str) -> None:
    """Create the URL's database when it does not exist (PostgreSQL, MariaDB/MySQL)."""
    u = make_url(url)
    if u.get_backend_name() == "postgresql":
        admin = sa.create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            if not conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": u.database}):
                conn.exec_driver_sql(f'CREATE DATABASE "{u.database}"')
    elif u.get_backend_name() in ("mysql", "mariadb"):
        admin = sa.create_engine(u.set(database="information_schema"))
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS `{u.database}`")
    else:
        return
    admin.dispose()


def drop_everything(engine: sa.Engine) -> None:
    """Drop every table of the scratch database (foreign keys of earlier variants included)."""
    with engine.begin() as conn:
        md = sa.MetaData()
        md.reflect(conn)
        md.drop_all(conn)


def classify(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) == "40P01":  # psycopg
        return "deadlocked"
    args = getattr(orig, "args", ())
    if args and args[0] == 1213:  # pymysql / mysqlclient: ER_LOCK_DEADLOCK
        return "deadlocked"
    return "deadlocked" if "deadlock" in str(exc).lower() else "other"


def worker(engine, m, post_ids, rng, txns, deadline, out: Counter, examples: list, lock,
           single_flush: bool = False) -> None:
    with Session(engine) as session:
        for _ in range(txns):
            if time.monotonic() >= deadline:
                break
            kind = "committed"
            try:
                for i in range(rng.randint(1, 4)):
                    if i and rng.random() < 0.5 and not single_flush:
                        session.flush()  # one more flush: the earlier flushes' locks are held
                    session.add(m["Comment"](post_id=rng.choice(post_ids)))
                session.commit()
            except Exception as exc:  # noqa: BLE001 - counted, never retried
                session.rollback()
                kind = classify(exc)
                if len(examples) < 3 and (kind == "other" or not examples):
                    stmt = " ".join(str(getattr(exc, "statement", "") or "").split())[:120]
                    examples.append(f"{kind}: {str(getattr(exc, 'orig', exc)).splitlines()[0][:200]} | {stmt}")
            with lock:
                out[kind] += 1


def verify(engine: sa.Engine, m: dict[str, Any], variant: str, strategy: Optional[str]) -> list[str]:
    """Counters against recounts; returns the mismatches (empty: exact)."""
    wrong: list[str] = []
    if strategy == "sharded":
        wrong += [repr(d) for d in countercache.check(engine)]  # column + pending shard deltas
        countercache.fold(engine)
    with engine.connect() as conn:
        if variant in ("both", "direct"):
            for pid, stored, real in conn.execute(text(
                    "SELECT p.id, p.comment_count, (SELECT count(*) FROM comments c WHERE c.post_id = p.id) "
                    "FROM posts p ORDER BY p.id")):
                if stored != real:
                    wrong.append(f"post {pid}: comment_count {stored}, real {real}")
        if variant in ("both", "multi"):
            for uid, stored, real in conn.execute(text(
                    "SELECT u.id, u.comment_received_count, (SELECT count(*) FROM comments c "
                    "JOIN posts p ON c.post_id = p.id WHERE p.user_id = u.id) FROM users u ORDER BY u.id")):
                if stored != real:
                    wrong.append(f"user {uid}: comment_received_count {stored}, real {real}")
    return wrong


def run_cell(args, variant: str, strategy: Optional[str]) -> dict[str, Any]:
    countercache._reset_for_tests()
    clear_mappers()
    m = models(variant, strategy)
    extra = {"isolation_level": args.isolation} if args.isolation else {}
    engine = sa.create_engine(args.url, pool_size=args.threads + 1, max_overflow=2, **extra)
    try:
        drop_everything(engine)
        m["Base"].metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([m["User"](id=1), m["User"](id=2)])
            s.flush()
            s.add_all([m["Post"](id=1, user_id=1), m["Post"](id=2, user_id=1 if args.same_user else 2)])
            s.commit()
        out: Counter = Counter()
        examples: list[str] = []
        lock = threading.Lock()
        seed = random.Random(f"{args.seed}")  # one workload per seed: every cell runs the same transactions
        start = time.monotonic()
        threads = [threading.Thread(target=worker, args=(
            engine, m, [1, 2], random.Random(seed.random()), args.txns, start + args.seconds, out, examples, lock,
            args.single_flush))
            for _ in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        drift = verify(engine, m, variant, strategy)
    finally:
        engine.dispose()
    return {"variant": variant, "strategy": strategy or "-", "committed": out["committed"],
            "deadlocked": out["deadlocked"], "other": out["other"], "seconds": round(elapsed, 1),
            "drift": drift, "examples": examples}


def print_table(args, results: list[dict[str, Any]]) -> None:
    title = (f"{args.server}, {args.isolation or 'default isolation'}, "
             f"{'both posts of user 1' if args.same_user else 'post 1 of user 1, post 2 of user 2'}"
             f"{', one flush per transaction' if args.single_flush else ''}: "
             f"{args.threads} threads x {args.txns} txns, cap {args.seconds:g} s, seed {args.seed}")
    cols = ["variant", "strategy", "committed", "deadlocked", "other", "seconds", "drift"]
    rows = [[str(r[c]) if c != "drift" else ("DRIFT" if r["drift"] else "no") for c in cols] for r in results]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        stream = sys.stderr if args.json else sys.stdout
        print(title, file=stream)
        for row in [cols] + rows:
            print("  ".join(f"{v:>10}" for v in row), file=stream)
    else:
        table = Table(title=title)
        for c in cols:
            table.add_column(c, justify="left" if c in ("variant", "strategy") else "right")
        for row in rows:
            table.add_row(*row)
        Console(stderr=args.json).print(table)
    for r in results:
        for line in r["drift"] + r["examples"]:
            print(f"  {r['variant']}/{r['strategy']}: {line}", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="scratch database (created if missing; its tables are dropped)")
    p.add_argument("--strategy", action="append", choices=STRATEGIES, help="repeatable (default: all)")
    p.add_argument("--variant", action="append", choices=VARIANTS, help="repeatable (default: all)")
    p.add_argument("--threads", type=int, default=6)
    p.add_argument("--txns", type=int, default=25, help="transactions per thread")
    p.add_argument("--seconds", type=float, default=60.0, help="start no transaction after this (per cell)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--same-user", action="store_true", help="both posts belong to user 1")
    p.add_argument("--single-flush", action="store_true",
                   help="no flush before the commit's (each transaction locks its rows once)")
    p.add_argument("--isolation", help='e.g. "READ COMMITTED" (default: the server\'s)')
    p.add_argument("--json", action="store_true", help="JSON on stdout (the table goes to stderr)")
    args = p.parse_args(argv)
    print(f"countercache from {countercache.__file__}", file=sys.stderr)
    ensure_database(args.url)
    probe = sa.create_engine(args.url)
    with probe.connect() as conn:
        args.server = f"{conn.dialect.name} {'.'.join(map(str, conn.dialect.server_version_info or ()))}"
    probe.dispose()
    cells = [(v, None if v == "none" else s) for v in (args.variant or VARIANTS)
             for s in ((args.strategy or STRATEGIES) if v != "none" else [None])]
    results = []
    for variant, strategy in cells:
        results.append(run_cell(args, variant, strategy))
        r = results[-1]
        print(f"  {variant}/{strategy or '-'}: {r['committed']} committed, {r['deadlocked']} deadlocked, "
              f"{r['other']} other, {r['seconds']} s{', DRIFT' if r['drift'] else ''}", file=sys.stderr)
    print_table(args, results)
    if args.json:
        json.dump({"url": make_url(args.url).render_as_string(hide_password=True), "server": args.server,
                   "isolation": args.isolation,
                   "same_user": args.same_user, "threads": args.threads, "txns": args.txns,
                   "seconds_cap": args.seconds, "seed": args.seed, "results": results}, sys.stdout, indent=2)
        print()
    return 1 if any(r["drift"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
