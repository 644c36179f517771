"""The lean HTTP/1.1 client against raw asyncio servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from typing import Awaitable, Callable

import pytest

from service.backends import BackendConfig, HTTPBackend
from service.http1 import ConnectError, ConnectionClosed, ConnectionPool, ProtocolError
from strategies.protocol import GenerationRequest
from tests.conftest import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server whose handler writes whatever bytes a test wants; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed_by_client = asyncio.Event()

    async def __aenter__(self) -> "RawServer":
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await reader.readexactly(length) if length else b""
    return head.decode("latin-1"), body


def json_response(payload: object, *, extra: str = "") -> bytes:
    body = json.dumps(payload).encode()
    return f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def keep_alive_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head, body = await read_request(reader)
        writer.write(json_response({"path": head.split()[1], "body": body.decode()}))
        await writer.drain()


async def test_connection_is_reused_and_request_is_well_formed():
    seen: list[str] = []

    async def handler(reader, writer):
        while True:
            head, body = await read_request(reader)
            seen.append(head)
            writer.write(json_response({"body": json.loads(body)}))
            await writer.drain()

    async with RawServer(handler) as server:
        pool = ConnectionPool(server.url + "/prefix", headers={"Authorization": "Bearer k"})
        for i in range(5):
            response = await pool.request("POST", "/v1/x", json.dumps({"i": i}).encode())
            assert response.status == 200 and response.headers["content-type"] == "application/json"
            assert json.loads(await response.read()) == {"body": {"i": i}}
            response.release()
        assert server.connections == 1 and pool.idle_connections == 1
        assert seen[0].startswith("POST /prefix/v1/x HTTP/1.1\r\n")
        assert "Authorization: Bearer k" in seen[0] and "Content-Length: 8" in seen[0]
        pool.close()


async def test_concurrent_requests_open_one_connection_each_then_reuse_them():
    async def slow_echo(reader, writer):
        while True:
            await read_request(reader)
            await asyncio.sleep(0.05)
            writer.write(json_response({"ok": True}))
            await writer.drain()

    async with RawServer(slow_echo) as server:
        pool = ConnectionPool(server.url)

        async def one() -> int:
            response = await pool.request("GET", "/")
            await response.read()
            response.release()
            return response.status

        assert await asyncio.gather(*(one() for _ in range(8))) == [200] * 8
        assert await asyncio.gather(*(one() for _ in range(8))) == [200] * 8
        assert server.connections == 8
        pool.close()


async def test_chunked_stream_arrives_in_pieces_and_connection_is_kept():
    release = asyncio.Event()

    async def handler(reader, writer):
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"5\r\nfirst\r\n")
            await writer.drain()
            await release.wait()
            writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
            await writer.drain()

    async with RawServer(handler) as server:
        pool = ConnectionPool(server.url)
        response = await pool.request("POST", "/s", b"{}")
        chunks = response.iter_chunks()
        assert await chunks.__anext__() == b"first"  # before the server has sent the rest
        release.set()
        assert [c async for c in chunks] == [b"second"]
        response.release()
        assert pool.idle_connections == 1
        pool.close()


async def test_large_stream_pauses_reading_until_consumed():
    size = 4 * 1024 * 1024

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        writer.write(b"x" * size)
        await writer.drain()

    async with RawServer(handler) as server:
        pool = ConnectionPool(server.url)
        response = await pool.request("GET", "/big")
        connection = response._connection
        await asyncio.sleep(0.3)  # let the server push as much as the socket takes
        assert connection.paused and connection.buffered < size
        received = sum([len(c) async for c in response.iter_chunks()])
        assert received == size and not connection.paused
        response.release()
        pool.close()


async def test_body_delimited_by_connection_close():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    async with RawServer(handler) as server:
        pool = ConnectionPool(server.url)
        response = await pool.request("GET", "/")
        assert await response.read() == b"all of it"
        response.release()
        assert pool.idle_connections == 0
        pool.close()


async def test_abandoned_stream_closes_the_connection():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        assert await reader.read() == b""  # EOF: the client hung up
        server.closed_by_client.set()

    async with RawServer(handler) as server:
        pool = ConnectionPool(server.url)
        response = await pool.request("GET", "/")
        assert await response.iter_chunks().__anext__() == b"first"
        response.close()
        await asyncio.wait_for(server.closed_by_client.wait(), 2)
        assert pool.idle_connections == 0
        pool.close()


async def test_unread_body_is_not_returned_to_the_pool():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        await reader.read()

    async with RawServer(handler) as server:
        pool = ConnectionPool(server.url)
        response = await pool.request("GET", "/")
        response.release()
        assert pool.idle_connections == 0
        pool.close()


async def test_server_closing_before_answering_is_connection_closed():
    async def handler(reader, writer):
        await read_request(reader)

    async with RawServer(handler) as server:
        pool = ConnectionPool(server.url)
        with pytest.raises(ConnectionClosed):
            await pool.request("GET", "/")
        pool.close()


async def test_cut_off_body_is_protocol_error():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()

    async with RawServer(handler) as server:
        pool = ConnectionPool(server.url)
        response = await pool.request("GET", "/")
        with pytest.raises(ProtocolError):
            await response.read()
        pool.close()


async def test_malformed_response_is_protocol_error():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with RawServer(handler) as server:
        pool = ConnectionPool(server.url)
        with pytest.raises(ProtocolError):
            await pool.request("GET", "/")
        pool.close()


async def test_silent_server_times_out_between_chunks():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await writer.drain()
        await reader.read()

    async with RawServer(handler) as server:
        pool = ConnectionPool(server.url, read_timeout=0.2)
        response = await pool.request("GET", "/")
        chunks = response.iter_chunks()
        assert await chunks.__anext__() == b"a"
        with pytest.raises(TimeoutError):
            await chunks.__anext__()
        response.close()
        pool.close()


async def test_refused_connection_is_connect_error():
    pool = ConnectionPool(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConnectError):
        await pool.request("GET", "/")


async def test_expired_idle_connection_is_not_reused():
    async with RawServer(keep_alive_echo) as server:
        pool = ConnectionPool(server.url, keepalive_s=0.1)
        for _ in range(2):
            response = await pool.request("GET", "/")
            await response.read()
            response.release()
            await asyncio.sleep(0.2)
        assert server.connections == 2
        pool.close()


async def test_backend_retries_when_a_kept_alive_connection_was_closed_by_the_server():
    """The server answers once per connection, then closes it without saying so: the
    next request on that connection gets nothing back, and the backend retries it."""
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1}}

    received = []

    async def one_answer_per_connection(reader, writer):
        received.append(await read_request(reader))
        writer.write(json_response(answer))  # advertises keep-alive, then:
        await writer.drain()
        received.append(await read_request(reader))  # reads the next request and hangs up

    async with RawServer(one_answer_per_connection) as server:
        backend = HTTPBackend(BackendConfig(urls=[server.url], default_model="m", backoff_base=0.01))
        request = GenerationRequest(messages=({"role": "user", "content": "x"},))
        for _ in range(3):
            [generation] = await backend.generate([request])
            assert generation.choices[0].text == "hi"
        assert backend.endpoints[0].healthy  # a stale connection is not the endpoint's fault
        # Requests 2 and 3 each went out on the kept connection first, then again on a new one.
        assert server.connections == 3 and len(received) == 5
        await backend.aclose()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_https_origin_verifies_the_server_certificate(tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server = await asyncio.start_server(keep_alive_echo, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    try:
        untrusted = ConnectionPool(f"https://localhost:{port}")
        with pytest.raises(ConnectError):  # self-signed: refused until trusted
            await untrusted.request("GET", "/")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        pool = ConnectionPool(f"https://localhost:{port}")
        response = await pool.request("POST", "/v1/x", b'{"a": 1}')
        assert json.loads(await response.read()) == {"path": "/v1/x", "body": '{"a": 1}'}
        response.release()
        pool.close()
    finally:
        server.close()


async def test_bytes_arriving_on_an_idle_connection_make_it_unusable():
    async def answer_then_chatter(reader, writer):
        await read_request(reader)
        writer.write(json_response({"ok": True}))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")  # unsolicited
        await writer.drain()
        await read_request(reader)
        writer.write(json_response({"stale": True}))
        await writer.drain()

    async with RawServer(answer_then_chatter) as server:
        pool = ConnectionPool(server.url)
        response = await pool.request("GET", "/")
        await response.read()
        response.release()
        await asyncio.sleep(0.2)
        assert pool.idle_connections == 1
        response = await pool.request("GET", "/")  # must not read the 408 as its answer
        assert response.status == 200 and json.loads(await response.read()) == {"ok": True}
        assert server.connections == 2
        response.release()
        pool.close()
