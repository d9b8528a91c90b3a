"""Alembic: op.create_counter_trigger / op.drop_counter_trigger and ``trigger`` counters in autogenerate.

Each test builds an Alembic environment in ``tmp_path`` (as tests/test_alembic.py
does), generates migrations from successive models, runs them, and compares
the counters with an independent ``SELECT count(*)`` after raw SQL writes.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache.alembic  # noqa: F401 (registers the operations and the comparator)
import countercache
from countercache import _registry, counter_cache, triggers
from countercache._compat import alembic_plugins
from countercache.errors import CounterCacheError

REPO = Path(__file__).resolve().parent.parent

ENV_PY = '''
from alembic import context

config = context.config
if context.is_offline_mode():
    context.configure(url=config.attributes["url"], target_metadata=config.attributes.get("metadata"),
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    context.configure(connection=config.attributes["connection"],
                      target_metadata=config.attributes.get("metadata"), **config.attributes.get("configure", {}))
    with context.begin_transaction():
        context.run_migrations()
'''

#: a condition whose SQL text holds a quote, a ``%`` and a child-qualified name inside string literals
TRICKY = ("open", "it's questions.state", "100%")


class Env:
    def __init__(self, root: Path, engine: sa.Engine) -> None:
        self.root, self.engine = root, engine
        (root / "versions").mkdir(parents=True)
        (root / "env.py").write_text(ENV_PY)
        shutil.copy(REPO / "migrations" / "script.py.mako", root / "script.py.mako")
        self.metadata: Any = None
        self.configure: dict[str, Any] = {}

    def config(self, **kw: Any) -> Config:
        cfg = Config(**kw)
        cfg.set_main_option("script_location", str(self.root))
        cfg.attributes["metadata"] = self.metadata
        cfg.attributes["configure"] = self.configure
        cfg.attributes["url"] = self.engine.url.render_as_string(hide_password=False)
        return cfg

    def run(self, fn: Any, *args: Any, **kw: Any) -> Any:
        cfg = self.config()
        with self.engine.begin() as connection:
            cfg.attributes["connection"] = connection
            return fn(cfg, *args, **kw)

    def revision(self, rev_id: str) -> str:
        script = self.run(command.revision, message="m", autogenerate=True, rev_id=rev_id)
        source = Path(script.path).read_text()
        compile(source, f"{rev_id}.py", "exec")
        return source

    def upgrade(self, target: str = "head") -> None:
        self.run(command.upgrade, target)

    def downgrade(self, target: str) -> None:
        self.run(command.downgrade, target)

    def offline_sql(self, span: str) -> str:
        buf = io.StringIO()
        command.upgrade(self.config(output_buffer=buf), span, sql=True)
        return buf.getvalue()

    def write(self, rev_id: str, down: str | None, upgrade: str) -> None:
        (self.root / "versions" / f"{rev_id}_hand.py").write_text(
            "from alembic import op\nimport countercache.alembic\n"
            f"revision = {rev_id!r}\ndown_revision = {down!r}\nbranch_labels = None\ndepends_on = None\n\n"
            f"def upgrade():\n    {upgrade}\n\ndef downgrade():\n    pass\n")


@pytest.fixture
def env(tmp_path: Path, engine: sa.Engine) -> Env:
    return Env(tmp_path / "migrations", engine)


def schema_v1() -> sa.MetaData:
    md = sa.MetaData()
    sa.Table("users", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("name", sa.String(50)))
    sa.Table("questions", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("state", sa.String(40), nullable=False),
             sa.Column("user_id", sa.ForeignKey("users.id"), index=True))
    return md


def models(strategy: str, where: Any = None, shards: int | None = None) -> tuple[type, type, sa.MetaData]:
    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str | None] = mapped_column(sa.String(50))
        questions: Mapped[list[Question]] = relationship()
        question_count: Mapped[int] = counter_cache("questions", strategy=strategy,
                                                    where=where and (lambda: where(Question)),
                                                    **({} if shards is None else {"shards": shards}))

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        state: Mapped[str] = mapped_column(sa.String(40))
        user_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id"), index=True)

    sa.orm.configure_mappers()
    return User, Question, Base.metadata


def is_open(q: Any) -> Any:
    return q.state == "open"


def tricky(q: Any) -> Any:
    return q.state.in_(TRICKY)


SQL_WHERE = {None: "", is_open: " AND q.state = 'open'", tricky: " AND q.state IN ('open', 'it''s questions.state', '100%')"}


def seed(engine: sa.Engine, users: bool = True) -> None:
    states = ["open", "closed", "it's questions.state", "100%"]
    with engine.begin() as conn:
        if users:
            conn.execute(sa.text("INSERT INTO users (id, name) VALUES (:i, :n)"),
                         [{"i": i, "n": n} for i, n in ((1, "a"), (2, "b"), (3, "c"))])
        conn.execute(sa.text("INSERT INTO questions (id, state, user_id) VALUES (:i, :s, :u)"),
                     [{"i": i, "s": states[i % 4], "u": (i % 4) or None} for i in range(1, 13)])


def raw_writes(engine: sa.Engine) -> None:
    """Raw SQL the ORM never sees: one statement per transaction, checked by the caller."""
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO questions (id, state, user_id) VALUES (101, 'open', 1), (102, 'closed', 2), "
                             "(103, '100%', 2), (104, 'open', NULL)", execution_options={"no_parameters": True})
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE questions SET user_id = 3 WHERE id IN (101, 104)")
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE questions SET state = 'open' WHERE id = 102")
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM questions WHERE id IN (1, 2)")


def exact(engine: sa.Engine, where: Any = None) -> dict[int, int]:
    """Every stored count equals its recount (under ``where``); returns them."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT u.id, u.question_count, (SELECT count(*) FROM questions q WHERE q.user_id = u.id"
            f"{SQL_WHERE[where]}) FROM users u ORDER BY u.id")).all()
    assert [(i, s) for i, s, _ in rows] == [(i, r) for i, _, r in rows]
    return {i: s for i, s, _ in rows}


def installed(engine: sa.Engine, cls: type) -> bool:
    with engine.connect() as conn:
        return triggers.installed(conn, _registry.lookup(cls.question_count))


def bases(engine: sa.Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return triggers.installed_bases(conn)


def body(source: str, part: str = "upgrade") -> str:
    rest = source.split(f"def {part}()", 1)[1]
    return rest.split("def downgrade()", 1)[0] if part == "upgrade" else rest


def start(env: Env, engine: sa.Engine, strategy: str, where: Any = None) -> tuple[type, str]:
    """Tables without the counter (0001, seeded), then the counter added (0002)."""
    env.metadata = schema_v1()
    env.revision("0001")
    env.upgrade()
    seed(engine)
    User, _, env.metadata = models(strategy, where)
    source = env.revision("0002")
    env.upgrade()
    exact(engine, where)
    return User, source


# -- (a) a new trigger counter -----------------------------------------------------


def test_new_trigger_counter(env: Env, engine: sa.Engine) -> None:
    User, source = start(env, engine, "trigger")
    up = body(source)
    assert "op.add_column(" in up
    assert "op.create_counter_trigger('users', 'question_count', 'questions', 'user_id', parent_key='id')" in up
    assert up.index("add_column") < up.index("create_counter_trigger") < up.index("op.backfill_counter(")
    assert "op.drop_counter_trigger('users', 'question_count', 'questions', 'user_id', parent_key='id')" in \
        body(source, "downgrade")
    assert installed(engine, User)
    raw_writes(engine)
    assert exact(engine) == {1: 2, 2: 4, 3: 5}
    with Session(engine) as session:  # the ORM finds the triggers under the migration's names
        session.add(User(id=4, name="d"))
        session.flush()
        session.execute(sa.text("INSERT INTO questions (id, state, user_id) VALUES (200, 'open', 4)"))
        session.commit()
    assert exact(engine)[4] == 1

    sql = env.offline_sql("0001:0002")
    assert sql.count("CREATE TRIGGER") >= 3 and "cc_users_question_count_" in sql

    env.downgrade("0001")
    assert not installed(engine, User) and bases(engine) == {}


# -- (b) an ORM strategy switched to trigger, (c) and back ---------------------------


def test_switch_to_trigger_and_back(env: Env, engine: sa.Engine) -> None:
    _, source = start(env, engine, "bulk")
    assert "create_counter_trigger" not in source
    with engine.begin() as conn:  # rows the bulk strategy never counted: the backfill does
        conn.exec_driver_sql("INSERT INTO questions (id, state, user_id) VALUES (90, 'open', 1)")

    User, _, env.metadata = models("trigger")
    source = env.revision("0003")
    up = body(source)
    assert "add_column" not in up
    assert up.index("op.create_counter_trigger(") < up.index("op.backfill_counter(")
    env.upgrade()
    assert installed(engine, User)
    assert exact(engine) == {1: 4, 2: 3, 3: 3}
    raw_writes(engine)
    exact(engine)
    assert "create_counter_trigger" not in body(env.revision("0004a"))  # nothing left to do
    (env.root / "versions").joinpath(next(p.name for p in (env.root / "versions").iterdir()
                                          if p.name.startswith("0004a"))).unlink()

    User, _, env.metadata = models("bulk")
    source = env.revision("0004")
    up = body(source)
    assert "op.drop_counter_trigger('users', 'question_count', 'questions', 'user_id', parent_key='id')" in up
    assert "create_counter_trigger" not in up and "backfill_counter" not in up
    assert "op.create_counter_trigger('users', 'question_count'" in body(source, "downgrade")
    assert "backfill=True" in body(source, "downgrade")  # (the bulk strategy kept it meanwhile: recount)
    env.upgrade()
    assert not installed(engine, User) and bases(engine) == {}
    with engine.begin() as conn:  # rows nothing counts once the triggers are gone: the downgrade's recount does
        conn.exec_driver_sql("INSERT INTO questions (id, state, user_id) VALUES (200, 'x', 2)")
    env.downgrade("0003")
    assert installed(engine, User)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO questions (id, state, user_id) VALUES (300, 'x', 3)")
    exact(engine)


def test_create_counter_trigger_can_run_again(env: Env, engine: sa.Engine) -> None:
    """A migration that failed after creating the triggers (MariaDB's DDL is not
    transactional: a deadlocked backfill leaves them) runs again."""
    User, _ = start(env, engine, "bulk")
    call = "op.create_counter_trigger('users', 'question_count', 'questions', 'user_id', parent_key='id')"
    env.write("0003", "0002", f"{call}; {call}")
    User, _, env.metadata = models("trigger")
    env.upgrade()
    assert installed(engine, User)
    raw_writes(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET question_count = (SELECT count(*) FROM questions q "
                             "WHERE q.user_id = users.id)"))
    raw_writes_again = "INSERT INTO questions (id, state, user_id) VALUES (400, 'x', 1)"
    with engine.begin() as conn:
        conn.exec_driver_sql(raw_writes_again)
    exact(engine)  # counted once: the second create replaced the first's triggers


# -- (d) a changed where= ----------------------------------------------------------


def test_changed_definition(env: Env, engine: sa.Engine) -> None:
    User, _ = start(env, engine, "trigger", is_open)
    old = set(bases(engine))
    User, _, env.metadata = models("trigger", tricky)
    source = env.revision("0003")
    up = body(source)
    drop = "op.drop_counter_trigger('users', 'question_count', 'questions', 'user_id', where=\"questions.state = 'open'\""
    assert drop in up
    assert up.index(drop) < up.index("op.create_counter_trigger(") < up.index("op.backfill_counter(")
    env.upgrade()
    assert installed(engine, User) and set(bases(engine)).isdisjoint(old) and len(bases(engine)) == 1
    exact(engine, tricky)
    raw_writes(engine)
    exact(engine, tricky)

    env.downgrade("0002")  # the previous definition's triggers, and its values
    assert set(bases(engine)) == old
    exact(engine, is_open)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO questions (id, state, user_id) VALUES (400, 'open', 3), (401, '100%', 3)",
                             execution_options={"no_parameters": True})
    exact(engine, is_open)


def test_triggers_of_a_counter_no_longer_declared_are_dropped_by_name(env: Env, engine: sa.Engine) -> None:
    start(env, engine, "trigger")
    (base, child), = bases(engine).items()
    for path in (env.root / "versions").iterdir():  # no migration recorded their definition
        if path.name.startswith("0002"):
            path.write_text(path.read_text().replace("op.create_counter_trigger(", "(lambda *a, **k: None)("))
    env.metadata = schema_v1()
    env.metadata.tables["users"].append_column(sa.Column("question_count", sa.Integer, nullable=False,
                                                         server_default="0"))
    source = env.revision("0003")
    assert f"op.drop_counter_trigger(child_table='questions', name='{base}')" in body(source)
    assert "stay dropped" in body(source, "downgrade")
    env.upgrade()
    assert bases(engine) == {}


# -- the migration path generates what the declaration does --------------------------


def test_migration_and_declaration_give_the_same_triggers(env: Env, engine: sa.Engine) -> None:
    User, _, metadata = models("trigger", tricky)
    counter = _registry.lookup(User.question_count)
    metadata.create_all(engine)  # the declaration's triggers (create_all)
    declared = bases(engine)
    assert list(declared) == [triggers.trigger_name(counter)]
    seed(engine)
    raw_writes(engine)
    by_declaration = exact(engine, tricky)

    with engine.begin() as conn:
        triggers.execute(conn, triggers.drop_statements(counter, engine.dialect))
        conn.exec_driver_sql("DELETE FROM questions")
        conn.exec_driver_sql("UPDATE users SET question_count = 0")
    assert bases(engine) == {}
    env.write("0001", None, "op.create_counter_trigger('users', 'question_count', 'questions', 'user_id', "
              f"where={counter.where_sql!r}, parent_key='id')")
    env.upgrade()
    assert bases(engine) == declared and installed(engine, User)
    seed(engine, users=False)
    raw_writes(engine)
    assert exact(engine, tricky) == by_declaration
    metadata.drop_all(engine)


# -- (e) refusals -------------------------------------------------------------------


def test_refused_at_autogenerate(env: Env, engine: sa.Engine) -> None:
    class Base(DeclarativeBase):
        pass

    class Org(Base):
        __tablename__ = "orgs"
        id: Mapped[int] = mapped_column(primary_key=True)
        members: Mapped[list[Member]] = relationship()
        question_count: Mapped[int] = counter_cache("members.asks", strategy="trigger")

    class Member(Base):
        __tablename__ = "members"
        id: Mapped[int] = mapped_column(primary_key=True)
        org_id: Mapped[int] = mapped_column(sa.ForeignKey(Org.id))
        asks: Mapped[list[Ask]] = relationship()

    class Ask(Base):
        __tablename__ = "asks"
        id: Mapped[int] = mapped_column(primary_key=True)
        member_id: Mapped[int] = mapped_column(sa.ForeignKey(Member.id, onupdate="CASCADE"))

    env.metadata = Base.metadata
    with pytest.raises(CounterCacheError, match=r"Org\.question_count: asks's foreign key to members has ON UPDATE "
                                                r"CASCADE.*'bulk'"):
        env.revision("0001")


def test_refused_at_upgrade(env: Env, engine: sa.Engine) -> None:
    schema_v1().create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE users ADD COLUMN question_count INTEGER NOT NULL DEFAULT 0")
    env.write("0001", None, "op.create_counter_trigger('users', 'question_count', 'questions', 'user_id', "
              "where=\"users.name = 'x'\", parent_key='id')")
    name = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}.get(engine.dialect.name, "MariaDB/MySQL")
    with pytest.raises(CounterCacheError, match=rf"users\.question_count: which rows count depends on another "
                                                 rf"table \(users\).*on {name}.*'bulk'"):
        env.upgrade()
    assert bases(engine) == {}


@pytest.mark.mariadb_only
def test_mariadb_refuses_a_self_referential_counter_at_upgrade(env: Env, engine: sa.Engine) -> None:
    md = sa.MetaData()
    sa.Table("comments", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("parent_id", sa.ForeignKey("comments.id")),
             sa.Column("reply_count", sa.Integer, nullable=False, server_default="0"))
    md.create_all(engine)
    env.write("0001", None, "op.create_counter_trigger('comments', 'reply_count', 'comments', 'parent_id', "
              "parent_key='id')")
    with pytest.raises(CounterCacheError, match=r"comments\.reply_count: MariaDB/MySQL triggers cannot update "
                                                 r"the table that fired them .*'bulk'"):
        env.upgrade()
    md.drop_all(engine)


# -- other shapes: many-to-many, sum=, self-referential ------------------------------


def tagging(with_counter: bool) -> sa.MetaData:
    class Base(DeclarativeBase):
        pass

    post_tags = sa.Table("post_tags", Base.metadata,
                         sa.Column("post_id", sa.ForeignKey("posts.id"), primary_key=True),
                         sa.Column("tag_id", sa.ForeignKey("tags.id"), primary_key=True))

    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)

    class Tag(Base):
        __tablename__ = "tags"
        id: Mapped[int] = mapped_column(primary_key=True)
        posts: Mapped[list[Post]] = relationship(secondary=post_tags)
        if with_counter:
            post_count: Mapped[int] = counter_cache("posts", strategy="trigger")

    sa.orm.configure_mappers()
    return Base.metadata


def test_many_to_many(env: Env, engine: sa.Engine) -> None:
    env.metadata = tagging(False)
    env.revision("0001")
    env.upgrade()
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO posts (id) VALUES (1), (2), (3)")
        conn.exec_driver_sql("INSERT INTO tags (id) VALUES (1), (2)")
        conn.exec_driver_sql("INSERT INTO post_tags (post_id, tag_id) VALUES (1, 1), (2, 1)")
    env.metadata = tagging(True)
    up = body(env.revision("0002"))
    assert "op.create_counter_trigger('tags', 'post_count', 'post_tags', 'tag_id', parent_key='id')" in up
    env.upgrade()
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO post_tags (post_id, tag_id) VALUES (3, 1), (3, 2)")
        conn.exec_driver_sql("UPDATE post_tags SET tag_id = 2 WHERE post_id = 1")
        conn.exec_driver_sql("DELETE FROM post_tags WHERE post_id = 2")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT id, post_count FROM tags ORDER BY id").all() == [(1, 1), (2, 2)]
    env.downgrade("0001")
    assert bases(engine) == {}


def scores(strategy: str | None) -> sa.MetaData:
    class Base(DeclarativeBase):
        pass

    class Player(Base):
        __tablename__ = "players"
        id: Mapped[int] = mapped_column(primary_key=True)
        games: Mapped[list[Game]] = relationship()
        if strategy:
            total: Mapped[int] = counter_cache("games", strategy=strategy, sum=lambda: Game.points * 2,
                                               where=lambda: Game.points > 1)

    class Game(Base):
        __tablename__ = "games"
        id: Mapped[int] = mapped_column(primary_key=True)
        points: Mapped[int | None]
        player_id: Mapped[int | None] = mapped_column(sa.ForeignKey("players.id"))

    sa.orm.configure_mappers()
    return Base.metadata


def test_sum(env: Env, engine: sa.Engine) -> None:
    env.metadata = scores(None)
    env.revision("0001")
    env.upgrade()
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO players (id) VALUES (1), (2)")
        conn.exec_driver_sql("INSERT INTO games (id, points, player_id) VALUES (1, 5, 1), (2, 1, 1), (3, 3, 2)")
    env.metadata = scores("trigger")
    up = body(env.revision("0002"))
    assert "op.create_counter_trigger('players', 'total', 'games', 'player_id', where='games.points > 1', " \
           "sum='games.points * 2', parent_key='id')" in up
    env.upgrade()
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO games (id, points, player_id) VALUES (4, 4, 2), (5, NULL, 2), (6, 2, 1)")
        conn.exec_driver_sql("UPDATE games SET points = 7 WHERE id = 2")
        conn.exec_driver_sql("DELETE FROM games WHERE id = 1")
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT p.id, p.total, (SELECT coalesce(sum(g.points * 2), 0) FROM games g WHERE g.player_id = p.id "
            "AND g.points > 1) FROM players p ORDER BY p.id").all()
    assert [tuple(r) for r in rows] == [(1, 18, 18), (2, 14, 14)]


@pytest.mark.sqlite_postgresql_only
def test_self_referential(env: Env, engine: sa.Engine) -> None:
    def comments(counter: bool) -> sa.MetaData:
        class Base(DeclarativeBase):
            pass

        class Comment(Base):
            __tablename__ = "comments"
            id: Mapped[int] = mapped_column(primary_key=True)
            parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("comments.id"))
            replies: Mapped[list[Comment]] = relationship()
            if counter:
                reply_count: Mapped[int] = counter_cache("replies", strategy="trigger")

        sa.orm.configure_mappers()
        return Base.metadata

    env.metadata = comments(False)
    env.revision("0001")
    env.upgrade()
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO comments (id, parent_id) VALUES (1, NULL), (2, 1), (3, 1)")
    env.metadata = comments(True)
    up = body(env.revision("0002"))
    assert "op.create_counter_trigger('comments', 'reply_count', 'comments', 'parent_id', parent_key='id')" in up
    env.upgrade()
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO comments (id, parent_id) VALUES (4, 2), (5, 2), (6, 1)")
        conn.exec_driver_sql("UPDATE comments SET parent_id = 3 WHERE id = 5")
        conn.exec_driver_sql("DELETE FROM comments WHERE id = 6")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT id, reply_count FROM comments ORDER BY id").all() == \
            [(1, 2), (2, 1), (3, 1), (4, 0), (5, 0)]


# -- offline (--sql) ------------------------------------------------------------------


def test_offline_sql_prints_the_trigger_ddl(env: Env, engine: sa.Engine) -> None:
    env.write("0001", None, "op.create_counter_trigger('users', 'question_count', 'questions', 'user_id', "
              "where=\"questions.state = 'open'\", parent_key='id')\n    "
              "op.drop_counter_trigger(child_table='questions', name='cc_users_question_count_0123abcd')")
    sql = env.offline_sql("base:0001")
    assert "CREATE TRIGGER" in sql and "DROP TRIGGER IF EXISTS" in sql and "cc_users_question_count_0123abcd_ins" in sql
    assert "NEW.state" in sql or "r.state" in sql  # the condition reads the trigger's row
    (env.root / "versions" / "0001_hand.py").write_text(
        (env.root / "versions" / "0001_hand.py").read_text().replace(", parent_key='id'", ""))
    with pytest.raises(CounterCacheError, match="parent_key= is required offline"):
        env.offline_sql("base:0001")
    if engine.dialect.name not in ("mysql", "mariadb"):  # (refused there)
        env.write("0001", None, "op.create_counter_trigger('comments', 'reply_count', 'comments', 'parent_id', "
                  "where=\"comments.status = 'open'\", parent_key='id')")
        sql = env.offline_sql("base:0001")
        assert "CREATE TRIGGER" in sql and "status" in sql and "'open'" in sql


# -- where=/sum= text read back over the trigger's row ---------------------------------


@pytest.mark.parametrize("sql, expected", [
    ("questions.state = 'open'", "NEW.state = 'open'"),
    ('"questions"."state" = \'open\'', "NEW.state = 'open'"),
    ("`questions`.`state` = 'open'", "NEW.state = 'open'"),
    ("state IN ('questions.state', 'it''s', '100%')", "NEW.state IN ('questions.state', 'it''s', '100%')"),
    ("lower(questions.state) <> 'x' AND questions.user_id IS NOT NULL",
     "lower( NEW.state) <> 'x' AND NEW.user_id IS NOT NULL"),
    ("main.questions.state = 'a'", "NEW.state = 'a'"),
])
def test_text_reads_the_child_columns_from_the_row(sql: str, expected: str) -> None:
    from sqlalchemy.dialects import sqlite

    from countercache.trigger_sql import _sql
    from countercache.trigger_text import TextCounter

    md = sa.MetaData()
    users = sa.Table("users", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("n", sa.Integer))
    questions = sa.Table("questions", md, sa.Column("id", sa.Integer, primary_key=True),
                         sa.Column("state", sa.String), sa.Column("user_id", sa.ForeignKey("users.id")))
    counter = TextCounter(users, "n", questions, ("user_id",), ("id",), where=sql)
    from countercache.trigger_sql import _Shape

    shape = _Shape(counter)
    assert shape.foreign == []
    assert "".join(_sql(shape.condition, shape, "NEW", sqlite.dialect()).split()) == "".join(expected.split())


def test_text_over_another_table_is_refused() -> None:
    from sqlalchemy.dialects import postgresql

    from countercache.trigger_text import TextCounter

    md = sa.MetaData()
    users = sa.Table("users", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("n", sa.Integer))
    questions = sa.Table("questions", md, sa.Column("id", sa.Integer, primary_key=True),
                         sa.Column("user_id", sa.ForeignKey("users.id")))
    counter = TextCounter(users, "n", questions, ("user_id",), ("id",), where="users.n > 1")
    assert "depends on another table (users)" in triggers.refusal(counter, postgresql.dialect())
    with pytest.raises(CounterCacheError, match="no column 'nope'"):
        TextCounter(users, "n", questions, ("user_id",), ("id",), where="questions.nope > 1")


def test_counter_on_new_tables(env: Env, engine: sa.Engine) -> None:
    User, _, env.metadata = models("trigger")
    source = env.revision("0001")
    up, down = body(source), body(source, "downgrade")
    assert up.index("op.create_table('questions'") < up.index("op.create_counter_trigger(")
    assert "backfill_counter" not in up  # the tables are empty
    assert down.index("op.drop_counter_trigger(") < down.index("op.drop_table('questions')")
    env.upgrade()
    seed(engine)
    raw_writes(engine)
    assert exact(engine) == {1: 2, 2: 4, 3: 5}


def test_a_new_tables_where_counter_records_its_definition(env: Env, engine: sa.Engine) -> None:
    """A where= counter made with its table gets a backfill (of an empty table) that
    records its definition: the next autogenerate finds nothing to do, and a later
    change's downgrade restores this definition, not a plain count."""
    User, _, env.metadata = models("bulk", is_open)
    source = env.revision("0001")
    assert "op.backfill_counter('users', 'question_count', 'questions', 'user_id', where=" in body(source)
    env.upgrade()
    seed(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE users SET question_count = (SELECT count(*) FROM questions q "
                             "WHERE q.user_id = users.id AND q.state = 'open')"))
    assert "backfill_counter" not in env.revision("0002")
    (env.root / "versions").joinpath(next(p.name for p in (env.root / "versions").iterdir()
                                          if p.name.startswith("0002"))).unlink()
    User, _, env.metadata = models("trigger", is_open)
    env.revision("0002")
    env.upgrade()
    exact(engine, is_open)
    env.downgrade("0001")
    exact(engine, is_open)


def test_removed_counter_drops_its_triggers_and_the_downgrade_restores_them(env: Env, engine: sa.Engine) -> None:
    User, _ = start(env, engine, "trigger", is_open)
    env.metadata = schema_v1()
    source = env.revision("0003")
    up = body(source)
    drop = ("op.drop_counter_trigger('users', 'question_count', 'questions', 'user_id', "
            "where=\"questions.state = 'open'\", parent_key='id')")
    assert up.index(drop) < up.index("op.drop_column('users', 'question_count')")
    down = body(source, "downgrade")
    assert down.index("op.add_column(") < down.index("op.create_counter_trigger(") < down.index("op.backfill_counter(")
    env.upgrade()
    assert bases(engine) == {}
    env.downgrade("0002")
    assert installed(engine, User)
    raw_writes(engine)
    exact(engine, is_open)


@pytest.mark.skipif(alembic_plugins() is None, reason="Alembic < 1.18 has no autogenerate_plugins")
def test_plugin_and_import_together_give_one_create(env: Env, engine: sa.Engine) -> None:
    env.metadata = schema_v1()
    env.revision("0001")
    env.upgrade()
    seed(engine)
    countercache.alembic.autogenerate.install()
    env.configure = {"autogenerate_plugins": ["alembic.autogenerate.*", "countercache"]}
    *_, env.metadata = models("trigger")
    up = body(env.revision("0002"))
    assert up.count("op.create_counter_trigger(") == 1 and up.count("op.backfill_counter(") == 1
    assert up.index("op.create_counter_trigger(") < up.index("op.backfill_counter(")


def regions(counter: bool) -> sa.MetaData:
    class Base(DeclarativeBase):
        pass

    class Region(Base):
        __tablename__ = "regions"
        country: Mapped[str] = mapped_column(sa.String(2), primary_key=True)
        code: Mapped[int] = mapped_column(primary_key=True)
        shops: Mapped[list[Shop]] = relationship()
        if counter:
            shop_count: Mapped[int] = counter_cache("shops", strategy="trigger")

    class Shop(Base):
        __tablename__ = "shops"
        __table_args__ = (sa.ForeignKeyConstraint(["country", "region"], ["regions.country", "regions.code"]),)
        id: Mapped[int] = mapped_column(primary_key=True)
        country: Mapped[str | None] = mapped_column(sa.String(2))
        region: Mapped[int | None]

    sa.orm.configure_mappers()
    return Base.metadata


def test_composite_key(env: Env, engine: sa.Engine) -> None:
    env.metadata = regions(False)
    env.revision("0001")
    env.upgrade()
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO regions (country, code) VALUES ('fr', 1), ('fr', 2), ('de', 1)")
        conn.exec_driver_sql("INSERT INTO shops (id, country, region) VALUES (1, 'fr', 1), (2, 'de', 1), (3, 'fr', 1)")
    env.metadata = regions(True)
    up = body(env.revision("0002"))
    assert ("op.create_counter_trigger('regions', 'shop_count', 'shops', ('country', 'region'), "
            "parent_key=('country', 'code'))") in up
    env.upgrade()
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO shops (id, country, region) VALUES (4, 'fr', 2), (5, 'de', 1)")
        conn.exec_driver_sql("UPDATE shops SET region = 2 WHERE id = 3")
        conn.exec_driver_sql("DELETE FROM shops WHERE id = 2")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT country, code, shop_count FROM regions ORDER BY country, code").all() == \
            [("de", 1, 1), ("fr", 1, 1), ("fr", 2, 2)]


@pytest.mark.sqlite_only
def test_sqlite_batch_copy_around_a_trigger_counter(env: Env, engine: sa.Engine) -> None:
    """docs/database.rst: drop the triggers, batch, create them again with a recount."""
    User, _ = start(env, engine, "trigger")
    args = "'users', 'question_count', 'questions', 'user_id', parent_key='id'"
    (env.root / "versions" / "0003_batch.py").write_text(
        "from alembic import op\nimport countercache.alembic\n"
        "revision = '0003'\ndown_revision = '0002'\nbranch_labels = None\ndepends_on = None\n\n"
        f"def upgrade():\n    op.drop_counter_trigger({args})\n"
        "    with op.batch_alter_table('users', recreate='always') as batch_op:\n"
        "        batch_op.drop_column('name')\n"
        f"    op.create_counter_trigger({args}, backfill=True)\n\n"
        "def downgrade():\n    pass\n")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO questions (id, state, user_id) VALUES (500, 'x', 1)")
    env.upgrade()
    with engine.connect() as conn:
        assert "name" not in {c["name"] for c in sa.inspect(conn).get_columns("users")}
    raw_writes(engine)
    exact(engine)


# -- sharded_trigger ----------------------------------------------------------------


def shard_rows(engine: sa.Engine) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        return [(r[0], int(r[1])) for r in conn.exec_driver_sql(
            "SELECT parent_key, delta FROM countercache_shards WHERE counter = 'users.question_count' "
            "ORDER BY parent_key, shard")]


def folded_exact(engine: sa.Engine, User: type) -> dict[int, int]:
    """exact() and check() see the pending deltas; once folded, the columns are the recounts."""
    real = {1: 0, 2: 0, 3: 0}
    with engine.connect() as conn:
        for i, n in conn.exec_driver_sql("SELECT u.id, (SELECT count(*) FROM questions q WHERE q.user_id = u.id) "
                                         "FROM users u"):
            real[i] = n
    with Session(engine) as session:
        assert {u.id: countercache.exact(session, u, "question_count") for u in session.query(User)} == real
    assert countercache.check(engine, User.question_count) == []
    countercache.fold(engine, User.question_count)
    assert shard_rows(engine) == []
    return exact(engine)


SHARDED = ("op.create_counter_trigger('users', 'question_count', 'questions', 'user_id', parent_key='id', "
           "strategy='sharded_trigger', shards=4)")


def test_switch_to_sharded_trigger_and_back(env: Env, engine: sa.Engine) -> None:
    start(env, engine, "bulk")
    with engine.begin() as conn:  # a row the bulk strategy never counted: the backfill does
        conn.exec_driver_sql("INSERT INTO questions (id, state, user_id) VALUES (90, 'open', 1)")

    User, _, env.metadata = models("sharded_trigger", shards=4)
    source = env.revision("0003")
    up = body(source)
    assert "op.create_table('countercache_shards'" in up
    assert up.index("op.create_table(") < up.index(SHARDED) < up.index(
        "op.backfill_counter('users', 'question_count', 'questions', 'user_id', parent_key='id', shards=True)")
    assert SHARDED.replace("create_", "drop_") in body(source, "downgrade")
    env.upgrade()
    assert installed(engine, User) and list(bases(engine)) == [
        triggers.trigger_name(_registry.lookup(User.question_count))]
    assert exact(engine) == {1: 4, 2: 3, 3: 3} and shard_rows(engine) == []
    raw_writes(engine)
    assert shard_rows(engine) != []
    assert folded_exact(engine, User) == {1: 3, 2: 4, 3: 5}
    raw_writes_more = "INSERT INTO questions (id, state, user_id) VALUES (300, 'x', 3), (301, 'x', 1)"
    with engine.begin() as conn:
        conn.exec_driver_sql(raw_writes_more)
    assert "create_counter_trigger" not in body(env.revision("0004a"))  # nothing left to do
    (env.root / "versions").joinpath(next(p.name for p in (env.root / "versions").iterdir()
                                          if p.name.startswith("0004a"))).unlink()

    env.downgrade("0002")  # the pending deltas are recounted as the triggers go
    assert bases(engine) == {}
    assert exact(engine) == {1: 4, 2: 4, 3: 6}

    env.upgrade()  # and again, switched back by autogenerate (the definition from the 0003 migration)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM questions WHERE id = 301")
    User, _, env.metadata = models("bulk")
    source = env.revision("0004")
    up, down = body(source), body(source, "downgrade")
    drop = SHARDED.replace("create_", "drop_")
    assert up.index(drop) < up.index("op.drop_table('countercache_shards')")
    assert down.index("op.create_table('countercache_shards'") < down.index(SHARDED[:-1] + ", backfill=True)")
    env.upgrade()
    assert bases(engine) == {} and exact(engine) == {1: 3, 2: 4, 3: 6}
    env.downgrade("0003")
    User, _, env.metadata = models("sharded_trigger", shards=4)
    assert installed(engine, User) and shard_rows(engine) == [] and exact(engine) == {1: 3, 2: 4, 3: 6}
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO questions (id, state, user_id) VALUES (400, 'x', 2)")
        conn.exec_driver_sql("UPDATE questions SET user_id = 1 WHERE id = 300")
    assert folded_exact(engine, User) == {1: 4, 2: 5, 3: 5}


def test_sharded_trigger_after_sharded_drops_the_pending_rows(env: Env, engine: sa.Engine) -> None:
    env.metadata = schema_v1()
    env.revision("0001")
    env.upgrade()
    seed(engine)
    User, Question, env.metadata = models("sharded", shards=4)
    env.revision("0002")
    env.upgrade()
    with Session(engine) as session:  # pending deltas of the ORM's sharded strategy
        session.add_all([Question(id=50, state="open", user_id=1), Question(id=51, state="open", user_id=2)])
        session.commit()
    assert shard_rows(engine) == [("1", 1), ("2", 1)]

    User, _, env.metadata = models("sharded_trigger", shards=4)
    up = body(env.revision("0003"))
    assert SHARDED in up and "shards=True" in up and "create_table" not in up
    env.upgrade()
    assert shard_rows(engine) == []  # folded into the recount, not counted twice
    assert exact(engine) == {1: 4, 2: 4, 3: 3}
    raw_writes(engine)
    folded_exact(engine, User)


def test_sharded_trigger_shard_count_change_recreates(env: Env, engine: sa.Engine) -> None:
    start(env, engine, "bulk")
    User4, _, env.metadata = models("sharded_trigger", shards=4)
    env.revision("0003")
    env.upgrade()
    old = set(bases(engine))
    raw_writes(engine)  # pending rows of the 4-shard triggers

    User, _, env.metadata = models("sharded_trigger", shards=8)
    source = env.revision("0004")
    up = body(source)
    assert up.index(SHARDED.replace("create_", "drop_")) < up.index(SHARDED.replace("=4", "=8")) < up.index(
        "op.backfill_counter(")
    assert SHARDED.replace("create_", "drop_").replace("=4", "=8") in body(source, "downgrade")
    env.upgrade()
    new = set(bases(engine))
    assert len(new) == 1 and new.isdisjoint(old) and installed(engine, User)
    assert list(new) == [triggers.trigger_name(_registry.lookup(User.question_count))]
    assert shard_rows(engine) == [] and exact(engine) == {1: 2, 2: 4, 3: 5}
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO questions (id, state, user_id) VALUES (300, 'x', 3), (301, 'x', 1)")
    assert folded_exact(engine, User) == {1: 3, 2: 4, 3: 6}

    env.downgrade("0003")
    assert set(bases(engine)) == old
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM questions WHERE id = 300")
    assert folded_exact(engine, User4) == {1: 3, 2: 4, 3: 5}


def test_sharded_trigger_migration_and_declaration_give_the_same_triggers(env: Env, engine: sa.Engine) -> None:
    User, _, metadata = models("sharded_trigger", tricky, shards=8)
    counter = _registry.lookup(User.question_count)
    metadata.create_all(engine)
    declared = bases(engine)
    assert list(declared) == [triggers.trigger_name(counter)]
    with engine.begin() as conn:
        triggers.execute(conn, triggers.drop_statements(counter, engine.dialect))
    assert bases(engine) == {}
    env.write("0001", None, "op.create_counter_trigger('users', 'question_count', 'questions', 'user_id', "
              f"where={counter.where_sql!r}, parent_key='id', strategy='sharded_trigger', shards=8)")
    env.upgrade()
    assert bases(engine) == declared and installed(engine, User)
    seed(engine)
    raw_writes(engine)
    with Session(engine) as session:
        assert countercache.check(session, User.question_count) == []
    metadata.drop_all(engine)


def test_sharded_trigger_needs_its_shards_and_side_table(env: Env, engine: sa.Engine) -> None:
    schema_v1().create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE users ADD COLUMN question_count INTEGER NOT NULL DEFAULT 0")
    env.write("0001", None, "op.create_counter_trigger('users', 'question_count', 'questions', 'user_id', "
              "parent_key='id', strategy='sharded_trigger', shards=4)")
    with pytest.raises(CounterCacheError, match="needs the side table countercache_shards"):
        env.upgrade()
    env.write("0001", None, "op.create_counter_trigger('users', 'question_count', 'questions', 'user_id', "
              "parent_key='id', strategy='sharded_trigger')")
    with pytest.raises(CounterCacheError, match="shards must be an integer"):
        env.upgrade()
    assert bases(engine) == {}


def test_sharded_trigger_offline_sql(env: Env, engine: sa.Engine) -> None:
    env.write("0001", None, "op.create_counter_trigger('users', 'question_count', 'questions', 'user_id', "
              "parent_key='id', strategy='sharded_trigger', shards=4, backfill=True)\n    "
              "op.drop_counter_trigger('users', 'question_count', 'questions', 'user_id', parent_key='id', "
              "strategy='sharded_trigger', shards=4)")
    sql = env.offline_sql("base:0001")
    assert sql.count("CREATE TRIGGER") >= 4 and "countercache_shards" in sql and "_pdl" in sql
    assert sql.count("DELETE FROM countercache_shards WHERE countercache_shards.counter = 'users.question_count'") == 2
