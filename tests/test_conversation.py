"""Every helper prompt sees the whole conversation the caller sent; every rewrite that can
become the answer keeps it (system prompt, earlier turns, tools, response_format); every
cache key holds it."""

from __future__ import annotations

import pytest

from strategies import Choice, GenerationRequest, Task, prompts, run_strategy

from tests.scripted import (
    DictCache,
    ScriptedGenerator,
    is_checklist,
    is_critique,
    is_feedback,
    is_judge,
    is_refine,
    is_reward,
    is_score,
    is_select,
    is_step_score,
    is_task_sample,
    request_text,
)

pytestmark = pytest.mark.asyncio

SYSTEM = "You are a terse pirate poet."
FIRST = "Write a poem about the sea."
EARLIER = "The sea is wide, the sea is deep, the sea sings the sailors to sleep."
TOOLS = [{"type": "function", "function": {"name": "rhyme_lookup", "description": "Find rhymes.",
                                           "parameters": {"type": "object", "properties": {}}}}]
RESPONSE_FORMAT = {"type": "json_object"}


def conversation(earlier: str = EARLIER, *, extra: bool = True) -> Task:
    messages = ({"role": "system", "content": SYSTEM}, {"role": "user", "content": FIRST},
                {"role": "assistant", "content": earlier}, {"role": "user", "content": "Make it shorter."})
    fields = (("tools", TOOLS), ("response_format", RESPONSE_FORMAT), ("tool_choice", "auto")) if extra else ()
    return Task(messages=messages, extra=fields)


def respond(request: GenerationRequest, i: int) -> Choice | str:
    if is_checklist(request):
        return " Is the poem shorter than before?\n2. Does it keep the pirate voice?"
    if is_judge(request):
        return " NO" if "pirate voice" in request_text(request).rsplit("Question about", 1)[-1] else " YES"
    if is_feedback(request):
        return " 5\nIssues:\n- still long\nVerdict: REVISE"
    if is_refine(request):
        return "Sea sings; sailors sleep."
    if is_critique(request):
        return "Too long."
    if is_score(request) or is_reward(request) or is_step_score(request):
        return " 6"
    if is_select(request):
        return " 2"
    return Choice(f"The sea sleeps, take {i}.", finish_reason="stop", stop_reason=None)


CASES = {
    "self-refine": {"max_rounds": 1},
    "checklist-bon": {"n": 2, "refine": True},
    "best-of-n": {"n": 2},
    "self-consistency": {"k": 3, "aggregate": "llm"},
    "mcts": {"mode": "refine", "simulations": 1, "branching": 1, "value_samples": 1},
    "mcts-steps": {"mode": "steps", "simulations": 1, "branching": 1, "value_samples": 1},
}


@pytest.mark.parametrize("case", list(CASES))
async def test_helper_prompts_render_the_whole_conversation_and_rewrites_keep_it(case: str) -> None:
    gen = ScriptedGenerator(respond)
    task = conversation()
    result = await run_strategy(case.split("-steps")[0] if case == "mcts-steps" else case, task, gen,
                                params=CASES[case])
    assert result.answer
    helpers = [r for r in gen.requests if not is_task_sample(r) and not is_refine(r)]
    assert helpers, "no helper prompt was sent"
    for request in helpers:
        text = request_text(request)
        assert len(request.messages) == 1, "a helper prompt is one rendered user message"
        for part in (SYSTEM, FIRST, EARLIER, "Make it shorter.", "rhyme_lookup", "json_object"):
            assert part in text, (part, text)
        assert text.index(SYSTEM) < text.index(FIRST) < text.index(EARLIER) < text.index("Make it shorter.")
        assert not dict(request.extra).keys() & {"tools", "response_format", "tool_choice"}
    for request in gen.requests_where(is_refine):  # rewrites that become the answer
        assert request.messages[:3] == task.messages[:3]
        assert request.messages[-1]["role"] == "user" and "Make it shorter." in request_text(request)
        assert dict(request.extra)["tools"] == TOOLS and dict(request.extra)["response_format"] == RESPONSE_FORMAT
    if case in ("self-refine", "checklist-bon", "mcts"):
        assert gen.requests_where(is_refine)
    for request in gen.requests_where(is_task_sample):  # samples of the task itself
        assert request.messages[:4] == task.messages and dict(request.extra)["tools"] == TOOLS


async def test_two_chats_ending_alike_do_not_share_cached_helper_work() -> None:
    cache = DictCache()
    params = {"n": 2}
    gen = ScriptedGenerator(respond)
    await run_strategy("checklist-bon", conversation(), gen, params=params, cache=cache)
    other = ScriptedGenerator(respond)
    result = await run_strategy("checklist-bon", conversation("A long poem about the moon."), other,
                                params=params, cache=cache)
    assert result.usage.cache_hits == 0
    assert len(other.requests_where(is_checklist)) == 1  # written again, not reused
    # The same conversation reuses it; without the caller's tools it is another task.
    again = ScriptedGenerator(respond)
    result = await run_strategy("checklist-bon", conversation(), again, params=params, cache=cache)
    assert not again.requests_where(is_checklist) and result.usage.cache_hits >= 1
    bare = ScriptedGenerator(respond)
    await run_strategy("checklist-bon", conversation(extra=False), bare, params=params, cache=cache)
    assert len(bare.requests_where(is_checklist)) == 1


@pytest.mark.parametrize("name, params", [("self-refine", {"max_rounds": 1}), ("best-of-n", {"n": 2}),
                                          ("self-consistency", {"k": 2, "aggregate": "llm"})])
async def test_every_cache_key_holds_the_conversation(name: str, params: dict) -> None:
    cache = DictCache()
    await run_strategy(name, conversation(), ScriptedGenerator(respond), params=params, cache=cache)
    stored = len(cache.store)
    assert stored
    result = await run_strategy(name, conversation("Another poem."), ScriptedGenerator(respond), params=params,
                                cache=cache)
    assert result.usage.cache_hits == 0 and len(cache.store) > stored


async def test_completion_and_chat_tasks_of_one_text_do_not_share_keys() -> None:
    cache = DictCache()
    params = {"n": 1}
    await run_strategy("checklist-bon", Task(prompt="Make it shorter."), ScriptedGenerator(respond),
                       params=params, cache=cache)
    chat = ScriptedGenerator(respond)
    await run_strategy("checklist-bon", Task(messages=({"role": "user", "content": "Make it shorter."},)), chat,
                       params=params, cache=cache)
    assert len(chat.requests_where(is_checklist)) == 1


async def test_render_conversation() -> None:
    assert prompts.render_conversation(({"role": "user", "content": "Hi"},)) == "Hi"
    assert prompts.render_conversation(None, "2+2=") == "2+2="
    text = conversation().conversation
    assert text.startswith(prompts.CONVERSATION.split("{")[0])
    assert f"System: {SYSTEM}\n\nUser: {FIRST}\n\nAssistant: {EARLIER}\n\nUser: Make it shorter." in text
    assert '"response_format": {"type": "json_object"}' in text
    tool_turns = ({"role": "user", "content": [{"type": "text", "text": "Weather?"}, {"type": "image_url"}]},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "c1", "type": "function",
                                   "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "rain"})
    rendered = prompts.render_conversation(tool_turns)
    assert "User: Weather?\n[image_url]" in rendered
    assert 'Assistant: [tool call] weather({"city": "Oslo"})' in rendered
    assert "Tool: rain" in rendered and "last tool message" in rendered
