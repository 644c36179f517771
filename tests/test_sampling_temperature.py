"""The temperature of a strategy's samples: its ``temperature`` param when set, else the
request's ``temperature`` (the caller's, or the server's default for the model), else the
strategy's own default. Before, every strategy sampled at its own default whatever the
caller sent, so a caller's ``temperature`` never reached a strategy's samples."""

from __future__ import annotations

import pytest

from strategies import Task, get_strategy, run_strategy
from tests.scripted import ScriptedGenerator

QUESTION = ({"role": "user", "content": "What is 6 times 7?"},)
SAMPLING = ["self-consistency", "best-of-n", "checklist-bon", "self-refine", "mcts", "auto"]


def sample_temperatures(gen: ScriptedGenerator) -> set[float]:
    """Temperatures of the requests that sample the task itself (its own messages)."""
    return {r.temperature for r in gen.requests if r.messages == QUESTION}


def answer(request, index: int) -> str:
    return "YES" if request.messages != QUESTION else f"The answer is {42 + index % 2}."


@pytest.mark.parametrize("strategy", SAMPLING)
async def test_samples_take_the_params_then_the_request_then_the_default(strategy: str) -> None:
    params = {"simulations": 1} if strategy == "mcts" else {}
    default = get_strategy(strategy).Params.default_temperature
    for task_temperature, param_temperature, expected in ((0.3, None, 0.3), (0.3, 1.1, 1.1), (None, None, default)):
        gen = ScriptedGenerator(answer)
        chosen = dict(params, **({} if param_temperature is None else {"temperature": param_temperature}))
        await run_strategy(strategy, Task(messages=QUESTION, temperature=task_temperature), gen, params=chosen,
                           use_cache=False)
        assert sample_temperatures(gen) == {expected}, (strategy, task_temperature, param_temperature)


async def test_none_is_greedy_unless_asked() -> None:
    for task_temperature, expected in ((None, 0.0), (0.5, 0.5)):
        gen = ScriptedGenerator(answer)
        await run_strategy("none", Task(messages=QUESTION, temperature=task_temperature), gen)
        assert sample_temperatures(gen) == {expected}


def test_the_schema_says_unset_and_the_default() -> None:
    schema = get_strategy("best-of-n").Params.model_json_schema()["properties"]["temperature"]
    assert schema["default"] is None and "else 0.8" in schema["description"]


# -- the service's default: PONDER_DEFAULT_TEMPERATURE, else the embedded model's own ------------------------


def test_request_temperature_default() -> None:
    from service.config import Settings

    assert Settings(backend_urls="").request_temperature == 0.2  # embedded SmolLM2: its model card's 0.2
    assert Settings(backend_urls="", embedded_model="gemma-3-270m").request_temperature is None
    assert Settings(backend_urls="http://gpu:8000").request_temperature is None  # each strategy's own
    assert Settings(backend_urls="http://gpu:8000", default_temperature=0.5).request_temperature == 0.5


def test_embedded_engine_applies_the_same_default_to_requests_that_set_none(tmp_path) -> None:
    import json

    from service.config import Settings
    from service.engine import EmbeddedEngine

    command = EmbeddedEngine(Settings(backend_urls="", model_cache_dir=tmp_path)).command(tmp_path)
    flag = command.index("--override-generation-config")
    assert json.loads(command[flag + 1]) == {"temperature": 0.2}
    gemma = EmbeddedEngine(Settings(backend_urls="", embedded_model="gemma-3-270m")).command(tmp_path)
    assert "--override-generation-config" not in gemma


def test_proxy_and_task_api_sample_at_the_callers_then_the_servers_temperature() -> None:
    import httpx

    from service.app import create_app
    from service.config import Settings
    from tests.fake_openai import FakeOpenAI
    from tests.servers import ServedApp

    messages = [{"role": "user", "content": "Pick a number."}]
    with FakeOpenAI(name="temperature") as fake:
        settings = Settings(backend_urls=fake.url, model="fake-model", default_temperature=0.3)
        with ServedApp(create_app(settings), name="ponder-temperature") as served, \
                httpx.Client(base_url=served.url, timeout=30) as client:
            for sent, expected in (({}, 0.3), ({"temperature": 0.9}, 0.9)):
                fake.reset()
                body = {"model": "fake-model", "messages": messages, "strategy": "best-of-n",
                        "strategy_params": {"n": 2}, **sent}
                assert client.post("/v1/chat/completions", json=body).status_code == 200
                assert fake.generation_requests[0].body["temperature"] == expected
                fake.reset()
                solve = {"task": {"messages": messages}, "strategy": "self-consistency", "params": {"k": 2},
                         "sampling": sent}
                assert client.post("/v1/solve", json=solve).status_code == 200
                assert fake.generation_requests[0].body["temperature"] == expected
