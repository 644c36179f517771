"""Constrained verdicts and ratings (issue 12 §4): strategies ask for one of a fixed set of
replies; backends that support vLLM's ``structured_outputs`` enforce it, others answer freely
and the parsers read the reply."""

from __future__ import annotations

import pytest

from service.backends import BackendConfig, HTTPBackend
from strategies import GenerationRequest, Task, prompts, run_strategy
from tests.scripted import ScriptedGenerator, is_checklist, is_judge, is_score, match_template

JUDGE = GenerationRequest(messages=({"role": "user", "content": "Is it? Answer YES or NO."},), temperature=0.0,
                          max_tokens=3, allowed_replies=prompts.VERDICT_REPLIES)


@pytest.mark.parametrize("supported", [True, False])
async def test_backend_sends_structured_outputs_only_where_supported(supported: bool) -> None:
    backend = HTTPBackend(BackendConfig(urls=["http://127.0.0.1:9"], default_model="m",
                                        supports_structured_outputs=supported))
    try:
        body = await backend.request_body(JUDGE)
        plain = await backend.request_body(GenerationRequest(prompt="x"))
    finally:
        await backend.aclose()
    if supported:
        assert body["structured_outputs"] == {"choice": ["YES", "NO", " YES", " NO"]}
    else:
        assert "structured_outputs" not in body
    assert "structured_outputs" not in plain


async def test_judges_and_raters_ask_for_constrained_replies() -> None:
    task = Task(messages=({"role": "user", "content": "Write a haiku."},))

    def respond(request: GenerationRequest, i: int) -> str:
        if is_checklist(request):
            return " Is it a haiku?\n2. Is it about nature?"
        if match_template(request, prompts.JUDGE_ITEM) is not None:
            return "YES"
        if is_score(request):
            return " 7"
        return f"haiku {i}"

    gen = ScriptedGenerator(respond)
    await run_strategy("checklist-bon", task, gen, params={"n": 2})
    assert gen.requests_where(is_judge) and all(
        r.allowed_replies == prompts.VERDICT_REPLIES for r in gen.requests_where(is_judge))
    assert all(not r.allowed_replies for r in gen.requests_where(is_checklist))

    gen = ScriptedGenerator(respond)
    await run_strategy("best-of-n", task, gen, params={"n": 2})
    assert gen.requests_where(is_score) and all(
        r.allowed_replies == prompts.SCORE_REPLIES for r in gen.requests_where(is_score))
    assert all(prompts.parse_score(reply) is not None for reply in prompts.SCORE_REPLIES)
    assert {prompts.parse_yes_no(reply) for reply in prompts.VERDICT_REPLIES} == {True, False}


@pytest.mark.engine
async def test_engine_enforces_allowed_replies(engine_backend) -> None:
    """The vLLM CPU engine honours structured_outputs.choice: every verdict and rating is one
    of the allowed replies, in chat and completion mode, however small the model."""
    requests = [
        JUDGE,
        GenerationRequest(prompt="Question: Is the sky green?\nAnswer YES or NO.\nAnswer:", temperature=0.0,
                          max_tokens=3, allowed_replies=prompts.VERDICT_REPLIES),
        GenerationRequest(messages=({"role": "user", "content": "Rate 'The cat sat.' from 0 to 10."},),
                          temperature=0.8, n=4, max_tokens=4, allowed_replies=prompts.SCORE_REPLIES),
    ]
    generations = await engine_backend.generate(requests)
    replies = [choice.text for generation in generations for choice in generation.choices]
    assert len(replies) == 6
    assert all(reply in prompts.VERDICT_REPLIES for reply in replies[:2]), replies
    assert all(reply in prompts.SCORE_REPLIES for reply in replies[2:]), replies
