"""SQLModel: a counter as a field of a table model.

SQLModel builds each column from a field; :func:`counter_field` is the
field of a counter, its column the one :func:`~countercache.counter_cache`
makes (with the same arguments)::

    from sqlmodel import Field, Relationship, SQLModel
    from countercache.sqlmodel import counter_field

    class Team(SQLModel, table=True):
        id: int | None = Field(default=None, primary_key=True)
        name: str
        heroes: list["Hero"] = Relationship(back_populates="team")
        hero_count: int = counter_field("heroes")

    class Hero(SQLModel, table=True):
        id: int | None = Field(default=None, primary_key=True)
        name: str
        team_id: int | None = Field(default=None, foreign_key="team.id")
        team: Team | None = Relationship(back_populates="heroes")

``Team(name="Preventers")`` and ``Team.model_validate(team_create)`` give
the counter its default, 0, as SQLModel gives every field its default;
any other value (``Team(name="x", hero_count=3)``), like any later
assignment, is refused with :class:`~countercache.AssignmentError`.
``Field(default=0, sa_column=counter_cache("heroes").column)`` is the same
thing spelled out.

Needs ``pip install countercache[frameworks]`` (SQLModel 0.0.14+).
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Field

from .installation import counter_cache

__all__ = ["counter_field"]


def counter_field(relationship: str, *, strategy: str | None = None, where: Any = None,
                  sum: Any = None, shards: int | None = None,  # noqa: A002 - counter_cache()'s name
                  description: str | None = None, **column_kwargs: Any) -> Any:
    """A SQLModel field holding a counter of the children on ``relationship``.

    Takes :func:`~countercache.counter_cache`'s arguments (``strategy=``,
    ``where=``, ``sum=``, ``shards=``, and column arguments such as
    ``type_=BigInteger`` or ``index=True``); ``description`` goes to the
    Pydantic field (the OpenAPI schema).
    """
    column = counter_cache(relationship, strategy=strategy, where=where, sum=sum, shards=shards,
                           **column_kwargs).column
    return Field(default=column.default.arg, sa_column=column, description=description)
