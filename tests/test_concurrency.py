"""Many writers at once (SPEC §4 "Concurrency"), PostgreSQL and MariaDB.

8 threads, each with its own session, run transactions of random inserts,
deletes and re-parents across 3 hot parents. Queries in the middle of a
transaction autoflush, so most transactions flush several times. Afterwards
every counter must equal the real count; a transaction that fails (a
deadlock, a lock timeout) must roll back without leaving drift; with
``deferred`` no transaction may fail with a deadlock on PostgreSQL, nor on
MariaDB once InnoDB's foreign-key locks are out of the picture (see
``test_deferred_never_deadlocks_on_mariadb_without_foreign_key_locks``);
``sharded``, which never writes the parent row, deadlocks on neither, with
the foreign key in place (its counters are checked with the pending shard
deltas, then folded and checked again).

On MariaDB the workload runs at READ COMMITTED. At InnoDB's default
REPEATABLE READ a locking read that scans to the end of ``questions`` holds
the gap before the supremum, and two such transactions inserting deadlock on
each other's gap with no counter involved (measured: 1 run in 6 of the
counter-less workload). READ COMMITTED takes no gap locks, so ``none`` is
deadlock-free on both backends (asserted) and every deadlock left is the
counters' or the foreign key's. The foreign-key check's shared lock on the
parent row is taken at every isolation level.

Bounded: each (backend, strategy) run stops after ``TXNS_PER_WORKER``
transactions per worker or ``SECONDS`` seconds, whichever comes first.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import event, inspect, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

import countercache
from countercache.config import ALL_STRATEGIES
from helpers import assert_counts
from models import qa

pytestmark = [pytest.mark.servers_only, pytest.mark.slow]

WORKERS = 8
TXNS_PER_WORKER = 40
SECONDS = 8.0
HOT = 3

#: Outcomes of the last run per (backend, strategy), printed by -s and used in notes.
RESULTS: dict[tuple[str, str], Counter] = {}
EXAMPLES: list[str] = []


def is_deadlock(exc: DBAPIError) -> bool:
    text = str(exc.orig).lower()
    return "deadlock" in text or "1213" in text


def worker(engine, m, parent_ids, seed, deadline, outcome: Counter):
    rng = random.Random(seed)
    for _ in range(TXNS_PER_WORKER):
        if time.monotonic() > deadline:
            break
        with Session(engine) as s:
            try:
                for _op in range(rng.randint(1, 4)):
                    op = rng.random()
                    if op < 0.5:
                        s.add(m.Question(user_id=rng.choice(parent_ids)))
                    else:
                        # the query autoflushes what is pending: another flush
                        child = s.scalars(
                            select(m.Question)
                            .order_by(m.Question.id)
                            .limit(1)
                            .offset(rng.randint(0, 5))
                            .with_for_update(skip_locked=True)
                        ).first()
                        if child is None:
                            continue
                        if op < 0.75:
                            s.delete(child)
                        else:
                            child.user_id = rng.choice(parent_ids)
                s.commit()
                outcome["committed"] += 1
            except DBAPIError as exc:
                s.rollback()
                kind = "deadlock" if is_deadlock(exc) else "failed"
                outcome[kind] += 1
                if len(EXAMPLES) < 3:
                    EXAMPLES.append(f"{kind}: {str(exc.orig)[:600]} | {exc.statement[:300]}")


# "none" first: the workload without counters, then every strategy the library implements
@pytest.mark.parametrize("strategy", ["none", *(s for s in ALL_STRATEGIES if s != "sharded_trigger")])
def test_no_lost_update_under_concurrency(engine, backend, strategy):
    """``none`` is the same workload without a counter: the deadlocks of the workload itself."""
    m = qa(None if strategy == "none" else strategy, counted=strategy != "none")
    m.Base.metadata.create_all(engine)
    outcome = run_workload(engine, backend, m)
    RESULTS[(backend, strategy)] = outcome
    assert outcome["committed"] >= WORKERS  # the run did real work
    if strategy == "sharded":
        assert countercache.check(engine) == []  # column + pending shard deltas
        countercache.fold(engine)
    if strategy != "none":
        assert_counts(engine)  # no drift, whatever failed
    if strategy == "none":
        # the baseline: whatever deadlocks below, the workload alone does not
        assert outcome["deadlock"] == 0, f"the workload itself deadlocked: {dict(outcome)}"
    if strategy == "deferred" and backend == "postgresql":
        assert outcome["deadlock"] == 0, f"deferred counters deadlocked: {dict(outcome)}"
    if strategy == "sharded":
        # never the parent row: not even InnoDB's foreign-key locks make it deadlock
        assert outcome["deadlock"] == 0, f"sharded counters deadlocked: {dict(outcome)}"


@pytest.mark.mariadb_only
def test_deferred_never_deadlocks_on_mariadb_without_foreign_key_locks(engine, backend):
    """InnoDB's foreign-key check takes a shared lock on the parent row when a
    child is inserted; two transactions holding it and then updating the
    counter deadlock (a shared-to-exclusive upgrade) whatever the order. That
    is the database's lock, not the counter's order: without the constraint,
    ``deferred`` must not deadlock on MariaDB either."""
    m = qa("deferred")
    m.Base.metadata.create_all(engine)
    with engine.begin() as conn:
        for fk in inspect(conn).get_foreign_keys("questions"):
            conn.execute(text(f"ALTER TABLE questions DROP FOREIGN KEY {fk['name']}"))
    outcome = run_workload(engine, backend, m)
    RESULTS[(backend, "deferred, no FK constraint")] = outcome
    assert_counts(engine)
    assert outcome["deadlock"] == 0, f"deferred counters deadlocked: {dict(outcome)}"


def run_workload(engine, backend, m) -> Counter:
    with Session(engine) as s:
        users = [m.User(name=f"hot{i}") for i in range(HOT)]
        for user in users:
            user.questions.extend(m.Question() for _ in range(5))
        s.add_all(users)
        s.commit()
        parent_ids = [u.id for u in users]

    if backend == "mariadb":
        @event.listens_for(engine, "connect")
        def short_lock_wait(dbapi_conn, record):
            with dbapi_conn.cursor() as cur:
                cur.execute("SET SESSION innodb_lock_wait_timeout = 5")
                # no gap locks: see the module docstring
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        engine.pool.dispose()

    outcome: Counter = Counter()
    deadline = time.monotonic() + SECONDS
    threads = [
        threading.Thread(target=worker, args=(engine, m, parent_ids, seed, deadline, outcome))
        for seed in range(WORKERS)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(SECONDS + 60)
        assert not any(t.is_alive() for t in threads), "a worker is stuck"
    finally:
        if backend == "mariadb":
            event.remove(engine, "connect", short_lock_wait)
            engine.pool.dispose()

    print(f"\n{backend}: {dict(outcome)}")
    for example in EXAMPLES:
        print("   ", example)
    EXAMPLES.clear()
    return outcome
