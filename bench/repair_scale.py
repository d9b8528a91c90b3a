"""check() and reconcile() at scale: time and peak memory.

    python bench/repair_scale.py [URL] [--parents 200000] [--children 1000000] [--drift-every 100]

Builds the parents and children with set-based SQL, makes every Nth parent
drift, then times ``check`` and ``reconcile`` (Engine bind, batches of
``--batch-size``) and reports Python's peak allocation (tracemalloc) and the
process's peak RSS.
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
    __tablename__ = "scale_parents"
    id: Mapped[int] = mapped_column(primary_key=True)
    children: Mapped[list["Child"]] = relationship()
    child_count: Mapped[int] = counter_cache("children")


class Child(Base):
    __tablename__ = "scale_children"
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("scale_parents.id"), index=True)


def timed(label, fn):
    tracemalloc.start()
    started = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{label:<10} {elapsed:8.2f} s   python peak {peak / 2**20:6.1f} MiB   process max RSS {rss:6.0f} MiB   "
          f"{len(result):,} drifted")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url", nargs="?", default="postgresql+psycopg://postgres@127.0.0.1/test")
    ap.add_argument("--parents", type=int, default=200_000)
    ap.add_argument("--children", type=int, default=1_000_000)
    ap.add_argument("--drift-every", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args()
    engine = create_engine(args.url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO scale_parents (id, child_count) SELECT g, 0 FROM generate_series(1, :p) g"),
                     {"p": args.parents})
        conn.execute(text("INSERT INTO scale_children (id, parent_id) SELECT g, 1 + (g % :p) FROM generate_series(1, :c) g"),
                     {"p": args.parents, "c": args.children})
        conn.execute(text("UPDATE scale_parents SET child_count = "
                          "(SELECT count(*) FROM scale_children c WHERE c.parent_id = scale_parents.id)"))
        conn.execute(text("UPDATE scale_parents SET child_count = child_count + 3 WHERE id % :n = 0"),
                     {"n": args.drift_every})
        conn.execute(text("ANALYZE scale_parents"))
        conn.execute(text("ANALYZE scale_children"))
    print(f"{args.parents:,} parents, {args.children:,} children, every {args.drift_every}th parent drifted "
          f"(set-up {time.perf_counter() - started:.1f} s), batch size {args.batch_size}")
    timed("check", lambda: countercache.check(engine, Parent.child_count, batch_size=args.batch_size))
    timed("reconcile", lambda: countercache.reconcile(engine, Parent.child_count, batch_size=args.batch_size))
    timed("check", lambda: countercache.check(engine, Parent.child_count, batch_size=args.batch_size))
    Base.metadata.drop_all(engine)


if __name__ == "__main__":
    main()
