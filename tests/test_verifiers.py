"""The verifier implementations (service/verifiers.py) and the spec parsing and caching
rules (strategies/verification.py): pass, fail, malformed spec, timeout, crash in the
checked code, a webhook that hangs or answers junk, the code-execution switch and the
webhook allowlist."""

from __future__ import annotations

import asyncio
import os

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse

from service.verifiers import CheckPool, VerifierRegistry, check_regex, extract_code, extract_json, url_allowed
from strategies.base import RunContext, StrategyError, Task
from strategies.verification import Verdict, Verification, choose, parse_verify

from tests.scripted import DictCache, ScriptedGenerator
from tests.scripted_verifiers import ScriptedVerifier
from tests.servers import ServedApp

@pytest.fixture(scope="module")
async def registry():
    reg = VerifierRegistry(allow_code_execution=True, workers=1, check_timeout_s=20)
    yield reg
    await reg.aclose()


async def verdict(registry: VerifierRegistry, spec: dict, text: str, instruction: str = "task") -> Verdict:
    (verifier,) = registry.build([spec], instruction=instruction).verifiers
    return await verifier.verify(text)


def field_of(raw, registry: VerifierRegistry | None = None) -> str | None:
    with pytest.raises(StrategyError) as caught:
        (registry or VerifierRegistry()).build(raw)
    return caught.value.field


# -- spec parsing -------------------------------------------------------------------------


@pytest.mark.parametrize("raw, field", [
    ({"type": "regex"}, "verify"),
    ([{"type": "nope"}], "verify[0].type"),
    (["regex"], "verify[0].type"),
    ([{"type": "regex", "pattern": "a"}, {"type": "regex"}], "verify[1].pattern"),
    ([{"type": "regex", "pattern": "a", "colour": "red"}], "verify[0].colour"),
    ([{"type": "regex", "pattern": "a", "flags": ["NOPE"]}], "verify[0].flags.0"),
    ([{"type": "json_schema"}], "verify[0].schema"),
    ([{"type": "ifeval", "instructions": []}], "verify[0].instructions"),
    ([{"type": "python_tests", "tests": ["assert (1"]}], "verify[0].tests"),
    ([{"type": "python_tests", "tests": ["assert 1"], "timeout_s": 300}], "verify[0].timeout_s"),
    ([{"type": "webhook", "url": "http://x/y", "timeout_s": 0}], "verify[0].timeout_s"),
    ([{"type": "regex", "pattern": "a"}] * 9, "verify"),
])
def test_malformed_specs_name_the_field(raw, field) -> None:
    with pytest.raises(StrategyError) as caught:
        parse_verify(raw)
    assert caught.value.field == field


@pytest.mark.parametrize("spec, field", [
    ({"type": "json_schema", "schema": {"type": "wat"}}, "verify[0].schema"),
    ({"type": "regex", "pattern": "(unclosed"}, "verify[0].pattern"),
    ({"type": "ifeval", "instructions": [{"id": "punctuation:no_comma"}, {"id": "no:such"}]},
     "verify[0].instructions[1].id"),
    ({"type": "ifeval", "instructions": [{"id": "punctuation:no_comma", "kwargs": {"bogus": 1}}]},
     "verify[0].instructions[0].kwargs"),
])
def test_specs_the_checkers_cannot_run_name_the_field(spec, field) -> None:
    assert field_of([spec]) == field


# -- json_schema ------------------------------------------------------------------------

SCHEMA = {"type": "json_schema", "schema": {"type": "object", "required": ["name", "age"],
                                            "properties": {"age": {"type": "integer"}}}}


@pytest.mark.parametrize("text", ['{"name": "Ada", "age": 36}',
                                  'Here it is:\n```json\n{"name": "Ada", "age": 36}\n```\nDone.',
                                  'The record {"name": "Ada", "age": 36} as asked.'])
async def test_json_schema_passes_the_whole_text_a_fenced_block_or_an_embedded_value(registry, text) -> None:
    assert await verdict(registry, SCHEMA, text) == Verdict(True, 1.0, "")


async def test_json_schema_failures_score_by_error_count_and_say_where(registry) -> None:
    one = await verdict(registry, SCHEMA, '{"name": "Ada", "age": "old"}')
    assert not one.passed and one.score == 0.5 and "at age" in one.feedback and "integer" in one.feedback
    two = await verdict(registry, SCHEMA, '{"age": "old"}')
    assert not two.passed and two.score == 0.25 and "2 error" in two.feedback
    none = await verdict(registry, SCHEMA, "no json at all")
    assert (none.passed, none.score) == (False, 0.0) and "no JSON" in none.feedback


def test_extract_json_prefers_the_whole_text_then_fenced_then_embedded() -> None:
    assert extract_json(" [1, 2] ") == (True, [1, 2])
    assert extract_json("```\n{\"a\": 1}\n```") == (True, {"a": 1})
    assert extract_json("x {bad} then {\"b\": 2}") == (True, {"b": 2})
    assert extract_json("nothing") == (False, None)


# -- regex -------------------------------------------------------------------------------


async def test_regex_search_fullmatch_flags_and_negation(registry) -> None:
    assert (await verdict(registry, {"type": "regex", "pattern": r"\d{3}"}, "code 123 ok")).passed
    miss = await verdict(registry, {"type": "regex", "pattern": r"\d{3}"}, "code 12")
    assert not miss.passed and miss.score == 0.0 and r"/\d{3}/" in miss.feedback
    full = {"type": "regex", "pattern": r"[a-z]+", "mode": "fullmatch"}
    assert (await verdict(registry, full, "abc")).passed and not (await verdict(registry, full, "abc1")).passed
    caseless = {"type": "regex", "pattern": "^yes$", "flags": ["IGNORECASE", "MULTILINE"]}
    assert (await verdict(registry, caseless, "first\nYES\n")).passed
    banned = await verdict(registry, {"type": "regex", "pattern": "sorry", "must_match": False}, "I am sorry")
    assert not banned.passed and "must not contain" in banned.feedback and "'sorry'" in banned.feedback


async def test_regex_catastrophic_backtracking_times_out_instead_of_hanging(registry) -> None:
    slow = await verdict(registry, {"type": "regex", "pattern": r"(\w+\s?)*$"}, "a " * 5000 + "!")
    assert not slow.passed and "took over" in slow.feedback


async def test_a_check_over_the_pool_timeout_fails_uncached() -> None:
    pool = CheckPool(1, 0.05, preload=("regex",))
    try:
        slow = await pool.run(check_regex, r"(\w+\s?)*$", (), "search", True, "a " * 5000 + "!")
        assert not slow.passed and not slow.cacheable and "did not finish within 0.05s" in slow.feedback
    finally:
        pool.shutdown()


# -- ifeval ------------------------------------------------------------------------------

IFEVAL = {"type": "ifeval", "instructions": [{"id": "change_case:english_lowercase"},
                                             {"id": "punctuation:no_comma"}]}


async def test_ifeval_scores_the_share_followed_and_feeds_back_the_instruction(registry) -> None:
    assert await verdict(registry, IFEVAL, "all lower case and no commas here") == Verdict(True, 1.0, "")
    half = await verdict(registry, IFEVAL, "lower case, but a comma")
    assert not half.passed and half.score == 0.5
    assert "commas" in half.feedback and "lowercase" not in half.feedback
    both = await verdict(registry, IFEVAL, "Capital, and comma")
    assert both.score == 0.0 and "lowercase" in both.feedback and "commas" in both.feedback


async def test_ifeval_kwargs_reach_the_checker(registry) -> None:
    spec = {"type": "ifeval", "instructions": [{"id": "length_constraints:number_words",
                                                "kwargs": {"relation": "at least", "num_words": 5}}]}
    assert (await verdict(registry, spec, "one two three four five six")).passed
    assert not (await verdict(registry, spec, "too short")).passed


# -- python_tests ------------------------------------------------------------------------

SQUARE_TESTS = {"type": "python_tests", "tests": ["assert square(2) == 4", "assert square(-3) == 9"]}


def test_code_execution_is_off_by_default() -> None:
    assert field_of([SQUARE_TESTS]) == "verify[0].type"
    with pytest.raises(StrategyError, match="PONDER_ALLOW_CODE_EXECUTION"):
        VerifierRegistry().build([SQUARE_TESTS])


def test_settings_switch_code_execution_and_the_allowlist(monkeypatch) -> None:
    from service.config import Settings

    assert Settings().allow_code_execution is False and Settings().webhook_allowlist_list == []
    monkeypatch.setenv("PONDER_ALLOW_CODE_EXECUTION", "true")
    monkeypatch.setenv("PONDER_WEBHOOK_ALLOWLIST", "http://127.0.0.1:9000/hooks/, https://checks.example/")
    reg = VerifierRegistry.from_settings(Settings())
    assert reg.allow_code_execution and reg.webhook_allowlist == ("http://127.0.0.1:9000/hooks/",
                                                                  "https://checks.example/")
    assert reg.build([SQUARE_TESTS])


async def test_python_tests_pass_and_partial_fail(registry) -> None:
    good = "Here:\n```python\ndef square(x):\n    return x * x\n```\nUse it like `square(2)`."
    assert await verdict(registry, SQUARE_TESTS, good) == Verdict(True, 1.0, "")
    bad = await verdict(registry, SQUARE_TESTS, "```python\ndef square(x):\n    return x * 2\n```")
    assert not bad.passed and bad.score == 0.5 and "1 of 2 tests fail" in bad.feedback
    assert "assert square(-3) == 9" in bad.feedback


@pytest.mark.parametrize("code, says", [
    ("raise ValueError('boom')", "the code raised ValueError: boom"),
    ("import os\nos._exit(3)", "crashed the test process (exit code 3)"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "crashed the test process (signal 11)"),
    ("x = bytearray(600 * 1024 * 1024)", "MemoryError"),
])
async def test_a_crash_in_the_checked_code_fails_the_candidate_with_feedback(registry, code, says) -> None:
    result = await verdict(registry, SQUARE_TESTS, code)
    assert not result.passed and result.score == 0.0 and says in result.feedback


async def test_code_that_never_ends_is_killed_at_the_timeout(registry) -> None:
    spec = {**SQUARE_TESTS, "timeout_s": 0.5}
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await verdict(registry, spec, "while True:\n    pass")
    assert loop.time() - started < 3
    assert not result.passed and not result.cacheable and "within 0.5s" in result.feedback


async def test_the_code_runs_in_an_empty_dir_with_a_scrubbed_environment(registry, monkeypatch) -> None:
    monkeypatch.setenv("H7_SECRET_TOKEN", "do-not-leak")
    tests = ["import os\nassert os.listdir('.') == []", "import os\nassert 'H7_SECRET_TOKEN' not in os.environ",
             "import os\nassert os.getcwd() != " + repr(os.getcwd())]
    result = await verdict(registry, {"type": "python_tests", "tests": tests}, "x = 1")
    assert result == Verdict(True, 1.0, ""), result.feedback


async def test_the_code_has_no_network_where_the_os_allows(registry) -> None:
    if not registry.code.isolates_network:
        pytest.skip("user namespaces are not available here")
    test = "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n    ok = False\n" \
           "except OSError:\n    ok = True\nassert ok"
    assert (await verdict(registry, {"type": "python_tests", "tests": [test]}, "x = 1")).passed


def test_extract_code_takes_the_python_block_else_the_text() -> None:
    assert extract_code("a\n```\nuntagged\n```\n```python\ntagged\n```") == "tagged\n"
    assert extract_code("```\nonly\n```") == "only\n"
    assert extract_code("x = 1") == "x = 1"


# -- webhook -----------------------------------------------------------------------------


def hook_app() -> FastAPI:
    app = FastAPI()

    @app.post("/hooks/check")
    async def check(body: dict):
        ok = "please" in body["candidate"]
        return {"pass": ok, "score": 0.9 if ok else 0.2, "feedback": "" if ok else f"say please ({body['task']})"}

    @app.post("/hooks/junk")
    async def junk():
        return PlainTextResponse("I am not JSON")

    @app.post("/hooks/wrong-shape")
    async def wrong_shape():
        return {"pass": "yes", "score": 3}

    @app.post("/hooks/hang")
    async def hang():
        await asyncio.sleep(30)
        return {"pass": True}

    @app.post("/hooks/error")
    async def error():
        return JSONResponse({"detail": "down"}, status_code=500)

    @app.post("/hooks/redirect")
    async def redirect():
        return RedirectResponse("http://169.254.169.254/latest/meta-data", status_code=307)

    return app


@pytest.fixture(scope="module")
def hooks():
    with ServedApp(hook_app(), name="hooks", lifespan="off") as served:
        yield served


@pytest.fixture(scope="module")
async def hook_registry(hooks):
    reg = VerifierRegistry(webhook_allowlist=[f"{hooks.url}/hooks/"])
    yield reg
    await reg.aclose()


async def test_webhook_pass_and_fail_carry_its_score_and_feedback(hook_registry, hooks) -> None:
    spec = {"type": "webhook", "url": f"{hooks.url}/hooks/check"}
    assert await verdict(hook_registry, spec, "yes please") == Verdict(True, 0.9, "")
    fail = await verdict(hook_registry, spec, "no", instruction="Ask nicely.")
    assert (fail.passed, fail.score, fail.feedback, fail.cacheable) == (False, 0.2, "say please (Ask nicely.)", True)


@pytest.mark.parametrize("path, says", [("junk", "not {"), ("wrong-shape", "not {"), ("error", "HTTP 500"),
                                        ("redirect", "HTTP 307")])
async def test_a_webhook_answering_junk_fails_uncached(hook_registry, hooks, path, says) -> None:
    result = await verdict(hook_registry, {"type": "webhook", "url": f"{hooks.url}/hooks/{path}"}, "x")
    assert not result.passed and not result.cacheable and says in result.feedback


async def test_a_hanging_webhook_times_out(hook_registry, hooks) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await verdict(hook_registry, {"type": "webhook", "url": f"{hooks.url}/hooks/hang", "timeout_s": 0.3},
                           "x")
    assert loop.time() - started < 2
    assert not result.passed and not result.cacheable and "within 0.3s" in result.feedback


async def test_a_dead_webhook_fails_uncached() -> None:
    reg = VerifierRegistry(webhook_allowlist=["http://127.0.0.1:9/"])
    try:
        result = await verdict(reg, {"type": "webhook", "url": "http://127.0.0.1:9/x", "timeout_s": 2}, "x")
        assert not result.passed and not result.cacheable and "could not be reached" in result.feedback
    finally:
        await reg.aclose()


def test_webhook_urls_off_the_allowlist_are_refused(hooks) -> None:
    reg = VerifierRegistry(webhook_allowlist=[f"{hooks.url}/hooks/"])
    for url in ("http://169.254.169.254/latest/meta-data", "http://localhost:6379/", f"{hooks.url}/admin",
                f"{hooks.url}/hooks-evil/x", "file:///etc/passwd"):
        assert field_of([{"type": "webhook", "url": url}], reg) == "verify[0].url", url
    assert field_of([{"type": "webhook", "url": f"{hooks.url}/hooks/check"}], VerifierRegistry()) == "verify[0].url"


@pytest.mark.parametrize("url, allowed", [
    ("https://checks.example/v1/grade", True),
    ("https://checks.example/v1", True),
    ("https://checks.example/v10/grade", False),
    ("http://checks.example/v1/grade", False),
    ("https://checks.example:8443/v1/grade", False),
    ("https://checks.example.evil.net/v1/grade", False),
    ("https://user:pw@checks.example/v1/grade", False),
    ("https://CHECKS.example/v1/x", True),
    ("ftp://checks.example/v1/x", False),
])
def test_url_allowed_needs_scheme_host_port_and_path_prefix(url, allowed) -> None:
    assert url_allowed(url, ["https://checks.example/v1"]) is allowed


# -- Verification: concurrency, dedup, caching ----------------------------------------------


def context(cache=None, *, use_cache: bool = True) -> RunContext:
    return RunContext(ScriptedGenerator(lambda r, i: ""), Task(prompt="p"), cache=cache, use_cache=use_cache)


async def test_verdicts_are_cached_per_spec_and_text_and_identical_texts_checked_once() -> None:
    checker = ScriptedVerifier(lambda t: "good" in t)
    ctx, cache = None, DictCache()
    ctx = context(cache)
    reports = await Verification([checker]).check(ctx, ["good", "bad", "good"])
    assert [r.passed for r in reports] == [True, False, True] and sorted(checker.calls) == ["bad", "good"]
    again = context(cache)
    await Verification([checker]).check(again, ["good", "bad"])
    assert sorted(checker.calls) == ["bad", "good"] and again.usage.cache_hits == 2
    assert cache.kinds() == ["verdict"]
    fresh = context(cache, use_cache=False)
    await Verification([checker]).check(fresh, ["good"])
    assert checker.calls.count("good") == 2


async def test_trouble_verdicts_are_not_cached() -> None:
    flaky = ScriptedVerifier(lambda t: Verdict(False, 0.0, "timed out", cacheable=False))
    cache = DictCache()
    await Verification([flaky]).check(context(cache), ["x"])
    await Verification([flaky]).check(context(cache), ["x"])
    assert flaky.calls == ["x", "x"] and not cache.store


async def test_every_verifier_and_text_pair_runs_concurrently() -> None:
    running, peak = 0, 0

    class Slow(ScriptedVerifier):
        async def verify(self, text: str) -> Verdict:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1
            return Verdict(True, 1.0)

    events = []
    ctx = RunContext(ScriptedGenerator(lambda r, i: ""), Task(prompt="p"), on_event=lambda e, d: events.append(e))
    await Verification([Slow(lambda t: True, name="a"), Slow(lambda t: True, name="b")]).check(ctx, ["x", "y", "z"])
    assert peak == 6 and events == ["verified"]


def test_choose_prefers_full_passes_then_the_strategy_rule_then_reports() -> None:
    from strategies.verification import Report

    def report(*passed: bool, score: float | None = None) -> Report:
        return Report(tuple(f"c{i}" for i in range(len(passed))),
                      tuple(Verdict(p, score if score is not None else float(p)) for p in passed))

    reports = [report(True, False), report(True, True), report(True, True), report(False, False)]
    assert choose(reports) == 1  # earliest full pass
    assert choose(reports, own_key=lambda i: i) == 2  # the strategy's rule among the passing
    nobody = [report(False, False), report(True, False, score=0.4), report(True, False, score=0.6)]
    assert choose(nobody, own_key=lambda i: -i) == 2  # best report, whatever the strategy prefers
    assert choose([report(False), report(False)], own_key=lambda i: i) == 1  # the strategy breaks report ties
