"""A loopback TCP proxy that delays each direction, and counts round trips.

``countercache bench --latency-ms X`` puts one between every contender and
the database, so that the benchmark runs in the shape applications run: the
database across a network, every round trip paying ``2 * X`` ms.

The proxy runs in a process of its own (it must not take the GIL from the
clients it measures). Each chunk read from one side is written to the other
``X`` ms later, order kept, without waiting for the previous one: bytes in
flight overlap as on a network, so a client that sends several statements
before reading (a pipeline) pays the delay once.

Round trips are counted per connection as the turns of the conversation:
each time the server answers after the client has sent something since the
server last spoke. A statement that waits for its answer is one; statements
sent together and answered together are one. :attr:`LatencyProxy.round_trips`
is the total over every connection so far (connection set-up included: read
it before and after the part to count).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
from typing import Any

import sqlalchemy as sa

_CHUNK = 65536


def _serve(target: tuple[str, int], delay: float, trips: Any, port: Any, ready: Any) -> None:
    listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listen.bind(("127.0.0.1", 0))
    listen.listen(512)
    port.value = listen.getsockname()[1]
    asyncio.run(_main(listen, target, delay, trips, ready))


async def _main(listen: socket.socket, target: tuple[str, int], delay: float, trips: Any, ready: Any) -> None:
    loop = asyncio.get_running_loop()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   turn: list[bool], from_client: bool) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                due = loop.time() + delay
                if from_client:
                    turn[0] = True
                elif data and turn[0]:
                    turn[0] = False
                    with trips.get_lock():
                        trips.value += 1
                if not data:
                    loop.call_at(due, _close, writer)
                    return
                loop.call_at(due, writer.write, data)
        except (ConnectionError, OSError):
            loop.call_at(loop.time() + delay, _close, writer)

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        for writer in (client_writer, server_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        turn = [False]  # has the client spoken since the server last did?
        await asyncio.gather(pump(client_reader, server_writer, turn, True),
                             pump(server_reader, client_writer, turn, False))

    server = await asyncio.start_server(handle, sock=listen)
    ready.set()
    async with server:
        await server.serve_forever()


def _close(writer: asyncio.StreamWriter) -> None:
    try:
        if writer.can_write_eof():
            writer.write_eof()
        else:
            writer.close()
    except (ConnectionError, OSError, RuntimeError):
        writer.close()


class LatencyProxy:
    """``with LatencyProxy(host, port, delay_ms) as proxy:`` connect to ``proxy.port``."""

    def __init__(self, host: str, port: int, delay_ms: float) -> None:
        if delay_ms < 0:
            raise ValueError(f"latency must not be negative, not {delay_ms}")
        self.target = (host, port)
        self.delay_ms = delay_ms
        context = multiprocessing.get_context("spawn")
        self._trips = context.Value("q", 0)
        self._port = context.Value("i", 0)
        self._ready = context.Event()
        self._context = context
        self._process: Any = None
        self.port = 0

    def start(self) -> LatencyProxy:
        self._process = self._context.Process(
            target=_serve, args=(self.target, self.delay_ms / 1000.0, self._trips, self._port, self._ready),
            daemon=True, name="countercache-latency-proxy")
        self._process.start()
        if not self._ready.wait(30):
            self.stop()
            raise OSError("the latency proxy did not start")
        self.port = self._port.value
        return self

    @property
    def round_trips(self) -> int:
        """Round trips through the proxy so far, every connection included."""
        with self._trips.get_lock():
            return int(self._trips.value)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.join(10)
            self._process = None

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def url(self, url: str) -> str:
        """``url`` pointed at this proxy instead of the database."""
        return sa.engine.make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)


def target_of(url: str) -> tuple[str, int]:
    """The host and port a database URL connects to (SQLite: refused)."""
    parsed = sa.engine.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        raise ValueError("--latency-ms needs a database server; SQLite runs in the process")
    default = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}.get(backend)
    port = parsed.port or default
    if port is None:
        raise ValueError(f"--latency-ms: no port known for {backend}")
    return parsed.host or "127.0.0.1", port
