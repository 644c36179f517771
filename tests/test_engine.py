"""The HTTP backend against the real vLLM CPU engine (the embedded model: SmolLM2-135M-Instruct
by default, Gemma 3 270M base with PONDER_EMBEDDED_MODEL=gemma-3-270m). Assertions hold for either."""

from __future__ import annotations

import pytest

from strategies import GenerationRequest

pytestmark = pytest.mark.engine

FEW_SHOT = "2+3=5\n4+4=8\n7+1=8\n6+3=9\n5+2="


async def test_completion_n4_is_one_request_with_distinct_choices(engine_backend):
    request = GenerationRequest(prompt="Once upon a time", n=4, temperature=1.0, max_tokens=16)
    (generation,) = await engine_backend.generate([request])
    texts = [c.text for c in generation.choices]
    assert len(texts) == 4
    assert len(set(texts)) >= 3, texts  # sampled independently, not one answer repeated
    # usage is per request: the shared prompt counted once, completions summed over n
    assert generation.prompt_tokens == pytest.approx(5, abs=2)
    assert 4 <= generation.completion_tokens <= 4 * 16


async def test_few_shot_completion_with_stop_and_bos(engine_backend, engine):
    request = GenerationRequest(prompt=FEW_SHOT, temperature=0.0, max_tokens=8, stop=("\n",))
    (generation,) = await engine_backend.generate([request])
    (choice,) = generation.choices
    assert "\n" not in choice.text
    assert choice.finish_reason == "stop"
    assert choice.stop_reason == "\n"
    # Greedy few-shot arithmetic answers with a number (small models are often wrong).
    assert choice.text.strip().isdigit(), choice.text
    # <bos> on /v1/completions exactly as the recipe says (Gemma is near-random without it).
    from transformers import AutoTokenizer

    from service.model_prep import prepared_model_dir

    recipe = engine.settings.embedded_recipe
    tokenizer = AutoTokenizer.from_pretrained(prepared_model_dir(recipe, engine.settings.model_cache_dir))
    plain = len(tokenizer(FEW_SHOT, add_special_tokens=False).input_ids)
    assert generation.prompt_tokens == plain + int(recipe.add_bos_token)


async def test_chat_completion_and_usage(engine_backend):
    request = GenerationRequest(messages=({"role": "user", "content": "Say hello."},), temperature=0.0, max_tokens=12)
    (generation,) = await engine_backend.generate([request])
    (choice,) = generation.choices
    assert choice.message is not None and choice.message["role"] == "assistant"
    assert generation.prompt_tokens > 5
    assert 0 < generation.completion_tokens <= 12


async def test_chat_answer_ends_at_end_of_turn(engine_backend, engine):
    """The recipe's chat template and EOS ids: an instruction-tuned model's answer stops by
    itself (not at max_tokens), and the end-of-turn token is not part of the text."""
    if not engine.settings.embedded_recipe.instruct:
        pytest.skip("a base model does not end its turns")
    request = GenerationRequest(messages=({"role": "user", "content": "What is the capital of France?"},),
                                temperature=0.0, max_tokens=96)
    (generation,) = await engine_backend.generate([request])
    (choice,) = generation.choices
    assert choice.finish_reason == "stop", choice
    assert choice.text.strip() and "<|im_end|>" not in choice.text and "<|im_start|>" not in choice.text
    assert generation.completion_tokens < 96


async def test_batch_with_seeds_does_not_crash_the_engine(engine_backend):
    """Per-request seeds crash the vLLM CPU engine; the embedded backend drops them."""
    requests = [GenerationRequest(prompt=FEW_SHOT, n=2, temperature=0.8, max_tokens=4, seed=i) for i in range(4)]
    generations = await engine_backend.generate(requests)
    assert [len(g.choices) for g in generations] == [2, 2, 2, 2]
    assert all((await engine_backend.ready()).values())


async def test_logprobs_parsed(engine_backend):
    requests = [
        GenerationRequest(prompt=FEW_SHOT, temperature=0.0, max_tokens=3, logprobs=True),
        GenerationRequest(messages=({"role": "user", "content": "Hi"},), temperature=0.0, max_tokens=3, logprobs=True),
    ]
    for generation in await engine_backend.generate(requests):
        (choice,) = generation.choices
        assert choice.token_logprobs and all(lp <= 0 for lp in choice.token_logprobs)
        assert choice.mean_logprob is not None


async def test_models_and_ready(engine_backend, engine):
    listing = await engine_backend.models()
    assert [m["id"] for m in listing["data"]] == [engine.model_name]
    assert await engine_backend.ready() == {engine.url: True}


async def test_self_consistency_reads_no_answer_into_samples_the_engine_cut_off(engine_backend):
    """``finish_reason: length`` from the real engine reaches the vote: a sample cut off by
    max_tokens states no answer by the last-number fallback, so none of these vote."""
    from strategies import Task, run_strategy

    task = Task(messages=({"role": "user", "content": "Count from 1 to 50, one number per line."},), max_tokens=6)
    result = await run_strategy("self-consistency", task, engine_backend, use_cache=False,
                                params={"k": 3, "temperature": 0.2})
    samples = result.trace["samples"]
    assert [s["cut_off"] for s in samples] == [True] * 3, samples
    assert [s["answer"] for s in samples] == [None] * 3, samples
    assert result.answer == samples[0]["text"]


async def test_self_refine_on_a_few_shot_completion_answers_in_the_task_format(engine_backend):
    """A completion-mode rewrite continues the task's prompt, so the real model's rewrite is an
    answer in the few-shot format, not the blank line it wrote after the bare REFINE prompt."""
    from strategies import Task, run_strategy

    task = Task(prompt=FEW_SHOT, stop=("\n",), max_tokens=8)
    result = await run_strategy("self-refine", task, engine_backend, use_cache=False,
                                params={"max_rounds": 1, "stop_score": 10, "temperature": 0.2})
    chain = result.trace["chains"][0]
    assert result.answer.strip(), chain
    if len(chain) > 1:  # the draft was refined: the rewrite is a short answer, not blank
        assert chain[1]["text"].strip() and len(chain[1]["text"]) < 40, chain


async def test_mcts_refine_searches_a_few_shot_completion_task(engine_backend):
    """MCTSr's rewrites of a few-shot answer are answers in the task's format, so the tree grows.
    After the old rewrite prompt (REFINE's "Improved response:" cue, then the task) the real model
    wrote a blank line first in 79 of 80 tries: every tree stayed a childless root."""
    from strategies import Task, run_strategy

    task = Task(prompt=FEW_SHOT, stop=("\n",), max_tokens=8)
    result = await run_strategy("mcts", task, engine_backend, use_cache=False,
                                params={"mode": "refine", "simulations": 2, "branching": 2, "value_samples": 1})
    children = result.trace["tree"]["children"]
    assert children, result.trace
    assert all(c["state"]["text"].strip() and len(c["state"]["text"]) < 40 for c in children), children
