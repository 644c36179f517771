"""On the real vLLM engine: each strategy, given a chat with a system prompt and two earlier
turns, sends helper prompts that hold that whole conversation, and rewrites that keep it.
A recording proxy between ponder and the engine captures what the engine received."""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from strategies import Task, prompts, run_strategy
from tests.servers import ServedApp

pytestmark = pytest.mark.engine

SYSTEM = "You are a terse pirate poet."
FIRST = "Write a poem about the sea."
EARLIER = "The sea is wide, the sea is deep, it sings the sailors all to sleep."
LAST = "Make it shorter."
TASK = Task(messages=({"role": "system", "content": SYSTEM}, {"role": "user", "content": FIRST},
                      {"role": "assistant", "content": EARLIER}, {"role": "user", "content": LAST}),
            max_tokens=16, temperature=0.8)

CASES = {
    "self-refine": ("self-refine", {"max_rounds": 1, "stop_score": 10, "feedback_max_tokens": 16}),
    "checklist-bon": ("checklist-bon", {"n": 2, "max_items": 2, "checklist_max_tokens": 32, "refine": True}),
    "best-of-n": ("best-of-n", {"n": 2}),
    "self-consistency (USC)": ("self-consistency", {"k": 2, "aggregate": "llm"}),
    "mcts refine": ("mcts", {"mode": "refine", "simulations": 1, "branching": 1, "value_samples": 1}),
    "mcts steps": ("mcts", {"mode": "steps", "simulations": 1, "branching": 1, "value_samples": 1,
                            "step_max_tokens": 12}),
}


class Recorder:
    """An ASGI proxy that forwards every request to ``upstream`` and keeps the JSON bodies."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.bodies: list[dict] = []
        self.app = Starlette(routes=[Route("/{path:path}", self.forward, methods=["GET", "POST"])])

    async def forward(self, request: Request) -> Response:
        raw = await request.body()
        if raw and request.url.path.endswith("/completions"):
            self.bodies.append(json.loads(raw))
        async with httpx.AsyncClient(base_url=self.upstream, timeout=300) as client:
            upstream = await client.request(request.method, request.url.path, content=raw,
                                            headers={"content-type": "application/json"})
        return Response(upstream.content, status_code=upstream.status_code,
                        media_type=upstream.headers.get("content-type"))


@pytest.fixture(scope="module")
def recorder(engine):
    recorder = Recorder(engine.url)
    with ServedApp(recorder.app, name="recorder", lifespan="off") as served:
        recorder.url = served.url
        yield recorder


def user_text(message: dict) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content or ())


@pytest.mark.parametrize("case", list(CASES))
async def test_engine_receives_the_whole_conversation_in_every_helper_prompt(case, engine, recorder) -> None:
    from service.backends import BackendConfig, HTTPBackend

    strategy, params = CASES[case]
    backend = HTTPBackend(BackendConfig(urls=[recorder.url], supports_seed=False, default_model=engine.model_name))
    recorder.bodies.clear()
    try:
        result = await run_strategy(strategy, TASK, backend, params=params, use_cache=False)
    finally:
        await backend.aclose()
    assert result.usage.backend_calls == len(recorder.bodies) >= 2
    assert all(body["model"] == engine.model_name and "messages" in body for body in recorder.bodies)
    samples = [b for b in recorder.bodies if b["messages"][:4] == list(TASK.messages)]
    refines = [b for b in recorder.bodies if b not in samples and b["messages"][0]["role"] == "system"]
    helpers = [b for b in recorder.bodies if b not in samples and b not in refines]
    assert samples and helpers, case
    for body in helpers:  # one rendered user message holding the whole conversation
        assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
        text = user_text(body["messages"][0])
        assert text.index(SYSTEM) < text.index(FIRST) < text.index(EARLIER) < text.index(LAST), text
    for body in refines:  # rewrites that can become the answer keep the caller's turns
        assert body["messages"][:3] == list(TASK.messages[:3])
        assert LAST in user_text(body["messages"][-1]) and user_text(body["messages"][-1]).startswith(
            prompts.REFINE.split("\n")[0])
    rewrote = {
        "self-refine": lambda t: len(t["chains"][0]) > 1 or t["chains"][0][-1].get("stop") == "no change",
        "checklist-bon": lambda t: "refine" in t,
        "mcts refine": lambda t: True,  # one simulation: one critique and rewrite
    }.get(case, lambda t: False)(result.trace)
    assert bool(refines) == rewrote, case


async def test_engine_steps_in_chat_mode_grow_past_the_first_step(engine_backend) -> None:
    """The chat template may trim the continued assistant message (dropping the newline
    that ended the step); the next step must still be a real step, not a blank one. (The
    model may itself write a blank line before a step: "\n\n" is one token.)"""
    task = Task(messages=({"role": "system", "content": "Answer with a list, one item per line."},
                          {"role": "user", "content": "Name three animals that live in the sea."}),
                max_tokens=32)
    result = await run_strategy("mcts", task, engine_backend, params={
        "mode": "steps", "simulations": 3, "branching": 2, "max_depth": 3, "value_samples": 1,
        "step_max_tokens": 16, "temperature": 1.0})

    def walk(node: dict, parent_text: str, depth: int) -> None:
        text = node["state"]["text"]
        if depth:
            assert text.startswith(parent_text) and text[len(parent_text):].strip(), "a blank step was kept"
        for child in node["children"]:
            walk(child, text, depth + 1)

    walk(result.trace["tree"], "", 0)
    assert result.trace["tree"]["children"] and result.answer.strip()
