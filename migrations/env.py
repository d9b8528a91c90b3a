"""Alembic environment of the example application (``countercache/demo.py``).

The database: ``-x url=...``, else env ``COUNTERCACHE_URL``, else
``sqlalchemy.url`` of alembic.ini; a caller that already holds a connection
passes it as ``config.attributes["connection"]`` (``countercache demo
--migrate`` does).
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine

import countercache.alembic  # noqa: F401  op.backfill_counter and counters in autogenerate
from countercache.demo import Base

config = context.config
if config.config_file_name is not None and not config.attributes.get("connection"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata

# The plugin spelling (Alembic 1.18+) of what the import above already does;
# both together still give one backfill per counter.
try:
    from alembic.runtime.plugins import Plugin  # noqa: F401
except ImportError:  # pragma: no cover - Alembic < 1.18
    PLUGINS: dict[str, list[str]] = {}
else:
    PLUGINS = {"autogenerate_plugins": ["alembic.autogenerate.*", "countercache"]}


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("COUNTERCACHE_URL")
    return url or config.get_main_option("sqlalchemy.url") or ""


def run_migrations_offline() -> None:
    context.configure(
        url=_url(), target_metadata=target_metadata, literal_binds=True,
        dialect_opts={"paramstyle": "named"}, **PLUGINS,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection) -> None:
    context.configure(
        connection=connection, target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite", **PLUGINS,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url())
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
