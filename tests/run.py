#!/usr/bin/env python3
"""The test command of countercache: ``python3 tests/run.py [--matrix NAME] [pytest args...]``.

Standard library only.  It

1. creates ``.venv`` in the repository root if missing and installs the
   project into it (``pip install -e ".[test,postgresql,mysql,async,alembic,bench,frameworks,docs]"``;
   re-run only when setup.cfg / pyproject.toml changed, see the stamp file);
2. checks that PostgreSQL (env ``COUNTERCACHE_PG_HOST``/``COUNTERCACHE_PG_PORT``,
   default 127.0.0.1:5432) and MariaDB (``COUNTERCACHE_MYSQL_HOST``/
   ``COUNTERCACHE_MYSQL_PORT``, default 127.0.0.1:3306) answer; if one does not,
   starts a throwaway server in a temp dir and points the tests at it;
3. runs ``.venv/bin/python -m pytest ARGS`` from the repository root and exits
   with pytest's exit code, stopping the servers it started (also on Ctrl-C).

Supported versions (``MATRIX`` below): ``--matrix lowest`` installs the
floors of setup.cfg (``SQLAlchemy>=2.0.29``, ``alembic>=1.13.0``, pinned ``==``) into
``.venv-lowest`` and runs the fast subset (``SUBSET``) on them;
``--matrix alembic-1.18`` / ``alembic-1.19`` pin those Alembic releases
(newest SQLAlchemy) in their own ``.venv-alembic-*`` and run the Alembic
tests; ``--matrix newest`` is the default run; ``--matrix all`` (what
``.ci/run`` runs) is each of them in turn, servers started once, and exits
with the first failing run's exit code after a summary.  ARGS go to every
run.

A server that can neither be reached nor started is reported and left to the
fixtures (tests/conftest.py): they fail under ``CI=true`` and skip otherwise.
"""

from __future__ import annotations

import configparser
import glob
import hashlib
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
EXTRAS = "test,postgresql,mysql,async,alembic,bench,frameworks,docs"


class Matrix(NamedTuple):
    """One supported-versions run: its virtualenv, what it pins, what it runs."""

    venv: str
    extras: str
    pins: tuple[str, ...]
    tests: tuple[str, ...]  # empty: the whole suite


#: The fast subset run against older versions: declaration, the four
#: strategies (test_one_to_many: every test over ``STRATEGIES``),
#: configuration, Alembic autogenerate (also through the installed plugin),
#: the command line, the commit-time write sent with the COMMIT (it stands
#: in for SQLAlchemy's transaction in ``SessionTransaction._connections``),
#: counter statements sent past ``Connection.execute`` (private compiler
#: attributes; engines made by ``execution_options()``), schema translation.
SUBSET = ("tests/test_declaration.py", "tests/test_one_to_many.py", "tests/test_config.py",
          "tests/test_alembic.py", "tests/test_alembic_plugin.py", "tests/test_cli.py",
          "tests/test_cli_repair.py", "tests/test_shape.py", "tests/test_riding.py",
          "tests/test_execute.py", "tests/test_schema_translate.py")
ALEMBIC_TESTS = ("tests/test_alembic.py", "tests/test_alembic_plugin.py")



def _floors(*names: str) -> tuple[str, ...]:
    """``name==X`` for each ``name>=X`` of setup.cfg (install_requires, extras)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].split()
    lines += [req for value in cfg["options.extras_require"].values() for req in value.split()]
    found = {}
    for req in lines:
        name, sep, version = req.partition(">=")
        if sep and name.lower() in names:
            found[name.lower()] = f"{name}=={version.split(',')[0]}"
    return tuple(found[n] for n in names)


#: ``--matrix NAME``. "newest" is what setup.cfg's ranges resolve to (the
#: default run); "lowest" pins the floors of setup.cfg (SQLAlchemy 2.0.29,
#: Alembic 1.13.0); the Alembic entries pin the releases whose plugin loader
#: iterates over the entry point.
MATRIX = {
    "newest": Matrix(".venv", EXTRAS, (), ()),
    "lowest": Matrix(".venv-lowest", "test,postgresql,mysql,async,alembic",
                     _floors("sqlalchemy", "alembic"), SUBSET),
    "alembic-1.18": Matrix(".venv-alembic-1.18", "test,postgresql,mysql,alembic",
                           ("alembic==1.18.0",), ALEMBIC_TESTS),
    "alembic-1.19": Matrix(".venv-alembic-1.19", "test,postgresql,mysql,alembic",
                           ("alembic==1.19.0",), ALEMBIC_TESTS),
}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}
START_TIMEOUT = 90  # seconds


def log(msg: str) -> None:
    print(f"[tests/run.py] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# virtualenv
# ---------------------------------------------------------------------------


def _install_fingerprint(entry: Matrix) -> str:
    h = hashlib.sha256()
    for name in ("setup.cfg", "pyproject.toml", "setup.py"):
        p = REPO / name
        h.update(name.encode() + b"\0")
        if p.exists():
            h.update(p.read_bytes())
    h.update(entry.extras.encode())
    h.update("\0".join(entry.pins).encode())
    return h.hexdigest()


def ensure_venv(entry: Matrix) -> Path:
    """Create ``entry.venv`` if missing, install the project with its pins; its python."""
    venv_dir = REPO / entry.venv
    python = venv_dir / "bin" / "python"
    stamp = venv_dir / ".countercache-install-stamp"
    if not python.exists():
        log(f"creating virtualenv {venv_dir}")
        venv.EnvBuilder(with_pip=True, clear=False).create(venv_dir)
    fingerprint = _install_fingerprint(entry)
    if stamp.exists() and stamp.read_text().strip() == fingerprint:
        return python
    what = " ".join([f'-e ".[{entry.extras}]"', *entry.pins])
    log(f"installing: pip install {what} into {venv_dir}")
    cmd = [str(python), "-m", "pip", "install", "--quiet", "-e", f".[{entry.extras}]", *entry.pins]
    rc = subprocess.call(cmd, cwd=REPO)
    if rc != 0:
        log(f"pip install failed (exit code {rc})")
        sys.exit(rc)
    stamp.write_text(fingerprint + "\n")
    return python


def installed_versions(python: Path) -> str:
    code = ("from importlib.metadata import version as v; "
            "print(f\"SQLAlchemy {v('sqlalchemy')}, Alembic {v('alembic')}\")")
    res = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return res.stdout.strip() or "versions unknown"


def parse_matrix(argv: list[str]) -> tuple[list[str], list[str]]:
    """``--matrix NAME[,NAME...]`` / ``--matrix all`` out of ``argv``: (names, the rest)."""
    names: list[str] = []
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--matrix" or arg.startswith("--matrix="):
            value = arg.partition("=")[2] if "=" in arg else next(args, "")
            names += list(MATRIX) if value == "all" else [n for n in value.split(",") if n]
        else:
            rest.append(arg)
    unknown = [n for n in names if n not in MATRIX]
    if unknown or (not names and any(a == "--matrix" or a.startswith("--matrix=") for a in argv)):
        log(f"unknown --matrix {', '.join(unknown) or '(empty)'}: choose from all, {', '.join(MATRIX)}")
        sys.exit(2)
    return names or ["newest"], rest


# ---------------------------------------------------------------------------
# probing (real protocol handshakes, not just an open port)
# ---------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def pg_answers(host: str, port: int, timeout: float = 3.0) -> bool:
    """Send an SSLRequest; a PostgreSQL server answers a single b'S' or b'N'."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack("!ii", 8, 80877103))
            return _recv_exact(s, 1) in (b"S", b"N")
    except OSError:
        return False


def mysql_answers(host: str, port: int, timeout: float = 3.0) -> bool:
    """A MySQL/MariaDB server greets first: 3-byte length, seq 0, protocol 10."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            header = _recv_exact(s, 5)
            return len(header) == 5 and header[3] == 0 and header[4] == 10
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # servers set SO_REUSEADDR too, so TIME_WAIT leftovers do not count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_port(wanted: int) -> int:
    return wanted if port_free(wanted) else free_port()


# ---------------------------------------------------------------------------
# throwaway servers
# ---------------------------------------------------------------------------


class ServerError(Exception):
    pass


def _as_user(user: str) -> list[str]:
    """Command prefix running a server program as ``user`` when we are root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise ServerError("running as root but `runuser` is not available")
    return [runuser, "-u", user, "--"]


def _make_tempdir(prefix: str, user: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        pw = pwd.getpwnam(user)
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    os.chmod(tmp, 0o700)
    return tmp


def _run(cmd: list[str], what: str, log_file: Path | None = None) -> None:
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stdout + res.stderr).strip()[-2000:]
        if log_file is not None and log_file.exists():
            tail += "\n--- " + str(log_file) + " ---\n" + log_file.read_text(errors="replace")[-2000:]
        raise ServerError(f"{what} failed (exit code {res.returncode}): {' '.join(cmd)}\n{tail}")


def _wait_for(check, proc: subprocess.Popen | None, what: str, log_file: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""
    raise ServerError(f"{what} did not come up on time\n--- {log_file} ---\n{tail}")


def _find_pg_bindir() -> Path:
    env = os.environ.get("COUNTERCACHE_PG_BINDIR")
    candidates = [env] if env else []
    which = shutil.which("initdb")
    if which:
        candidates.append(str(Path(which).parent))
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
        if Path(p).parent.name.isdigit() else 0, reverse=True,
    )
    candidates += ["/usr/local/pgsql/bin", "/opt/homebrew/bin", "/usr/local/bin"]
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    raise ServerError("PostgreSQL binaries (initdb, pg_ctl) not found; set COUNTERCACHE_PG_BINDIR")


class Server:
    name = "server"

    def __init__(self) -> None:
        self.tmp: Path | None = None
        self.port: int | None = None

    def stop(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        try:
            self.stop()
        except Exception as exc:  # noqa: BLE001
            log(f"stopping {self.name} failed: {exc}")
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            log(f"stopped throwaway {self.name} on port {self.port}, removed {self.tmp}")
            self.tmp = None


class PostgresServer(Server):
    name = "PostgreSQL"

    def start(self, wanted_port: int) -> int:
        bindir = _find_pg_bindir()
        prefix = _as_user("postgres")
        self.tmp = _make_tempdir("countercache-pg-", "postgres")
        data = self.tmp / "data"
        logfile = self.tmp / "server.log"
        self.port = pick_port(wanted_port)
        _run(prefix + [str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                       "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
             "initdb")
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} "
            f"-c unix_socket_directories='{self.tmp}' "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=100"
        )
        self._pg_ctl = prefix + [str(bindir / "pg_ctl"), "-D", str(data)]
        _run(self._pg_ctl + ["start", "-w", "-t", str(START_TIMEOUT), "-l", str(logfile), "-o", opts],
             "pg_ctl start", logfile)
        _wait_for(lambda: pg_answers("127.0.0.1", self.port), None, "PostgreSQL", logfile)
        return self.port

    def stop(self) -> None:
        if self.tmp is None:
            return
        pidfile = self.tmp / "data" / "postmaster.pid"
        if not pidfile.exists():
            return
        try:
            _run(self._pg_ctl + ["stop", "-m", "fast", "-w", "-t", "60"], "pg_ctl stop")
        except ServerError as exc:
            log(str(exc))
            if pidfile.exists():
                pid = int(pidfile.read_text().split()[0])
                log(f"killing postmaster {pid}")
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)


class MariaDBServer(Server):
    name = "MariaDB"

    def __init__(self) -> None:
        super().__init__()
        self.proc: subprocess.Popen | None = None

    def start(self, wanted_port: int) -> int:
        install_db = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
        mariadbd = (shutil.which("mariadbd") or shutil.which("mysqld")
                    or next((p for p in ("/usr/sbin/mariadbd", "/usr/sbin/mysqld")
                             if Path(p).exists()), None))
        if not install_db or not mariadbd:
            raise ServerError("MariaDB binaries (mariadb-install-db, mariadbd) not found")
        prefix = _as_user("mysql")
        self.tmp = _make_tempdir("countercache-mariadb-", "mysql")
        data = self.tmp / "data"
        logfile = self.tmp / "error.log"
        self.port = pick_port(wanted_port)
        _run(prefix + [install_db, "--no-defaults", f"--datadir={data}",
                       "--auth-root-authentication-method=normal",
                       "--skip-test-db", "--skip-name-resolve"],
             "mariadb-install-db")
        cmd = prefix + [
            mariadbd, "--no-defaults", f"--datadir={data}",
            f"--port={self.port}", "--bind-address=127.0.0.1", "--skip-networking=0",
            f"--socket={self.tmp / 'mysqld.sock'}", f"--pid-file={self.tmp / 'mysqld.pid'}",
            f"--log-error={logfile}", "--skip-name-resolve", "--skip-log-bin",
            "--innodb-buffer-pool-size=64M", "--innodb-flush-log-at-trx-commit=0",
            "--innodb-doublewrite=0", "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_unicode_ci",
        ]
        # own session: a Ctrl-C in the terminal must not kill it behind our back
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_for(lambda: mysql_answers("127.0.0.1", self.port), self.proc, "MariaDB", logfile)
        return self.port

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # signal the server itself (runuser may not forward signals)
        pidfile = self.tmp / "mysqld.pid" if self.tmp else None
        pid = int(pidfile.read_text().strip()) if pidfile and pidfile.exists() else None
        for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
            for target in filter(None, (pid, self.proc.pid)):
                try:
                    os.kill(target, sig)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                log(f"MariaDB did not stop after {sig.name}")


def ensure_server(kind: str, started: list[Server], env: dict[str, str]) -> None:
    if kind == "postgresql":
        host_var, port_var, default_port = "COUNTERCACHE_PG_HOST", "COUNTERCACHE_PG_PORT", 5432
        answers, server_cls = pg_answers, PostgresServer
    else:
        host_var, port_var, default_port = "COUNTERCACHE_MYSQL_HOST", "COUNTERCACHE_MYSQL_PORT", 3306
        answers, server_cls = mysql_answers, MariaDBServer
    host = env.get(host_var) or "127.0.0.1"
    port = int(env.get(port_var) or default_port)
    if answers(host, port):
        log(f"{kind}: using the server at {host}:{port}")
        env[host_var], env[port_var] = host, str(port)
        return
    if host not in LOCAL_HOSTS:
        log(f"{kind}: nothing answers at {host}:{port} and it is not a local address; "
            "not starting a throwaway server (tests will fail under CI=true, else skip)")
        return
    server = server_cls()
    started.append(server)  # registered first so that a half-started one is cleaned up
    t0 = time.monotonic()
    try:
        new_port = server.start(port)
    except (ServerError, OSError, KeyError) as exc:
        log(f"{kind}: nothing answers at {host}:{port} and starting a throwaway "
            f"server failed: {exc}\n(tests will fail under CI=true, else skip)")
        server.cleanup()
        started.remove(server)
        return
    env[host_var], env[port_var] = "127.0.0.1", str(new_port)
    log(f"{kind}: nothing answered at {host}:{port}; started a throwaway server on "
        f"127.0.0.1:{new_port} in {server.tmp} ({time.monotonic() - t0:.1f}s)")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


_forward_sigint = False


def _raise_interrupt(signum, frame):  # SIGTERM/SIGHUP -> same cleanup as Ctrl-C
    global _forward_sigint
    _forward_sigint = True  # pytest did not get a signal: send it a SIGINT
    raise KeyboardInterrupt


def run_pytest(python: Path, args: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen([str(python), "-m", "pytest", *args], cwd=REPO, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # on Ctrl-C pytest got the terminal's SIGINT too; let it report
        if _forward_sigint and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            proc.wait()
        raise


def main(argv: list[str]) -> int:
    os.chdir(REPO)
    if argv and argv[0] in ("-h", "--help"):  # (before installing or starting anything)
        print((__doc__ or "").strip())
        print(f"\n--matrix: all, {', '.join(MATRIX)}. Other arguments go to pytest; its own, with the "
              "project's (--backend sqlite|postgresql|mariadb, repeatable): .venv/bin/python -m pytest --help")
        return 0
    names, argv = parse_matrix(argv)
    pythons = {name: ensure_venv(MATRIX[name]) for name in names}
    env = dict(os.environ)
    started: list[Server] = []
    old_handlers = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    results: list[tuple[str, str, float, int]] = []
    try:
        for kind in ("postgresql", "mariadb"):
            ensure_server(kind, started, env)
        for name in names:
            entry, python = MATRIX[name], pythons[name]
            versions = installed_versions(python)
            if len(names) > 1 or name != "newest":
                scope = "subset: " + " ".join(entry.tests) if entry.tests else "whole suite"
                log(f"matrix {name} ({versions}, {entry.venv}): {scope}")
            t0 = time.monotonic()
            rc = run_pytest(python, [*entry.tests, *argv], env)
            results.append((name, versions, time.monotonic() - t0, rc))
        if len(results) > 1:
            for name, versions, seconds, rc in results:
                log(f"  {name:<14} {versions:<36} {seconds:6.0f}s  exit code {rc}")
        return next((rc for *_, rc in results if rc != 0), 0)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        # ignore further Ctrl-C while stopping servers
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for server in reversed(started):
                server.cleanup()
        finally:
            signal.signal(signal.SIGINT, old_int)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
