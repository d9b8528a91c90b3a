"""Statement forms for applying per-parent counter deltas, timed per dialect.

    .venv/bin/python bench/statement_forms.py [URL ...] [--quick]

Backs the choice documented in ``countercache/writer.py``. On a table
``parents(id int primary key, n int not null default 0)`` holding P rows, each
candidate form applies a delta map ``{id: delta}`` covering all P rows, inside
a transaction, committed per repetition (the commit is not timed). Shapes:

* P=1       (one small transaction)             200 repetitions
* P=100     (one flush of 10,000 children)      200 repetitions
* P=10,000  (a very wide flush)                  20 repetitions

Each form goes through ``conn.execute(text(...), params)`` as the library does,
so SQLAlchemy's overhead is included. A few untimed warm-up applications come
first (psycopg prepares a statement server-side after 5 executions of one text).
A form whose repetitions run past a time budget stops early (at least 5 are
kept); the ``n`` column says how many were timed.

Correctness: the expected sums are kept in Python; after every shape an
independent ``SELECT id, n`` must match them, and where a form returns values
(RETURNING) every returned row must equal the expected new value. Otherwise
the form is marked WRONG.

Forms whose SQL text depends on P (VALUES / CASE / UNION ALL lists) hit
SQLAlchemy's compiled cache, sqlite3's statement cache and psycopg's prepared
statements here only because P is fixed within a shape; in a real workload P
varies from flush to flush. The ``cold`` rows (P=100 only) re-run such a form
with a unique comment per repetition, i.e. with every cache missed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection

DEFAULT_URLS = [
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "mysql+pymysql://root@127.0.0.1:3306/test",
    "sqlite:////tmp/countercache_statement_forms.db",
]
SHAPES = [(1, 200), (100, 200), (10_000, 20)]
WARMUP = {1: 10, 100: 10, 10_000: 2}
BUDGET_S = 10.0  # per form and shape
MYSQL_CHUNK = 1000  # as countercache.statements.MYSQL_CHUNK

T = "parents"
Deltas = dict[int, int]
Apply = Callable[[Connection, Deltas, str], Optional[list[tuple[int, int]]]]
# An Apply returns the (id, new n) rows it got back, or None if it cannot return values.
# The str argument is a comment appended to texts that vary with P (cold runs), else "".


@dataclass
class Form:
    label: str
    doc: str
    fn: Apply
    returns: bool
    lock_order: str  # "yes" / "NO" / "n/a"
    variable_text: bool = False
    statements: str = "1"


# -- PostgreSQL -------------------------------------------------------------------

PG_A = text(
    f"UPDATE {T} AS p SET n = p.n + l.d FROM (SELECT {T}.id AS k0, v.d FROM {T} "
    f"JOIN unnest(CAST(:k AS INTEGER[]), CAST(:d AS INTEGER[])) AS v(k0, d) ON {T}.id = v.k0 "
    f"ORDER BY {T}.id FOR NO KEY UPDATE OF {T}) AS l WHERE p.id = l.k0 RETURNING p.id, p.n"
)
PG_LOCK = text(f"SELECT id FROM {T} WHERE id = ANY(CAST(:k AS INTEGER[])) ORDER BY id FOR NO KEY UPDATE")
PG_B = text(
    f"UPDATE {T} AS p SET n = p.n + v.d FROM unnest(CAST(:k AS INTEGER[]), CAST(:d AS INTEGER[])) "
    f"AS v(k, d) WHERE p.id = v.k RETURNING p.id, p.n"
)
PG_ONE_RET = text(f"UPDATE {T} SET n = n + :d WHERE id = :k RETURNING id, n")
ONE = text(f"UPDATE {T} SET n = n + :d WHERE id = :k")


def pg_a(conn: Connection, deltas: Deltas, c: str) -> list[tuple[int, int]]:
    keys = sorted(deltas)
    rows = conn.execute(PG_A, {"k": keys, "d": [deltas[k] for k in keys]}).fetchall()
    return [tuple(r) for r in rows]


def pg_b(conn: Connection, deltas: Deltas, c: str) -> list[tuple[int, int]]:
    keys = sorted(deltas)
    conn.execute(PG_LOCK, {"k": keys}).fetchall()
    rows = conn.execute(PG_B, {"k": keys, "d": [deltas[k] for k in keys]}).fetchall()
    return [tuple(r) for r in rows]


def pg_c(conn: Connection, deltas: Deltas, c: str) -> list[tuple[int, int]]:
    keys = sorted(deltas)
    conn.execute(PG_LOCK, {"k": keys}).fetchall()
    params: dict[str, Any] = {}
    values = []
    for m, k in enumerate(keys):
        params[f"k{m}"] = k
        params[f"d{m}"] = deltas[k]
        values.append(
            f"(CAST(:k{m} AS INTEGER), CAST(:d{m} AS INTEGER))" if m == 0 else f"(:k{m}, :d{m})"
        )
    sql = (
        f"UPDATE {T} AS p SET n = p.n + v.d FROM (VALUES {', '.join(values)}) AS v(k, d) "
        f"WHERE p.id = v.k RETURNING p.id, p.n{c}"
    )
    return [tuple(r) for r in conn.execute(text(sql), params).fetchall()]


def executemany(conn: Connection, deltas: Deltas, c: str) -> None:
    conn.execute(ONE, [{"k": k, "d": deltas[k]} for k in sorted(deltas)])
    return None


def per_row_returning(conn: Connection, deltas: Deltas, c: str) -> list[tuple[int, int]]:
    out = []
    for k in sorted(deltas):
        out.extend(tuple(r) for r in conn.execute(PG_ONE_RET, {"k": k, "d": deltas[k]}).fetchall())
    return out


def per_row(conn: Connection, deltas: Deltas, c: str) -> None:
    for k in sorted(deltas):
        conn.execute(ONE, {"k": k, "d": deltas[k]})
    return None


PG_SELECT = text(f"SELECT id, n FROM {T} WHERE id = ANY(CAST(:k AS INTEGER[])) ORDER BY id")


def pg_d_select(conn: Connection, deltas: Deltas, c: str) -> list[tuple[int, int]]:
    executemany(conn, deltas, c)
    return [tuple(r) for r in conn.execute(PG_SELECT, {"k": sorted(deltas)}).fetchall()]


PG_FORMS = [
    Form("a", "writer: UPDATE FROM (unnest JOIN ... ORDER BY FOR NO KEY UPDATE) RETURNING", pg_a, True, "yes"),
    Form("b", "lock SELECT; UPDATE FROM unnest RETURNING", pg_b, True, "yes", statements="2"),
    Form("c", "lock SELECT; UPDATE FROM (VALUES ...) RETURNING", pg_c, True, "yes", True, "2"),
    Form("d", "executemany single-row UPDATE (no RETURNING)", executemany, False, "yes", statements="1 (pipelined xP)"),
    Form("e", "single-row UPDATE RETURNING per parent", per_row_returning, True, "yes", statements="P"),
    Form("d+sel*", "(d) then SELECT id, n WHERE id = ANY(:k) for the new values", pg_d_select, True, "yes",
         statements="2"),
]


# -- SQLite -----------------------------------------------------------------------

SQLITE_A = text(
    f"UPDATE {T} SET n = {T}.n + v.d FROM (SELECT json_extract(value, '$[0]') AS k0, "
    f"json_extract(value, '$[1]') AS d FROM json_each(:rows)) AS v WHERE {T}.id = v.k0 "
    f"RETURNING {T}.id, {T}.n"
)


def sqlite_a(conn: Connection, deltas: Deltas, c: str) -> list[tuple[int, int]]:
    rows = json.dumps([[k, deltas[k]] for k in sorted(deltas)])
    return [tuple(r) for r in conn.execute(SQLITE_A, {"rows": rows}).fetchall()]


def sqlite_b(conn: Connection, deltas: Deltas, c: str) -> list[tuple[int, int]]:
    keys = sorted(deltas)
    params: dict[str, Any] = {}
    whens = []
    for m, k in enumerate(keys):
        params[f"k{m}"] = k
        params[f"d{m}"] = deltas[k]
        whens.append(f"WHEN :k{m} THEN :d{m}")
    sql = (
        f"UPDATE {T} SET n = n + CASE id {' '.join(whens)} END "
        f"WHERE id IN ({', '.join(f':k{m}' for m in range(len(keys)))}) RETURNING id, n{c}"
    )
    return [tuple(r) for r in conn.execute(text(sql), params).fetchall()]


def sqlite_d(conn: Connection, deltas: Deltas, c: str) -> list[tuple[int, int]]:
    keys = sorted(deltas)
    params: dict[str, Any] = {}
    values = []
    for m, k in enumerate(keys):
        params[f"k{m}"] = k
        params[f"d{m}"] = deltas[k]
        values.append(f"(:k{m}, :d{m})")
    sql = (
        f"UPDATE {T} SET n = {T}.n + v.column2 FROM (VALUES {', '.join(values)}) AS v "
        f"WHERE {T}.id = v.column1 RETURNING {T}.id, {T}.n{c}"
    )
    return [tuple(r) for r in conn.execute(text(sql), params).fetchall()]


SQLITE_SELECT = text(f"SELECT id, n FROM {T} WHERE id IN (SELECT value FROM json_each(:k))")


def sqlite_c_select(conn: Connection, deltas: Deltas, c: str) -> list[tuple[int, int]]:
    executemany(conn, deltas, c)
    return [tuple(r) for r in conn.execute(SQLITE_SELECT, {"k": json.dumps(sorted(deltas))}).fetchall()]


SQLITE_FORMS = [
    Form("a", "writer: UPDATE FROM json_each(:rows) RETURNING", sqlite_a, True, "n/a"),
    Form("b", "UPDATE SET n = n + CASE id WHEN ... END WHERE id IN (...) RETURNING", sqlite_b, True, "n/a", True),
    Form("c", "executemany single-row UPDATE (no RETURNING)", executemany, False, "n/a", statements="1 (xP)"),
    Form("d", "UPDATE FROM (VALUES ...) RETURNING", sqlite_d, True, "n/a", True),
    Form("e*", "single-row UPDATE RETURNING per parent (writer's P=1 path)", per_row_returning, True, "n/a",
         statements="P"),
    Form("c+sel*", "(c) then SELECT id, n WHERE id IN json_each(:k) for the new values", sqlite_c_select, True,
         "n/a", statements="2"),
]


# -- MariaDB / MySQL --------------------------------------------------------------

def mysql_a(conn: Connection, deltas: Deltas, c: str) -> None:
    keys = sorted(deltas)
    for start in range(0, len(keys), MYSQL_CHUNK):
        chunk = keys[start : start + MYSQL_CHUNK]
        params: dict[str, Any] = {}
        whens = []
        for m, k in enumerate(chunk):
            params[f"k{m}"] = k
            params[f"d{m}"] = deltas[k]
            whens.append(f"WHEN id = :k{m} THEN :d{m}")
        sql = (
            f"UPDATE {T} SET n = n + CASE {' '.join(whens)} ELSE 0 END "
            f"WHERE id IN ({', '.join(f':k{m}' for m in range(len(chunk)))}) ORDER BY id{c}"
        )
        conn.execute(text(sql), params)
    return None


def mysql_c(conn: Connection, deltas: Deltas, c: str) -> None:
    keys = sorted(deltas)
    params: dict[str, Any] = {}
    selects = []
    for m, k in enumerate(keys):
        params[f"k{m}"] = k
        params[f"d{m}"] = deltas[k]
        selects.append(f"SELECT :k{m} AS k, :d{m} AS d" if m == 0 else f"SELECT :k{m}, :d{m}")
    conn.execute(
        text(f"SELECT id FROM {T} WHERE id IN ({', '.join(f':k{m}' for m in range(len(keys)))}) "
             f"ORDER BY id FOR UPDATE{c}"),
        params,
    ).fetchall()
    conn.execute(
        text(f"UPDATE {T} JOIN ({' UNION ALL '.join(selects)}) AS v ON {T}.id = v.k SET {T}.n = {T}.n + v.d{c}"),
        params,
    )
    return None


MYSQL_D = text(
    f"UPDATE {T} JOIN JSON_TABLE(:rows, '$[*]' COLUMNS(k INT PATH '$[0]', d INT PATH '$[1]')) AS v "
    f"ON {T}.id = v.k SET {T}.n = {T}.n + v.d"
)


def mysql_d(conn: Connection, deltas: Deltas, c: str) -> None:
    conn.execute(MYSQL_D, {"rows": json.dumps([[k, deltas[k]] for k in sorted(deltas)])})
    return None


def mysql_d_locked(conn: Connection, deltas: Deltas, c: str) -> None:
    keys = sorted(deltas)
    conn.execute(
        text(f"SELECT id FROM {T} WHERE id IN ({', '.join(f':k{m}' for m in range(len(keys)))}) "
             f"ORDER BY id FOR UPDATE{c}"),
        {f"k{m}": k for m, k in enumerate(keys)},
    ).fetchall()
    return mysql_d(conn, deltas, c)


MYSQL_FORMS = [
    Form("a", "writer: UPDATE SET n = n + CASE WHEN ... END WHERE id IN (...) ORDER BY id", mysql_a, False, "yes",
         True, "ceil(P/1000)"),
    Form("b", "executemany single-row UPDATE", executemany, False, "yes", statements="P"),
    Form("c", "SELECT ... ORDER BY id FOR UPDATE; UPDATE JOIN (UNION ALL ...)", mysql_c, False, "yes", True, "2"),
    Form("d", "UPDATE JOIN JSON_TABLE(:json) (no ORDER BY)", mysql_d, False, "NO"),
    Form("e*", "single-row UPDATE per parent, execute() each (writer's P=1 path)", per_row, False, "yes",
         statements="P"),
    Form("f*", "SELECT ... WHERE id IN (...) ORDER BY id FOR UPDATE; then (d)", mysql_d_locked, False, "yes",
         True, "2"),
]


# -- harness ----------------------------------------------------------------------

def forms_for(dialect: str) -> list[Form]:
    if dialect == "postgresql":
        return PG_FORMS
    if dialect == "sqlite":
        return SQLITE_FORMS
    if dialect in ("mysql", "mariadb"):
        return MYSQL_FORMS
    raise SystemExit(f"no candidate forms for dialect {dialect}")


def reset(engine: Any, p: int) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {T}"))
        conn.execute(text(f"CREATE TABLE {T} (id INTEGER PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0)"))
        conn.execute(text(f"INSERT INTO {T} (id, n) VALUES (:id, 0)"), [{"id": i} for i in range(1, p + 1)])
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text(f"ANALYZE {T}"))
            conn.commit()


def delta_map(rng: random.Random, p: int) -> Deltas:
    keys = list(range(1, p + 1))
    rng.shuffle(keys)  # every form has to sort
    # ~100 per parent in the P=100 shape (10,000 children), some removals; never 0.
    return {k: rng.choice((-1, 1)) * rng.randint(1, 150) for k in keys}


@dataclass
class Result:
    median_us: float
    reps: int
    wrong: str = ""


def run_form(engine: Any, form: Form, p: int, reps: int, cold: bool) -> Result:
    reset(engine, p)
    expected = {i: 0 for i in range(1, p + 1)}
    rng = random.Random(p)
    times: list[float] = []
    wrong: list[str] = []
    warm = WARMUP[p]
    started = time.perf_counter()
    with engine.connect() as conn:
        for r in range(warm + reps):
            deltas = delta_map(rng, p)
            comment = f" /* cold {r} */" if cold else ""
            conn.begin()
            t0 = time.perf_counter_ns()
            try:
                returned = form.fn(conn, deltas, comment)
            except Exception as exc:  # report and move on
                conn.rollback()
                return Result(float("nan"), len(times), f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            t1 = time.perf_counter_ns()
            conn.commit()
            for k, d in deltas.items():
                expected[k] += d
            if r >= warm:
                times.append((t1 - t0) / 1000)
            if form.returns:
                got = dict(returned or [])
                if got != {k: expected[k] for k in deltas} and "returned" not in wrong:
                    wrong.append("returned")
            if r >= warm + 5 and time.perf_counter() - started > BUDGET_S:
                break
        actual = dict(conn.execute(text(f"SELECT id, n FROM {T}")).all())
        conn.rollback()
    if actual != expected:
        bad = sum(1 for k in expected if actual.get(k) != expected[k])
        wrong.append(f"table ({bad} rows differ)")
    return Result(statistics.median(times), len(times), ("WRONG: " + ", ".join(wrong)) if wrong else "")


def bench(url: str, quick: bool) -> None:
    engine = create_engine(url)
    dialect = engine.dialect.name
    with engine.connect() as conn:
        if dialect == "sqlite":
            version = "SQLite " + conn.exec_driver_sql("select sqlite_version()").scalar()
        else:
            version = conn.exec_driver_sql("select version()").scalar().split(" on ")[0]
    print(f"\n== {engine.url.render_as_string(hide_password=True)}  ({version})")
    forms = forms_for(dialect)
    shapes = [(p, max(10, reps // 10) if quick else reps) for p, reps in SHAPES]
    table: dict[tuple[str, str], dict[int, Result]] = {}
    for p, reps in shapes:
        for form in forms:
            table.setdefault((form.label, ""), {})[p] = run_form(engine, form, p, reps, cold=False)
            if form.variable_text and p == 100:
                table.setdefault((form.label, "cold"), {})[p] = run_form(engine, form, p, reps, cold=True)
            sys.stdout.write(".")
            sys.stdout.flush()
    print()
    header = f"{'form':<9}{'RET':<5}{'lock':<6}" + "".join(f"{'P=' + format(p, ','):>16}" for p, _ in shapes)
    print(header + "   statement")
    notes = []
    for (label, variant), results in table.items():
        form = next(f for f in forms if f.label == label)
        name = label + (" cold" if variant else "")
        cells = []
        for p, _ in shapes:
            res = results.get(p)
            if res is None:
                cells.append(f"{'':>16}")
                continue
            mark = "!" if res.wrong else ""
            cells.append(f"{res.median_us:>12,.0f}{mark:<1}/{res.reps:<3}" if res.median_us == res.median_us
                         else f"{'error' + mark:>16}")
            if res.wrong:
                notes.append(f"  {name} P={p}: {res.wrong}")
        ret = "yes" if form.returns else "no"
        print(f"{name:<9}{ret:<5}{form.lock_order:<6}" + "".join(cells) + f"   {form.doc}")
    print("  (median µs per application / repetitions timed; RET: new values come back; "
          "lock: rows locked in key order)")
    returning = bool(engine.dialect.update_returning)
    for p, _ in shapes:
        ok = [(res.median_us, label) for (label, variant), results in table.items()
              if not variant and (res := results.get(p)) and not res.wrong and res.median_us == res.median_us]
        byl = {f.label: f for f in forms}
        locked = [(t, lb) for t, lb in ok if byl[lb].lock_order != "NO"]
        line = f"  P={p:,}: fastest correct, key-ordered locks: " + (
            "%s (%s µs)" % (min(locked)[1], format(min(locked)[0], ",.0f")) if locked else "-")
        if returning:
            ret = [(t, lb) for t, lb in locked if byl[lb].returns]
            if ret:
                line += "; of those returning new values: %s (%s µs)" % (min(ret)[1], format(min(ret)[0], ",.0f"))
        unl = [(t, lb) for t, lb in ok if byl[lb].lock_order == "NO"]
        if unl and min(unl)[0] < min(locked)[0]:
            line += "; faster but lock order NOT guaranteed: %s (%s µs)" % (min(unl)[1], format(min(unl)[0], ",.0f"))
        print(line)
    if notes:
        print("WRONG / errors:")
        print("\n".join(notes))
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {T}"))
    engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("urls", nargs="*", default=DEFAULT_URLS)
    ap.add_argument("--quick", action="store_true", help="a tenth of the repetitions (smoke test)")
    args = ap.parse_args()
    for url in args.urls:
        bench(url, args.quick)


if __name__ == "__main__":
    main()
