"""The mock vLLM backend (loadtests/mock_backend.py), served in-process on a loopback port."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from loadtests.mock_backend import MockConfig, classify_prompt, serve_in_background

pytestmark = pytest.mark.asyncio

FAST = dict(ttft_ms=0, tpot_ms=0, prefill_ms_per_1k_tokens=0)
CHAT = [{"role": "user", "content": "What is 6 times 7?"}]


async def post(url: str, path: str, body: dict) -> dict:
    async with httpx.AsyncClient(base_url=url) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def test_n_choices_and_response_shape() -> None:
    async with serve_in_background(MockConfig(**FAST, seed=1)) as url:
        data = await post(url, "/v1/chat/completions", {"model": "mock-model", "messages": CHAT, "n": 4})
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["model"] == "mock-model" and isinstance(data["created"], int)
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    for choice in data["choices"]:
        assert choice["message"]["role"] == "assistant"
        assert "The answer is" in choice["message"]["content"]
        assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    usage = data["usage"]
    assert usage["completion_tokens"] == 4 * 32
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_stop_max_tokens_and_logprobs() -> None:
    async with serve_in_background(MockConfig(**FAST, tokens=10, answer_p=1.0)) as url:
        stopped = await post(url, "/v1/completions", {"prompt": "Q: 6*7?", "stop": ["answer", "zzz"]})
        limited = await post(url, "/v1/completions", {"prompt": "Q: 6*7?", "max_tokens": 3, "logprobs": 0})
        chat = await post(url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 5, "logprobs": True, "top_logprobs": 2})

    choice = stopped["choices"][0]
    assert stopped["object"] == "text_completion"
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == "answer"
    assert "answer" not in choice["text"] and choice["text"].endswith("The ")

    choice = limited["choices"][0]
    assert choice["finish_reason"] == "length" and limited["usage"]["completion_tokens"] == 3
    assert len(choice["text"].split()) == 3
    token_logprobs = choice["logprobs"]["token_logprobs"]
    assert len(token_logprobs) == 3 and all(v < 0 for v in token_logprobs)
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]

    choice = chat["choices"][0]
    assert choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert len(content) == 5 and all(item["logprob"] < 0 for item in content)
    assert "".join(item["token"] for item in content) == choice["message"]["content"]
    assert len(content[0]["top_logprobs"]) == 2


async def test_streaming_done_and_usage() -> None:
    async with serve_in_background(MockConfig(**FAST, tokens=8, answer_p=1.0)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            body = {"messages": CHAT, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                raw = (await response.aread()).decode()
            completion = await client.post(
                "/v1/completions", json={"prompt": "Q?", "stream": True, "max_tokens": 4}
            )
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 16
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert finishes == {0: "stop", 1: "stop"}
    assert all(t.endswith("The answer is 42.") and len(t.split()) == 8 for t in texts.values())

    events = [e for e in completion.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and len(events) == 5  # 4 tokens, no usage chunk
    last = json.loads(events[-2][len("data: "):])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"


async def test_timing_model() -> None:
    config = MockConfig(ttft_ms=50, tpot_ms=5, tokens=20, prefill_ms_per_1k_tokens=0)
    async with serve_in_background(config) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            await client.get("/health")  # connect first
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json={"messages": CHAT})
            elapsed = time.perf_counter() - started
            assert response.json()["usage"]["completion_tokens"] == 20
            assert 0.14 <= elapsed <= 0.5, elapsed

            started = time.perf_counter()
            first = None
            async with client.stream("POST", "/v1/completions", json={"prompt": "Q?", "stream": True}) as stream:
                async for _ in stream.aiter_raw():
                    if first is None:
                        first = time.perf_counter() - started
            elapsed = time.perf_counter() - started
            assert 0.045 <= first <= 0.2, first
            assert 0.14 <= elapsed <= 0.5, elapsed


async def test_batch_model_slows_decoding() -> None:
    # tpot_eff = 10 ms * (1 + 1.0 * (3 - 1)) = 30 ms with n=3 -> ~300 ms instead of ~100 ms.
    config = MockConfig(ttft_ms=0, tpot_ms=10, tokens=11, batch_slope=1.0, prefill_ms_per_1k_tokens=0)
    async with serve_in_background(config) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            await client.get("/health")
            started = time.perf_counter()
            await client.post("/v1/completions", json={"prompt": "Q?", "n": 3})
            elapsed = time.perf_counter() - started
    assert 0.27 <= elapsed <= 0.6, elapsed


async def test_answer_distribution_and_seed() -> None:
    async with serve_in_background(MockConfig(**FAST, answer_p=1.0)) as url:
        results = await asyncio.gather(
            *(post(url, "/v1/chat/completions", {"messages": CHAT, "n": 4}) for _ in range(10))
        )
    texts = [c["message"]["content"] for r in results for c in r["choices"]]
    assert len(texts) == 40 and all("The answer is 42." in t for t in texts)

    async with serve_in_background(MockConfig(**FAST, answer="7", answer_p=0.5)) as url:
        body = {"prompt": "Q?", "n": 8, "seed": 123}
        first, second = await post(url, "/v1/completions", body), await post(url, "/v1/completions", body)
        greedy = await post(url, "/v1/completions", {"prompt": "Q?", "n": 3, "temperature": 0})
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in second["choices"]]
    assert len({t.rsplit(" ", 1)[-1] for t in texts}) > 1  # both the answer and others appear
    assert len({c["text"] for c in greedy["choices"]}) == 1


async def test_auxiliary_prompt_heuristics() -> None:
    assert classify_prompt("Rate the response from 1 to 10. Reply as 'Score: N'.") == "score"
    assert classify_prompt("Is the answer correct? Answer YES or NO.") == "yesno"
    assert classify_prompt("Write a checklist of questions answerable with YES or NO.") == "checklist"
    assert classify_prompt("What is 6 times 7?") == "answer"
    async with serve_in_background(MockConfig(**FAST)) as url:
        score = await post(url, "/v1/completions", {"prompt": "Give the response a score. Score:", "n": 5})
        yesno = await post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Correct? YES or NO"}], "n": 5})
        checklist = await post(url, "/v1/completions", {"prompt": "Write a checklist for judging answers."})
    for choice in score["choices"]:
        label, value = choice["text"].split()
        assert label == "Score:" and 1 <= int(value) <= 10
    assert all(c["message"]["content"] in ("YES", "NO") for c in yesno["choices"])
    lines = checklist["choices"][0]["text"].splitlines()
    assert len(lines) == 4
    assert all(line.startswith(f"{i}. Does the response") and line.endswith("?") for i, line in enumerate(lines, 1))


async def test_models_health_and_errors() -> None:
    async with serve_in_background(MockConfig(**FAST, model="my-model")) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            models = (await client.get("/v1/models")).json()
            health = await client.get("/health")
            bad = await client.post("/v1/completions", content=b"{not json")
            missing = await client.get("/nope")
    assert [m["id"] for m in models["data"]] == ["my-model"]
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert health.status_code == 200
    assert bad.status_code == 400 and "message" in bad.json()["error"]
    assert missing.status_code == 404


async def test_config_from_env_and_cli() -> None:
    from loadtests.mock_backend import config_from_args, parse_args

    env = {"MOCK_TTFT_MS": "0", "MOCK_ANSWER_P": "1", "MOCK_SEED": "5", "MOCK_MODEL": "m"}
    config = MockConfig.from_env(env)
    assert (config.ttft_ms, config.answer_p, config.seed, config.model) == (0.0, 1.0, 5, "m")
    args = parse_args(["--port", "9001", "--tokens", "7", "--answer", "x", "--batch-slope", "0.5"])
    config = config_from_args(args)
    assert (args.port, config.tokens, config.answer, config.batch_slope) == (9001, 7, "x", 0.5)


async def test_stream_disconnect_releases_sequences() -> None:
    config = MockConfig(ttft_ms=0, tpot_ms=20, tokens=50, prefill_ms_per_1k_tokens=0)
    async with serve_in_background(config) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            body = {"messages": CHAT, "n": 3, "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for _ in response.aiter_raw():
                    break
                metrics = (await client.get("/metrics")).text
                assert "mock_active_sequences 3" in metrics
            await asyncio.sleep(0.1)  # the client hung up; the next token notices
            metrics = (await client.get("/metrics")).text
    assert "mock_active_sequences 0" in metrics
