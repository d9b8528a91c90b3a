"""``countercache bench`` at a tiny size on SQLite, run the way users run it.

As a subprocess: the bench declares and clears mappers process-wide
(``clear_mappers()``), which must not touch this test process's models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from countercache.config import STRATEGIES

TINY = ("--children", "60", "--parents", "5", "--repeat", "1")
WORKLOADS = ["batch", "txn", "delete", "move", "noop"]
WORKLOADS_DEFAULT = WORKLOADS  # `hot` runs only when named
ON_SQLITE = ["none", *STRATEGIES, "listener", "flush_listener", "aggregated"]
POSTGRESQL_ONLY = ["pg_row_trigger", "pg_statement_trigger", "pg_sharded_trigger"]


def countercache(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "countercache.cli", *args],
        check=False, capture_output=True, text=True, timeout=timeout,
    )


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


@pytest.mark.slow  # the whole benchmark, every contender
def test_every_workload_and_contender_on_sqlite_without_drift(tmp_path):
    url = f"sqlite:///{tmp_path / 'bench.sqlite'}"
    done = countercache("bench", "--url", url, *TINY, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)

    assert doc["backend"] == "sqlite"
    assert doc["sizes"]["children"] == 60 and doc["sizes"]["parents"] == 5
    assert doc["sizes"]["repeat"] == 1
    assert doc["workloads"] == WORKLOADS
    assert set(doc["sizes"]["workloads"]) == set(WORKLOADS)
    assert doc["sizes"]["workloads"]["txn"]["rows"] == 6
    assert doc["sizes"]["workloads"]["delete"]["rows"] == 30
    assert doc["contenders"] == ["none", *STRATEGIES, "listener", "flush_listener", *POSTGRESQL_ONLY, "aggregated"]

    results = {(r["workload"], r["contender"]): r for r in doc["results"]}
    assert set(results) == {(w, c) for w in WORKLOADS for c in doc["contenders"]}
    for (workload, contender), r in results.items():
        assert set(r) >= {"status", "note", "seconds", "ratio", "drift", "times", "spread"}
        assert r["spread"] is None  # one run: no scatter to speak of
        if contender in POSTGRESQL_ONLY:
            assert r["status"] == "skipped" and "PostgreSQL only" in r["note"]
            assert r["seconds"] is None and r["ratio"] is None
            continue
        if contender == "aggregated" and r["status"] == "unavailable":
            assert r["note"].startswith("unavailable: ")  # reported, not a crash
            continue
        assert r["seconds"] > 0 and len(r["times"]) == 1
        if contender == "none":
            assert r["status"] == "ok" and r["ratio"] == 1.0 and r["drift"] is None
            continue
        assert r["ratio"] == pytest.approx(r["seconds"] / results[(workload, "none")]["seconds"])
        if (workload, contender) == ("move", "aggregated"):
            # SQLAlchemy-Utils recounts only the new parents (its issue #345):
            # when it drifts, the bench must say WRONG, not give a ratio a meaning
            assert (r["status"], r["drift"] > 0) in {("ok", False), ("WRONG", True)}
            continue
        assert r["drift"] == 0, (workload, contender, r)
        assert r["status"] == "ok", (workload, contender, r)

    assert {t["name"] for t in doc["targets"]} >= {"bulk batch <= x1.05", "bulk noop <= x1.02"}
    assert all({"noise", "within_noise"} <= set(t) for t in doc["targets"])


def test_noise_is_the_median_absolute_deviation_and_judges_closeness():
    from bench.report import Target
    from bench.runner import Cell

    cell = Cell("delete", "bulk", times=[1.0, 1.1, 0.9, 1.0, 2.0])
    assert cell.spread == pytest.approx(0.1)  # deviations 0, .1, .1, 0, 1: median .1, over median 1.0
    assert Cell("delete", "bulk", times=[1.0, 2.0]).spread is None
    assert Target("t", 1.12, 1.10, False, noise=0.05).within_noise
    assert not Target("t", 1.30, 1.10, False, noise=0.05).within_noise
    assert not Target("t", 1.12, 1.10, False).within_noise


@pytest.mark.slow  # runs the benchmark, plots with matplotlib
def test_table_and_plot(tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not in_ci():
            pytest.skip("matplotlib is not installed (pip install -e '.[bench]')")
    url = f"sqlite:///{tmp_path / 'bench.sqlite'}"
    png = tmp_path / "ratios.png"
    done = countercache(
        "bench", "--url", url, *TINY, "--workload", "batch", "delete",
        "--contender", "bulk", "listener", "--plot", str(png),
    )
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for word in ("none", "bulk", "listener", "batch", "delete", "x1.00"):
        assert word in done.stdout
    assert "per_row" not in done.stdout.split("project targets")[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--workload", "nope"), "invalid choice: 'nope'"),
        (("--contender", "magic"), "invalid choice: 'magic'"),
        (("--repeat", "0"), "must be at least 1"),
    ],
)
def test_bench_errors_are_one_line_exit_2(args, message, capsys):
    # in-process: argparse stops each of these before the bench is imported
    from countercache import cli

    try:
        code = cli.main(["bench", *args])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("countercache: error:"), err
    assert message in lines[0]


@pytest.mark.parametrize(
    "url, message",
    [
        ("postgresql+psycopg://nobody@127.0.0.1:1/none", "connection"),
        ("nosuchdialect://x", "error"),
    ],
)
def test_bench_connection_errors_are_one_line_exit_2(url, message):
    done = countercache("bench", "--url", url)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("countercache: error:"), done.stderr
    assert message in lines[0]
    assert "Traceback" not in done.stderr


def test_bench_outside_a_source_checkout_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    import countercache
    from countercache import cli

    monkeypatch.setattr(countercache, "__file__", str(tmp_path / "site-packages" / "countercache" / "__init__.py"))
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("countercache: error:") and "bench" in err[0]


@pytest.mark.slow  # concurrent writers on one hot parent
def test_hot_on_sqlite_without_drift(tmp_path):
    url = f"sqlite:///{tmp_path / 'bench.sqlite'}"
    done = countercache(
        "bench", "--url", url, "--workload", "hot", "--workers", "2", "--seconds", "0.5",
        "--repeat", "1", "--json", "--contender", *STRATEGIES, "sharded4", "aggregated",
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)

    assert doc["workloads"] == ["hot"]
    assert doc["sizes"]["workers"] == 2 and doc["sizes"]["seconds"] == 0.5
    assert doc["sizes"]["workloads"]["hot"]["rows"] is None
    results = {r["contender"]: r for r in doc["results"]}
    # the hand-written listener is left out: two workers deleting the same
    # child both decrement (it is reported WRONG when that happens)
    assert set(results) == set(doc["contenders"]) == {"none", *STRATEGIES, "sharded4", "aggregated"}
    floor = results["none"]
    assert floor["status"] == "ok" and floor["ratio"] == 1.0 and floor["drift"] is None
    for contender, r in results.items():
        assert r["workload"] == "hot"
        assert set(r) >= {"tx_per_s", "committed", "failed", "ratio", "runs", "errors", "drift"}
        if contender in POSTGRESQL_ONLY:
            assert r["status"] == "skipped" and r["tx_per_s"] is None and r["committed"] is None
            continue
        if contender == "aggregated" and r["status"] == "unavailable":
            continue
        assert r["status"] == "ok", (contender, r)
        assert r["committed"] > 0 and r["failed"] >= 0
        assert r["tx_per_s"] == pytest.approx(r["committed"] / 0.5)
        assert r["ratio"] == pytest.approx(r["tx_per_s"] / floor["tx_per_s"])
        assert len(r["runs"]) == 1 and r["runs"][0]["committed"] == r["committed"]
        assert sum(r["errors"].values()) == r["failed"]
        if contender != "none":
            assert r["drift"] == 0, (contender, r)


def test_hot_is_not_a_default_workload():
    from bench.workloads import DEFAULT_WORKLOADS, WORKLOADS

    assert DEFAULT_WORKLOADS == WORKLOADS_DEFAULT == [w for w in WORKLOADS if w != "hot"]
    assert "hot" in WORKLOADS


# ---------------------------------------------------------------------------
# the latency proxy (bench/latency.py), alone and in front of PostgreSQL
# ---------------------------------------------------------------------------


class _EchoServer:
    """A local TCP server answering every chunk it reads with the same bytes."""

    def __init__(self) -> None:
        import socket
        import threading

        self.listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listen.bind(("127.0.0.1", 0))
        self.listen.listen(8)
        self.port = self.listen.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.listen.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.listen.close()


@pytest.fixture
def echo():
    server = _EchoServer()
    yield server
    server.close()


def _receive(sock, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        assert chunk, "connection closed early"
        got += chunk
    return bytes(got)


def test_proxy_counts_each_request_and_answer_as_one_round_trip(echo):
    import socket

    from bench.latency import LatencyProxy

    with LatencyProxy("127.0.0.1", echo.port, 0) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            before = proxy.round_trips
            for i in range(5):
                message = f"request {i}\n".encode()
                client.sendall(message)
                assert _receive(client, len(message)) == message
            assert proxy.round_trips - before == 5


def test_proxy_counts_messages_sent_before_reading_as_one_round_trip(echo):
    import socket

    from bench.latency import LatencyProxy

    # 20 ms each way: every message reaches the proxy before the first answer is back
    with LatencyProxy("127.0.0.1", echo.port, 20) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            before = proxy.round_trips
            messages = [f"pipelined {i}\n".encode() for i in range(4)]
            for message in messages:
                client.sendall(message)
            assert _receive(client, sum(map(len, messages))) == b"".join(messages)
            assert proxy.round_trips - before == 1


def test_proxy_delivers_the_bytes_intact_and_in_order(echo):
    import random
    import socket
    import threading

    from bench.latency import LatencyProxy

    payload = random.Random(18).randbytes(512 * 1024)
    with LatencyProxy("127.0.0.1", echo.port, 1) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            def send() -> None:  # while the answers are read: no buffer fills up
                for start in range(0, len(payload), 7919):
                    client.sendall(payload[start:start + 7919])

            sender = threading.Thread(target=send)
            sender.start()
            assert _receive(client, len(payload)) == payload
            sender.join(10)


@pytest.fixture
def pg_url(engine, backend) -> str:
    """The test database's URL (PostgreSQL: the tests using it are postgresql_only)."""
    return engine.url.render_as_string(hide_password=False)


@pytest.mark.postgresql_only
def test_proxy_in_front_of_postgresql_counts_begin_insert_commit_as_3(pg_url):
    import sqlalchemy as sa

    from bench.latency import LatencyProxy, target_of

    with LatencyProxy(*target_of(pg_url), 0) as proxy:
        engine = sa.create_engine(proxy.url(pg_url))
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql("CREATE TEMPORARY TABLE ccb_proxy_probe (x integer)")
                connection.commit()
                before = proxy.round_trips
                connection.exec_driver_sql("INSERT INTO ccb_proxy_probe VALUES (1)")
                connection.commit()
                assert proxy.round_trips - before == 3  # BEGIN, INSERT, COMMIT
        finally:
            engine.dispose()


# ---------------------------------------------------------------------------
# the command line on PostgreSQL: hot in processes and threads, round trips,
# the contenders added for issue #18
# ---------------------------------------------------------------------------


def _bench_json(*args: str) -> dict:
    done = countercache("bench", *args, "--repeat", "1", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.postgresql_only
@pytest.mark.parametrize("mode", [("--processes", "2"), ("--threads", "2")], ids=["processes", "threads"])
def test_hot_on_postgresql_without_drift(pg_url, mode):
    doc = _bench_json("--url", pg_url, "--workload", "hot", *mode, "--seconds", "0.5", "--contender", "sharded")
    assert doc["sizes"]["workers"] == 2
    assert doc["sizes"]["mode"] == mode[0].lstrip("-")
    assert doc["sizes"]["latency_ms"] is None
    results = {r["contender"]: r for r in doc["results"]}
    assert set(results) == {"none", "sharded"}
    for contender, r in results.items():
        assert r["status"] == "ok", (contender, r)
        assert r["committed"] > 0
        assert "round_trips_per_txn" not in r  # no proxy: nothing counted, nothing shown
    assert results["sharded"]["drift"] == 0


@pytest.mark.postgresql_only
def test_latency_reports_round_trips_per_transaction(pg_url):
    doc = _bench_json("--url", pg_url, "--latency-ms", "0", "--workload", "txn", "--children", "50",
                      "--contender", "bulk", "flush_listener")
    assert doc["sizes"]["latency_ms"] == 0
    results = {r["contender"]: r for r in doc["results"]}
    assert set(results) == {"none", "bulk", "flush_listener"}
    for contender, r in results.items():
        assert r["status"] == "ok", (contender, r)
        assert len(r["round_trips"]) == 1
        assert r["round_trips_per_txn"] >= 3  # BEGIN, INSERT, COMMIT at least
    assert results["bulk"]["round_trips_per_txn"] > results["none"]["round_trips_per_txn"]  # + its UPDATE


def test_latency_on_sqlite_is_a_one_line_usage_error(tmp_path):
    done = countercache("bench", "--url", f"sqlite:///{tmp_path / 'bench.sqlite'}", "--latency-ms", "1")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("countercache: error:"), done.stderr
    assert "--latency-ms" in lines[0]


@pytest.mark.postgresql_only
def test_new_contenders_keep_the_count_on_postgresql(pg_url):
    doc = _bench_json("--url", pg_url, "--workload", "batch", "delete", "move", "--children", "60",
                      "--parents", "6", "--contender", "flush_listener", "pg_sharded_trigger")
    results = {(r["workload"], r["contender"]): r for r in doc["results"]}
    for workload in ("batch", "delete", "move"):
        for contender in ("flush_listener", "pg_sharded_trigger"):
            r = results[(workload, contender)]
            assert r["status"] == "ok" and r["drift"] == 0, (workload, contender, r)


@pytest.mark.postgresql_only
def test_txn_floor_counts_every_variant_and_reports_ratios(pg_url):
    from bench.txn_floor import VARIANTS, measure

    doc = measure(pg_url, transactions=20, repeat=1)
    assert doc["counted"] is True  # every counting variant added exactly one per transaction
    assert set(doc["ratio"]) == set(VARIANTS)
    assert doc["ratio"]["none"] == 1.0


def test_txn_floor_refuses_other_databases_in_one_line(tmp_path, capsys):
    from bench.txn_floor import main

    assert main(["--url", f"sqlite:///{tmp_path / 'floor.sqlite'}", "--repeat", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PostgreSQL with psycopg 3 only" in err[0]


def test_sharded_trigger_contender_folds_before_the_drift_check(tmp_path):
    """Run when named; its seed's shard rows are dropped after the recount, and it folds before the check."""
    url = f"sqlite:///{tmp_path / 'bench.sqlite'}"
    done = countercache("bench", "--url", url, *TINY, "--workload", "batch", "delete", "--json",
                        "--contender", "sharded_trigger")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]
    assert {(r["workload"], r["contender"]) for r in results} >= {("batch", "sharded_trigger"),
                                                                 ("delete", "sharded_trigger")}
    for r in results:
        if r["contender"] == "sharded_trigger":
            assert r["status"] == "ok" and r["drift"] == 0, r


def test_hot_table_without_latency_shows_the_drift(tmp_path):
    """Without ``--latency-ms`` the hot table has no round-trip column: it was dropped
    after the rows were added, and took the drift cells with it (a blank drift column)."""
    url = f"sqlite:///{tmp_path / 'bench.sqlite'}"
    done = countercache("bench", "--url", url, "--workload", "hot", "--workers", "2", "--seconds", "0.3",
                        "--repeat", "1", "--contender", "none", "--contender", "bulk")
    assert done.returncode == 0, done.stderr
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in done.stdout.splitlines() if line.startswith("│")}
    assert "round trips/txn" not in done.stdout
    assert rows["none"][-2] == "not kept" and rows["bulk"][-2] == "0", done.stdout
