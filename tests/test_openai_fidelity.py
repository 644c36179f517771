"""OpenAI fidelity of strategy answers on the proxy, read with the official ``openai`` SDK:
tool calls beside null content, streamed tool-call deltas with ``index`` (the SDK's stream
helper merges them by it), and ``logprobs`` refused rather than answered with null."""

from __future__ import annotations

import json

import openai
import pytest

from service.app import create_app
from service.config import Settings
from tests.fake_openai import FakeOpenAI
from tests.servers import ServedApp

CALLS = [
    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
    {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Bergen"}'}},
]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
MESSAGES = [{"role": "user", "content": "Weather in Oslo and Bergen?"}]


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI(name="fake") as served:
        yield served


@pytest.fixture(scope="module")
def client(fake):
    settings = Settings(backend_urls=fake.url, model=fake.model)
    with ServedApp(create_app(settings), name="ponder") as served:
        yield openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(autouse=True)
def fresh(fake):
    fake.reset()


def plan_tool_calls(fake: FakeOpenAI, n: int) -> None:
    """One backend chat answer whose ``n`` choices all call the tools (content null)."""
    choices = [{"index": i, "message": {"role": "assistant", "content": None, "tool_calls": CALLS},
                "finish_reason": "tool_calls"} for i in range(n)]
    fake.plan(json={"id": "x", "object": "chat.completion", "model": fake.model, "choices": choices,
                    "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}})


STRATEGY = {"strategy": "self-consistency", "strategy_params": {"k": 2}}


def test_tool_calls_answer_has_null_content(client, fake) -> None:
    plan_tool_calls(fake, 2)
    reply = client.chat.completions.create(model=fake.model, messages=MESSAGES, tools=TOOLS, extra_body=STRATEGY)
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert [c.function.arguments for c in choice.message.tool_calls] == [c["function"]["arguments"] for c in CALLS]
    assert fake.generation_requests[0].body["tools"] == TOOLS  # the caller's tools reach the samples


def test_streamed_tool_calls_carry_index_for_the_sdk_stream_helper(client, fake) -> None:
    plan_tool_calls(fake, 2)
    with client.chat.completions.stream(model=fake.model, messages=MESSAGES, tools=TOOLS,
                                        extra_body=STRATEGY) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    (choice,) = final.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        (c["id"], c["function"]["name"], c["function"]["arguments"]) for c in CALLS]
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert [(e.index, json.loads(e.arguments)["city"]) for e in done] == [(0, "Oslo"), (1, "Bergen")]
    deltas = [e.chunk.choices[0].delta for e in events if e.type == "chunk" and e.chunk.choices]
    assert deltas[0].role == "assistant" and deltas[0].content is None  # null, not "", beside tool calls
    assert all(call.index is not None for d in deltas for call in d.tool_calls or ())


def test_streamed_text_answer_still_starts_with_empty_content(client, fake) -> None:
    with client.chat.completions.stream(model=fake.model, messages=MESSAGES, extra_body=STRATEGY) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None
    first = next(e.chunk.choices[0].delta for e in events if e.type == "chunk" and e.chunk.choices)
    assert first.role == "assistant" and first.content == ""


@pytest.mark.parametrize("chat, field, value", [
    (True, "logprobs", True), (True, "top_logprobs", 2), (False, "logprobs", 0), (False, "logprobs", 3)])
def test_logprobs_on_a_strategy_request_are_refused_not_nulled(client, fake, chat, field, value) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        if chat:
            client.chat.completions.create(model=fake.model, messages=MESSAGES,
                                           extra_body={**STRATEGY, field: value, "logprobs": True})
        else:
            client.completions.create(model=fake.model, prompt="2+2=", extra_body={**STRATEGY, field: value})
    assert info.value.status_code == 400
    assert info.value.body["param"] in (field, "logprobs") and "logprobs" in info.value.body["message"]
    assert fake.generation_requests == []  # refused before any backend work


def test_logprobs_false_and_pass_through_logprobs_still_work(client, fake) -> None:
    reply = client.chat.completions.create(model=fake.model, messages=MESSAGES, logprobs=False, extra_body=STRATEGY)
    assert reply.choices[0].message.content
    client.chat.completions.create(model=fake.model, messages=MESSAGES, logprobs=True, top_logprobs=1)
    assert fake.generation_requests[-1].body["logprobs"] is True  # no strategy: passed through
