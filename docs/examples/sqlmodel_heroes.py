"""SQLModel: the tutorial's teams and heroes, with a counter of each team's heroes.

Needs ``pip install countercache[frameworks]`` (SQLModel, Flask-SQLAlchemy).
Run as ``python sqlmodel_heroes.py [DATABASE_URL]`` (default: SQLite in memory).
"""

# (no `from __future__ import annotations`: SQLModel reads the annotations at class creation)
import sys
from typing import Optional

from sqlmodel import Field, Relationship, Session, SQLModel, create_engine, select

import countercache
from countercache.sqlmodel import counter_field


class Team(SQLModel, table=True):
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=50)
    headquarters: str = Field(max_length=50)
    heroes: list["Hero"] = Relationship(back_populates="team")
    hero_count: int = counter_field("heroes")


class Hero(SQLModel, table=True):
    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=50)
    secret_name: str = Field(max_length=50)
    age: Optional[int] = Field(default=None, index=True)
    team_id: Optional[int] = Field(default=None, foreign_key="team.id")
    team: Optional[Team] = Relationship(back_populates="heroes")


engine = create_engine(sys.argv[1] if len(sys.argv) > 1 else "sqlite://")
SQLModel.metadata.create_all(engine)


def show(session: Session, when: str) -> None:
    teams = session.exec(select(Team).order_by(Team.name)).all()
    print(f"{when}:", ", ".join(f"{t.name}={t.hero_count}" for t in teams))


with Session(engine) as session:
    preventers = Team(name="Preventers", headquarters="Sharp Tower")
    z_force = Team(name="Z-Force", headquarters="Sister Margaret's Bar")
    session.add(Hero(name="Deadpond", secret_name="Dive Wilson", team=z_force))
    session.add(Hero(name="Rusty-Man", secret_name="Tommy Sharp", age=48, team=preventers))
    session.add(Hero(name="Spider-Boy", secret_name="Pedro Parqueador"))
    session.commit()
    show(session, "created")

    spider_boy = session.exec(select(Hero).where(Hero.name == "Spider-Boy")).one()
    spider_boy.team = preventers  # joins a team: +1
    session.add(spider_boy)
    session.add(Hero(name="Black Lion", secret_name="Trevor Challa", age=35, team_id=preventers.id))
    session.commit()
    show(session, "joined")

    spider_boy.team = None  # leaves it: -1
    session.delete(session.exec(select(Hero).where(Hero.name == "Deadpond")).one())
    session.commit()
    show(session, "left and deleted")

    try:
        Team(name="Avengers", headquarters="Tower", hero_count=3)
    except countercache.AssignmentError as exc:
        print("refused:", exc)
    print("drift:", countercache.check(session))
