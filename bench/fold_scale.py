"""fold() at scale: what folding N pending shard deltas costs (PostgreSQL).

    python bench/fold_scale.py [URL] [--deltas 1000000] [--shards 16] [--batch-size 5000]

Puts ``--deltas`` pending rows in ``countercache_shards`` (``deltas / shards``
parents, each with a row in every shard, written with set-based SQL as if
that many transactions had committed), then times ``countercache.fold`` with
an Engine bind (each batch its own transaction) and reports rows per second,
Python's peak allocation and the process's peak RSS, and checks every
counter against ``SELECT count(*)`` afterwards.
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

from sqlalchemy import ForeignKey, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import countercache
from countercache import counter_cache


class Base(DeclarativeBase):
    pass


class Parent(Base):
    __tablename__ = "fold_parents"
    id: Mapped[int] = mapped_column(primary_key=True)
    children: Mapped[list["Child"]] = relationship()
    child_count: Mapped[int] = counter_cache("children", strategy="sharded")


class Child(Base):
    __tablename__ = "fold_children"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("fold_parents.id"), index=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url", nargs="?", default="postgresql+psycopg://postgres@127.0.0.1/test")
    ap.add_argument("--deltas", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args()
    parents = args.deltas // args.shards
    engine = create_engine(args.url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO fold_parents (id, child_count) SELECT g, 0 FROM generate_series(1, :p) g"),
                     {"p": parents})
        # one child per shard row: every pending delta is +1
        conn.execute(text("INSERT INTO fold_children (id, parent_id) SELECT g, 1 + (g % :p) "
                          "FROM generate_series(1, :n) g"), {"p": parents, "n": args.deltas})
        conn.execute(text("INSERT INTO countercache_shards (counter, parent_key, shard, delta) "
                          "SELECT 'fold_parents.child_count', p::text, s, 1 "
                          "FROM generate_series(1, :p) p, generate_series(0, :s - 1) s"),
                     {"p": parents, "s": args.shards})
        for table in ("fold_parents", "fold_children", "countercache_shards"):
            conn.execute(text(f"ANALYZE {table}"))
    print(f"{args.deltas:,} pending shard rows over {parents:,} parents x {args.shards} shards "
          f"(set-up {time.perf_counter() - started:.1f} s), batch size {args.batch_size}")
    tracemalloc.start()
    started = time.perf_counter()
    folded = countercache.fold(engine, Parent.child_count, batch_size=args.batch_size)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"fold       {elapsed:8.2f} s   {folded / elapsed:,.0f} rows/s   python peak {peak / 2**20:6.1f} MiB   "
          f"process max RSS {rss:6.0f} MiB   {folded:,} rows folded")
    with engine.connect() as conn:
        left = conn.scalar(text("SELECT count(*) FROM countercache_shards"))
    print(f"after: {left} shard rows left; drift {countercache.check(engine, Parent.child_count)}")
    Base.metadata.drop_all(engine)


if __name__ == "__main__":
    main()
