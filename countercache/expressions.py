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

import operator
import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import Boolean, Enum, Float, Integer, Numeric, String, TypeDecorator
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.evaluator import UnevaluatableError
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.elements import ColumnClause
from sqlalchemy.sql.visitors import iterate

from ._compat import EvaluatorCompiler, column_annotation, enum_db_value, expect_expression, property_of_column
from .collation import compare
from .errors import ConfigurationError, CounterCacheError
from .values import as_stored

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
        stored = as_stored(clause.type, self.mapper)
        if stored is not None:
            # a number as the column holds it (rounded to its scale, "7" read as 7)
            return lambda values: stored(values.get(key))
        return lambda values: values.get(key)

    def visit_binary(self, clause: Any) -> Evaluator:
        """A comparison of strings: as the column's collation compares them
        (:mod:`countercache.collation`); anything else: SQLAlchemy's way."""
        op = getattr(clause.operator, "__name__", "")
        column = _string_column(clause.left, self.mapper) if op in _COLLATED else None
        if column is None and op in _COLLATED and op not in _LIKE:
            column = _string_column(clause.right, self.mapper)
            if column is not None and op in _FLIPPED:  # ('a' < col) is (col > 'a')
                left, right = self.process(clause.right), self.process(clause.left)
                return _collated(_FLIPPED[op], left, right, column, self.mapper, None)
        if column is None:
            return super().visit_binary(clause)  # type: ignore[no-any-return]
        left, right = self.process(clause.left), self.process(clause.right)
        return _collated(op, left, right, column, self.mapper, clause.modifiers.get("escape"))

    def visit_bindparam(self, clause: Any) -> Evaluator:
        if isinstance(clause.type, Enum):  # ("open" compared with an Enum column: as stored)
            given = clause.callable() if clause.callable else clause.value
            if isinstance(given, (list, tuple)):  # in_([...])
                value: Any = [enum_db_value(clause.type, v) for v in given]
            else:
                value = enum_db_value(clause.type, given)
            return lambda values: value
        return super().visit_bindparam(clause)  # type: ignore[no-any-return]


_LIKE = {"startswith_op", "endswith_op"}
_FLIPPED = {"eq": "eq", "ne": "ne", "lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}
_COLLATED = {"in_op", "not_in_op"} | _LIKE | set(_FLIPPED)


def _string_column(element: Any, mapper: Mapper[Any]) -> Any:
    """``element`` if it is a string column of the child (Enum aside: compared as stored)."""
    type_ = getattr(element, "type", None)
    if getattr(element, "table", None) is None or not isinstance(getattr(type_, "_type_affinity", None), type) \
            or not issubclass(type_._type_affinity, String) or isinstance(type_, Enum):
        return None
    return element


def _collated(op: str, left: Evaluator, right: Evaluator, column: Any, mapper: Mapper[Any],
              escape: str | None) -> Evaluator:
    def evaluate(values: dict[str, Any]) -> Any:
        a, b = left(values), right(values)
        if a is None or b is None:
            return None
        if not isinstance(a, str):
            return _PYTHON[op](a, b)
        if op in ("in_op", "not_in_op"):
            found: Any = False
            for item in b:
                if item is None:
                    found = None if found is False else found
                elif (compare("eq", column, mapper, a, item) if isinstance(item, str) else a == item):
                    found = True
                    break
            return found if op == "in_op" or found is None else not found
        if not isinstance(b, str):
            return _PYTHON[op](a, b)
        if op in _LIKE:
            return compare("like", column, mapper, a, b + "%" if op == "startswith_op" else "%" + b, escape)
        return compare(op, column, mapper, a, b)

    return evaluate


_PYTHON = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt,
           "ge": operator.ge, "in_op": lambda a, b: a in b, "not_in_op": lambda a, b: a not in b,
           "startswith_op": lambda a, b: a.startswith(b), "endswith_op": lambda a, b: a.endswith(b)}


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


class Unevaluable(ConfigurationError):
    """``where=`` / ``sum=`` that Python cannot evaluate during a flush (only SQL can)."""

    def raiser(self) -> Evaluator:
        error = self

        def evaluate(values: dict[str, Any]) -> Any:
            raise ConfigurationError(str(error))

        return evaluate


def columns_read(expression: ColumnElement[Any], child: Mapper[Any]) -> list[str]:
    """The attribute keys of ``child``'s columns that ``expression`` reads."""
    found: list[str] = []
    for element in iterate(expression):
        if isinstance(element, ColumnClause) and getattr(element, "table", None) is not None:
            try:
                prop = child.get_property_by_column(element)
            except Exception:  # noqa: BLE001 - not one of the child's columns
                continue
            if prop.key not in found:
                found.append(prop.key)
    return found


def _other_table(expression: ColumnElement[Any], child: Mapper[Any]) -> str | None:
    """``table.column`` of a column ``expression`` reads from a table ``child`` is not mapped to, if any."""
    for element in iterate(expression):
        table = getattr(element, "table", None) if isinstance(element, ColumnClause) else None
        if table is not None and getattr(table, "name", None) and all(table is not t for t in child.tables):
            return f"{table.name}.{element.name}"
    return None


def compile_evaluator(expression: ColumnElement[Any], child: Mapper[Any], what: str,
                      name: str) -> tuple[Evaluator, list[str]]:
    """A Python function of a values dict, and the attribute keys it reads."""
    compiler = _ValuesEvaluator(child)
    try:
        fn = compiler.process(expression)
    except UnevaluatableError as exc:
        # (SQLAlchemy names an operator by its function's repr: "<function like_op at 0x...>")
        why = re.sub(r"<function (\w+?)(?:_op)? at 0x[0-9a-f]+>", lambda m: m.group(1).upper(), str(exc))
        other = _other_table(expression, child)
        if other is not None:  # (the trigger strategy refuses another table's column too)
            raise ConfigurationError(
                f"{name}: {what}= reads {other}, a column of another table than {child.class_.__name__}'s, "
                f"which no strategy keeps yet; write it over {child.class_.__name__}'s own columns") from None
        raise Unevaluable(
            f"{name}: {what}= cannot be evaluated in Python during a flush ({why}); "
            "use plain comparisons and arithmetic over the child's own columns, or strategy 'trigger' "
            "(the database evaluates it)"
        ) from None
    if not compiler.keys:
        raise ConfigurationError(f"{name}: {what}= uses none of {child.class_.__name__}'s columns")
    affinity = getattr(expression.type, "_type_affinity", None)
    if what == "where" and not (affinity is not None and issubclass(affinity, Boolean)):
        # (a number or a string is true or false in Python, and in SQLite and MariaDB; PostgreSQL
        # refuses it in a WHERE: the recount of check() and the triggers would fail there)
        raise ConfigurationError(
            f"{name}: where= must be a boolean expression, not {expression.type!r} "
            f"({sql_text(expression)}); compare it, e.g. {sql_text(expression)} != 0 or ... IS NOT NULL"
        )
    if what == "sum" and not is_number(expression.type):
        raise ConfigurationError(
            f"{name}: sum= must be a number, not {expression.type!r} "
            f"({sql_text(expression)}); sum a numeric column or expression"
        )
    return _clear_errors(fn, what, name, sql_text(expression), compiler.keys), compiler.keys


def _clear_errors(fn: Evaluator, what: str, name: str, sql: str, keys: list[str]) -> Evaluator:
    """``fn``, raising a :class:`CounterCacheError` naming the counter where
    Python cannot compare or add the row's values as SQL would (a naive and an
    aware datetime, a date given as text) instead of a bare ``TypeError``."""
    def evaluate(values: dict[str, Any]) -> Any:
        try:
            return fn(values)
        except TypeError as exc:
            given = ", ".join(f"{k}={values.get(k)!r}" for k in keys)
            raise CounterCacheError(
                f"{name}: {what}= ({sql}) cannot be evaluated on a row with {given} ({exc}); "
                "give those attributes values of the column's Python type"
            ) from None
    return evaluate


def is_number(type_: Any) -> bool:
    """Integer, Numeric or Float (SQLAlchemy 2.1's Float is no Numeric), also under a TypeDecorator."""
    if isinstance(type_, TypeDecorator):
        type_ = type_.impl_instance
    return isinstance(type_, (Integer, Numeric, Float))


def sql_text(expression: ColumnElement[Any]) -> str:
    """The expression as SQL text over the child table's columns (for migrations)."""
    return str(expression.compile(compile_kwargs={"literal_binds": True}))
