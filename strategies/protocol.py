"""The small contracts strategies depend on: a batched generator and a cache.

Backends (vLLM over HTTP, the embedded engine, scripted test doubles) implement
``Generator``; cache stores (Redis, in-process LRU) implement ``Cache``. Nothing
here knows about HTTP, FastAPI or Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class GenerationRequest:
    """One backend request: chat ``messages`` or a raw ``prompt`` (completion mode).

    ``n`` samples of the same prompt travel as ONE request so the engine prefills
    the shared prompt once.
    """

    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    model: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()
    """Extra body fields passed through verbatim (tools, tool_choice, ...)."""
    allowed_replies: tuple[str, ...] = ()
    """When set, each sample is exactly one of these strings on backends that can constrain
    decoding (vLLM ``structured_outputs.choice``); elsewhere the model answers freely and
    the strategy's parser reads the reply."""

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerationRequest needs exactly one of messages or prompt")
        if self.n < 1:
            raise ValueError("n must be >= 1")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str | None = None
    token_logprobs: tuple[float, ...] | None = None
    """Per-token logprobs of the sampled tokens, when requested."""
    message: dict[str, Any] | None = None
    """The full assistant message in chat mode (keeps tool calls)."""
    stop_reason: str | int | None = None
    """vLLM's extension: the stop string or token that ended the sample (None = EOS)."""

    @property
    def cut_off(self) -> bool:
        """The sample ended at max_tokens, not where the model stopped: its text is unfinished."""
        return self.finish_reason == "length"

    @property
    def blank(self) -> bool:
        """Nothing but whitespace: no answer, whatever a judge would score it."""
        return not self.text.strip()

    @property
    def mean_logprob(self) -> float | None:
        if not self.token_logprobs:
            return None
        return sum(self.token_logprobs) / len(self.token_logprobs)


@dataclass(frozen=True)
class Generation:
    """The answer to one ``GenerationRequest``: ``n`` choices and the usage it cost."""

    choices: tuple[Choice, ...]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str | None = None


@runtime_checkable
class Generator(Protocol):
    """Anything that turns a batch of requests into generations, in order.

    Requests in one batch are independent and are issued concurrently. A request
    that fails for good (after the generator's own retries) raises, and the batch
    with it; with ``return_exceptions=True`` (as in ``asyncio.gather``) its exception
    takes its place in the list instead and the other requests still complete.
    """

    async def generate(self, requests: Sequence[GenerationRequest], *,
                       return_exceptions: bool = False) -> list[Generation | BaseException]: ...


@runtime_checkable
class Cache(Protocol):
    """Store for reusable intermediate results (checklists, critiques, judgments).

    ``kind`` is a namespace with its own TTL; ``key`` is a content hash built with
    ``strategies.cache_key``. Values are JSON-serialisable. A cache never raises on
    store trouble: it answers a miss instead.
    """

    async def get(self, kind: str, key: str) -> Any | None: ...

    async def get_many(self, kind: str, keys: Sequence[str]) -> list[Any | None]: ...

    async def put(self, kind: str, key: str, value: Any, ttl: float | None = None) -> None: ...

    async def get_or_compute(
        self, kind: str, key: str, compute: Callable[[], Awaitable[Any]]
    ) -> tuple[Any, bool]:
        """Return ``(value, was_hit)``; concurrent identical misses compute once."""
        ...


@dataclass
class Usage:
    """Everything a run spent, summed over all internal calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    backend_calls: int = 0
    samples: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    wall_ms: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "backend_calls": self.backend_calls,
            "samples": self.samples,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "wall_ms": round(self.wall_ms, 1),
        }
