"""Flask-SQLAlchemy 3.1: counters on ``db.Model`` classes, checked through ``db.session``.

Needs ``pip install countercache[frameworks]`` (Flask-SQLAlchemy, SQLModel).
Run as ``python flask_app.py [DATABASE_URL]`` (default: SQLite in memory).
"""

from __future__ import annotations

import sys
from typing import Optional

from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import countercache
from countercache import counter_cache


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class User(db.Model):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    questions: Mapped[list["Question"]] = relationship(back_populates="user")
    question_count: Mapped[int] = counter_cache("questions")


class Question(db.Model):
    __tablename__ = "questions"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id"), index=True)
    user: Mapped[Optional[User]] = relationship(back_populates="questions")


app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = sys.argv[1] if len(sys.argv) > 1 else "sqlite://"
db.init_app(app)


@app.post("/users")
def create_user():
    user = User(name=request.json["name"])
    db.session.add(user)
    db.session.commit()
    return {"id": user.id, "question_count": user.question_count}


@app.post("/users/<int:user_id>/questions")
def ask(user_id: int):
    user = db.get_or_404(User, user_id)
    question = Question(title=request.json["title"], user=user)
    db.session.add(question)
    db.session.commit()
    return {"id": question.id, "question_count": user.question_count}


@app.delete("/questions/<int:question_id>")
def delete_question(question_id: int):
    question = db.get_or_404(Question, question_id)
    user = question.user
    db.session.delete(question)
    db.session.commit()
    return {"question_count": user.question_count}


@app.get("/health/counters")
def counters_health():
    # db.session is a scoped_session: check() reads in its current session
    drifts = countercache.check(db.session)
    return {"drift": [{"counter": d.name, "pk": d.pk, "stored": d.stored, "actual": d.actual}
                      for d in drifts]}


with app.app_context():
    db.create_all()

client = app.test_client()
ada = client.post("/users", json={"name": "ada"}).json
print("new user:", ada)
first = client.post(f"/users/{ada['id']}/questions", json={"title": "Why?"}).json
print("asked:", first)
print("asked:", client.post(f"/users/{ada['id']}/questions", json={"title": "How?"}).json)
print("deleted:", client.delete(f"/questions/{first['id']}").json)
print("health:", client.get("/health/counters").json)

with app.app_context():
    # behind the ORM's back (raw SQL): check() finds it, reconcile() repairs it
    db.session.execute(db.text("UPDATE users SET question_count = 5"))
    db.session.commit()
    print("after raw SQL:", client.get("/health/counters").json)
    fixed = countercache.reconcile(db.session)
    db.session.commit()
    print("repaired:", [(d.name, d.pk, d.stored, d.actual) for d in fixed])
    with countercache.suspended(db.session):  # a bulk import, counted afterwards
        db.session.add_all([Question(title=f"import {i}", user_id=ada["id"]) for i in range(3)])
        db.session.commit()
    print("after import:", [(d.stored, d.actual) for d in countercache.reconcile(db.session)])
    db.session.commit()
    print("question_count:", db.session.get(User, ada["id"]).question_count)
