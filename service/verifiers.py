"""Verifier implementations: the checks behind a request's ``verify`` list.

``VerifierRegistry.build(raw, instruction=...)`` parses the specs (``strategies.verification``),
builds one ``Verifier`` per spec and raises ``StrategyError`` (a 400 naming the field) for an
unknown type, a malformed spec, an invalid JSON Schema or regex, an unknown IFEval instruction,
a disabled ``python_tests`` or a webhook URL off the allowlist.

- ``json_schema``: the answer, else its first fenced JSON block, else the first JSON value in
  it, validated with ``jsonschema`` (remote ``$ref`` is never fetched). Score 1 if valid,
  0.5/k with k schema errors, 0 without JSON.
- ``regex``: PyPI ``regex`` with a match timeout (no catastrophic backtracking hang).
- ``ifeval``: each instruction checked with ``if-verifiable`` (strict); score = share followed.
  An instruction whose checker cannot run here (missing nltk data) is left out of the count.
- These three run in a spawn-started process pool (``PONDER_VERIFIER_WORKERS``), so CPU work
  never runs on the event loop; a check over ``PONDER_VERIFIER_TIMEOUT_S`` fails as timed out.
- ``python_tests`` (only with ``PONDER_ALLOW_CODE_EXECUTION=true``): the answer's first
  Python code block (else the whole answer), then each test, in a fresh ``python -I -S``
  process: empty temporary working directory, environment reduced to PATH/HOME/LANG, stdio of
  the code sent to /dev/null, rlimits (CPU seconds, address space ``memory_mb``, 1 MB files,
  64 open files, no core dumps), killed with its process group at ``timeout_s``, and without
  network (``unshare --net --map-root-user``) where the OS allows user namespaces. It is NOT a
  security sandbox: the code runs as the server's user with read access to whatever that user
  can read, and can use the CPU and memory up to the limits. Score = share of tests passing.
- ``webhook``: POST ``{"candidate", "name", "task"}`` with aiohttp to a URL that matches a
  prefix in ``PONDER_WEBHOOK_ALLOWLIST`` (same scheme, host and port; path under the prefix's),
  no redirects followed, ``timeout_s`` for the whole exchange, 64 KiB answer cap. It answers
  ``{"pass": bool, "score"?: 0-1, "feedback"?: str}``; anything else fails the candidate.

A check that times out, crashes or gets no usable webhook answer fails the candidate with
feedback saying so, and that verdict is not cached.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import multiprocessing
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from strategies.base import StrategyError
from strategies.verification import (
    IFEvalSpec, JsonSchemaSpec, PythonTestsSpec, RegexSpec, Verdict, Verification, VerifierSpec, WebhookSpec,
    parse_verify,
)

log = logging.getLogger("ponder.verifiers")

REGEX_MATCH_TIMEOUT_S = 1.0
WEBHOOK_MAX_ANSWER_BYTES = 64 * 1024
FEEDBACK_MAX_CHARS = 500


def _clip(text: str, limit: int = FEEDBACK_MAX_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- checks run in the process pool (module-level: picklable) --------------------------

_FENCED_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_json(text: str) -> tuple[bool, Any]:
    """``(found, value)``: the whole text as JSON, else the first fenced block that parses,
    else the first JSON object or array embedded in the text."""
    decoder = json.JSONDecoder()
    stripped = text.strip()
    try:
        return True, json.loads(stripped)
    except ValueError:
        pass
    for _lang, body in _FENCED_RE.findall(text):
        try:
            return True, json.loads(body.strip())
        except ValueError:
            continue
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _end = decoder.raw_decode(text, match.start())
            return True, value
        except ValueError:
            continue
    return False, None


def check_json_schema(schema: dict[str, Any], text: str) -> tuple[bool, float, str]:
    from jsonschema.validators import validator_for

    found, value = extract_json(text)
    if not found:
        return False, 0.0, "the response holds no JSON value"
    validator = validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))[:20]
    if not errors:
        return True, 1.0, ""
    described = "; ".join(f"at {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:3])
    return False, 0.5 / len(errors), _clip(f"the JSON does not match the schema ({len(errors)} error(s)): {described}")


def check_regex(pattern: str, flags: Sequence[str], mode: str, must_match: bool, text: str) -> tuple[bool, float, str]:
    import regex

    bits = 0
    for flag in flags:
        bits |= getattr(regex, flag)
    compiled = regex.compile(pattern, bits)
    try:
        match = (compiled.fullmatch if mode == "fullmatch" else compiled.search)(text, timeout=REGEX_MATCH_TIMEOUT_S)
    except TimeoutError:
        return False, 0.0, f"matching /{_clip(pattern, 80)}/ took over {REGEX_MATCH_TIMEOUT_S}s"
    if (match is not None) == must_match:
        return True, 1.0, ""
    if must_match:
        how = "match the whole of" if mode == "fullmatch" else "contain a match for"
        return False, 0.0, f"the response must {how} /{_clip(pattern, 200)}/"
    return False, 0.0, f"the response must not contain /{_clip(pattern, 200)}/ (found {_clip(match.group(0), 80)!r})"


def ifeval_instruction_rows(key: Any, prompt: str, instruction_ids: Sequence[str], kwargs: Sequence[dict],
                            response: str) -> list[dict[str, Any]]:
    """Per instruction: ``{"id", "strict", "loose"}`` checked with ``if-verifiable``, or
    ``{"id", "strict": None, "loose": None, "unscored": reason}`` when its checker cannot run
    here. One instruction per call, so a checker that fails spoils only itself."""
    from if_verifiable import IFEvalSample, evaluate_output_for_sample
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    rows: list[dict[str, Any]] = []
    for instruction_id, args in zip(instruction_ids, kwargs):
        row: dict[str, Any] = {"id": instruction_id, "strict": None, "loose": None}
        if instruction_id not in INSTRUCTION_DICT:
            row["unscored"] = "unknown instruction"
            rows.append(row)
            continue
        sample = IFEvalSample(key=key, prompt=prompt, instruction_id_list=[instruction_id], kwargs=[args])
        try:
            results, _ = evaluate_output_for_sample("ifeval", sample, response or "")
        except Exception as exc:  # noqa: BLE001 — a checker crash must not fail the others
            row["unscored"] = _unscored_reason(exc)
            if not isinstance(exc, LookupError):
                log.warning("ifeval checker %s failed: %r", instruction_id, exc)
            rows.append(row)
            continue
        # No result for a known instruction means an empty response (after stripping thinking): a fail.
        row["strict"] = bool(results and results[0].strict_pass)
        row["loose"] = bool(results and results[0].loose_pass)
        rows.append(row)
    return rows


_RESOURCE_RE = re.compile(r"Resource\s+(?:\x1b\[[0-9;]*m)?'?(\w+)")


def _unscored_reason(exc: Exception) -> str:
    if isinstance(exc, LookupError):
        found = _RESOURCE_RE.search(str(exc))
        return f"missing nltk data: {found.group(1)}" if found else "missing nltk data"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")


def ifeval_description(instruction_id: str, kwargs: dict[str, Any]) -> str:
    """The instruction as the model reads it (``if-verifiable``'s description)."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT[instruction_id](instruction_id).build_description(**kwargs)


def check_ifeval(prompt: str, instructions: Sequence[tuple[str, dict]], text: str) -> tuple[bool, float, str]:
    ids = [i for i, _ in instructions]
    args = [dict(a) for _, a in instructions]
    rows = ifeval_instruction_rows("verify", prompt, ids, args, text)
    scored = [(row, a) for row, a in zip(rows, args) if row["strict"] is not None]
    if not scored:
        return True, 1.0, "no instruction could be checked here"
    failed = [(row, a) for row, a in scored if not row["strict"]]
    if not failed:
        return True, 1.0, ""
    notes = "; ".join(_clip(ifeval_description(row["id"], a), 200) for row, a in failed)
    return False, 1 - len(failed) / len(scored), _clip(f"not followed: {notes}", 2 * FEEDBACK_MAX_CHARS)


# -- python_tests: a separate, limited process ----------------------------------------

# Runs inside the child: set hard rlimits, run the code and each test with stdio on /dev/null,
# then report one line prefixed by a nonce on the saved stdout.
_HARNESS = r"""
import json, os, resource, sys
spec = json.loads(sys.stdin.read())
for name, value in spec["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
report = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
def describe(exc):
    return (type(exc).__name__ + (": " + str(exc) if str(exc) else ""))[:300]
ns = {"__name__": "__main__"}
results, failure = [], None
try:
    exec(compile(spec["code"], "<answer>", "exec"), ns)
except BaseException as exc:
    failure = "the code raised " + describe(exc)
for i, test in enumerate(spec["tests"]):
    if failure is not None:
        results.append([False, failure])
        continue
    try:
        exec(compile(test, "<test %d>" % i, "exec"), ns)
        results.append([True, ""])
    except AssertionError as exc:
        results.append([False, "failed: " + test.strip().splitlines()[0][:200] + (" (" + str(exc)[:100] + ")" if str(exc) else "")])
    except BaseException as exc:
        results.append([False, test.strip().splitlines()[0][:200] + " raised " + describe(exc)])
report.write(spec["nonce"] + json.dumps(results) + "\n")
report.flush()
"""

_PYTHON_BLOCK_RE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str:
    """The first ```python (or untagged) fenced block, else the whole text."""
    blocks = _PYTHON_BLOCK_RE.findall(text)
    for lang, body in blocks:
        if lang:
            return body
    return blocks[0][1] if blocks else text


def _netns_works() -> bool:
    try:
        return subprocess.run(["unshare", "--net", "--map-root-user", "true"], capture_output=True,
                              timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


class PythonTestsVerifier:
    def __init__(self, spec: PythonTestsSpec, runner: "CodeRunner") -> None:
        self.spec, self.runner = spec, runner

    async def verify(self, text: str) -> Verdict:
        results = await self.runner.run(extract_code(text), self.spec)
        if isinstance(results, Verdict):
            return results
        passed = [ok for ok, _ in results]
        if all(passed):
            return Verdict(True, 1.0)
        notes = "; ".join(note for ok, note in results if not ok)
        return Verdict(False, sum(passed) / len(passed),
                       _clip(f"{len(passed) - sum(passed)} of {len(passed)} tests fail: {notes}"))


class CodeRunner:
    """Runs answer code against tests in separate processes, at most ``workers`` at once."""

    def __init__(self, workers: int) -> None:
        self._slots = asyncio.Semaphore(workers)
        self._netns: bool | None = None

    @property
    def isolates_network(self) -> bool:
        if self._netns is None:
            self._netns = _netns_works()
            if not self._netns:
                log.warning("python_tests: user namespaces unavailable; answer code runs WITH network access")
        return self._netns

    async def run(self, code: str, spec: PythonTestsSpec) -> list[tuple[bool, str]] | Verdict:
        nonce = secrets.token_hex(16)
        limits = {
            "RLIMIT_CPU": math.ceil(spec.timeout_s) + 1,
            "RLIMIT_AS": spec.memory_mb * 1024 * 1024,
            "RLIMIT_FSIZE": 1024 * 1024,
            "RLIMIT_NOFILE": 64,
            "RLIMIT_CORE": 0,
        }
        payload = json.dumps({"code": code, "tests": spec.tests, "limits": limits, "nonce": nonce}).encode()
        prefix = ["unshare", "--net", "--map-root-user"] if self.isolates_network else []
        async with self._slots:
            with tempfile.TemporaryDirectory(prefix="ponder-tests-") as workdir:
                env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
                proc = await asyncio.create_subprocess_exec(
                    *prefix, sys.executable, "-I", "-S", "-c", _HARNESS, cwd=workdir, env=env,
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                    start_new_session=True)
                try:
                    out, _ = await asyncio.wait_for(proc.communicate(payload), spec.timeout_s)
                except (TimeoutError, asyncio.CancelledError) as exc:
                    _kill_group(proc.pid)
                    await proc.wait()
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    return Verdict(False, 0.0, f"the tests did not finish within {spec.timeout_s}s", cacheable=False)
        for line in out.decode(errors="replace").splitlines():
            if line.startswith(nonce):
                return [(bool(ok), str(note)) for ok, note in json.loads(line[len(nonce):])]
        reason = f"signal {-proc.returncode}" if proc.returncode and proc.returncode < 0 else f"exit code {proc.returncode}"
        return Verdict(False, 0.0, f"the code crashed the test process ({reason}) before the tests finished")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- verifiers over the process pool ---------------------------------------------------


POOL_START_TIMEOUT_S = 120.0
"""Allowance for a fresh check process to import its libraries (``if-verifiable`` pulls in
``datasets``: seconds), awaited before a check's own timeout starts."""


CHECK_MODULES = ("jsonschema", "regex", "if_verifiable")


def _import_checkers(modules: Sequence[str]) -> None:
    """Pool initializer: import the check libraries once per process, before any check."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:  # if-verifiable is optional (the eval extra)
            pass


def _ready() -> bool:
    return True


class CheckPool:
    """CPU-bound checks in a spawn-started process pool, each under ``timeout_s`` once the
    pool's processes have started; a broken pool (a worker killed) is replaced."""

    def __init__(self, workers: int, timeout_s: float, preload: Sequence[str] = CHECK_MODULES) -> None:
        self.workers, self.timeout_s, self.preload = workers, timeout_s, tuple(preload)
        self._pool: ProcessPoolExecutor | None = None
        self._started: list[Any] = []

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_import_checkers, initargs=(self.preload,))
            self._started = [self._pool.submit(_ready) for _ in range(self.workers)]
        return self._pool

    async def run(self, check: Callable[..., tuple[bool, float, str]], *args: Any) -> Verdict:
        loop = asyncio.get_running_loop()
        executor = self._executor()
        try:
            if not all(f.done() for f in self._started):
                await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(f) for f in self._started)),
                                       POOL_START_TIMEOUT_S)
            passed, score, feedback = await asyncio.wait_for(loop.run_in_executor(executor, check, *args),
                                                             self.timeout_s)
        except TimeoutError:
            return Verdict(False, 0.0, f"the check did not finish within {self.timeout_s}s", cacheable=False)
        except BrokenProcessPool:
            if self._pool is executor:
                self._pool = None
                executor.shutdown(wait=False, cancel_futures=True)
            return Verdict(False, 0.0, "the checker process died", cacheable=False)
        return Verdict(passed, score, feedback)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class PooledVerifier:
    """json_schema, regex and ifeval: one pure check function and its arguments."""

    def __init__(self, spec: VerifierSpec, pool: CheckPool, check: Callable[..., tuple[bool, float, str]],
                 *args: Any) -> None:
        self.spec, self._pool, self._check, self._args = spec, pool, check, args

    async def verify(self, text: str) -> Verdict:
        return await self._pool.run(self._check, *self._args, text)


# -- webhook ---------------------------------------------------------------------------


def _origin(url: str) -> tuple[str, str, int | None, str] | None:
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return None
    return parts.scheme, parts.hostname.lower(), port, parts.path or "/"


def url_allowed(url: str, allowlist: Sequence[str]) -> bool:
    """Whether ``url`` falls under an allowlist prefix: same scheme, host and port, and a path
    at or below the prefix's path."""
    target = _origin(url)
    if target is None:
        return False
    for prefix in allowlist:
        allowed = _origin(prefix)
        if allowed is None or allowed[:3] != target[:3]:
            continue
        base = allowed[3]
        if target[3] == base or target[3].startswith(base if base.endswith("/") else base + "/"):
            return True
    return False


class WebhookVerifier:
    def __init__(self, spec: WebhookSpec, registry: "VerifierRegistry", instruction: str) -> None:
        self.spec, self._registry, self._instruction = spec, registry, instruction

    async def verify(self, text: str) -> Verdict:
        import aiohttp

        session = self._registry.http_session()
        body = {"candidate": text, "name": self.spec.label, "task": self._instruction}
        try:
            async with session.post(self.spec.url, json=body, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=self.spec.timeout_s)) as response:
                raw = await response.content.read(WEBHOOK_MAX_ANSWER_BYTES + 1)
                status = response.status
        except TimeoutError:
            return Verdict(False, 0.0, f"the webhook did not answer within {self.spec.timeout_s}s", cacheable=False)
        except aiohttp.ClientError as exc:
            return Verdict(False, 0.0, f"the webhook could not be reached ({type(exc).__name__})", cacheable=False)
        if status != 200:
            return Verdict(False, 0.0, f"the webhook answered HTTP {status}", cacheable=False)
        return _webhook_verdict(raw)


def _webhook_verdict(raw: bytes) -> Verdict:
    junk = Verdict(False, 0.0, 'the webhook answer is not {"pass": bool, "score": 0-1, "feedback": str}',
                   cacheable=False)
    if len(raw) > WEBHOOK_MAX_ANSWER_BYTES:
        return junk
    try:
        answer = json.loads(raw)
    except ValueError:
        return junk
    if not isinstance(answer, dict) or not isinstance(answer.get("pass"), bool):
        return junk
    passed = answer["pass"]
    score = answer.get("score", 1.0 if passed else 0.0)
    feedback = answer.get("feedback", "")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
        return junk
    if not isinstance(feedback, str):
        return junk
    return Verdict(passed, float(score), _clip(feedback))


# -- the registry ----------------------------------------------------------------------


class VerifierRegistry:
    """Builds a request's verifiers; owns the check process pool, the code runner and the
    webhook HTTP session (``aclose`` releases them)."""

    def __init__(self, *, allow_code_execution: bool = False, webhook_allowlist: Sequence[str] = (),
                 workers: int = 2, check_timeout_s: float = 10.0) -> None:
        self.allow_code_execution = allow_code_execution
        self.webhook_allowlist = tuple(webhook_allowlist)
        self.pool = CheckPool(workers, check_timeout_s)
        self.code = CodeRunner(workers)
        self._session = None

    @classmethod
    def from_settings(cls, settings: Any) -> "VerifierRegistry":
        return cls(allow_code_execution=settings.allow_code_execution,
                   webhook_allowlist=settings.webhook_allowlist_list, workers=settings.verifier_workers,
                   check_timeout_s=settings.verifier_timeout_s)

    def http_session(self):
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        return self._session

    def build(self, raw: Any, *, instruction: str = "") -> Verification:
        """The run's ``Verification`` for a raw ``verify`` list (``None``: no checks).
        Raises ``StrategyError`` naming the field for anything this server will not run."""
        return Verification([self._build(spec, i, instruction) for i, spec in enumerate(parse_verify(raw))])

    def _build(self, spec: VerifierSpec, index: int, instruction: str):
        where = f"verify[{index}]"
        if isinstance(spec, JsonSchemaSpec):
            from jsonschema.exceptions import SchemaError
            from jsonschema.validators import validator_for

            try:
                validator_for(spec.json_schema).check_schema(spec.json_schema)
            except SchemaError as exc:
                raise StrategyError(f"{where}.schema is not a valid JSON Schema: {exc.message}",
                                    field=f"{where}.schema") from None
            return PooledVerifier(spec, self.pool, check_json_schema, spec.json_schema)
        if isinstance(spec, RegexSpec):
            import regex

            try:
                regex.compile(spec.pattern)
            except regex.error as exc:
                raise StrategyError(f"{where}.pattern does not compile: {exc}", field=f"{where}.pattern") from None
            return PooledVerifier(spec, self.pool, check_regex, spec.pattern, tuple(spec.flags), spec.mode,
                                  spec.must_match)
        if isinstance(spec, IFEvalSpec):
            try:
                from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
            except ImportError:
                raise StrategyError(f"{where}: ifeval checks need the if-verifiable package, which this server "
                                    "lacks (install ponder[eval])", field=f"{where}.type") from None

            for j, instruction_spec in enumerate(spec.instructions):
                field = f"{where}.instructions[{j}]"
                if instruction_spec.id not in INSTRUCTION_DICT:
                    raise StrategyError(f"{field}.id: unknown IFEval instruction {instruction_spec.id!r}",
                                        field=f"{field}.id")
                try:
                    ifeval_description(instruction_spec.id, instruction_spec.kwargs)
                except (TypeError, ValueError) as exc:
                    raise StrategyError(f"{field}.kwargs do not fit {instruction_spec.id}: {exc}",
                                        field=f"{field}.kwargs") from None
            instructions = tuple((i.id, i.kwargs) for i in spec.instructions)
            return PooledVerifier(spec, self.pool, check_ifeval, spec.prompt or instruction, instructions)
        if isinstance(spec, PythonTestsSpec):
            if not self.allow_code_execution:
                raise StrategyError(f"{where}: python_tests is disabled on this server "
                                    "(PONDER_ALLOW_CODE_EXECUTION is not true)", field=f"{where}.type")
            return PythonTestsVerifier(spec, self.code)
        if isinstance(spec, WebhookSpec):
            if not url_allowed(spec.url, self.webhook_allowlist):
                raise StrategyError(f"{where}.url is not on this server's PONDER_WEBHOOK_ALLOWLIST",
                                    field=f"{where}.url")
            return WebhookVerifier(spec, self, instruction)
        raise AssertionError(f"unhandled verifier spec {type(spec).__name__}")  # parse_verify admits no other

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.pool.shutdown()
