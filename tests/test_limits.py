"""Limits that hold (issue 13): one token budget per request, reserved before each call.

The backend here is the worst case for a budget: every prompt costs ``PROMPT_TOKENS``
and every sample runs to its ``max_tokens``. Each strategy that fans out concurrently
(checklist-bon n=8, MCTS parallel=4, self-refine chains=4, a proxy request with n=4)
must spend no more than its budget and say ``budget_limited`` when the budget bound.
"""

from __future__ import annotations

from typing import Sequence

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from service.runtime import Runtime
from strategies import Budget, Task, prompts, run_strategy
from strategies.base import BudgetLedger, BudgetTooSmall, StrategyError
from strategies.protocol import Choice, Generation, GenerationRequest
from tests.scripted import DictCache, ScriptedGenerator, match_template
from tests.servers import ServedApp

PROMPT_TOKENS = 1000
# About 1000 tokens of English for a real tokenizer (~4.5 bytes a token).
INSTRUCTION = "Write a careful, complete answer to the question about the history of bridges. " * 56


def worst_case_reply(request: GenerationRequest, i: int) -> str:
    """Parseable replies for every strategy prompt; the token counts come from MaxLengthGenerator."""
    if match_template(request, prompts.CHECKLIST) is not None:
        return "1. Is it accurate?\n2. Is it complete?\n3. Is it clear?"
    if match_template(request, prompts.JUDGE_ITEM) is not None:
        return " YES" if i % 2 == 0 else " NO"
    if match_template(request, prompts.FEEDBACK) is not None:
        return " 5\nIssues:\n- too short\nVerdict: REVISE"
    if match_template(request, prompts.SCORE) is not None:
        return " 6"
    if match_template(request, prompts.CRITIQUE) is not None:
        return f"critique {i}"
    if match_template(request, prompts.REFINE) is not None:
        return f"refined {i} of {len(request.prompt or str(request.messages))}"
    return f"answer {i}"


class MaxLengthGenerator(ScriptedGenerator):
    """Every prompt costs PROMPT_TOKENS; every sample runs to ``max_tokens`` (finish "length")."""

    def __init__(self) -> None:
        super().__init__(worst_case_reply, delay=0.002)

    def _answer(self, request: GenerationRequest) -> Generation:
        choices = tuple(Choice(self.responder(request, i), finish_reason="length") for i in range(request.n))
        completion = request.n * request.max_tokens
        self.prompt_tokens += PROMPT_TOKENS
        self.completion_tokens += completion
        return Generation(choices, PROMPT_TOKENS, completion, request.model)


TASK = Task(messages=({"role": "user", "content": INSTRUCTION},), max_tokens=512)

SCENARIOS = {
    "checklist-bon n=8": ("checklist-bon", {"n": 8}),
    "mcts parallel=4": ("mcts", {"parallel": 4, "simulations": 8, "branching": 2}),
    "self-refine chains=4": ("self-refine", {"chains": 4, "max_rounds": 3}),
}


@pytest.mark.parametrize("max_tokens", [4000, 20000])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_concurrent_fan_out_spends_within_the_token_budget(scenario: str, max_tokens: int) -> None:
    name, params = SCENARIOS[scenario]
    gen = MaxLengthGenerator()
    result = await run_strategy(name, TASK, gen, params=params, cache=DictCache(),
                                budget=Budget(max_tokens=max_tokens))
    spent = gen.prompt_tokens + gen.completion_tokens
    print(f"\n[budget] {scenario} budget={max_tokens} spent={spent} calls={len(gen.requests)} "
          f"limited={result.budget_limited}")
    assert result.usage.total_tokens == spent  # the reported spend is the true spend
    assert spent <= max_tokens
    assert result.budget_limited  # every scenario wants more than 20000 tokens here
    assert result.answer  # stopped by its budget, it still answers with the best so far


@pytest.mark.parametrize("max_tokens", [4000, 20000])
async def test_concurrent_batches_cannot_fit_against_the_same_remainder(max_tokens: int) -> None:
    """Four batches issued at once, each alone within the budget: the ledger books them one
    after another, so the later ones shrink or are refused instead of all fitting."""
    ledger = BudgetLedger(Budget(max_tokens=max_tokens))
    request = TASK.sample_request(n=8)  # about 5600 tokens at worst
    booked = []
    for _ in range(4):
        try:
            booked.append(ledger.reserve([request]))
        except Exception as exc:  # BudgetExhausted
            booked.append(exc)
    reservations = [b for b in booked if not isinstance(b, Exception)]
    worst = sum(ledger.estimate_prompt_tokens(r) + r.n * r.max_tokens
                for res in reservations for r in res.requests)
    assert worst <= max_tokens and ledger.bound
    assert ledger.estimate_prompt_tokens(request) >= PROMPT_TOKENS  # conservative for English text


async def test_a_budget_too_small_for_anything_is_a_400_naming_the_field() -> None:
    gen = MaxLengthGenerator()
    with pytest.raises(BudgetTooSmall) as err:
        await run_strategy("self-consistency", TASK, gen, params={"k": 4}, budget=Budget(max_tokens=500))
    assert err.value.field == "budget.max_tokens" and isinstance(err.value, StrategyError)
    assert gen.requests == []  # nothing was sent
    with pytest.raises(BudgetTooSmall) as err:
        await run_strategy("self-consistency", TASK, gen, params={"k": 4}, budget=Budget(max_calls=1),
                           ledger=_spent_calls(1))
    assert err.value.field == "budget.max_calls"


def _spent_calls(calls: int) -> BudgetLedger:
    ledger = BudgetLedger(Budget(max_calls=calls))
    ledger.calls = calls
    return ledger


async def test_settle_calibrates_the_prompt_estimate_on_the_backends_counts() -> None:
    """Dense text the first estimate under-counts is counted right from the second batch on."""
    ledger = BudgetLedger(Budget(max_tokens=100_000))
    dense = Task(prompt="7" * 3000, max_tokens=16).sample_request()
    first = ledger.estimate_prompt_tokens(dense)
    reservation = ledger.reserve([dense])
    ledger.settle(reservation, [Generation((Choice("x"),), prompt_tokens=3001, completion_tokens=16)])
    assert first < 3001 <= ledger.estimate_prompt_tokens(dense)
    assert ledger.tokens_spent == 3017 and ledger.tokens_reserved == 0


# -- the proxy: n runs share one budget -----------------------------------------------------


class ScriptedBackend:
    """The slice of HTTPBackend that strategy requests use, over a generator."""

    class config:
        supports_seed = True

    def __init__(self, generator) -> None:
        self.generator = generator

    async def generate(self, requests: Sequence[GenerationRequest], *,
                       return_exceptions: bool = False) -> list[Generation | BaseException]:
        return await self.generator.generate(requests, return_exceptions=return_exceptions)

    async def default_model(self) -> str:
        return "scripted"

    async def aclose(self) -> None:
        pass


@pytest.fixture(scope="module")
def proxy_over_worst_case():
    gen = MaxLengthGenerator()
    settings = Settings(backend_urls="http://unused", model="scripted", max_total_tokens=20_000)
    runtime = Runtime(settings=settings, backend=ScriptedBackend(gen), cache=DictCache())
    with ServedApp(create_app(runtime=runtime), name="ponder-budget") as served:
        yield served, gen


@pytest.mark.parametrize("max_tokens", [4000, 20000, None])
def test_proxy_n_runs_share_one_budget(proxy_over_worst_case, max_tokens: int | None) -> None:
    served, gen = proxy_over_worst_case
    before = gen.prompt_tokens + gen.completion_tokens
    body = {"model": "scripted", "n": 4, "messages": [{"role": "user", "content": INSTRUCTION}],
            "strategy": "self-consistency", "strategy_params": {"k": 8}, "max_tokens": 512}
    if max_tokens is not None:
        body["budget"] = {"max_tokens": max_tokens}
    response = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    reply = response.json()
    spent = gen.prompt_tokens + gen.completion_tokens - before
    budget = max_tokens or 20_000  # no budget: the server's ceiling, for the whole request
    print(f"\n[budget] proxy n=4 budget={budget} spent={spent} "
          f"limited={[r['budget_limited'] for r in reply['ponder']['runs']]}")
    assert reply["usage"]["total_tokens"] == spent <= budget
    assert len(reply["choices"]) == 4
    assert any(r["budget_limited"] for r in reply["ponder"]["runs"])


def test_proxy_budget_too_small_for_any_run_is_400(proxy_over_worst_case) -> None:
    served, _ = proxy_over_worst_case
    body = {"model": "scripted", "n": 2, "messages": [{"role": "user", "content": INSTRUCTION}],
            "strategy": "self-consistency", "budget": {"max_tokens": 100}}
    response = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "budget.max_tokens"


def test_solve_budget_too_small_is_400(proxy_over_worst_case) -> None:
    served, _ = proxy_over_worst_case
    body = {"task": {"prompt": INSTRUCTION}, "strategy": "self-consistency", "budget": {"max_tokens": 100}}
    response = httpx.post(served.url + "/v1/solve", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "budget.max_tokens"
