"""A lean keep-alive HTTP/1.1 client for the backend's hot path.

Strategies fan out many small JSON requests to a few known servers, so the client's own
CPU per call bounds how many strategy requests a ponder process can serve. Measured on
fan-outs of 32 chat requests, JSON and parsing included (``loadtests/bench_backend_client.py``,
docs/performance.md): ``HTTPBackend`` on this client 0.18 ms CPU per call, on aiohttp 0.32,
on httpx 1.1-4.7 (its pool rescans every connection on each checkout). It does only what
the backend needs: one origin per pool (http or https), requests written in one piece,
responses parsed by httptools (uvicorn's parser, already installed with
``uvicorn[standard]``), bodies read whole or streamed with back-pressure, idle connections
reused LIFO and dropped before the server's keep-alive timeout or when bytes arrive on
them unasked. A response abandoned half-read closes its connection, which is how vLLM
learns to abort a generation.

Errors: ``ConnectError`` (no connection: refused, unresolvable, connect timeout),
``ConnectionClosed`` (the server closed the connection before answering: a stale
keep-alive connection or a crash; safe to retry for idempotent work), ``ProtocolError``
(malformed response or a body cut off), and the built-in ``TimeoutError`` when the
server goes silent for longer than the read timeout.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import AsyncIterator
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 256 * 1024
"""Buffered bytes of a streamed body at which reading from the socket pauses."""


class HTTPClientError(Exception):
    """Base of the client's own errors."""


class ConnectError(HTTPClientError):
    pass


class ConnectionClosed(HTTPClientError):
    pass


class ProtocolError(HTTPClientError):
    pass


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Connection(asyncio.Protocol):
    """One TCP connection and the state of the response currently arriving on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.begin()

    def begin(self) -> None:
        """Ready for the response to a request about to be written."""
        self.active = True
        self.status = 0
        self.headers: dict[str, str] = {}
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.until_eof = False
        self.error: HTTPClientError | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def wait(self, timeout: float) -> None:
        """Until the next parser event (headers, body bytes, end, error), or TimeoutError
        after ``timeout`` (a plain timer on the future: lighter than ``asyncio.timeout``)."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: HTTPClientError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def take(self) -> bytes:
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered < HIGH_WATER // 2:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.active:  # bytes on an idle connection (e.g. a server's 408): unusable
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed HTTP response: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete:
            return
        if self.headers_done and self.until_eof and exc is None:
            self.complete = True  # a body delimited by the end of the connection
            self._wake()
        elif self.headers_done:
            self._fail(ProtocolError("the server closed the connection mid-response"))
        else:
            self._fail(ConnectionClosed("the server closed the connection before answering"))

    # -- httptools callbacks -------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        headers: dict[str, str] = {}
        for raw_name, raw_value in self._raw_headers:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.headers = headers
        self.status = self.parser.get_status_code()
        self.until_eof = "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "")
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if not self.paused and self.buffered > HIGH_WATER:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()


class Response:
    """A response whose status and headers have arrived; the body is read or streamed
    once, then ``release()`` hands the connection back (or ``close()`` drops it)."""

    def __init__(self, pool: "ConnectionPool", connection: _Connection) -> None:
        self._pool, self._connection = pool, connection
        self.status = connection.status
        self.headers = connection.headers
        self._done = False

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks()])

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        connection = self._connection
        while True:
            if connection.chunks:
                yield connection.take()
            elif connection.complete:
                return
            elif connection.error is not None:
                raise connection.error
            else:
                await connection.wait(self._pool.read_timeout)

    def release(self) -> None:
        """Back to the pool if the response was read to its end, else close."""
        if self._done:
            return
        self._done = True
        connection = self._connection
        if connection.complete and connection.keep_alive and not connection.closed and not connection.chunks:
            self._pool._put_idle(connection)
        else:
            connection.abort()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._connection.abort()


class ConnectionPool:
    """Keep-alive connections to one origin (``http://host:port`` or ``https://...``)."""

    def __init__(self, url: str, *, headers: dict[str, str] | None = None, connect_timeout: float = 5.0,
                 read_timeout: float = 300.0, keepalive_s: float = 4.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.connect_timeout, self.read_timeout, self.keepalive_s = connect_timeout, read_timeout, keepalive_s
        host_header = parts.netloc.rpartition("@")[2]
        lines = [f"Host: {host_header}", "User-Agent: ponder", "Accept: */*"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self._head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self._idle: list[_Connection] = []

    async def request(self, method: str, path: str, body: bytes | None = None,
                      content_type: str = "application/json") -> Response:
        """Send a request; return once the status and headers are in."""
        connection = self._take_idle() or await self._connect()
        connection.begin()
        head = f"{method} {self.base_path}{path} HTTP/1.1\r\n".encode("latin-1") + self._head
        if body is not None:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode("latin-1")
            connection.transport.write(head + body)
        else:
            connection.transport.write(head + b"\r\n")
        try:
            while not connection.headers_done:
                if connection.error is not None:
                    raise connection.error
                await connection.wait(self.read_timeout)
        except BaseException:
            connection.abort()
            raise
        return Response(self, connection)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < self.keepalive_s:
                return connection
            connection.abort()
        return None

    def _put_idle(self, connection: _Connection) -> None:
        connection.active = False
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None)
        except TimeoutError as exc:
            raise ConnectError(f"connecting to {self.host}:{self.port} timed out after {self.connect_timeout}s") from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return connection

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().abort()
