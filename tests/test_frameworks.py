"""Flask-SQLAlchemy, SQLModel and FastAPI-style async code (issue 17): the
docs' examples on every backend (the async one where the ``async`` extra has
a driver: aiosqlite, asyncpg), and SQLModel's constructor, which assigns
every field's default."""

# (no `from __future__ import annotations`: SQLModel reads the annotations at class creation)
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from sqlalchemy.orm import registry
from sqlmodel import Field, Relationship, Session, SQLModel, select

import countercache
from countercache import counter_cache
from countercache.sqlmodel import counter_field
from helpers import assert_counts
from models import qa

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def run_example(name: str, url: str, cwd: Path) -> str:
    """Run ``docs/examples/<name>`` on ``url``; it prints what its ``.out`` shows."""
    done = subprocess.run([sys.executable, str(EXAMPLES / name), url], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = "\n".join(line.rstrip() for line in done.stdout.splitlines()).strip()
    assert printed == (EXAMPLES / name).with_suffix(".out").read_text().strip()
    return printed


def url_of(engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def test_flask_example(engine, tmp_path):
    run_example("flask_app.py", url_of(engine), tmp_path)
    assert assert_counts(engine) == {1: 4}


def test_sqlmodel_example(engine, tmp_path):
    run_example("sqlmodel_heroes.py", url_of(engine), tmp_path)
    assert sorted(assert_counts(engine, "team", "hero_count", "hero", "team_id").values()) == [0, 2]


#: the async drivers of the ``async`` extra (none for MariaDB/MySQL)
ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}


@pytest.mark.sqlite_postgresql_only
def test_fastapi_style_async_example(engine, backend, tmp_path):
    url = engine.url.set(drivername=ASYNC_DRIVERS[backend])
    run_example("fastapi_async.py", url.render_as_string(hide_password=False), tmp_path)
    assert assert_counts(engine) == {1: 1, 2: 2}


def tutorial(spelled_out: bool = False):
    """The SQLModel tutorial's Team and Hero, on a registry of their own."""

    class Base(SQLModel, registry=registry()):
        pass

    class TeamBase(Base):
        name: str = Field(max_length=50)

    class Team(TeamBase, table=True):
        id: Optional[int] = Field(default=None, primary_key=True)
        heroes: list["Hero"] = Relationship(back_populates="team")
        if spelled_out:
            hero_count: int = Field(default=0, sa_column=counter_cache("heroes").column)
        else:
            hero_count: int = counter_field("heroes")

    class Hero(Base, table=True):
        id: Optional[int] = Field(default=None, primary_key=True)
        name: str = Field(max_length=50)
        team_id: Optional[int] = Field(default=None, foreign_key="team.id")
        team: Optional[Team] = Relationship(back_populates="heroes")

    return Base, TeamBase, Team, Hero


@pytest.mark.parametrize("spelled_out", [False, True], ids=["counter_field", "sa_column"])
def test_sqlmodel_constructor_takes_the_default_only(engine, spelled_out):
    Base, TeamBase, Team, Hero = tutorial(spelled_out)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        made = Team(name="Preventers")
        validated = Team.model_validate(TeamBase(name="Z-Force"))
        assert made.hero_count == validated.hero_count == 0
        session.add_all([Hero(name="Rusty-Man", team=made), Hero(name="Spider-Boy", team=made),
                         Hero(name="Deadpond", team=validated), Hero(name="Tarantula")])
        session.commit()
        assert (made.hero_count, validated.hero_count) == (2, 1)
        tarantula = session.exec(select(Hero).where(Hero.name == "Tarantula")).one()
        tarantula.team = validated
        session.delete(session.exec(select(Hero).where(Hero.name == "Rusty-Man")).one())
        session.commit()
        assert (made.hero_count, validated.hero_count) == (1, 2)
        assert countercache.check(session) == []

        refused = [lambda: Team(name="Avengers", hero_count=3),
                   lambda: Team.model_validate({"name": "Avengers", "hero_count": 3}),
                   lambda: setattr(made, "hero_count", 0),  # (a persistent team: never)
                   lambda: made.sqlmodel_update({"hero_count": 1})]
        for attempt in refused:
            with pytest.raises(countercache.AssignmentError, match="Team.hero_count is maintained"):
                attempt()
        fresh = Team(name="Avengers")
        with pytest.raises(countercache.AssignmentError):
            fresh.hero_count = 0  # (outside the constructor: refused as in plain SQLAlchemy)
        session.rollback()
    assert sorted(assert_counts(engine, "team", "hero_count", "hero", "team_id").values()) == [1, 2]


def test_plain_constructor_keyword_still_refused(engine):
    """Any value but the default (the row's start) is refused; the default, given
    to a new object once (as a dataclass constructor does), is let through."""
    m = qa("bulk")
    with pytest.raises(countercache.AssignmentError):
        m.User(name="ada", question_count=5)
    user = m.User(name="ada", question_count=0)
    with pytest.raises(countercache.AssignmentError):
        user.question_count = 0  # (a second assignment: refused)


@pytest.mark.parametrize("form", ["sa_column without .column", "plain default"])
def test_sqlmodel_forms_that_sqlmodel_does_not_map_are_refused(form):
    """``Field(sa_column=counter_cache("heroes"))`` (SQLModel ignores a non-Column)
    and ``hero_count: int = counter_cache("heroes")`` (a default, not a column):
    the counter would never be kept; refused when the mappers are configured."""
    from sqlalchemy.orm import configure_mappers

    class Base(SQLModel, registry=registry()):
        pass

    class Team(Base, table=True):
        id: Optional[int] = Field(default=None, primary_key=True)
        heroes: list["Hero"] = Relationship(back_populates="team")
        if form == "plain default":
            hero_count: int = counter_cache("heroes")
        else:
            hero_count: int = Field(default=0, sa_column=counter_cache("heroes"))

    class Hero(Base, table=True):
        id: Optional[int] = Field(default=None, primary_key=True)
        team_id: Optional[int] = Field(default=None, foreign_key="team.id")
        team: Optional[Team] = Relationship(back_populates="heroes")

    try:
        with pytest.raises(countercache.ConfigurationError,
                           match=r"Team\.hero_count: counter_cache\('heroes'\) as a SQLModel field is not mapped "
                                 r"by SQLModel; declare it with countercache\.sqlmodel\.counter_field\('heroes'\)"):
            configure_mappers()
    finally:
        Base._sa_registry.dispose()  # (a mapper that failed to configure would fail every later configure)
