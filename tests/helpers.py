"""Assertions shared by the test modules."""

from __future__ import annotations

from sqlalchemy import text


def assert_counts(engine, table: str = "users", counter: str = "question_count",
                  child: str = "questions", fk: str = "user_id") -> dict[int, int]:
    """Every stored counter equals an independent ``SELECT count(*)``; returns {id: count}."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            f"SELECT p.id, p.{counter}, (SELECT count(*) FROM {child} c WHERE c.{fk} = p.id) "
            f"FROM {table} p ORDER BY p.id"
        )).all()
    wrong = [(pk, stored, actual) for pk, stored, actual in rows if stored != actual]
    assert not wrong, f"{table}.{counter} drifted (id, stored, actual): {wrong}"
    return {pk: stored for pk, stored, _ in rows}
