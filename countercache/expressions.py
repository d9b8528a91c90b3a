"""Conditional and summing counters: one expression, read by Python and by SQL (private).

``where=`` and ``sum=`` are SQL expressions over the child's columns. The
very same expression object is

* evaluated in Python on a child row's old and new values during a flush
  (SQLAlchemy's own ORM evaluator, the one behind
  ``synchronize_session="evaluate"``, reading a dict of values instead of an
  object), and
* rendered into the SQL of ``check()``, ``reconcile()`` and Alembic's
  ``backfill_counter``,

so the flush and the recount cannot disagree. An expression the evaluator
cannot run in Python (a SQL function, a subquery, another table's column)
is refused when mappers are configured.

NULL behaves as in SQL: a condition that is NULL does not count, and a NULL
summed value adds 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import Enum, Float, Integer, Numeric, TypeDecorator
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.evaluator import UnevaluatableError
from sqlalchemy.sql import ColumnElement

from ._compat import EvaluatorCompiler, column_annotation, enum_db_value, expect_expression, property_of_column
from .errors import ConfigurationError

Evaluator = Callable[[dict[str, Any]], Any]


class _ValuesEvaluator(EvaluatorCompiler):
    """SQLAlchemy's evaluator, reading attribute values from a dict."""

    def __init__(self, mapper: Mapper[Any]) -> None:
        super().__init__(mapper.class_)
        self.mapper = mapper
        self.keys: list[str] = []

    def visit_column(self, clause: Any) -> Evaluator:
        parentmapper = column_annotation(clause, "parentmapper")
        if parentmapper is None or not self.mapper.isa(parentmapper):
            raise UnevaluatableError(f"{clause} is not a column of {self.mapper.class_.__name__}")
        key = property_of_column(parentmapper, clause).key
        if key not in self.keys:
            self.keys.append(key)
        if isinstance(clause.type, Enum):
            # as the database compares it: a member or its string, as stored
            type_ = clause.type
            return lambda values: enum_db_value(type_, values.get(key))
        return lambda values: values.get(key)

    def visit_bindparam(self, clause: Any) -> Evaluator:
        if isinstance(clause.type, Enum):  # ("open" compared with an Enum column: as stored)
            value = enum_db_value(clause.type, clause.callable() if clause.callable else clause.value)
            return lambda values: value
        return super().visit_bindparam(clause)  # type: ignore[no-any-return]


def resolve(value: Any, child: Mapper[Any], what: str, name: str) -> ColumnElement[Any]:
    """The SQL expression behind ``where=`` / ``sum=`` (a callable is called now)."""
    if callable(value) and not isinstance(value, ColumnElement) and not hasattr(value, "__clause_element__"):
        value = value()
    if isinstance(value, str):
        if what != "sum":
            raise ConfigurationError(f"{name}: where= takes a SQL expression, not the string {value!r}")
        prop = child.attrs.get(value)
        if prop is None or not hasattr(prop, "columns"):
            raise ConfigurationError(f"{name}: sum={value!r} is not a column of {child.class_.__name__}")
        value = getattr(child.class_, value)
    try:
        return expect_expression(value)
    except Exception as exc:
        raise ConfigurationError(f"{name}: {what}= is not a SQL expression ({exc})") from None


def compile_evaluator(expression: ColumnElement[Any], child: Mapper[Any], what: str,
                      name: str) -> tuple[Evaluator, list[str]]:
    """A Python function of a values dict, and the attribute keys it reads."""
    compiler = _ValuesEvaluator(child)
    try:
        fn = compiler.process(expression)
    except UnevaluatableError as exc:
        # (SQLAlchemy names an operator by its function's repr: "<function like_op at 0x...>")
        why = re.sub(r"<function (\w+?)(?:_op)? at 0x[0-9a-f]+>", lambda m: m.group(1).upper(), str(exc))
        raise ConfigurationError(
            f"{name}: {what}= cannot be evaluated in Python during a flush ({why}); "
            "use plain comparisons and arithmetic over the child's own columns"
        ) from None
    if not compiler.keys:
        raise ConfigurationError(f"{name}: {what}= uses none of {child.class_.__name__}'s columns")
    if what == "sum" and not is_number(expression.type):
        raise ConfigurationError(
            f"{name}: sum= must be a number, not {expression.type!r} "
            f"({sql_text(expression)}); sum a numeric column or expression"
        )
    return fn, compiler.keys


def is_number(type_: Any) -> bool:
    """Integer, Numeric or Float (SQLAlchemy 2.1's Float is no Numeric), also under a TypeDecorator."""
    if isinstance(type_, TypeDecorator):
        type_ = type_.impl_instance
    return isinstance(type_, (Integer, Numeric, Float))


def sql_text(expression: ColumnElement[Any]) -> str:
    """The expression as SQL text over the child table's columns (for migrations)."""
    return str(expression.compile(compile_kwargs={"literal_binds": True}))
