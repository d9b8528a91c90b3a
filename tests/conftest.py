"""Backend fixtures shared by the countercache test-suite.

Interface (see also tests/test_backends.py):

* ``--backend NAME`` (repeatable) / env ``COUNTERCACHE_BACKENDS=a,b``: restrict
  the backends (sqlite, postgresql, mariadb); default: all three.
* ``backend``: the backend name, parametrized over the selected backends.
* ``engine``: a SQLAlchemy ``Engine`` for the current backend.  SQLite gets a
  fresh file database per test; PostgreSQL / MariaDB share one session-wide
  engine on the database ``countercache_test``, and every table left behind
  is dropped after each test.  A test that leaves a connection checked out
  fails (at teardown).
* ``statements``: SQL recorder, ``with statements.record() as rec: ...``.
* ``real_count``: ``real_count("SELECT count(*) FROM t WHERE x = :x", x=1)``.
* ``strategy``: the strategy name, parametrized over
  ``countercache.config.STRATEGIES`` (the library's own list; ids = the
  names), so every suite that takes it runs ``sharded`` too.  A ``sharded``
  column lags until ``countercache.fold()``: compare through
  ``helpers.assert_counts`` (exact for every strategy), ``countercache.check``
  or ``helpers.exact_value``.  A test that cannot apply to some strategy
  narrows it with ``@pytest.mark.parametrize("strategy", [...])`` or skips
  with a one-line reason.
* markers: ``slow`` (the concurrency/stress tests), ``postgresql_only``,
  ``mariadb_only``, ``servers_only``, ``sqlite_postgresql_only``, ``sqlite_only``,
  ``sqlite_mariadb_only``.

Fast tier: ``python3 tests/run.py -q -m "not slow" --backend sqlite`` (under a
minute) leaves out the ``slow`` tests; the whole suite runs them.

Unreachable servers: the test fails when env ``CI`` is ``true``, else skips.
Server location: env ``COUNTERCACHE_PG_HOST``/``COUNTERCACHE_PG_PORT`` and
``COUNTERCACHE_MYSQL_HOST``/``COUNTERCACHE_MYSQL_PORT`` (``tests/run.py``
starts throwaway servers and sets these when nothing answers).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import warnings
from typing import Any, Callable, Iterator

import pytest
import sqlalchemy as sa
import sqlalchemy.orm
from sqlalchemy import event
from sqlalchemy.engine import Engine

try:  # pragma: no cover - depends on the installed extras
    from pytest_postgresql import factories as _pg_factories
    from pytest_postgresql.janitor import DatabaseJanitor
except ImportError:  # pragma: no cover
    _pg_factories = None
    DatabaseJanitor = None

ALL_BACKENDS = ["sqlite", "postgresql", "mariadb"]
# One database per test process, so that concurrent runs never share one.
TEST_DBNAME = os.environ.get("COUNTERCACHE_TEST_DB") or f"countercache_test_{os.getpid()}"

PG_HOST = os.environ.get("COUNTERCACHE_PG_HOST") or "127.0.0.1"
PG_PORT = int(os.environ.get("COUNTERCACHE_PG_PORT") or 5432)
PG_USER = "postgres"
MYSQL_HOST = os.environ.get("COUNTERCACHE_MYSQL_HOST") or "127.0.0.1"
MYSQL_PORT = int(os.environ.get("COUNTERCACHE_MYSQL_PORT") or 3306)
MYSQL_USER = "root"

PG_URL = f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{TEST_DBNAME}"
MYSQL_URL = f"mysql+pymysql://{MYSQL_USER}@{MYSQL_HOST}:{MYSQL_PORT}/{TEST_DBNAME}"
SERVER_URLS = {"postgresql": PG_URL, "mariadb": MYSQL_URL}

# Seconds: how long we wait on a lock while dropping tables after a test.
CLEANUP_LOCK_TIMEOUT = 15

if _pg_factories is not None:
    # The session-scoped "existing server" fixture of pytest-postgresql.  Note
    # (pytest-postgresql 10): requesting it connects to the server (retrying
    # for up to 60 s) and creates/drops a template database
    # ``countercache_test_tmpl``; we only request it once the server is known
    # to answer.
    postgresql_noproc = _pg_factories.postgresql_noproc(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=TEST_DBNAME
    )


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


# ---------------------------------------------------------------------------
# options, markers, backend selection
# ---------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("countercache")
    group.addoption(
        "--backend",
        action="append",
        dest="countercache_backends",
        default=None,
        choices=ALL_BACKENDS,
        help="run database tests only on this backend (repeatable; "
        "default: env COUNTERCACHE_BACKENDS or all of %s)" % ", ".join(ALL_BACKENDS),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: slow test")
    config.addinivalue_line(
        "markers", "postgresql_only: with the engine fixture, only run on PostgreSQL"
    )
    config.addinivalue_line(
        "markers", "mariadb_only: with the engine fixture, only run on MariaDB"
    )
    config.addinivalue_line(
        "markers", "servers_only: with the engine fixture, only run on PostgreSQL and MariaDB"
    )
    config.addinivalue_line(
        "markers", "sqlite_postgresql_only: with the engine fixture, only run on SQLite and PostgreSQL"
    )
    config.addinivalue_line("markers", "sqlite_only: with the engine fixture, only run on SQLite")
    config.addinivalue_line(
        "markers", "sqlite_mariadb_only: with the engine fixture, only run on SQLite and MariaDB"
    )


def selected_backends(config: pytest.Config) -> list[str]:
    chosen = config.getoption("countercache_backends")
    if not chosen:
        env = os.environ.get("COUNTERCACHE_BACKENDS", "").strip()
        if env:
            chosen = [b.strip().lower() for b in env.split(",") if b.strip()]
            unknown = sorted(set(chosen) - set(ALL_BACKENDS))
            if unknown:
                raise pytest.UsageError(
                    f"COUNTERCACHE_BACKENDS: unknown backend(s) {unknown}; "
                    f"choose from {ALL_BACKENDS}"
                )
    if not chosen:
        chosen = ALL_BACKENDS
    return [b for b in ALL_BACKENDS if b in chosen]


_ONLY_MARKERS = {
    "postgresql_only": {"postgresql"},
    "mariadb_only": {"mariadb"},
    "servers_only": {"postgresql", "mariadb"},
    "sqlite_postgresql_only": {"sqlite", "postgresql"},
    "sqlite_only": {"sqlite"},
    "sqlite_mariadb_only": {"sqlite", "mariadb"},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = set(selected_backends(config))
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec is not None else None
        if backend is not None:
            # several markers (module-level and on the test) narrow each other
            allowed = set(ALL_BACKENDS)
            for marker, backends in _ONLY_MARKERS.items():
                if item.get_closest_marker(marker):
                    allowed &= backends
            if backend not in wanted or backend not in allowed:
                dropped.append(item)
                continue
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


# ---------------------------------------------------------------------------
# reachability (checked once per session per backend)
# ---------------------------------------------------------------------------

_reachability: dict[str, tuple[bool, str]] = {}


def _probe(backend: str) -> tuple[bool, str]:
    try:
        if backend == "postgresql":
            import psycopg

            psycopg.connect(
                host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres",
                connect_timeout=5,
            ).close()
        elif backend == "mariadb":
            import pymysql

            pymysql.connect(
                host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password="",
                connect_timeout=5,
            ).close()
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any failure means unreachable
        detail = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
        return False, (
            f"{backend} backend unreachable at {SERVER_URLS[backend]} ({detail}); "
            "start it or run the suite through `python3 tests/run.py`"
        )


def backend_reachable(backend: str) -> tuple[bool, str]:
    if backend == "sqlite":
        return True, ""
    if backend not in _reachability:
        _reachability[backend] = _probe(backend)
    return _reachability[backend]


class BackendUnavailable(pytest.fail.Exception):  # type: ignore[name-defined]
    """Raised (under CI=true) when a backend cannot be reached."""


def require_backend(backend: str) -> None:
    ok, message = backend_reachable(backend)
    if ok:
        return
    if in_ci():
        raise BackendUnavailable(f"[CI=true] {message}", pytrace=False)
    pytest.skip(message)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    # An unreachable backend under CI=true is raised while setting up the
    # ``engine`` fixture; report it as a test failure, not a setup error.
    if (
        call.when == "setup"
        and call.excinfo is not None
        and call.excinfo.errisinstance(BackendUnavailable)
    ):
        outcome.get_result().when = "call"


# ---------------------------------------------------------------------------
# session-wide server engines
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _pg_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    require_backend("postgresql")
    if DatabaseJanitor is None:
        pytest.fail("pytest-postgresql is not installed", pytrace=False)
    # A previous run killed mid-way may have left the template database of
    # postgresql_noproc behind, which would make its janitor fail.
    DatabaseJanitor(
        user=PG_USER, host=PG_HOST, port=PG_PORT, dbname=f"{TEST_DBNAME}_tmpl",
        as_template=True, connection_timeout=10,
    ).drop()
    noop = request.getfixturevalue("postgresql_noproc")
    janitor = DatabaseJanitor(
        user=noop.user, host=noop.host, port=noop.port, password=noop.password,
        dbname=TEST_DBNAME, connection_timeout=10,
    )
    janitor.drop()
    janitor.init()
    engine = sa.create_engine(PG_URL)
    try:
        yield engine
    finally:
        engine.dispose()
        janitor.drop()


@pytest.fixture(scope="session")
def _mariadb_engine() -> Iterator[Engine]:
    require_backend("mariadb")
    import pymysql

    def admin(sql: str) -> None:
        conn = pymysql.connect(
            host=MYSQL_HOST, port=MYSQL_PORT, user=MYSQL_USER, password="",
            connect_timeout=10, autocommit=True,
        )
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    admin(f"DROP DATABASE IF EXISTS `{TEST_DBNAME}`")
    admin(f"CREATE DATABASE `{TEST_DBNAME}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    engine = sa.create_engine(MYSQL_URL)
    try:
        yield engine
    finally:
        engine.dispose()
        admin(f"DROP DATABASE IF EXISTS `{TEST_DBNAME}`")


def _drop_all_tables(engine: Engine) -> None:
    """Drop every table left in the engine's database."""
    with warnings.catch_warnings():
        # e.g. "Can't sort tables for DROP" on FK cycles (SAWarning is an error
        # under this project's filterwarnings)
        warnings.simplefilter("ignore", sa.exc.SAWarning)
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SET lock_timeout = '{CLEANUP_LOCK_TIMEOUT}s'")
            elif engine.dialect.name in ("mysql", "mariadb"):
                conn.exec_driver_sql(f"SET SESSION lock_wait_timeout = {CLEANUP_LOCK_TIMEOUT}")
                conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 0")
            md = sa.MetaData()
            md.reflect(conn)
            if md.tables:
                try:
                    md.drop_all(conn)
                    conn.commit()
                except sa.exc.DBAPIError:
                    conn.rollback()
                    if engine.dialect.name != "postgresql":
                        raise
                    # last resort on PostgreSQL: CASCADE takes FKs/views along
                    prep = engine.dialect.identifier_preparer
                    for table in md.tables.values():
                        conn.exec_driver_sql(
                            f"DROP TABLE IF EXISTS {prep.format_table(table)} CASCADE"
                        )
                    conn.commit()
            if engine.dialect.name in ("mysql", "mariadb"):
                conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS = 1")


def _kill_other_sessions(engine: Engine) -> None:
    """After a connection leak: end server sessions still holding locks."""
    with contextlib.suppress(Exception), engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        else:
            ids = conn.exec_driver_sql(
                "SELECT id FROM information_schema.processlist "
                "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
            ).scalars().all()
            for pid in ids:
                with contextlib.suppress(Exception):
                    conn.exec_driver_sql(f"KILL {int(pid)}")


# ---------------------------------------------------------------------------
# public fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(params=ALL_BACKENDS, ids=ALL_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def _strategies() -> tuple[str, ...]:
    from countercache.config import ALL_STRATEGIES

    # (sharded_trigger's column lags by design, as sharded's, and the generic
    # suites read it: its own suite is tests/test_sharded_trigger.py)
    return tuple(s for s in ALL_STRATEGIES if s != "sharded_trigger")


@pytest.fixture(params=_strategies(), ids=list(_strategies()))
def strategy(request: pytest.FixtureRequest) -> str:
    """Every strategy the library implements (``countercache.config.STRATEGIES``)."""
    return request.param


_VIEWS: dict[str, bool] = {}


def _views_take_listeners(eng: Engine) -> bool:
    """Does this SQLAlchemy take a listener on a connection of an
    ``engine.execution_options()`` view (2.0.29 does not: "No such event")?"""
    if eng.dialect.name not in _VIEWS:
        def noop(*args: Any) -> None:
            pass

        view = eng.execution_options()
        ok = True
        try:
            event.listen(view, "engine_connect", noop)
            event.remove(view, "engine_connect", noop)
            with view.connect() as connection:
                event.listen(connection, "before_execute", noop)
        except sa.exc.InvalidRequestError:
            ok = False
        _VIEWS[eng.dialect.name] = ok
    return _VIEWS[eng.dialect.name]


def sqlite_real_transactions(eng: Engine) -> None:
    """SQLAlchemy's documented fix for pysqlite's transactions: the driver
    issues no BEGIN before a SAVEPOINT, so releasing the first savepoint of a
    transaction would commit it. Let SQLAlchemy emit BEGIN itself."""

    @event.listens_for(eng, "connect")
    def _no_driver_transactions(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None

    @event.listens_for(eng, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN")


@pytest.fixture
def engine(backend: str, request: pytest.FixtureRequest, tmp_path) -> Iterator[Engine]:
    require_backend(backend)
    if backend == "sqlite":
        eng = sa.create_engine(f"sqlite:///{tmp_path / 'countercache_test.db'}")
        shared = False
    else:
        # a per-test view of the shared engine (its pool): the listeners a test
        # adds stay on it, so the next test's engine has none (countercache
        # takes a shorter way for its own statements where nothing listens)
        eng = request.getfixturevalue("_pg_engine" if backend == "postgresql" else "_mariadb_engine")
        if _views_take_listeners(eng):  # (not SQLAlchemy 2.0.29's: tests/test_execute.py covers that)
            eng = eng.execution_options()
        shared = True

    yield eng

    checked_out = eng.pool.checkedout()
    if checked_out:
        gc.collect()  # connections merely unreferenced are returned by GC
        checked_out = eng.pool.checkedout()
    leak_message = None
    if checked_out:
        leak_message = (
            f"{checked_out} connection(s) still checked out of the {backend} engine "
            f"pool ({eng.url.render_as_string(hide_password=True)}) after the test: "
            "close every Connection/Session (use `with engine.connect()` / "
            "`with Session(engine)`)"
        )
        # Reset so that the leak does not cascade into later tests.
        eng.dispose()
        if shared:
            _kill_other_sessions(eng)
    try:
        if shared:
            _drop_all_tables(eng)
    finally:
        if not shared:
            eng.dispose()
    if leak_message:
        pytest.fail(leak_message, pytrace=False)


class Recording(list):
    """List of ``(sql_text, params, executemany)`` captured by ``statements``."""

    def sql(self) -> list[str]:
        return [s for s, _, _ in self]

    def updates_to(self, table_name: str) -> list[str]:
        pattern = re.compile(
            r"^\s*UPDATE\s+(?:[`\"\[]?\w+[`\"\]]?\.)?[`\"\[]?"
            + re.escape(table_name)
            + r"[`\"\]]?(?=\s|$)",
            re.IGNORECASE,
        )
        return [s for s, _, _ in self if pattern.match(s)]

    def executemany(self) -> list[str]:
        return [s for s, _, many in self if many]


# execution option marking connections that must not be recorded
_UNRECORDED = "countercache_tests_unrecorded"


class StatementRecorder:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextlib.contextmanager
    def record(self) -> Iterator[Recording]:
        rec = Recording()

        def listener(conn, cursor, statement, parameters, context, executemany):
            if conn.get_execution_options().get(_UNRECORDED):
                return
            rec.append((statement, parameters, bool(executemany)))

        event.listen(self.engine, "before_cursor_execute", listener)
        try:
            yield rec
        finally:
            event.remove(self.engine, "before_cursor_execute", listener)


@pytest.fixture
def statements(engine: Engine) -> StatementRecorder:
    return StatementRecorder(engine)


@pytest.fixture
def real_count(engine: Engine) -> Callable[..., int]:
    def real_count(sql_text: str, **params: Any) -> int:
        with engine.connect() as conn:
            conn = conn.execution_options(**{_UNRECORDED: True})
            return int(conn.execute(sa.text(sql_text), params).scalar_one())

    return real_count


@pytest.fixture(autouse=True)
def _reset_countercache_state() -> Iterator[None]:
    yield
    try:
        import countercache
    except Exception:  # noqa: BLE001 - library not written / importable yet
        return
    reset = getattr(countercache, "_reset_for_tests", None)
    if reset is not None:
        reset()
    # Each test declares its own models: forget them, so that a mapper that
    # failed to configure on purpose cannot poison the next test's configure.
    sa.orm.clear_mappers()
