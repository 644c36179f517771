"""A deadline that passes before a run has any answer is a 504 naming ``budget.deadline_s``,
in the OpenAI error schema, on every surface. Before, the run answered 200 with an empty
answer, which reads as the model saying nothing."""

from __future__ import annotations

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from strategies import Budget, Task, run_strategy, strategies
from strategies.base import DeadlineBeforeAnswer
from tests.fake_openai import FakeOpenAI
from tests.scripted import ScriptedGenerator
from tests.servers import ServedApp, assert_openai_error

QUESTION = Task(messages=({"role": "user", "content": "What is the capital of France?"},))


@pytest.mark.parametrize("name", sorted(set(strategies()) - {"verified-bon"}))
async def test_no_answer_by_the_deadline_is_an_error_not_an_empty_answer(name: str) -> None:
    slow = ScriptedGenerator(lambda request, index: "Paris", delay=3)
    with pytest.raises(DeadlineBeforeAnswer) as info:
        await run_strategy(name, QUESTION, slow, budget=Budget(deadline_s=1), use_cache=False)
    assert info.value.status_code == 504 and info.value.field == "budget.deadline_s"
    assert info.value.result.budget_limited


def test_proxy_and_task_api_answer_504() -> None:
    with FakeOpenAI(name="deadline", delay=3) as fake:
        settings = Settings(backend_urls=fake.url, model="fake-model")
        with ServedApp(create_app(settings), name="ponder-deadline") as served, \
                httpx.Client(base_url=served.url, timeout=30) as client:
            messages = [{"role": "user", "content": "Say hi."}]
            proxy = client.post("/v1/chat/completions", json={
                "model": "fake-model", "messages": messages, "strategy": "self-consistency",
                "strategy_params": {"k": 2}, "budget": {"deadline_s": 1}})
            assert_openai_error(proxy, 504, "budget.deadline_s")
            solve = client.post("/v1/solve", json={"task": {"messages": messages}, "strategy": "best-of-n",
                                                   "budget": {"deadline_s": 1}})
            assert_openai_error(solve, 504, "budget.deadline_s")
