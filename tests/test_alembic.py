"""Alembic: op.backfill_counter, counters in autogenerate, the example migrations/.

Each test builds an Alembic environment in ``tmp_path`` whose env.py takes
the connection and the target metadata from ``Config.attributes``, then
runs the whole cycle: generate, read the generated file, upgrade, compare
the counters with an independent ``SELECT count(*)``, print the offline SQL,
downgrade.
"""

from __future__ import annotations

import io
import random
import re
import shutil
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import countercache._compat
import countercache.alembic
from countercache import counter_cache
from countercache.alembic import autogenerate as cc_autogenerate

pytestmark = pytest.mark.sqlite_postgresql_only

REPO = Path(__file__).resolve().parent.parent
HAS_PLUGINS = countercache._compat.alembic_plugins() is not None  # Alembic 1.18+

ENV_PY = '''
from alembic import context

config = context.config
opts = dict(config.attributes.get("configure", {}))

if context.is_offline_mode():
    context.configure(url=config.attributes["url"], target_metadata=config.attributes.get("metadata"),
                      literal_binds=True, **opts)
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes["connection"]
    context.configure(connection=connection, target_metadata=config.attributes.get("metadata"),
                      **opts)
    with context.begin_transaction():
        context.run_migrations()
'''


# -- models ------------------------------------------------------------------


def schema_v1(index: bool = True) -> sa.MetaData:
    """The application before the counter: plain tables."""
    md = sa.MetaData()
    sa.Table("users", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("name", sa.String(50), nullable=False))
    sa.Table("questions", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("title", sa.String(200), nullable=False),
             sa.Column("user_id", sa.ForeignKey("users.id"), index=index))
    return md


def models_v2(strategy: str | None = None) -> tuple[type, type, sa.MetaData]:
    """The same tables, mapped, with ``User.question_count``."""

    class Base(DeclarativeBase):
        pass

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(sa.String(50))
        questions: Mapped[list[Question]] = relationship(back_populates="user")
        question_count: Mapped[int] = counter_cache("questions", strategy=strategy)

    class Question(Base):
        __tablename__ = "questions"
        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str] = mapped_column(sa.String(200))
        user_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id"), index=True)
        user: Mapped[User | None] = relationship(back_populates="questions")

    sa.orm.configure_mappers()
    return User, Question, Base.metadata


# -- the environment -----------------------------------------------------------


class Env:
    """An Alembic environment in a temporary directory, on the test's engine."""

    def __init__(self, root: Path, engine: sa.Engine) -> None:
        self.root = root
        self.engine = engine
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

    def revision(self, rev_id: str, message: str = "m") -> str:
        script = self.run(command.revision, message=message, autogenerate=True, rev_id=rev_id)
        return Path(script.path).read_text()

    def upgrade(self, target: str = "head") -> None:
        self.run(command.upgrade, target)

    def downgrade(self, target: str) -> None:
        self.run(command.downgrade, target)

    def offline_sql(self, span: str) -> str:
        buf = io.StringIO()
        command.upgrade(self.config(output_buffer=buf), span, sql=True)
        return buf.getvalue()

    def write(self, rev_id: str, down: str | None, upgrade: str, imports: str = "") -> None:
        (self.root / "versions" / f"{rev_id}_hand.py").write_text(
            f"from alembic import op\nimport sqlalchemy as sa\n{imports}\n"
            f"revision = {rev_id!r}\ndown_revision = {down!r}\n"
            "branch_labels = None\ndepends_on = None\n\n"
            f"def upgrade():\n{textwrap.indent(textwrap.dedent(upgrade), '    ')}\n\n"
            "def downgrade():\n    pass\n"
        )


@pytest.fixture
def env(tmp_path: Path, engine: sa.Engine) -> Env:
    return Env(tmp_path / "migrations", engine)


@pytest.fixture
def global_comparator() -> Iterator[None]:
    """Leave the import-path comparator installed after the test, whatever it did."""
    yield
    cc_autogenerate.install()


# 5 users; questions per user 3, 0, 7, 1, 2 and 2 without a user
COUNTS = {1: 3, 2: 0, 3: 7, 4: 1, 5: 2}


def seed(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (id, name) VALUES (:id, :name)"),
                     [{"id": i, "name": f"u{i}"} for i in COUNTS])
        rows = [{"t": f"q{u}.{k}", "u": u} for u, n in COUNTS.items() for k in range(n)]
        rows += [{"t": "orphan1", "u": None}, {"t": "orphan2", "u": None}]
        conn.execute(sa.text("INSERT INTO questions (title, user_id) VALUES (:t, :u)"), rows)


def drifts(engine: sa.Engine) -> list[tuple[int, int, int]]:
    """Independent check: ``(user id, stored, real)`` for every wrong counter."""
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT u.id, u.question_count, (SELECT count(*) FROM questions q WHERE q.user_id = u.id) "
            "FROM users u WHERE u.question_count <> "
            "(SELECT count(*) FROM questions q WHERE q.user_id = u.id) ORDER BY u.id"
        ))]


def stored(engine: sa.Engine) -> dict[int, int]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT id, question_count FROM users")).all())


def upgrade_body(source: str) -> str:
    return source.split("def upgrade()", 1)[1].split("def downgrade()", 1)[0]


def columns(engine: sa.Engine, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns(table)}


# -- autogenerate, the whole cycle ---------------------------------------------


def test_autogenerate_adds_counter_with_backfill(env: Env, engine: sa.Engine) -> None:
    env.metadata = schema_v1()
    first = env.revision("0001")
    assert "backfill_counter" not in first
    env.upgrade()
    seed(engine)

    *_, env.metadata = models_v2()
    source = env.revision("0002")
    body = upgrade_body(source)
    assert re.search(
        r"add_column\(('users', )?sa\.Column\('question_count', sa\.Integer\(\), "
        r"server_default='0', nullable=False\)\)",
        body,
    ), body
    assert body.count("backfill_counter(") == 1
    assert "op.backfill_counter('users', 'question_count', 'questions', 'user_id', parent_key='id')" in body
    assert body.index("add_column") < body.index("backfill_counter")
    assert "\nimport countercache.alembic" in source
    compile(source, "0002.py", "exec")  # the downgrade's no-op is valid Python

    env.upgrade()
    assert stored(engine) == COUNTS
    assert drifts(engine) == []

    sql = env.offline_sql("0001:0002")
    assert re.search(
        r"UPDATE users SET question_count=\(SELECT count\(\*\) AS count_1\s+FROM questions\s+"
        r"WHERE questions\.user_id = users\.id\)", sql,
    ), sql
    assert ("LOCK TABLE users IN EXCLUSIVE MODE" in sql) == (engine.dialect.name == "postgresql")

    env.downgrade("0001")
    assert "question_count" not in columns(engine, "users")
    env.downgrade("base")
    assert not sa.inspect(engine).has_table("users")


def test_counter_on_new_table_needs_no_backfill(env: Env, engine: sa.Engine) -> None:
    *_, env.metadata = models_v2()
    source = env.revision("0001")
    assert "create_table('users'" in source
    assert "backfill_counter" not in source
    env.upgrade()
    assert "question_count" in columns(engine, "users")


@pytest.mark.parametrize(
    "mode, expected",
    [("import", 1), ("plugin", 1), ("both", 1), ("neither", 0), ("excluded", 0)],
)
def test_plugin_and_import_paths(
    env: Env, engine: sa.Engine, global_comparator: None, mode: str, expected: int
) -> None:
    if mode == "plugin" and not HAS_PLUGINS:
        pytest.skip("Alembic < 1.18 has no autogenerate_plugins")
    env.metadata = schema_v1()
    env.revision("0001")
    env.upgrade()
    *_, env.metadata = models_v2()
    if mode in ("plugin", "neither"):
        cc_autogenerate.uninstall()
    else:
        cc_autogenerate.install()
    if mode in ("plugin", "both"):
        env.configure = {"autogenerate_plugins": ["alembic.autogenerate.*", "countercache"]}
    elif mode == "excluded":
        env.configure = {"autogenerate_plugins": ["alembic.autogenerate.*", "~countercache"]}
    body = upgrade_body(env.revision("0002"))
    assert "add_column" in body
    assert body.count("backfill_counter(") == expected


def test_where_or_sum_changed_gets_a_new_backfill(env: Env, engine: sa.Engine) -> None:
    env.metadata = schema_v1()
    env.revision("0001")
    env.upgrade()
    seed(engine)
    User, _, env.metadata = models_v2()
    env.revision("0002")
    env.upgrade()

    # unchanged: nothing emitted, no migration content at all
    body = upgrade_body(env.revision("0003"))
    assert "backfill_counter" not in body and "pass" in body
    (env.root / "versions" / "0003_m.py").unlink()

    definition = User.question_count.property.columns[0].info["countercache"]
    definition.where_sql = "title <> 'q3.0'"
    body = upgrade_body(env.revision("0003"))
    assert body.count("backfill_counter(") == 1
    assert "where=\"title <> 'q3.0'\"" in body and "parent_key='id'" in body
    env.upgrade()
    assert stored(engine)[3] == COUNTS[3] - 1

    # the same where, written differently: recorded by 0003, nothing new
    definition.where_sql = "title  <>\n 'q3.0'"
    body = upgrade_body(env.revision("0004"))
    assert "backfill_counter" not in body
    (env.root / "versions" / "0004_m.py").unlink()

    definition.where_sql = None
    definition.sum_sql = "length(title)"
    body = upgrade_body(env.revision("0004"))
    assert "op.backfill_counter('users', 'question_count', 'questions', 'user_id', " \
           "sum='length(title)', parent_key='id')" in body
    env.upgrade()
    with engine.connect() as conn:
        expected = dict(conn.execute(sa.text(
            "SELECT u.id, coalesce((SELECT sum(length(title)) FROM questions q WHERE q.user_id = u.id), 0) "
            "FROM users u")).all())
    assert stored(engine) == expected


# -- the operation itself --------------------------------------------------------


def test_backfill_op_where_sum_and_parent_key_lookup(engine: sa.Engine) -> None:
    schema_v1().create_all(engine)
    seed(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE users ADD COLUMN question_count INTEGER DEFAULT 0 NOT NULL"))
        op = Operations(MigrationContext.configure(conn))
        op.backfill_counter("users", "question_count", "questions", "user_id")  # key looked up
    assert stored(engine) == COUNTS
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        op.backfill_counter("users", "question_count", "questions", "user_id",
                            where="title LIKE 'q3.%' OR title = 'q1.0'", parent_key="id")
    assert stored(engine) == {1: 1, 2: 0, 3: 7, 4: 0, 5: 0}
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        op.backfill_counter("users", "question_count", "questions", "user_id",
                            sum="id", where="id > 3", parent_key=("id",))
    with engine.connect() as conn:
        expected = dict(conn.execute(sa.text(
            "SELECT u.id, coalesce((SELECT sum(id) FROM questions q WHERE q.user_id = u.id AND id > 3), 0) "
            "FROM users u")).all())
    assert stored(engine) == expected


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_backfill_offline(dialect: str) -> None:
    buf = io.StringIO()
    ctx = MigrationContext.configure(dialect_name=dialect, opts={"as_sql": True, "output_buffer": buf})
    op = Operations(ctx)
    op.backfill_counter("users", "question_count", "questions", "user_id",
                        where="status = 'open'", sum="score", parent_key="id")
    sql = buf.getvalue()
    assert "UPDATE users SET question_count=(SELECT coalesce(sum((score)), 0)" in sql
    assert "WHERE questions.user_id = users.id AND (status = 'open'))" in sql
    with pytest.raises(countercache.alembic.BackfillError, match="'users'.*parent_key= is required"):
        op.backfill_counter("users", "question_count", "questions", "user_id")


# -- the example application's migrations/ -------------------------------------


def example_config(connection: sa.Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(REPO / "migrations"))
    cfg.attributes["connection"] = connection
    return cfg


def test_example_migrations(engine: sa.Engine) -> None:
    source = (REPO / "migrations" / "versions" / "0002_users_question_count.py").read_text()
    assert "op.backfill_counter('users', 'question_count', 'questions', 'user_id', parent_key='id')" in source
    later = (REPO / "migrations" / "versions" / "0003_open_and_score_counters.py").read_text()
    assert ("op.backfill_counter('users', 'open_question_count', 'questions', 'user_id', "
            "where=\"questions.status = 'open'\", parent_key='id')") in later
    assert "sum='questions.score'" in later
    with engine.begin() as conn:
        command.upgrade(example_config(conn), "0001")
    assert "question_count" not in columns(engine, "users")
    seed(engine)
    with engine.begin() as conn:
        command.upgrade(example_config(conn), "head")
    assert stored(engine) == COUNTS
    with engine.begin() as conn:
        command.downgrade(example_config(conn), "base")
    assert not sa.inspect(engine).has_table("users")
    assert not sa.inspect(engine).has_table("questions")


# -- a live table: writers running while the backfill migration runs -------------


@pytest.mark.slow  # writer threads racing the migration
def test_backfill_while_writers_run(env: Env, engine: sa.Engine) -> None:
    """The documented order: column (default 0), code, backfill, check.

    0001 creates the tables and fills them (the application before counters),
    0002 adds the column: its counters are 0. Then writers that maintain the
    counter start (the code is deployed), 0003 backfills while they insert,
    delete and move questions, and after they stop no counter has drifted.
    """
    # no index on questions.user_id: a slower backfill, a wider window for races
    env.metadata = schema_v1(index=False)
    env.revision("0001")
    env.upgrade()
    rng = random.Random(5)
    n_users = 200
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO users (id, name) VALUES (:id, 'u')"),
                     [{"id": i} for i in range(1, n_users + 1)])
        conn.execute(sa.text("INSERT INTO questions (title, user_id) VALUES ('old', :u)"),
                     [{"u": rng.randint(1, n_users)} for _ in range(6000)])
    env.write("0002", "0001", """
        op.add_column("users", sa.Column("question_count", sa.Integer(), server_default="0", nullable=False))
    """)
    env.upgrade("0002")
    env.write("0003", "0002", """
        op.backfill_counter("users", "question_count", "questions", "user_id", parent_key="id")
    """, imports="import countercache.alembic")

    _, Question, _ = models_v2()
    stop = threading.Event()
    done = {"tx": 0, "errors": 0}
    failures: list[BaseException] = []

    def writer(seed_: int) -> None:
        r = random.Random(seed_)
        try:
            while not stop.is_set():
                try:
                    with Session(engine) as s, s.begin():
                        kind = r.random()
                        if kind < 0.5:
                            s.add(Question(title="new", user_id=r.randint(1, n_users)))
                        else:
                            q = s.scalars(sa.select(Question).where(
                                Question.id >= r.randint(1, 7000)).order_by(Question.id).limit(1)).first()
                            if q is None:
                                continue
                            if kind < 0.8:
                                s.delete(q)
                            else:
                                q.user_id = r.randint(1, n_users)
                    done["tx"] += 1
                except (sa.exc.OperationalError, sa.orm.exc.StaleDataError, sa.exc.SAWarning):
                    # SQLite busy, a question moved by one writer and deleted by another,
                    # or deleted by both (SQLAlchemy warns that the second DELETE matched
                    # no row, an error in the tests): rolled back, nothing of it counted
                    done["errors"] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        env.upgrade("0003")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures
    assert done["tx"] > 50, done
    assert drifts(engine) == []
    with engine.connect() as conn:
        total = conn.scalar(sa.text("SELECT sum(question_count) FROM users"))
        real = conn.scalar(sa.text("SELECT count(*) FROM questions WHERE user_id IS NOT NULL"))
    assert total == real

