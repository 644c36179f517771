"""HTTPBackend's HTTP client (aiohttp) against raw asyncio servers that misbehave on purpose:
cut bodies, stalls, resets, 1xx, gzip, redirects, huge bodies, stale keep-alive, TLS, proxies."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from service.backends import BackendConfig, BackendError, BackendTimeout, BadResponse, HTTPBackend
from strategies.protocol import GenerationRequest

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

ANSWER = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
CHAT = GenerationRequest(messages=({"role": "user", "content": "x"},))


class RawServer:
    """A TCP server whose handler writes whatever bytes a test wants; counts connections
    and records when each one was closed by the client."""

    def __init__(self, handler: Handler, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler, self.ssl_context = handler, ssl_context
        self.connections = 0
        self.requests: list[tuple[str, bytes]] = []

    async def __aenter__(self) -> "RawServer":
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[str, bytes]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                       if line.lower().startswith("content-length:")), 0)
        body = await reader.readexactly(length) if length else b""
        self.requests.append((head, body))
        return head, body


def response(body: bytes, *, status: str = "200 OK", extra: str = "", length: int | None = None) -> bytes:
    length = len(body) if length is None else length
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n"
            .encode() + body)


def answer_bytes() -> bytes:
    return json.dumps(ANSWER).encode()


def backend_for(url: str, **overrides: Any) -> HTTPBackend:
    return HTTPBackend(BackendConfig(urls=[url], default_model="m", backoff_base=0.01, **overrides))


async def keep_answering(server: RawServer, reader, writer) -> None:
    while True:
        await server.read_request(reader)
        writer.write(response(answer_bytes()))
        await writer.drain()


async def test_connection_is_reused_and_request_is_well_formed():
    server = RawServer(lambda r, w: keep_answering(server, r, w))
    async with server:
        backend = backend_for(server.url + "/v1", api_key="sk-1\n", extra_headers={"X-Trace": "t"})
        for _ in range(3):
            [generation] = await backend.generate([CHAT])
            assert generation.choices[0].text == "hi"
        await backend.aclose()
    assert server.connections == 1
    head, body = server.requests[0]
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    lines = head.lower().split("\r\n")
    assert "authorization: bearer sk-1" in lines  # the key file's newline is not sent
    assert "x-trace: t" in lines and "content-type: application/json" in lines
    assert json.loads(body)["messages"] == [{"role": "user", "content": "x"}]


def test_header_values_that_cannot_be_sent_are_refused_at_start():
    with pytest.raises(ValueError, match="PONDER_BACKEND_API_KEY"):
        backend_for("http://127.0.0.1:9", api_key="sk-\r\nX-Evil: 1")
    with pytest.raises(ValueError, match="PONDER_BACKEND_API_KEY"):
        backend_for("http://127.0.0.1:9", api_key="clé-€")


async def test_cut_body_is_retried_then_502_never_500():
    async def cut(reader, writer):
        await server.read_request(reader)
        writer.write(response(answer_bytes()[:10], length=len(answer_bytes())))
        await writer.drain()

    server = RawServer(cut)
    async with server:
        backend = backend_for(server.url, max_retries=2)
        with pytest.raises(BadResponse) as info:
            await backend.generate([CHAT])
        await backend.aclose()
    assert info.value.status_code == 502
    assert len(server.requests) == 3  # retried: the upstream had finished with it
    bodies = [json.loads(body) for _, body in server.requests]  # the one ready payload, re-sent whole
    assert bodies[0]["messages"] == [{"role": "user", "content": "x"}] and bodies.count(bodies[0]) == 3
    assert all("content-type: application/json" in head.lower() for head, _ in server.requests)


@pytest.mark.parametrize("body", [b"<html>proxy login</html>", b'{"choices": [', b"\xff\xfe{}"],
                         ids=["html", "truncated-json", "undecodable"])
async def test_a_2xx_that_is_not_json_is_a_bad_response(body):
    async def bad_then_good(reader, writer):
        await server.read_request(reader)
        writer.write(response(body))
        await server.read_request(reader)
        writer.write(response(answer_bytes()))
        await writer.drain()

    server = RawServer(bad_then_good)
    async with server:
        backend = backend_for(server.url)
        [generation] = await backend.generate([CHAT])
        assert generation.choices[0].text == "hi" and len(server.requests) == 2
        # the raw pass-through path checks the body too
        server.requests.clear()
        backend_once = backend_for(server.url, max_retries=0)
        with pytest.raises(BadResponse):
            await backend_once.request("POST", "/v1/completions", {"prompt": "x"}, decode=False)
        await backend.aclose()
        await backend_once.aclose()


async def test_stall_times_out_without_a_second_request():
    async def silent(reader, writer):
        await server.read_request(reader)
        await asyncio.sleep(5)

    server = RawServer(silent)
    async with server:
        backend = backend_for(server.url, read_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(BackendTimeout) as info:
            await backend.generate([CHAT])
        await backend.aclose()
    assert time.monotonic() - started < 2
    assert info.value.status_code == 504
    assert len(server.requests) == 1  # it may still be generating: not asked twice


async def test_reset_before_answering_is_retried():
    async def reset_first(reader, writer):
        await server.read_request(reader)
        if len(server.requests) == 1:
            writer.transport.abort()
            return
        writer.write(response(answer_bytes()))
        await writer.drain()

    server = RawServer(reset_first)
    async with server:
        backend = backend_for(server.url)
        [generation] = await backend.generate([CHAT])
        await backend.aclose()
    assert generation.choices[0].text == "hi"
    assert len(server.requests) == 2 and backend.endpoints[0].healthy


async def test_interim_1xx_responses_are_skipped():
    async def early_hints(reader, writer):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(response(answer_bytes()))
        await writer.drain()

    server = RawServer(early_hints)
    async with server:
        backend = backend_for(server.url)
        [generation] = await backend.generate([CHAT])
        await backend.aclose()
    assert generation.choices[0].text == "hi"


async def test_gzip_body_from_an_intermediary_is_decoded():
    async def gzipped(reader, writer):
        await server.read_request(reader)
        writer.write(response(gzip.compress(answer_bytes()), extra="Content-Encoding: gzip\r\n"))
        await writer.drain()

    server = RawServer(gzipped)
    async with server:
        backend = backend_for(server.url)
        [generation] = await backend.generate([CHAT])
        assert await backend.request("POST", "/v1/chat/completions", {}, decode=False) == answer_bytes()
        await backend.aclose()
    assert generation.choices[0].text == "hi"


async def test_redirects_are_followed_with_the_body_and_loops_are_a_502():
    async def redirecting(reader, writer):
        while True:
            head, body = await server.read_request(reader)
            path = head.split()[1]
            if path == "/v1/chat/completions":
                writer.write(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /moved/v1/chat/completions\r\n"
                             b"Content-Length: 0\r\n\r\n")
            elif path.startswith("/moved"):
                writer.write(response(answer_bytes()))
            else:  # /v1/completions: a loop
                writer.write(b"HTTP/1.1 308 Permanent Redirect\r\nLocation: /v1/completions\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

    server = RawServer(redirecting)
    async with server:
        backend = backend_for(server.url, max_retries=0)
        [generation] = await backend.generate([CHAT])
        assert generation.choices[0].text == "hi"
        moved_head, moved_body = server.requests[1]
        assert moved_head.startswith("POST /moved/v1/chat/completions") and json.loads(moved_body)["messages"]
        with pytest.raises(BadResponse) as info:
            await backend.generate([GenerationRequest(prompt="x")])
        await backend.aclose()
    assert info.value.status_code == 502


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_over_the_cap_is_refused_without_buffering_it(framing):
    written = []

    async def huge(reader, writer):
        await server.read_request(reader)
        piece = b" " * 65536
        if framing == "content-length":
            writer.write(response(b"", length=64 * len(piece) * 1000))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(2000):  # up to 128 MB, unless the client hangs up first
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if framing == "chunked" else piece)
            written.append(len(piece))
            await writer.drain()

    server = RawServer(huge)
    async with server:
        backend = backend_for(server.url, max_response_bytes=1_000_000)
        with pytest.raises(BadResponse, match="PONDER_BACKEND_MAX_RESPONSE_BYTES") as info:
            await backend.generate([CHAT])
        await backend.aclose()
    assert info.value.status_code == 502
    assert len(server.requests) == 1  # too large is not retried: it would be too large again
    assert sum(written) < 20_000_000


async def test_stale_keep_alive_connection_is_retried_without_ejecting():
    """The server answers once per connection, then closes it without saying so: the
    next request on that connection gets nothing back, and the backend retries it."""

    async def one_answer_per_connection(reader, writer):
        await server.read_request(reader)
        writer.write(response(answer_bytes()))  # advertises keep-alive, then:
        await writer.drain()
        await server.read_request(reader)  # reads the next request and hangs up

    server = RawServer(one_answer_per_connection)
    async with server:
        backend = backend_for(server.url)
        for _ in range(3):
            [generation] = await backend.generate([CHAT])
            assert generation.choices[0].text == "hi"
        await backend.aclose()
    assert backend.endpoints[0].healthy
    assert server.connections == 3 and len(server.requests) == 5


async def test_abandoned_stream_closes_the_upstream_connection():
    closed = asyncio.Event()

    async def endless_stream(reader, writer):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        event = b'data: {"choices": []}\n\n'
        try:
            while True:
                writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    server = RawServer(endless_stream)
    async with server:
        backend = backend_for(server.url)
        async with backend.stream("/v1/completions", {"prompt": "x", "stream": True}) as chunks:
            async for chunk in chunks:
                assert chunk.startswith(b"data: ")
                break
        await asyncio.wait_for(closed.wait(), 2)
        assert backend.endpoints[0].in_flight == 0
        assert not backend._slots.locked() and backend._slots._value == backend.config.max_concurrency
        await backend.aclose()


async def test_userinfo_in_the_url_is_sent_as_basic_auth_and_never_shown():
    server = RawServer(lambda r, w: keep_answering(server, r, w))
    async with server:
        backend = backend_for(f"http://ops:s3cret@127.0.0.1:{server.port}")
        [generation] = await backend.generate([CHAT])
        assert generation.choices[0].text == "hi"
        assert backend.endpoints[0].url == server.url
        assert "s3cret" not in repr(backend.endpoints) and "s3cret" not in json.dumps(await backend.ready())
        await backend.aclose()
    expected = "authorization: basic " + base64.b64encode(b"ops:s3cret").decode().lower()
    assert expected in server.requests[0][0].lower().split("\r\n")
    with pytest.raises(ValueError, match="use one"):
        backend_for(f"http://ops:s3cret@127.0.0.1:{server.port}", api_key="sk-1")


async def test_proxy_from_the_environment_is_used_and_no_proxy_respected(monkeypatch):
    proxy = RawServer(lambda r, w: keep_answering(proxy, r, w))
    origin = RawServer(lambda r, w: keep_answering(origin, r, w))
    async with proxy, origin:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        backend = backend_for("http://backend.internal:8000")
        [generation] = await backend.generate([CHAT])
        assert generation.choices[0].text == "hi"
        assert proxy.requests[0][0].startswith("POST http://backend.internal:8000/v1/chat/completions HTTP/1.1")
        await backend.aclose()
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        direct = backend_for(origin.url)
        await direct.generate([CHAT])
        await direct.aclose()
    assert len(proxy.requests) == 1 and len(origin.requests) == 1


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A private CA, a server certificate for localhost and a client certificate, both signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make certificates")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name, extra in (("server", "subjectAltName=DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(d / f"{name}.key"),
                 "-out", str(d / f"{name}.csr"))
        (d / f"{name}.ext").write_text(extra + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-days", "1", "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


async def test_https_with_a_ca_bundle_and_a_client_certificate(pki):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server_pem"], pki["server_key"])
    context.load_verify_locations(pki["ca_pem"])
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS
    server = RawServer(lambda r, w: keep_answering(server, r, w), ssl_context=context)
    async with server:
        url = f"https://localhost:{server.port}"
        untrusted = backend_for(url, max_retries=0)
        with pytest.raises(BackendError):  # the private CA is not trusted by default
            await untrusted.generate([CHAT])
        no_client_cert = backend_for(url, max_retries=0, ca_bundle=str(pki["ca_pem"]))
        with pytest.raises(BackendError):  # the server wants a client certificate
            await no_client_cert.generate([CHAT])
        mutual = backend_for(url, ca_bundle=str(pki["ca_pem"]), client_cert=str(pki["client_pem"]),
                             client_key=str(pki["client_key"]))
        [generation] = await mutual.generate([CHAT])
        assert generation.choices[0].text == "hi"
        for backend in (untrusted, no_client_cert, mutual):
            await backend.aclose()
