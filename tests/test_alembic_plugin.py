"""The installed package and the installed Alembic, in a fresh interpreter.

With countercache installed, Alembic 1.18+ loads its ``alembic.plugins``
entry point when ``alembic`` is imported (1.18.0 to 1.20.0 iterate over
what the entry point loads, 1.20.1+ take a module): importing Alembic and
running its commands must work on every supported Alembic, with no
warning, and autogenerate must write the counter's backfill through the
plugin alone (on Alembic before 1.18, through ``import countercache.alembic``).
Each test runs ``python -m alembic`` / ``python -c`` in a subprocess, so
that nothing this test process imported hides what Alembic does at import.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not any(ep.name == "countercache" for ep in metadata.entry_points(group="alembic.plugins"))
    and os.environ.get("CI", "").strip().lower() != "true",
    reason="countercache is not installed (no alembic.plugins entry point): pip install -e .",
)

ALEMBIC = tuple(int(p) for p in metadata.version("alembic").split(".")[:2])
HAS_PLUGINS = ALEMBIC >= (1, 18)

MODELS = '''
from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from countercache import counter_cache


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    questions: Mapped[list["Question"]] = relationship(back_populates="user")
    question_count: Mapped[int] = counter_cache("questions")


class Question(Base):
    __tablename__ = "questions"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    user: Mapped[User | None] = relationship(back_populates="questions")
'''

ENV_PY = '''
from alembic import context
from sqlalchemy import engine_from_config, pool

{import_line}
from cc_models import Base

config = context.config
with engine_from_config(config.get_section(config.config_ini_section),
                        poolclass=pool.NullPool).connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, {configure})
    with context.begin_transaction():
        context.run_migrations()
'''


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(cwd), PYTHONWARNINGS="default")
    res = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, f"{args} exited {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def test_alembic_imports_with_countercache_installed(tmp_path: Path) -> None:
    script = textwrap.dedent('''
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import alembic.autogenerate, alembic.command, alembic.config
        print("warnings:", [str(w.message) for w in caught])
        try:
            from alembic.runtime.plugins import _all_plugins
        except ImportError:
            print("plugins: none")
        else:
            print("plugins:", sorted(_all_plugins))
    ''')
    out = run(["-c", script], tmp_path).stdout
    assert "warnings: []" in out, out
    if HAS_PLUGINS:
        assert "'countercache'" in out, out
    else:
        assert "plugins: none" in out, out
    run(["-m", "alembic", "--help"], tmp_path)


def test_autogenerate_through_the_installed_plugin(tmp_path: Path) -> None:
    """``alembic revision --autogenerate`` and ``upgrade``: the backfill comes
    from the entry point alone (Alembic 1.18+), env.py imports no countercache."""
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(
            "CREATE TABLE users (id INTEGER NOT NULL PRIMARY KEY, name VARCHAR(50) NOT NULL);"
            "CREATE TABLE questions (id INTEGER NOT NULL PRIMARY KEY, user_id INTEGER REFERENCES users(id));"
            "CREATE INDEX ix_questions_user_id ON questions (user_id);"
            "INSERT INTO users VALUES (1, 'a'), (2, 'b'), (3, 'c');"
            "INSERT INTO questions (user_id) VALUES (1), (1), (3), (NULL);"
        )
    (tmp_path / "cc_models.py").write_text(MODELS)
    (tmp_path / "migrations" / "versions").mkdir(parents=True)
    (tmp_path / "migrations" / "env.py").write_text(ENV_PY.format(
        import_line="" if HAS_PLUGINS else "import countercache.alembic  # Alembic < 1.18",
        configure='autogenerate_plugins=["alembic.autogenerate.*", "countercache"]' if HAS_PLUGINS else "",
    ))
    repo = Path(__file__).resolve().parent.parent
    (tmp_path / "migrations" / "script.py.mako").write_bytes(
        (repo / "migrations" / "script.py.mako").read_bytes())
    (tmp_path / "alembic.ini").write_text(
        f"[alembic]\nscript_location = migrations\nsqlalchemy.url = sqlite:///{db}\n")

    run(["-m", "alembic", "revision", "--autogenerate", "-m", "counter", "--rev-id", "0001"], tmp_path)
    source = next((tmp_path / "migrations" / "versions").glob("0001_*.py")).read_text()
    upgrade = source.split("def upgrade()", 1)[1].split("def downgrade()", 1)[0]
    assert "add_column" in upgrade and "question_count" in upgrade, source
    assert upgrade.count("op.backfill_counter(") == 1, source
    assert "import countercache.alembic" in source

    run(["-m", "alembic", "upgrade", "head"], tmp_path)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT id, question_count FROM users ORDER BY id").fetchall() == [
            (1, 2), (2, 0), (3, 1)]
    run(["-m", "alembic", "upgrade", "head", "--sql"], tmp_path)  # offline: rendered SQL
    run(["-m", "alembic", "downgrade", "base"], tmp_path)


def test_a_plugin_api_it_does_not_know_warns_instead_of_breaking_alembic() -> None:
    """``setup()`` runs inside ``import alembic``: it must not raise."""
    from countercache.alembic import autogenerate

    class ChangedPlugin:
        def add_autogenerate_comparator(self, *args: object, **kw: object) -> None:
            raise TypeError("unexpected keyword argument 'priority'")

    with pytest.warns(RuntimeWarning, match="could not register with this Alembic"):
        autogenerate.setup(ChangedPlugin())  # type: ignore[arg-type]
