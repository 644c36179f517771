"""HTTPBackend against a programmable fake OpenAI server, over real loopback HTTP."""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Iterator

import pytest
from prometheus_client import REGISTRY

from service.backends import BackendConfig, BackendError, BackendTimeout, HTTPBackend, UpstreamError
from strategies.protocol import Generation, GenerationRequest, Generator
from tests.fake_openai import FakeOpenAI, free_port

FAST = dict(backoff_base=0.01, backoff_max=1.0, default_model="fake-model")


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    with FakeOpenAI(name="a") as a, FakeOpenAI(name="b") as b:
        yield a, b


@pytest.fixture
def fake(_fakes) -> FakeOpenAI:
    a, b = _fakes
    a.reset()
    b.reset()
    return a


@pytest.fixture
def fake_b(_fakes, fake) -> FakeOpenAI:
    return _fakes[1]


@pytest.fixture
async def make_backend() -> AsyncIterator[Any]:
    backends: list[HTTPBackend] = []

    def make(urls: list[str], **overrides: Any) -> HTTPBackend:
        backend = HTTPBackend(BackendConfig(urls=urls, **{**FAST, **overrides}))
        backends.append(backend)
        return backend

    yield make
    for backend in backends:
        await backend.aclose()


def chat(text: str = "hi", **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(messages=({"role": "user", "content": text},), **kwargs)


def completion(prompt: str = "Once", **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, **kwargs)


# -- retries --------------------------------------------------------------------------


async def test_retries_503_then_succeeds(fake, make_backend):
    backend = make_backend([fake.url])
    fake.plan(503, {"error": {"message": "overloaded"}})
    [generation] = await backend.generate([chat()])
    assert len(fake.generation_requests) == 2
    assert [r.path for r in fake.generation_requests] == ["/v1/chat/completions"] * 2
    assert generation.choices[0].text == "a chat 0"
    assert generation.model == "fake-model"
    assert backend.endpoints[0].healthy and backend.endpoints[0].failures == 0


@pytest.mark.parametrize("status", [500, 502])
async def test_retries_finished_upstream_errors(fake, make_backend, status):
    backend = make_backend([fake.url])
    fake.plan(status, {"error": {"message": "gateway"}})
    [generation] = await backend.generate([completion()])
    assert len(fake.generation_requests) == 2
    assert generation.choices[0].text == "a text 0"
    # one failure is not enough to eject the only server
    assert backend.endpoints[0].healthy and backend.endpoints[0].failures == 0


async def test_504_is_not_retried_for_a_generation_but_is_for_a_read(fake, make_backend):
    """Behind a gateway that timed out the upstream may still be generating: asking again
    would double the work. Listing models is idempotent by construction."""
    backend = make_backend([fake.url])
    fake.plan(504, {"error": {"message": "gateway timeout"}})
    with pytest.raises(UpstreamError) as info:
        await backend.generate([completion()])
    assert info.value.status_code == 504
    assert len(fake.generation_requests) == 1
    fake.plan(504, {"error": {"message": "gateway timeout"}}, path="/v1/models")
    assert (await backend.models())["data"][0]["id"] == "fake-model"
    assert [r.path for r in fake.requests].count("/v1/models") == 2


async def test_retries_exhausted_surface_last_upstream_error(fake, make_backend):
    backend = make_backend([fake.url], max_retries=2)
    for _ in range(3):
        fake.plan(503, {"error": {"message": "still overloaded"}})
    with pytest.raises(UpstreamError) as info:
        await backend.generate([chat()])
    assert info.value.status_code == 503
    assert str(info.value) == "still overloaded"
    assert len(fake.generation_requests) == 3


async def test_retry_after_is_honoured(fake, make_backend):
    backend = make_backend([fake.url])
    fake.plan(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "0.5"})
    [generation] = await backend.generate([chat()])
    first, second = fake.generation_requests
    assert second.time - first.time >= 0.45
    assert generation.choices[0].text == "a chat 0"
    # 429 is back-pressure, not a failure: the endpoint stays in rotation.
    assert backend.endpoints[0].healthy


async def test_400_is_not_retried_and_keeps_upstream_body(fake, make_backend):
    backend = make_backend([fake.url])
    error = {"error": {"message": "max_tokens is too large", "type": "BadRequestError", "code": 400}}
    fake.plan(400, error)
    with pytest.raises(UpstreamError) as info:
        await backend.generate([completion(max_tokens=10**6)])
    assert len(fake.generation_requests) == 1
    assert info.value.status_code == 400
    assert info.value.body == error
    assert info.value.body["error"]["message"] == "max_tokens is too large"
    assert str(info.value) == "max_tokens is too large"
    assert backend.endpoints[0].healthy


async def test_non_json_error_body_is_wrapped(fake, make_backend):
    backend = make_backend([fake.url])
    fake.plan(422, text="bad things")
    with pytest.raises(UpstreamError) as info:
        await backend.request("POST", "/v1/completions", {"prompt": "x"})
    assert info.value.status_code == 422
    assert info.value.body["error"]["message"] == "bad things"
    assert info.value.body["error"]["code"] == 422
    assert len(fake.generation_requests) == 1


async def test_read_timeout_is_bounded(fake, make_backend):
    backend = make_backend([fake.url], read_timeout=0.3)
    fake.plan(delay=5.0)
    started = time.monotonic()
    with pytest.raises(BackendTimeout) as info:
        await backend.generate([chat()])
    assert time.monotonic() - started < 1.5
    assert info.value.status_code == 504
    assert len(fake.generation_requests) == 1


async def test_all_endpoints_down_raises_backend_error(make_backend):
    backend = make_backend([f"http://127.0.0.1:{free_port()}"], max_retries=1)
    with pytest.raises(BackendError) as info:
        await backend.generate([chat()])
    assert type(info.value) is BackendError
    assert info.value.status_code == 503
    assert not backend.endpoints[0].healthy


# -- routing --------------------------------------------------------------------------


async def test_dead_endpoint_is_ejected_and_traffic_goes_to_live_one(fake, make_backend):
    dead = f"http://127.0.0.1:{free_port()}"
    backend = make_backend([dead, fake.url])
    ejections = REGISTRY.get_sample_value("ponder_backend_ejections_total") or 0
    for i in range(10):
        [generation] = await backend.generate([chat(f"q{i}")])
        assert generation.choices[0].text == "a chat 0"
    dead_endpoint, live_endpoint = backend.endpoints
    assert not dead_endpoint.healthy
    assert dead_endpoint.failures == 1  # tried once, then skipped while ejected
    assert REGISTRY.get_sample_value("ponder_backend_ejections_total") == ejections + 1
    assert live_endpoint.healthy
    assert len(fake.generation_requests) == 10
    assert [r.body["messages"][0]["content"] for r in fake.generation_requests] == [f"q{i}" for i in range(10)]
    assert dead_endpoint.in_flight == live_endpoint.in_flight == 0


async def test_dead_endpoint_concurrent_batch_all_succeed(fake, make_backend):
    dead = f"http://127.0.0.1:{free_port()}"
    backend = make_backend([dead, fake.url])
    generations = await backend.generate([chat(f"q{i}") for i in range(10)])
    assert [g.choices[0].text for g in generations] == ["a chat 0"] * 10
    assert len(fake.generation_requests) == 10
    assert not backend.endpoints[0].healthy
    # Once ejected, the dead endpoint gets nothing more.
    failures = backend.endpoints[0].failures
    await backend.generate([chat("after")])
    assert backend.endpoints[0].failures == failures
    assert len(fake.generation_requests) == 11


async def test_fewest_in_flight_splits_load(fake, fake_b, make_backend):
    fake.delay = fake_b.delay = 0.2
    backend = make_backend([fake.url, fake_b.url])
    generations = await backend.generate([chat(f"q{i}") for i in range(8)])
    a, b = len(fake.generation_requests), len(fake_b.generation_requests)
    assert a + b == 8
    assert max(a, b) <= 5
    assert (a, b) == (4, 4)
    # Results come back in request order, whichever server answered.
    assert sorted(g.choices[0].text for g in generations) == ["a chat 0"] * a + ["b chat 0"] * b
    assert [e.in_flight for e in backend.endpoints] == [0, 0]
    # every concurrency slot is back (the fan-out share and the overall one)
    assert backend._slots._value == backend.config.max_concurrency
    assert not backend._fanout_slots.locked()


async def test_failed_request_retries_on_other_endpoint(fake, fake_b, make_backend):
    backend = make_backend([fake.url, fake_b.url])
    fake.plan(503, {"error": {"message": "busy"}})
    [generation] = await backend.generate([chat()])
    assert len(fake.generation_requests) == 1
    assert len(fake_b.generation_requests) == 1
    assert generation.choices[0].text == "b chat 0"
    # 503 is back-pressure from a live server: retried elsewhere, never a reason to eject it
    assert backend.endpoints[0].healthy and backend.endpoints[0].failures == 0


# -- request bodies and parsing ---------------------------------------------------------


async def test_n_passed_through_and_choices_parsed_in_index_order(fake, make_backend):
    backend = make_backend([fake.url])
    fake.plan(
        json={
            "model": "fake-model",
            "choices": [
                {"index": 2, "text": "two", "finish_reason": "length"},
                {"index": 0, "text": "zero", "finish_reason": "stop", "stop_reason": "\n"},
                {"index": 1, "text": "one", "finish_reason": "stop"},
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20},
        }
    )
    [generation] = await backend.generate([completion(n=3, temperature=0.7, top_p=0.9, max_tokens=32)])
    body = fake.generation_requests[0].body
    assert body["n"] == 3
    assert body["prompt"] == "Once"
    assert body["model"] == "fake-model"
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.7, 0.9, 32)
    assert "messages" not in body and "logprobs" not in body
    assert [c.text for c in generation.choices] == ["zero", "one", "two"]
    assert [c.finish_reason for c in generation.choices] == ["stop", "stop", "length"]
    assert generation.choices[0].stop_reason == "\n"
    assert generation.choices[0].message is None
    assert (generation.prompt_tokens, generation.completion_tokens) == (11, 9)


async def test_default_n_choices_and_usage(fake, make_backend):
    backend = make_backend([fake.url])
    [generation] = await backend.generate([chat(n=4)])
    assert [c.text for c in generation.choices] == [f"a chat {i}" for i in range(4)]
    assert generation.choices[0].message == {"role": "assistant", "content": "a chat 0"}
    assert (generation.prompt_tokens, generation.completion_tokens) == (7, 12)


async def test_stop_and_seed_kept_when_supported(fake, make_backend):
    backend = make_backend([fake.url], supports_seed=True)
    await backend.generate([chat(stop=("\n\n", "END"), seed=42)])
    body = fake.generation_requests[0].body
    assert body["stop"] == ["\n\n", "END"]
    assert body["seed"] == 42


async def test_seed_dropped_when_unsupported(fake, make_backend):
    backend = make_backend([fake.url], supports_seed=False)
    await backend.generate([chat(stop=("END",), seed=42)])
    body = fake.generation_requests[0].body
    assert "seed" not in body
    assert body["stop"] == ["END"]


async def test_empty_stop_and_no_seed_omitted(fake, make_backend):
    backend = make_backend([fake.url])
    await backend.generate([chat()])
    body = fake.generation_requests[0].body
    assert "stop" not in body and "seed" not in body
    assert body["messages"] == [{"role": "user", "content": "hi"}]


async def test_extra_fields_passed_through(fake, make_backend):
    backend = make_backend([fake.url])
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    await backend.generate([chat(extra=(("tools", tools), ("tool_choice", "auto")))])
    body = fake.generation_requests[0].body
    assert body["tools"] == tools and body["tool_choice"] == "auto"


async def test_chat_logprobs(fake, make_backend):
    backend = make_backend([fake.url])
    fake.plan(
        json={
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Yes."},
                    "finish_reason": "stop",
                    "logprobs": {
                        "content": [
                            {"token": "Yes", "logprob": -0.25, "bytes": [89, 101, 115], "top_logprobs": []},
                            {"token": ".", "logprob": -0.75, "bytes": [46], "top_logprobs": []},
                        ]
                    },
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2},
        }
    )
    [generation] = await backend.generate([chat(logprobs=True)])
    assert fake.generation_requests[0].body["logprobs"] is True
    choice = generation.choices[0]
    assert choice.text == "Yes."
    assert choice.token_logprobs == (-0.25, -0.75)
    assert choice.mean_logprob == pytest.approx(-0.5)
    assert (generation.prompt_tokens, generation.completion_tokens) == (5, 2)


async def test_completion_logprobs(fake, make_backend):
    backend = make_backend([fake.url])
    fake.plan(
        json={
            "choices": [
                {
                    "index": 0,
                    "text": " upon a time",
                    "finish_reason": "length",
                    "logprobs": {
                        "tokens": [" upon", " a", " time"],
                        "token_logprobs": [-1.0, None, -0.5],
                        "top_logprobs": None,
                        "text_offset": [0, 5, 7],
                    },
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3},
        }
    )
    [generation] = await backend.generate([completion(logprobs=True)])
    assert fake.generation_requests[0].body["logprobs"] == 0
    assert generation.choices[0].token_logprobs == (-1.0, -0.5)
    assert generation.choices[0].text == " upon a time"


async def test_no_logprobs_is_none(fake, make_backend):
    backend = make_backend([fake.url])
    [generation] = await backend.generate([completion()])
    assert generation.choices[0].token_logprobs is None
    assert generation.choices[0].mean_logprob is None


async def test_default_model_fetched_once_from_models(fake, make_backend):
    fake.model = "served-model"
    try:
        backend = make_backend([fake.url], default_model=None)
        await backend.generate([chat()])
        await backend.generate([chat()])
        assert [r.path for r in fake.requests].count("/v1/models") == 1
        assert [r.body["model"] for r in fake.generation_requests] == ["served-model"] * 2
        # An explicit model on the request wins.
        await backend.generate([chat(model="other")])
        assert fake.generation_requests[-1].body["model"] == "other"
    finally:
        fake.model = "fake-model"


async def test_url_normalised_and_auth_header_sent(fake, make_backend):
    backend = make_backend([fake.url + "/v1/"], api_key="sk-test", extra_headers={"X-Trace": "t1"})
    assert backend.endpoints[0].url == fake.url
    await backend.generate([chat()])
    headers = fake.generation_requests[0].headers
    assert headers["authorization"] == "Bearer sk-test"
    assert headers["x-trace"] == "t1"


async def test_backend_is_a_generator(fake, make_backend):
    backend = make_backend([fake.url])
    assert isinstance(backend, Generator)
    results = await backend.generate([chat(), completion()])
    assert all(isinstance(g, Generation) for g in results)
    assert [r.path for r in fake.generation_requests] in (
        ["/v1/chat/completions", "/v1/completions"],
        ["/v1/completions", "/v1/chat/completions"],
    )
    assert [g.choices[0].text for g in results] == ["a chat 0", "a text 0"]


# -- streaming --------------------------------------------------------------------------


async def test_stream_yields_raw_sse_bytes(fake, make_backend):
    backend = make_backend([fake.url])
    chunks = [
        b'data: {"choices":[{"index":0,"text":"Hel"}]}\n\n',
        b'data: {"choices":[{"index":0,"text":"lo"}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    fake.plan(stream=chunks, chunk_delay=0.01)
    body = {"model": "fake-model", "prompt": "x", "stream": True}
    async with backend.stream("/v1/completions", body) as stream:
        received = b"".join([chunk async for chunk in stream])
    assert received == b"".join(chunks)
    assert fake.generation_requests[0].body == body
    assert backend.endpoints[0].in_flight == 0


async def test_stream_default_chat_sse(fake, make_backend):
    backend = make_backend([fake.url])
    async with backend.stream("/v1/chat/completions", {"messages": [], "stream": True}) as stream:
        received = b"".join([chunk async for chunk in stream])
    events = [line.removeprefix(b"data: ") for line in received.split(b"\n\n") if line]
    assert events[-1] == b"[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]) == "Hello"


async def test_stream_upstream_400_raises_before_any_bytes(fake, make_backend):
    backend = make_backend([fake.url])
    error = {"error": {"message": "prompt too long", "type": "BadRequestError", "code": 400}}
    fake.plan(400, error)
    received: list[bytes] = []
    with pytest.raises(UpstreamError) as info:
        async with backend.stream("/v1/completions", {"prompt": "x", "stream": True}) as stream:
            async for chunk in stream:  # pragma: no cover - must not be reached
                received.append(chunk)
    assert received == []
    assert info.value.status_code == 400
    assert info.value.body == error
    assert len(fake.generation_requests) == 1
    assert backend.endpoints[0].in_flight == 0


async def test_stream_retries_503_before_first_byte(fake, make_backend):
    backend = make_backend([fake.url])
    fake.plan(503, {"error": {"message": "busy"}})
    async with backend.stream("/v1/completions", {"prompt": "x", "stream": True}) as stream:
        received = b"".join([chunk async for chunk in stream])
    assert received.endswith(b"data: [DONE]\n\n")
    assert len(fake.generation_requests) == 2


async def test_stream_read_timeout(fake, make_backend):
    backend = make_backend([fake.url], read_timeout=0.3)
    fake.plan(delay=5.0, stream=[b"data: [DONE]\n\n"])
    started = time.monotonic()
    with pytest.raises(BackendTimeout):
        async with backend.stream("/v1/completions", {"prompt": "x", "stream": True}):
            pass  # pragma: no cover
    assert time.monotonic() - started < 1.5


# -- readiness --------------------------------------------------------------------------


async def test_ready_reports_each_endpoint(fake, fake_b, make_backend):
    dead = f"http://127.0.0.1:{free_port()}"
    fake_b.health_status = 503
    backend = make_backend([fake.url + "/v1", fake_b.url, dead])
    assert await backend.ready() == {fake.url: True, fake_b.url: False, dead: False}
    assert [r.path for r in fake.requests] == ["/health"]
    assert [r.path for r in fake_b.requests] == ["/health"]


async def test_ready_brings_ejected_endpoint_back(fake, make_backend):
    backend = make_backend([fake.url])
    backend.endpoints[0].mark_down(30)
    assert not backend.endpoints[0].healthy
    assert await backend.ready() == {fake.url: True}
    assert backend.endpoints[0].healthy


async def test_models_listing(fake, make_backend):
    backend = make_backend([fake.url])
    listing = await backend.models()
    assert listing["data"][0]["id"] == "fake-model"


async def test_retry_prefers_healthy_endpoint_over_ejected_one(fake, make_backend):
    """A 429 from the live endpoint must not spend the retry on an endpoint known to be down."""
    dead = f"http://127.0.0.1:{free_port()}"
    backend = make_backend([fake.url, dead], max_retries=1)
    backend.endpoints[1].mark_down(30)
    fake.plan(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "0"})
    [generation] = await backend.generate([chat()])
    assert generation.choices[0].text == "a chat 0"
    assert len(fake.generation_requests) == 2
    assert backend.endpoints[1].failures == 1  # not hit again
