"""Numbers as the database stores them (private).

``where=`` and ``sum=`` are evaluated in Python on the values a flush
writes, but the database stores what the column can hold: PostgreSQL and
MariaDB/MySQL round ``Decimal("9.999")`` to ``10.00`` in a ``Numeric(12, 2)``,
``2.4`` to ``2`` in an ``Integer`` (a float half-way to the even integer, a
decimal away from zero), a float to single precision in ``REAL`` / MariaDB's
``FLOAT``; a web form's ``"7"`` becomes 7 everywhere. Counting the unrounded
value would disagree with the recount (``where=amount >= 10`` counts
``9.999`` stored as ``10.00``). :func:`as_stored` gives, per column type, the
conversion the flush's database applies (measured on PostgreSQL 15, MariaDB
10.11 and SQLite 3.40, which keeps numbers as given).
"""

from __future__ import annotations

import struct
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Callable

from sqlalchemy import Float, Integer, Numeric, TypeDecorator

from .collation import dialect_name, dialect_of

__all__ = ["as_stored", "single_precision"]

_ROUNDING = ("postgresql", "mysql", "mariadb")


_SINGLE: dict[tuple[Any, str], bool] = {}


def single_precision(type_: Any, dialect: Any) -> bool:
    """Does the column keep single-precision floats on this database (PostgreSQL
    ``REAL`` / ``FLOAT(p <= 24)``, MariaDB/MySQL ``FLOAT``; a ``with_variant()``
    type as its variant there)? Read from the type's DDL for ``dialect``."""
    key = (type_, dialect.name)
    found = _SINGLE.get(key)
    if found is None:
        try:
            ddl = str(type_.compile(dialect=dialect)).upper()
        except Exception:  # noqa: BLE001 - a type the dialect cannot render: as double precision
            ddl = ""
        digits = ddl[ddl.find("(") + 1:ddl.find(")")].split(",")[0] if "(" in ddl else ""
        precision = int(digits) if digits.strip().isdigit() else None
        if dialect.name == "postgresql":
            found = ddl.startswith("REAL") or ddl.startswith("FLOAT") and precision is not None and precision <= 24
        elif dialect.name in ("mysql", "mariadb"):
            found = ddl.startswith("FLOAT") and (precision is None or precision <= 24)
        else:
            found = False
        _SINGLE[key] = found
    return found


def as_stored(type_: Any, mapper: Any) -> Callable[[Any], Any] | None:
    """``value -> the value the column stores`` for a number column (None for
    any other, and for a user's ``TypeDecorator``, whose type says)."""
    if isinstance(type_, TypeDecorator) or not isinstance(type_, (Integer, Numeric, Float)):
        return None
    if isinstance(type_, Integer):
        kind = "integer"
    elif isinstance(type_, Float):
        kind = "float"
    else:
        kind = "numeric"
    scale = getattr(type_, "scale", None)
    asdecimal = getattr(type_, "asdecimal", kind == "numeric")

    def stored(value: Any) -> Any:
        if value is None or type(value) is int or isinstance(value, bool):
            return value
        if isinstance(value, str):  # a web form's "7" or "9.999"
            try:
                value = Decimal(value.strip())
            except InvalidOperation:
                return value  # (not a number: the database refuses it, or compares it clearly wrong)
            if value == value.to_integral_value() and kind == "integer":
                return int(value)
        dialect = dialect_name(mapper)
        if dialect not in _ROUNDING:  # (SQLite: as given; one Python type per column, for sums)
            if kind == "integer":
                return value
            if kind == "float" or not asdecimal:
                return float(value)
            return Decimal(repr(value)) if isinstance(value, float) else value
        if kind == "integer":
            if isinstance(value, float):
                return round(value)  # (half to even, as the servers convert a float)
            return int(Decimal(value).quantize(Decimal(1), ROUND_HALF_UP))
        if kind == "float":
            value = float(value)
            single = single_precision(type_, dialect_of(mapper))
            return struct.unpack("f", struct.pack("f", value))[0] if single else value
        digits = scale if scale is not None else (0 if dialect != "postgresql" else None)
        if digits is None:
            return value
        exact = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        exact = exact.quantize(Decimal(1).scaleb(-digits), ROUND_HALF_UP)
        return exact if asdecimal else float(exact)

    return stored
