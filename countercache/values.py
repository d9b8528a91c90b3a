"""Numbers, and keys, as the database stores them (private).

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

Keys alike: :func:`canonical_keys` files a parent key given as another type
(``"3"`` for an integer key) under the form stored; :func:`check_counter_column`
refuses a counter column that cannot hold a count.
"""

from __future__ import annotations

import struct
import uuid
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Callable

from sqlalchemy import Float, Integer, Numeric, TypeDecorator

from .collation import dialect_name, dialect_of
from .errors import ConfigurationError

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


def check_counter_column(relationship: str, type_: Any, column_kwargs: dict[str, Any]) -> None:
    """A counter's column holds a number, never NULL (``NULL + 1`` is NULL: every later
    change would be lost), or the declaration fails here, before any table is made."""
    what = f"counter_cache({relationship!r})"
    try:
        instance = type_() if isinstance(type_, type) else type_
        affinity = instance._type_affinity
    except Exception:  # noqa: BLE001 - not a SQLAlchemy type at all
        raise ConfigurationError(f"{what}: type_ must be a SQLAlchemy number type, not {type_!r}") from None
    if affinity is None or not issubclass(affinity, (Integer, Numeric, Float)):
        raise ConfigurationError(
            f"{what}: type_ must be a number type (Integer, BigInteger, Numeric, Float, or a TypeDecorator over one), "
            f"not {instance!r}: the counter adds to it")
    if column_kwargs.get("nullable"):
        raise ConfigurationError(
            f"{what}: a counter column is never NULL (NULL plus a change is NULL, and every later change "
            "would be lost); leave nullable= out (the column is NOT NULL DEFAULT 0)")


def key_converters(columns: Any) -> tuple[Any, ...] | None:
    """Per key column, ``(python type, conversion)`` where a value given as
    another type (a string from a web form for an integer or UUID key, a
    number for a string key) is stored by the database as that type; None
    when no column needs one."""
    found = []
    for col in columns:
        try:
            python_type = col.type.python_type
        except NotImplementedError:  # (a TypeDecorator without one, say)
            python_type = None
        found.append((python_type, python_type) if python_type in (int, uuid.UUID, str) else None)
    return tuple(found) if any(found) else None


def canonical_key(converters: tuple[Any, ...], key: Any) -> Any:
    """The key as the database will store it (``"3"`` -> ``3`` for an integer key)."""
    if all(c is None or type(v) is c[0] or v is None for c, v in zip(converters, key)):
        return key
    return tuple(v if c is None or v is None or type(v) is c[0] else c[1](v if c[0] is int else str(v))
                 for c, v in zip(converters, key))


def canonical_keys(converters: tuple[Any, ...], by_key: dict[Any, Any], add: Any) -> dict[Any, Any]:
    """``by_key`` with its keys as the database stores them, the values of keys
    that are then equal combined with ``add``; ``by_key`` itself (no copy) when
    every key already is (the common case: this runs on every flush)."""
    if len(converters) == 1:  # (a one-column key: checked without a call per key)
        converter = converters[0]
        if converter is None:
            return by_key
        python_type = converter[0]
        for key in by_key:
            value = key[0]
            if type(value) is not python_type and value is not None:
                break
        else:
            return by_key
    elif all(canonical_key(converters, key) is key for key in by_key):
        return by_key
    found: dict[Any, Any] = {}
    for key, value in by_key.items():
        key = canonical_key(converters, key)
        found[key] = add(found[key], value) if key in found else value
    return found
