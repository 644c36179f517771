"""The fault-injecting backend (tests/faulty_backend.py) does what its table says, over real HTTP."""

from __future__ import annotations

import json
import socket
import time
from typing import Iterator

import httpx
import pytest

from tests.faulty_backend import FaultyBackend

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "What is 6 times 7?"}], "n": 2}


@pytest.fixture(scope="module")
def _upstream() -> Iterator[FaultyBackend]:
    with FaultyBackend(seed=3, stall_s=5) as upstream:
        yield upstream


@pytest.fixture
def upstream(_upstream) -> FaultyBackend:
    _upstream.reset()
    return _upstream


def post(upstream: FaultyBackend, body: dict, timeout: float = 5) -> httpx.Response:
    return httpx.post(upstream.url + "/v1/chat/completions", json=body, timeout=timeout)


def test_ok_is_mock_content_and_listing_answers(upstream):
    response = post(upstream, CHAT)
    assert response.status_code == 200
    data = response.json()
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert "The answer is" in data["choices"][0]["message"]["content"]
    assert httpx.get(upstream.url + "/v1/models").json()["data"][0]["id"] == "mock-model"
    assert httpx.get(upstream.url + "/health").status_code == 200
    assert upstream.outcomes == {"ok": 1} and upstream.calls == 1
    assert [r.path for r in upstream.requests] == ["/v1/chat/completions", "/v1/models", "/health"]
    assert upstream.requests[0].body == CHAT


def test_status_faults_carry_an_error_body_and_retry_after(upstream):
    upstream.retry_after = 1.5
    try:
        upstream.script("500", "429", "503")
        responses = [post(upstream, CHAT) for _ in range(3)]
    finally:
        upstream.retry_after = 0
    assert [r.status_code for r in responses] == [500, 429, 503]
    assert all(r.json()["error"]["code"] == r.status_code for r in responses)
    assert [r.headers.get("retry-after") for r in responses] == [None, "1.5", "1.5"]
    assert upstream.outcomes == {"500": 1, "429": 1, "503": 1}


def test_reset_truncated_and_cut(upstream):
    upstream.script("reset")
    with pytest.raises(httpx.TransportError):
        post(upstream, CHAT)
    upstream.script("truncated")
    response = post(upstream, CHAT)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.content)
    upstream.script("cut")
    with pytest.raises(httpx.RemoteProtocolError):
        post(upstream, CHAT)
    assert upstream.outcomes == {"reset": 1, "truncated": 1, "cut": 1}


def test_stream_ok_and_truncated(upstream):
    with httpx.stream("POST", upstream.url + "/v1/completions", json={"prompt": "Once", "stream": True}) as r:
        text = r.read().decode()
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"]
    upstream.script("truncated")
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", upstream.url + "/v1/completions", json={"prompt": "Once", "stream": True}) as r:
            r.read()


def test_stall_records_when_the_client_leaves(upstream):
    upstream.script("stall")
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        post(upstream, CHAT, timeout=0.3)
    deadline = time.monotonic() + 2
    while upstream.stalls[0].closed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert upstream.stalls[0].closed is not None
    assert upstream.stalls[0].closed - started < 1.0
    assert upstream.open_connections == 0


def test_stream_stall_sends_the_first_event_then_nothing(upstream):
    upstream.script("stall")
    received = b""
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", upstream.url + "/v1/completions", json={"prompt": "x", "stream": True},
                          timeout=0.5) as r:
            for chunk in r.iter_raw():
                received += chunk
    assert received.startswith(b"data: {") and b"[DONE]" not in received
    assert len(upstream.stalls) == 1


def test_probabilities_are_drawn_with_the_seed(upstream):
    upstream.set_faults(**{"500": 0.3, "503": 0.2})
    with httpx.Client() as client:
        statuses = [client.post(upstream.url + "/v1/chat/completions", json=CHAT).status_code for _ in range(40)]
    assert set(statuses) == {200, 500, 503}
    assert statuses.count(500) == upstream.outcomes["500"] and 4 <= upstream.outcomes["500"] <= 20
    assert upstream.calls == 40
    with pytest.raises(ValueError):
        upstream.set_faults(bogus=0.1)


def test_keep_alive_connection_is_reused(upstream):
    with httpx.Client() as client:
        for _ in range(3):
            assert client.post(upstream.url + "/v1/chat/completions", json=CHAT).status_code == 200
    before = upstream.connections
    with socket.create_connection(("127.0.0.1", upstream.port)):
        pass
    time.sleep(0.05)
    assert upstream.connections == before + 1
