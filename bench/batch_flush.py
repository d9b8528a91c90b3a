"""One flush of N children over P parents: statements and wall time per strategy.

    python bench/batch_flush.py [URL] [--children N] [--parents P] [--repeat R]

The floor is the same flush into a table with no counter, measured in the same
run. (The full benchmark, ``countercache bench``, is a later piece of work.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

from sqlalchemy import ForeignKey, create_engine, event, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache
from countercache import counter_cache


def models(strategy: Optional[str]):
    class Base(DeclarativeBase):
        pass

    class Parent(Base):
        __tablename__ = "bench_parents"
        id: Mapped[int] = mapped_column(primary_key=True)
        children: Mapped[list["Child"]] = relationship()
        if strategy:
            child_count: Mapped[int] = counter_cache("children", strategy=strategy)

    class Child(Base):
        __tablename__ = "bench_children"
        id: Mapped[int] = mapped_column(primary_key=True)
        parent_id: Mapped[int] = mapped_column(ForeignKey("bench_parents.id"), index=True)

    return Base, Parent, Child


def one(url: str, strategy: Optional[str], n: int, p: int) -> tuple[float, int, int]:
    Base, Parent, Child = models(strategy)
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all(Parent(id=i + 1) for i in range(p))
        s.commit()
    updates = []
    event.listen(engine, "before_cursor_execute",
                 lambda c, cur, sql, params, ctx, many: updates.append(sql) if sql.lstrip().upper().startswith("UPDATE") else None)
    with Session(engine) as s:
        s.add_all(Child(parent_id=i % p + 1) for i in range(n))
        start = time.perf_counter()
        s.flush()
        elapsed = time.perf_counter() - start
        s.commit()
    drift = 0
    if strategy:
        with engine.connect() as c:
            drift = c.scalar(text(
                "SELECT count(*) FROM bench_parents p WHERE child_count <> "
                "(SELECT count(*) FROM bench_children c WHERE c.parent_id = p.id)"))
    Base.metadata.drop_all(engine)
    engine.dispose()
    countercache._reset_for_tests()
    return elapsed, len(updates), drift


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url", nargs="?", default="sqlite:////tmp/countercache-bench.sqlite")
    ap.add_argument("--children", type=int, default=10_000)
    ap.add_argument("--parents", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rows = {}
    for _ in range(args.repeat):  # interleaved, so drift in machine load hits all alike
        for strategy in (None, "bulk", "per_row"):
            rows.setdefault(strategy, []).append(one(args.url, strategy, args.children, args.parents))
    floor = statistics.median(r[0] for r in rows[None])
    print(f"{args.url.split(':')[0]}: one flush of {args.children} children over {args.parents} parents, median of {args.repeat}")
    print(f"{'contender':<12}{'seconds':>9}{'ratio':>8}{'UPDATEs':>9}{'drift':>7}")
    for strategy, runs in rows.items():
        t = statistics.median(r[0] for r in runs)
        print(f"{strategy or 'no counter':<12}{t:>9.3f}{t / floor:>8.2f}{runs[0][1]:>9}{max(r[2] for r in runs):>7}")


if __name__ == "__main__":
    main()
