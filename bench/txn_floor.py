"""The floor under a commit-time counter write: what one extra UPDATE costs a
single-insert transaction however it is sent, with no change tracking at all.

    .venv/bin/python -m bench.txn_floor --url postgresql+psycopg://... [--transactions N] [--repeat N] [--json]

Every variant runs the ``txn`` workload's transaction (a new Session adds one
child and commits) and, except ``none``, adds 1 to the child's parent by
hand, with the parent key known in advance:

* ``none``: no counter write.
* ``statement``: the UPDATE through SQLAlchemy (``connection.execute``) after
  the flush, as a statement of its own: one more round trip.
* ``pipelined``: the UPDATE queued in psycopg's pipeline mode, sent and
  answered with the COMMIT (what ``deferred`` and ``sharded`` do when they
  ride), entered and left through psycopg directly, no SQLAlchemy execute.
* ``one_message``: ``UPDATE ...; COMMIT`` as one simple-protocol query: the
  fewest bytes and calls the driver allows (psycopg's ``commit()`` then
  finds the transaction ended and sends nothing).

A countercache strategy does more than any of these (it finds the change,
sums it, and sends a statement SQLAlchemy's events can see), so the ratio of
the cheapest variant is a floor for its ``txn`` ratio on the same machine.
Contenders are interleaved, medians are reported. PostgreSQL with psycopg 3
only (pipeline mode). Each counting variant's count is checked at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy import ForeignKey, Integer, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

PARENTS = "ccbench_floor_parents"
CHILDREN = "ccbench_floor_children"
PARENT_ROWS = 100


class _Base(DeclarativeBase):
    pass


class _Parent(_Base):
    __tablename__ = PARENTS
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int] = mapped_column(Integer, default=0)


class _Child(_Base):
    __tablename__ = CHILDREN
    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey(f"{PARENTS}.id"), index=True)


_UPDATE = sa.update(_Parent).where(_Parent.id == sa.bindparam("key")).values(n=_Parent.n + 1)
_RAW_UPDATE = f"UPDATE {PARENTS} SET n = n + 1 WHERE id = %d"


def _none(session: Session, key: int) -> None:
    session.commit()


def _statement(session: Session, key: int) -> None:
    session.flush()
    session.connection().execute(_UPDATE, {"key": key})
    session.commit()


def _pipelined(session: Session, key: int) -> None:
    from psycopg import Pipeline

    session.flush()
    raw = session.connection().connection.dbapi_connection
    pipeline = Pipeline(raw)
    raw._pipeline = pipeline
    pipeline.__enter__()
    pipeline.command_queue.append(partial(raw.pgconn.send_query_params, (_RAW_UPDATE % key).encode(), None))
    pipeline.result_queue.append(None)
    try:
        session.commit()  # (the COMMIT and its sync follow the UPDATE: one round trip)
    finally:
        pipeline._exit(None)
        raw._pipeline = None


def _one_message(session: Session, key: int) -> None:
    session.flush()
    raw = session.connection().connection.dbapi_connection
    raw.execute((_RAW_UPDATE % key + "; COMMIT").encode())
    session.commit()


VARIANTS: dict[str, Callable[[Session, int], None]] = {
    "none": _none,
    "statement": _statement,
    "pipelined": _pipelined,
    "one_message": _one_message,
}


def _loop(engine: sa.Engine, variant: Callable[[Session, int], None], transactions: int) -> float:
    started = time.perf_counter()
    for i in range(transactions):
        key = i % PARENT_ROWS + 1
        with Session(engine) as session:
            session.add(_Child(parent_id=key))
            variant(session, key)
    return (time.perf_counter() - started) / transactions


def measure(url: str, transactions: int = 1000, repeat: int = 7) -> dict[str, Any]:
    """Median seconds per transaction of each variant, ratios to ``none``, and
    whether each counting variant's count is right."""
    engine = sa.create_engine(url)
    if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
        raise ValueError(f"PostgreSQL with psycopg 3 only, not {engine.dialect.name}+{engine.dialect.driver}")
    try:
        _Base.metadata.drop_all(engine)
        _Base.metadata.create_all(engine)
        with Session(engine) as session:
            session.add_all([_Parent(id=i, n=0) for i in range(1, PARENT_ROWS + 1)])
            session.commit()
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for name, variant in VARIANTS.items():  # (warm-up: connections, statement caches)
            _loop(engine, variant, min(50, transactions))
        for _ in range(repeat):
            for name, variant in VARIANTS.items():
                times[name].append(_loop(engine, variant, transactions))
        counting_runs = (len(VARIANTS) - 1) * (repeat * transactions + min(50, transactions))
        with engine.connect() as connection:
            total = connection.execute(text(f"SELECT sum(n) FROM {PARENTS}")).scalar()
        floor = statistics.median(times["none"])
        return {
            "url": engine.url.render_as_string(hide_password=True),
            "transactions": transactions,
            "repeat": repeat,
            "seconds_per_txn": {name: statistics.median(t) for name, t in times.items()},
            "ratio": {name: statistics.median(t) / floor for name, t in times.items()},
            "counted": total == counting_runs,
        }
    finally:
        _Base.metadata.drop_all(engine)
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.txn_floor")
    ap.add_argument("--url", required=True, help="a PostgreSQL URL with the psycopg driver")
    ap.add_argument("--transactions", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        doc = measure(args.url, args.transactions, args.repeat)
    except (ValueError, sa.exc.SQLAlchemyError) as exc:
        sys.stderr.write(f"txn_floor: error: {str(exc).splitlines()[0]}\n")
        return 2
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{doc['transactions']:,} single-insert transactions x {doc['repeat']}, {doc['url']}")
        for name, seconds in doc["seconds_per_txn"].items():
            print(f"  {name:12s} {seconds * 1e6:8.0f} us  x{doc['ratio'][name]:.2f}")
        print("  counts right" if doc["counted"] else "  COUNTS WRONG")
    return 0 if doc["counted"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
